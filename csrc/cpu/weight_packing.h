// The dense weight of binary_conv2d as channel bits (channel bits as in pixel_grid.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu_features.h"

namespace sparks {
namespace cpu {

// A dense weight (C_out, C_in/groups, kh, kw), bool or real in {-1, +1} (else ValueError naming
// `weight`), as uint64 (C_out, kh * kw, words): the channel bits of each (output channel, tap).
at::Tensor pack_weight_channels(const at::Tensor& weight, Isa isa);

}  // namespace cpu
}  // namespace sparks
