#include "codebook_packing.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace sparks {
namespace cpu {

PackedCodebook pack_codebook(const at::Tensor& codebook) {
  const int64_t n = codebook.size(0), kw = codebook.size(2);
  const int64_t taps = codebook.size(1) * kw;
  // double holds every integer and float entry exactly enough to test for -1/0/+1. Read in
  // place for the common dtypes (an ATen conversion would cost more than the whole op on a
  // small input), converted by ATen otherwise.
  std::vector<double> values(n * taps);
  switch (codebook.scalar_type()) {
    case at::kByte: case at::kChar: case at::kShort: case at::kInt: case at::kLong:
    case at::kHalf: case at::kBFloat16: case at::kFloat: case at::kDouble:
      AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, codebook.scalar_type(), "pack_codebook", [&] {
        const scalar_t* d = codebook.data_ptr<scalar_t>();
        const int64_t s0 = codebook.stride(0), s1 = codebook.stride(1), s2 = codebook.stride(2);
        for (int64_t k = 0; k < n; ++k)
          for (int64_t t = 0; t < taps; ++t)
            values[k * taps + t] = static_cast<double>(d[k * s0 + t / kw * s1 + t % kw * s2]);
      });
      break;
    default: {
      const at::Tensor converted = codebook.to(at::kDouble).contiguous();
      std::copy(converted.data_ptr<double>(), converted.data_ptr<double>() + n * taps, values.begin());
    }
  }
  const double* v = values.data();
  PackedCodebook packed;
  packed.sign.assign(n, 0);
  packed.mask.assign(n, 0);
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t t = 0; t < taps; ++t) {
      const double x = v[k * taps + t];
      TORCH_CHECK_VALUE(x == 1.0 || x == -1.0 || x == 0.0,
                        "codebook entries must be -1, 0 or +1; codeword ", k, " has ", x);
      if (x != 0.0) packed.mask[k] |= uint64_t{1} << t;
      if (x == 1.0) packed.sign[k] |= uint64_t{1} << t;
      if (x == 0.0) packed.ternary = true;
    }
  }
  return packed;
}

}  // namespace cpu
}  // namespace sparks
