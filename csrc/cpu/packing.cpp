#include "packing.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace sparks {
namespace cpu {

PackedCodebook pack_codebook(const at::Tensor& codebook) {
  const int64_t n = codebook.size(0);
  const int64_t taps = codebook.size(1) * codebook.size(2);
  // double holds every integer and float entry exactly enough to test for -1/0/+1.
  const at::Tensor values = codebook.to(at::kDouble).contiguous().view({n, taps});
  const double* v = values.data_ptr<double>();
  PackedCodebook packed;
  packed.sign.assign(n, 0);
  packed.mask.assign(n, 0);
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t t = 0; t < taps; ++t) {
      const double x = v[k * taps + t];
      TORCH_CHECK_VALUE(x == 1.0 || x == -1.0 || x == 0.0,
                        "codebook entries must be -1, 0 or +1; codeword ", k, " has ", x);
      if (x != 0.0) packed.mask[k] |= uint64_t{1} << t;
      if (x == 1.0) packed.sign[k] |= uint64_t{1} << t;
      if (x == 0.0) packed.ternary = true;
    }
  }
  return packed;
}

std::vector<uint64_t> pack_dense_weight(const at::Tensor& weight) {
  const int64_t kernels = weight.size(0) * weight.size(1);
  const int64_t taps = weight.size(2) * weight.size(3);
  std::vector<uint64_t> sign(kernels, 0);
  if (kernels == 0) return sign;
  if (weight.scalar_type() == at::kBool) {
    const at::Tensor bits = weight.contiguous().view({kernels, taps});
    const bool* b = bits.data_ptr<bool>();
    for (int64_t k = 0; k < kernels; ++k)
      for (int64_t t = 0; t < taps; ++t)
        if (b[k * taps + t]) sign[k] |= uint64_t{1} << t;
    return sign;
  }
  const at::Tensor values = weight.to(at::kDouble).contiguous().view({kernels, taps});
  const double* v = values.data_ptr<double>();
  for (int64_t k = 0; k < kernels; ++k) {
    for (int64_t t = 0; t < taps; ++t) {
      const double x = v[k * taps + t];
      TORCH_CHECK_VALUE(x == 1.0 || x == -1.0, "weight entries must be -1 or +1 (or bool), got ",
                        x, " in kernel (", k / weight.size(1), ", ", k % weight.size(1), ")");
      if (x == 1.0) sign[k] |= uint64_t{1} << t;
    }
  }
  return sign;
}

at::Tensor checked_indices(const at::Tensor& indices, int64_t n) {
  at::Tensor idx = indices.to(at::kInt).contiguous();
  if (indices.numel() > 0) {
    // Compare in int64 so that wide index values cannot wrap into range through the cast.
    const auto minmax = at::aminmax(indices.to(at::kLong));
    const int64_t lo = std::get<0>(minmax).item<int64_t>();
    const int64_t hi = std::get<1>(minmax).item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < n, "indices must lie in [0, n) = [0, ", n,
                      "), got values in [", lo, ", ", hi, "]");
  }
  return idx;
}

at::Tensor binarize_input(const at::Tensor& input) {
  return at::ge(input, 0).contiguous().view(at::kByte);
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
