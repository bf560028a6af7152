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
#include "output_transform.h"
#include "packing.h"

namespace sparks {
namespace cpu {

constexpr int64_t kMaxLutTaps = 10;   // 2^10 rows x 64 bytes = 64 KiB
constexpr int64_t kMaxLutCodewords = 64;
constexpr int64_t kLutRow = 64;       // bytes per LUT row

// Needs at least one input channel per group (its tiling divides by C_in/groups); with none the
// result is the empty sum, which the portable kernel writes.
inline bool lut_kernel_applies(const ConvGeometry& g, int64_t n) {
  return g.taps() <= kMaxLutTaps && n <= kMaxLutCodewords && g.in_per_group() > 0;
}

// One ISA's inner loops.
struct LutKernel {
  // offsets[ci] = kLutRow * (patch id of input channel ci), for ci < cin, from the tap pixels.
  void (*patch_offsets)(const uint64_t* const* pixels, int64_t taps, int64_t cin, uint32_t* offsets);
  // out[r][c] = sum_ci base[offsets[r * ld_off + ci] + idx_t[ci * ld_idx + c]] - bias for
  // r < rows <= max_rows, c < cols <= 64 (out row stride 64); sums fit uint16 per chunk.
  void (*gather)(const uint8_t* base, const uint32_t* offsets, int64_t ld_off, int64_t rows,
                 const uint8_t* idx_t, int64_t ld_idx, int64_t cols, int64_t cin, int64_t taps,
                 int64_t n, int32_t bias, int32_t* out);
  // Border rows for zero padding: for ci < cin, row ci of `scratch` (an offset from base) =
  // average of the rows at offsets[ci] and offsets[ci] | plus; offsets[ci] then points to it.
  void (*border_rows)(uint8_t* base, uint32_t* offsets, int64_t cin, uint32_t plus, uint32_t scratch);
  int64_t max_rows;
};

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
