// The channel-packed, padded input grid of the fast kernels (binary_conv2d, the LUT and tile
// codebook kernels): the ATen-side packer and the bound on how much padding it materialises.
//
// The binarized, padded input of each (n, group) is a (Hp, Wp) grid of pixels, Hp = H + 2 pad_h,
// Wp = W + 2 pad_w; a pixel is `words` 64-bit words whose bit c % 64 of word c / 64 is input
// channel group * C_in/groups + c (set = +1). Bits past C_in/groups are 0. Padding pixels hold
// all ones for pad_value = +1 and zeros otherwise; for pad_value = 0 the kernels also need the
// validity of each tap (tap_pixels below), since zero is neither bit.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "../conv_args.h"
#include "cpu_features.h"
#include "codebook_packing.h"

namespace sparks {
namespace cpu {

struct PackedPixels {
  at::Tensor storage;  // uint64 (N, G, Hp, Wp, words)
  const uint64_t* data;
  int64_t groups, hp, wp, words;
  int64_t stride_h, stride_w;
  // Word offset of each tap's pixel from the window's top-left pixel; taps inside the image by
  // output row and by output column (all ones unless pad_value = 0).
  std::vector<int64_t> tap_offset;
  std::vector<uint64_t> row_valid, col_valid;

  const uint64_t* pixel(int64_t n, int64_t grp, int64_t h, int64_t w) const {
    return data + (((n * groups + grp) * hp + h) * wp + w) * words;
  }
};

// The fast kernels materialise the padded input (PackedPixels; the amx kernel's int8 image).
// Padding far wider than any kernel reaches (10^9, say) would make that image enormous for a
// tiny output, so it is bounded: with `bytes_per_pixel` bytes per pixel of one (image, group),
// the padded image may take at most 4x the unpadded one plus kPaddingSlackBytes. False also when
// a size overflows int64. conv2d then runs the portable kernel, which reads padding on the fly;
// pack_pixels refuses (ValueError naming `padding`).
constexpr int64_t kPaddingSlackBytes = int64_t{1} << 30;
bool padded_image_bounded(const ConvGeometry& g, int64_t bytes_per_pixel);
// ValueError naming `padding` unless padded_image_bounded(g, 8 bytes per 64 channels of a pixel).
void check_padded_image_bounded(const ConvGeometry& g);

// Binarizes (x >= threshold[c] is +1, threshold undefined: 0; NaN is -1, like the reference)
// and packs `input` in any memory format and float dtype. Needs padded_image_bounded(g, 8 * words).
// Parallel over rows; `isa` only picks the instructions. If given,
// `row_done(n, grp, h)` runs on the packing thread right after padded row h of (n, grp) is
// complete, while it is still in cache.
PackedPixels pack_pixels(const at::Tensor& input, const at::Tensor& threshold, const ConvGeometry& g, Isa isa,
                         const std::function<void(const PackedPixels&, int64_t, int64_t, int64_t)>& row_done = {});

// The pixel of each tap of output position (oh, ow), tap t = i * kw + j, and the mask of taps
// that fall inside the image (all taps when pad_value != 0). Returns the mask.
inline uint64_t tap_pixels(const PackedPixels& px, int64_t n, int64_t grp, int64_t oh, int64_t ow,
                           const uint64_t** pixels) {
  const uint64_t* corner = px.pixel(n, grp, oh * px.stride_h, ow * px.stride_w);
  for (size_t t = 0; t < px.tap_offset.size(); ++t) pixels[t] = corner + px.tap_offset[t];
  return px.row_valid[oh] & px.col_valid[ow];
}

}  // namespace cpu
}  // namespace sparks
