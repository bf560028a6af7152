// ATen entry points of the NEON kernels: thin adapters from tensors to the ATen-free cores
// (neon_kernels.h, kernel_core.h). Compiled on aarch64 only; the dispatch in codebook_conv.cpp
// and binary_conv.cpp calls them for the neon family.
#pragma once

#include <ATen/core/Tensor.h>

#include "../conv_args.h"
#include "neon_kernels.h"
#include "output_transform.h"
#include "codebook_packing.h"

namespace sparks {
namespace cpu {

#if SPARKS_NEON_COMPILED
// conv2d through the NEON LUT kernel; the caller has checked core::lut_applies(g, cb.size()).
void codebook_conv_neon(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb, const at::Tensor& indices,
                        const ConvGeometry& g, const OutputTransform& writer);

// binary_conv2d; packed_weight is pack_weight_channels' (C_out, taps, words).
void binary_conv_neon(const at::Tensor& input, const at::Tensor& threshold, const at::Tensor& packed_weight, const ConvGeometry& g,
                      const OutputTransform& writer);
#endif

}  // namespace cpu
}  // namespace sparks
