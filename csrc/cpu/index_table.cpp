#include "index_table.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace sparks {
namespace cpu {
namespace {

// indices in a dtype AT_DISPATCH_INTEGRAL_TYPES covers (the wide unsigned ones become int64).
at::Tensor dispatchable(const at::Tensor& indices) {
  switch (indices.scalar_type()) {
    case at::kByte: case at::kChar: case at::kShort: case at::kInt: case at::kLong:
      return indices;
    default:
      return indices.to(at::kLong);
  }
}

}  // namespace

namespace {

template <typename scalar_t>
bool any_outside(const scalar_t* p, int64_t count, int64_t n) {
  // Compare in the index type (vectorizes); n - 1 may exceed the type's range.
  const scalar_t top = n - 1 >= static_cast<int64_t>(std::numeric_limits<scalar_t>::max())
                           ? std::numeric_limits<scalar_t>::max()
                           : static_cast<scalar_t>(n - 1);
  scalar_t lo = p[0], hi = p[0];  // min / max reductions vectorize
  for (int64_t i = 1; i < count; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  return lo < scalar_t(0) || hi > top;
}

}  // namespace

void check_index_range(const at::Tensor& indices, int64_t n) {
  if (indices.numel() == 0) return;
  // A non-overlapping dense tensor fills [data, data + numel) in some order: scan it flat.
  at::Tensor dense = dispatchable(indices);
  if (!dense.is_non_overlapping_and_dense()) dense = dense.contiguous();
  bool bad = false;
  AT_DISPATCH_INTEGRAL_TYPES(dense.scalar_type(), "check_indices", [&] {
    bad = any_outside(dense.data_ptr<scalar_t>(), dense.numel(), n);
  });
  if (!bad) return;
  const at::Tensor wide = dense.to(at::kLong);
  TORCH_CHECK_VALUE(false, "indices must lie in [0, n) = [0, ", n, "), got values in [",
                    wide.min().item<int64_t>(), ", ", wide.max().item<int64_t>(), "]");
}

at::Tensor index_table(const at::Tensor& indices) {
  if (indices.scalar_type() == at::kByte) {  // stored transposed already: used as it is
    at::Tensor table = indices.t();
    if (table.is_contiguous()) return table;
  }
  const int64_t rows = indices.size(0), cols = indices.size(1);
  const at::Tensor src = dispatchable(indices);
  at::Tensor table = at::empty({cols, rows}, indices.options().dtype(at::kByte));
  uint8_t* out = table.data_ptr<uint8_t>();
  AT_DISPATCH_INTEGRAL_TYPES(src.scalar_type(), "index_table", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    const int64_t s0 = src.stride(0), s1 = src.stride(1);
    constexpr int64_t kBlock = 32;  // transpose in blocks that stay in L1
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock)
        for (int64_t r = r0; r < std::min(rows, r0 + kBlock); ++r)
          for (int64_t c = c0; c < std::min(cols, c0 + kBlock); ++c)
            out[c * rows + r] = static_cast<uint8_t>(in[r * s0 + c * s1]);
  });
  return table;
}

}  // namespace cpu
}  // namespace sparks
