// The LUT codebook kernel (families avx512, avx2 and neon): the ATen entry over the core's driver
// (kernel_core.h's lut_conv); each ISA supplies the inner loops (core::LutOps). See
// lut_avx512.cpp for the instruction-level reasoning.
//
// For kernels of at most core::kLutMaxTaps taps, every possible binary patch x (2^taps of them) has a
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
#include "codebook_packing.h"
#include "kernel_core.h"
#include "output_transform.h"
#include "pixel_grid.h"

namespace sparks {
namespace cpu {

#if defined(__x86_64__)
core::LutOps lut_ops_avx512();
core::LutOps lut_ops_avx2();
#endif

// Runs the LUT kernel with one ISA's inner loops; kernel_choice.cpp has checked that it applies.
// `isa` picks the input packer's instructions.
void codebook_conv_lut(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb,
                       const at::Tensor& indices, const ConvGeometry& g, const OutputTransform& writer,
                       Isa isa, const core::LutOps& ops);

}  // namespace cpu
}  // namespace sparks
