// The channel-packed, padded input grid of the fast kernels (binary_conv2d, the LUT and tile
// codebook kernels): the ATen-side packer and the bound on how much padding it materialises.
//
// The binarized, padded input of each (n, group) is a (Hp, Wp) grid of pixels, Hp = H + 2 pad_h,
// Wp = W + 2 pad_w; a pixel is `words` 64-bit words whose bit c % 64 of word c / 64 is input
// channel group * C_in/groups + c (set = +1). Bits past C_in/groups are 0. Padding pixels hold
// all ones for pad_value = +1 and zeros otherwise; for pad_value = 0 the kernels also need the
// validity of each tap (core::PixelGrid::tap_pixels), since zero is neither bit.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../conv_args.h"
#include "cpu_features.h"
#include "kernel_core.h"

namespace sparks {
namespace cpu {

using core::low_bits;

// The fast kernels materialise the padded input (the pixel grid; the amx kernel's int8 image).
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
// and packs `input` in any memory format and float dtype; ValueError naming `padding` unless
// padded_image_bounded(g, 8 * words). Parallel over rows; `isa` only picks the instructions:
// with AVX-512, float32 input and channels_last bfloat16 are compared straight from the input,
// 16 channels per instruction; otherwise ATen binarizes to channels-last bytes first. row_done
// as in core::pack_grid_rows.
core::PixelGrid pack_pixels(const at::Tensor& input, const at::Tensor& threshold, const ConvGeometry& g, Isa isa,
                            const core::RowDone& row_done = {});

}  // namespace cpu
}  // namespace sparks
