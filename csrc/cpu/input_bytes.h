// The binarized input one byte per value (0 / 1), as the portable kernel reads it, and the
// patch words it builds from it per output row (tap bits as in codebook_packing.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../conv_args.h"

namespace sparks {
namespace cpu {

// Binarized input as contiguous uint8 (N, C, H, W): 1 where input >= threshold[c] (threshold
// undefined: 0, so sign(0) = +1; NaN gives 0, i.e. -1, exactly as the reference's
// where(input >= threshold, 1, -1)).
at::Tensor binarize_input(const at::Tensor& input, const at::Tensor& threshold);

// input >= threshold[c] (threshold undefined: >= 0) as a bool tensor of the input's layout,
// compared in the input's dtype by ATen (NaN is false, i.e. -1).
at::Tensor ge_threshold(const at::Tensor& input, const at::Tensor& threshold);

// Builds the patch words of output row `oh` for one input channel plane (contiguous H x W of
// 0/1 bytes): patch[ow] for ow in [0, out_w). Taps outside the image read `pad_bit`.
void patch_row(const uint8_t* plane, const ConvGeometry& g, int64_t oh, uint64_t* patch);

// Validity words of output row `oh` (bit set = tap inside the image). Only zero padding
// needs them; for pad_value = +-1 every tap is valid.
void valid_row(const ConvGeometry& g, int64_t oh, uint64_t* valid);

}  // namespace cpu
}  // namespace sparks
