// 0/1 channel bytes (non-zero = +1) to channel bits: bit i of a word is byte i. Shared by the
// pixel grid (pixel_grid.cpp) and the dense weight packing (weight_packing.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_features.h"
#include "kernel_core.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparks {
namespace cpu {

#if defined(__x86_64__)
// core::PackBytes with one masked load and one byte test: count <= 64 bytes.
SPARKS_AVX512 inline uint64_t pack_bytes_avx512(const uint8_t* b, int64_t count) {
  const __mmask64 m = count >= 64 ? ~__mmask64{0} : ((__mmask64{1} << count) - 1);
  const __m512i v = _mm512_maskz_loadu_epi8(m, b);
  return _mm512_test_epi8_mask(v, v);
}
#endif

// Packs `cin` contiguous 0/1 bytes into `words` words, with AVX-512 where `isa` allows.
inline void pack_channel_bytes(const uint8_t* bytes, int64_t cin, int64_t words, Isa isa, uint64_t* out) {
  for (int64_t k = 0; k < words; ++k) {
    const int64_t count = std::min<int64_t>(64, cin - 64 * k);
#if defined(__x86_64__)
    if (isa >= Isa::kAvx512) {
      out[k] = pack_bytes_avx512(bytes + 64 * k, count);
      continue;
    }
#endif
    out[k] = core::pack_bytes_portable(bytes + 64 * k, count);
  }
  (void)isa;
}

}  // namespace cpu
}  // namespace sparks
