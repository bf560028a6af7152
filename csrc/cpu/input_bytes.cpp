#include "input_bytes.h"

#include <ATen/ATen.h>

namespace sparks {
namespace cpu {

at::Tensor ge_threshold(const at::Tensor& input, const at::Tensor& threshold) {
  return threshold.defined() ? at::ge(input, threshold.reshape({1, -1, 1, 1})) : at::ge(input, 0);
}

at::Tensor binarize_input(const at::Tensor& input, const at::Tensor& threshold) {
  return ge_threshold(input, threshold).contiguous().view(at::kByte);
}

void patch_row(const uint8_t* plane, const ConvGeometry& g, int64_t oh, uint64_t* patch) {
  const uint64_t pad_bit = g.pad_value > 0 ? 1 : 0;
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    uint64_t word = 0;
    int64_t t = 0;
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
      const bool row_inside = ih >= 0 && ih < g.in_h;
      for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
        const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
        const uint64_t bit =
            (row_inside && iw >= 0 && iw < g.in_w) ? plane[ih * g.in_w + iw] : pad_bit;
        word |= bit << t;
      }
    }
    patch[ow] = word;
  }
}

void valid_row(const ConvGeometry& g, int64_t oh, uint64_t* valid) {
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    uint64_t word = 0;
    int64_t t = 0;
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
      for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
        const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
        if (g.pad_value != 0 || (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w))
          word |= uint64_t{1} << t;
      }
    }
    valid[ow] = word;
  }
}

}  // namespace cpu
}  // namespace sparks
