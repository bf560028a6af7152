// The tile (AMX int8) codebook kernel: decode the indexed weights to int8 once per call, then
// one int8 matrix product per (image, group) on the tile unit. See tile_amx.cpp for
// why this beats the LUT gather on CPUs that have AMX.
#pragma once

#include <ATen/core/Tensor.h>

#include "../conv_args.h"
#include "codebook_packing.h"
#include "index_table.h"
#include "output_transform.h"
#include "pixel_grid.h"

namespace sparks {
namespace cpu {

// Runs the tile kernel; kernel_choice.cpp has checked that the amx family is available and
// the kernel applies.
void codebook_conv_amx(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb,
                       const at::Tensor& indices, const ConvGeometry& g,
                       const OutputTransform& writer);

}  // namespace cpu
}  // namespace sparks
