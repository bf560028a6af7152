// AVX2 inner loops of the LUT codebook kernel (lut_kernel.h): the same algorithm as the
// AVX-512 one with 32-byte vectors and no vpermb. `vpshufb` looks up 16 entries per 128-bit
// lane, so a row of n codewords is ceil(n / 16) sub-tables; each output channel's index selects
// within a sub-table (low 4 bits) and a saturating add pushes the lanes of other sub-tables
// to bit 7, which vpshufb turns into 0. Per 32 output channels and (position, input channel):
// ceil(n / 16) x (vbroadcasti128 + vpshufb + vpaddb).
#include "lut_kernel.h"

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstring>

#define SPARKS_TARGET_AVX2 __attribute__((target("avx2,bmi2,popcnt")))

namespace sparks {
namespace cpu {
namespace {

SPARKS_TARGET_AVX2 void patch_offsets_avx2(const uint64_t* const* pixels, int64_t taps, int64_t cin,
                                           uint32_t* offsets) {
  for (int64_t c0 = 0; c0 < cin; c0 += 8) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t t = 0; t < taps; ++t) {
      const uint64_t byte = (pixels[t][c0 >> 6] >> (c0 & 63)) & 0xff;
      const uint64_t spread = _pdep_u64(byte, 0x0101010101010101ull);  // one 0/1 byte per channel
      const __m256i bits = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(spread)));
      acc = _mm256_or_si256(acc, _mm256_sll_epi32(bits, _mm_cvtsi64_si128(t + 6)));  // * kLutRowBytes
    }
    if (cin - c0 >= 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets + c0), acc);
    } else {
      alignas(32) uint32_t tmp[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc);
      std::memcpy(offsets + c0, tmp, (cin - c0) * sizeof(uint32_t));
    }
  }
}

SPARKS_TARGET_AVX2 void border_rows_avx2(uint8_t* base, uint32_t* offsets, int64_t cin,
                                         uint32_t plus, uint32_t scratch) {
  for (int64_t ci = 0; ci < cin; ++ci, scratch += core::kLutRowBytes) {
    for (int64_t h = 0; h < core::kLutRowBytes; h += 32) {
      const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(base + offsets[ci] + h));
      const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(base + (offsets[ci] | plus) + h));
      _mm256_store_si256(reinterpret_cast<__m256i*>(base + scratch + h), _mm256_avg_epu8(a, b));
    }
    offsets[ci] = scratch;
  }
}

// 32 (or fewer) output channels; out has row stride 64.
template <int R, int S>
SPARKS_TARGET_AVX2 void gather_half(const uint8_t* base, const uint32_t* offsets, int64_t ld_off,
                                    const uint8_t* idx_t, int64_t ld_idx, int64_t cols,
                                    int64_t cin, int64_t taps, int32_t bias, int32_t* out) {
  const int64_t period = 255 / (2 * taps);
  const int64_t chunk = (65535 / (2 * taps)) / period * period;
  const __m256i low_byte = _mm256_set1_epi16(0x00ff);
  const uint32_t* off[R];
  for (int r = 0; r < R; ++r) off[r] = offsets + r * ld_off;
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * 64 + c] = -bias;

  for (int64_t c0 = 0; c0 < cin; c0 += chunk) {
    const int64_t c1 = std::min(cin, c0 + chunk);
    __m256i even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_si256();
    for (int64_t w0 = c0; w0 < c1; w0 += period) {
      const int64_t w1 = std::min(c1, w0 + period);
      __m256i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      for (int64_t ci = w0; ci < w1; ++ci) {
        __m256i idx;
        if (cols == 32) {
          idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx_t + ci * ld_idx));
        } else {  // never read past the indices
          alignas(32) uint8_t tmp[32] = {};
          std::memcpy(tmp, idx_t + ci * ld_idx, cols);
          idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
        }
        __m256i sel[S];
        sel[0] = S == 1 ? idx : _mm256_adds_epu8(idx, _mm256_set1_epi8(0x70));
        for (int s = 1; s < S; ++s)
          sel[s] = _mm256_adds_epu8(_mm256_sub_epi8(idx, _mm256_set1_epi8(static_cast<char>(16 * s))),
                                    _mm256_set1_epi8(0x70));
        for (int r = 0; r < R; ++r) {
          const uint8_t* row = base + off[r][ci];
          for (int s = 0; s < S; ++s) {
            const __m256i table = _mm256_broadcastsi128_si256(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * s)));
            acc[r] = _mm256_add_epi8(acc[r], _mm256_shuffle_epi8(table, sel[s]));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        even[r] = _mm256_add_epi16(even[r], _mm256_and_si256(acc[r], low_byte));
        odd[r] = _mm256_add_epi16(odd[r], _mm256_srli_epi16(acc[r], 8));
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(32) uint16_t e[16], o[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(e), even[r]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(o), odd[r]);
      for (int64_t w = 0; w < 16; ++w) {
        if (2 * w < cols) out[r * 64 + 2 * w] += e[w];
        if (2 * w + 1 < cols) out[r * 64 + 2 * w + 1] += o[w];
      }
    }
  }
}

template <int R>
void gather_rows(const uint8_t* base, const uint32_t* offsets, int64_t ld_off, const uint8_t* idx_t,
                 int64_t ld_idx, int64_t cols, int64_t cin, int64_t taps, int64_t n, int32_t bias,
                 int32_t* out) {
  for (int64_t h = 0; h < cols; h += 32) {
    const int64_t hc = std::min<int64_t>(32, cols - h);
    switch ((n + 15) / 16) {
#define SPARKS_SUB(S)                                                                       \
  case S:                                                                                   \
    gather_half<R, S>(base, offsets, ld_off, idx_t + h, ld_idx, hc, cin, taps, bias, out + h); \
    break;
      SPARKS_SUB(1) SPARKS_SUB(2) SPARKS_SUB(3) SPARKS_SUB(4)
#undef SPARKS_SUB
    }
  }
}

void gather_avx2(const uint8_t* base, const uint32_t* offsets, int64_t ld_off, int64_t rows,
                 const uint8_t* idx_t, int64_t ld_idx, int64_t cols, int64_t cin, int64_t taps,
                 int64_t n, int32_t bias, int32_t* out) {
  switch (rows) {
#define SPARKS_ROWS(R) \
  case R: return gather_rows<R>(base, offsets, ld_off, idx_t, ld_idx, cols, cin, taps, n, bias, out);
    SPARKS_ROWS(1) SPARKS_ROWS(2) SPARKS_ROWS(3) SPARKS_ROWS(4)
#undef SPARKS_ROWS
  }
}

}  // namespace

core::LutOps lut_ops_avx2() { return {&patch_offsets_avx2, &gather_avx2, &border_rows_avx2, 4}; }

}  // namespace cpu
}  // namespace sparks
#endif
