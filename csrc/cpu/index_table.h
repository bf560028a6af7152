// The codebook indices: their range check and the byte table the fast kernels read.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparks {
namespace cpu {

// Checks that every index lies in [0, n) (ValueError naming `indices`) without converting.
void check_index_range(const at::Tensor& indices, int64_t n);

// Range-checked (C_out, C_in/groups) indices as a uint8 (C_in/groups, C_out) row-major table:
// one row of output channels per input channel. Free for uint8 indices stored that way
// (indices.t() contiguous), as a layer can keep them.
at::Tensor index_table(const at::Tensor& indices);

}  // namespace cpu
}  // namespace sparks
