// The fast codebook kernel (AVX-512 and AVX2): shared plan and driver; the ISA files supply the
// two inner loops. See codebook_conv_avx512.cpp for the instruction-level reasoning.
//
// For kernels of at most kMaxLutTaps taps, every possible binary patch x (2^taps of them) has a
// precomputed response row: LUT[x][k] = r_k(x) + taps for codeword k < n <= 64, one 64-byte row,
// so that values are unsigned in [0, 2 * taps]. Per (position, input channel) the kernel only
// computes the patch id x from the channel-packed input; each block of 64 output channels then
// gathers LUT[x][indices[co, ci]] with one byte permute and sums over ci.
//
// Zero padding: a tap on the padding is 0, neither bit. The response is linear in the input,
// so r(x with outside taps 0) = (r(x with them +1) + r(x with them -1)) / 2; the kernel builds
// such border rows with one byte average (exact: both rows differ by an even number) into a
// scratch area next to the LUT.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../conv_args.h"
#include "cpu_features.h"
#include "kernel_core.h"
#include "output_transform.h"
#include "codebook_packing.h"
#include "pixel_grid.h"

namespace sparks {
namespace cpu {

// The limits, the uint32-offset rule and the inner-loop table are the ATen-free core's
// (kernel_core.h), shared with the NEON family.
constexpr int64_t kMaxLutTaps = core::kLutMaxTaps;   // 2^10 rows x 64 bytes = 64 KiB
constexpr int64_t kMaxLutCodewords = core::kLutMaxCodewords;
constexpr int64_t kLutRow = core::kLutRowBytes;      // bytes per LUT row
using core::kMaxLutOffsetBytes;

// Needs at least one input channel per group (its tiling divides by C_in/groups); with none the
// result is the empty sum, which the portable kernel writes. Offsets must fit uint32
// (core::lut_offsets_fit), and padding must be small enough to materialise (padded_image_bounded): the
// portable kernel computes every other case. The same conditions hold for the NEON family.
inline bool lut_kernel_applies(const ConvGeometry& g, int64_t n) {
  return core::lut_applies(g, n) && padded_image_bounded(g, (g.in_per_group() + 63) / 64 * 8);
}

using LutKernel = core::LutOps;

#if defined(__x86_64__)
LutKernel lut_kernel_avx512();
LutKernel lut_kernel_avx2();
#endif

// Runs the LUT kernel; the caller has checked lut_kernel_applies.
void codebook_conv_lut(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb,
                       const at::Tensor& indices, const ConvGeometry& g,
                       const OutputTransform& writer, Isa isa);

}  // namespace cpu
}  // namespace sparks
