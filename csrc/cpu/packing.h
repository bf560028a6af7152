// Bit-packing shared by the CPU kernels.
//
// Bit convention (the same in every kernel and in sparks_ext/packing.py): tap t = i * kw + j of
// a kh x kw window is bit t of a 64-bit word; a set bit means +1. A codeword (or a dense
// kernel) is a pair (sign, mask): mask bit set = non-zero tap. Binary codewords have a full
// mask; ternary / signed-binary ones clear the mask at their zeros. For an input patch p with
// validity mask v (taps that fall on zero padding are invalid), the response is
//     sum_t x_t * w_t = popcount(mask & v) - 2 * popcount(mask & v & (p ^ sign)),
// because each valid non-zero tap contributes +1 when the signs agree and -1 when they differ.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "../conv_args.h"
#include "cpu_features.h"

namespace sparks {
namespace cpu {

inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1); }

struct PackedCodebook {
  std::vector<uint64_t> sign;  // (n,)
  std::vector<uint64_t> mask;  // (n,)
  bool ternary = false;        // some codeword has a zero entry
  int64_t size() const { return static_cast<int64_t>(sign.size()); }
};

// Packs a (n, kh, kw) codebook; throws ValueError naming `codebook` if an entry is not in
// {-1, 0, +1}.
PackedCodebook pack_codebook(const at::Tensor& codebook);

// Binarized input as contiguous uint8 (N, C, H, W): 1 where input >= threshold[c] (threshold
// undefined: 0, so sign(0) = +1; NaN gives 0, i.e. -1, exactly as the reference's
// where(input >= threshold, 1, -1)).
at::Tensor binarize_input(const at::Tensor& input, const at::Tensor& threshold);

// Builds the patch words of output row `oh` for one input channel plane (contiguous H x W of
// 0/1 bytes): patch[ow] for ow in [0, out_w). Taps outside the image read `pad_bit`.
void patch_row(const uint8_t* plane, const ConvGeometry& g, int64_t oh, uint64_t* patch);

// Validity words of output row `oh` (bit set = tap inside the image). Only zero padding
// needs them; for pad_value = +-1 every tap is valid.
void valid_row(const ConvGeometry& g, int64_t oh, uint64_t* valid);

// ---------------------------------------------------------------------------------------------
// Channel-packed layout used by the fast kernels (binary_conv2d and the LUT codebook kernel).
//
// The binarized, padded input of each (n, group) is a (Hp, Wp) grid of pixels, Hp = H + 2 pad_h,
// Wp = W + 2 pad_w; a pixel is `words` 64-bit words whose bit c % 64 of word c / 64 is input
// channel group * C_in/groups + c (set = +1). Bits past C_in/groups are 0. Padding pixels hold
// all ones for pad_value = +1 and zeros otherwise; for pad_value = 0 the kernels also need the
// validity of each tap (tap_pixels below), since zero is neither bit.
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

// Binarizes (x >= threshold[c] is +1, threshold undefined: 0; NaN is -1, like the reference)
// and packs `input` in any memory format and float dtype. Parallel over rows; `isa` only picks the instructions. If given,
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

// A dense weight (C_out, C_in/groups, kh, kw), bool or real in {-1, +1} (else ValueError naming
// `weight`), as uint64 (C_out, kh * kw, words): the channel bits of each (output channel, tap).
at::Tensor pack_weight_channels(const at::Tensor& weight, Isa isa);

// Checks that every index lies in [0, n) (ValueError naming `indices`) without converting.
void check_index_range(const at::Tensor& indices, int64_t n);

// Range-checked (C_out, C_in/groups) indices as a uint8 (C_in/groups, C_out) row-major table:
// one row of output channels per input channel. Free for uint8 indices stored that way
// (indices.t() contiguous), as a layer can keep them.
at::Tensor index_table(const at::Tensor& indices);

}  // namespace cpu
}  // namespace sparks
