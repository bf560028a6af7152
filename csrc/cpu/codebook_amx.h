// The tile (AMX int8) codebook kernel: decode the indexed weights to int8 once per call, then
// one int8 matrix product per (image, group) on the tile unit. See codebook_conv_amx.cpp for
// why this beats the LUT gather on CPUs that have AMX.
#pragma once

#include <ATen/core/Tensor.h>

#include "../conv_args.h"
#include "output_transform.h"
#include "codebook_packing.h"
#include "index_table.h"
#include "pixel_grid.h"

namespace sparks {
namespace cpu {

// The decode permutes a 64-entry table per tap, so n <= 64 codewords. Any kernel size, stride,
// dilation and groups; padding small enough to materialise in the int8 image
// (padded_image_bounded, 4 channels per byte group rounded up).
inline bool amx_kernel_applies(const ConvGeometry& g, int64_t n) {
  return n <= 64 && g.in_per_group() > 0 &&
         padded_image_bounded(g, (g.in_per_group() + 3) / 4 * 4);
}

// Whether the tile kernel is the faster choice (SPARKS_CPU_KERNEL=auto): its 16 x 64 x 16 tiles
// need enough channels; thin layers (depthwise, C_in/groups < 16, a 16 x 16 layer) run the LUT
// kernel faster (benchmarks/RESULTS.md).
inline bool amx_kernel_pays(const ConvGeometry& g) {
  return g.in_per_group() >= 16 && g.in_per_group() * g.out_per_group() >= 1024;
}

// Runs the tile kernel; the caller has checked that the amx family is available and
// amx_kernel_applies.
void codebook_conv_amx(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb,
                       const at::Tensor& indices, const ConvGeometry& g,
                       const OutputTransform& writer);

}  // namespace cpu
}  // namespace sparks
