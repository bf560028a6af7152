// The codebook as bits, and the tap-bit convention of every CPU kernel.
//
// Bit convention (the same in every kernel and in sparks_ext/packing.py): tap t = i * kw + j of
// a kh x kw window is bit t of a 64-bit word; a set bit means +1. A codeword (or a dense
// kernel) is a pair (sign, mask): mask bit set = non-zero tap. Binary codewords have a full
// mask; ternary / signed-binary ones clear the mask at their zeros. For an input patch p with
// validity mask v (taps that fall on zero padding are invalid), the response is
//     sum_t x_t * w_t = popcount(mask & v) - 2 * popcount(mask & v & (p ^ sign)),
// because each valid non-zero tap contributes +1 when the signs agree and -1 when they differ.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace sparks {
namespace cpu {

struct PackedCodebook {
  std::vector<uint64_t> sign;  // (n,)
  std::vector<uint64_t> mask;  // (n,)
  bool ternary = false;        // some codeword has a zero entry
  int64_t size() const { return static_cast<int64_t>(sign.size()); }
};

// Packs a (n, kh, kw) codebook; throws ValueError naming `codebook` if an entry is not in
// {-1, 0, +1}.
PackedCodebook pack_codebook(const at::Tensor& codebook);

}  // namespace cpu
}  // namespace sparks
