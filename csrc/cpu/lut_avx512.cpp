// AVX-512 (BW + VBMI) inner loops of the LUT codebook kernel (lut_kernel.h).
//
// Instruction-level reasoning. The work of a layer is one term per (position, input channel,
// output channel): the response of the patch to the codeword that output channel names.
//  - With n <= 64 codewords the n responses of one (position, input channel) are one 64-byte
//    LUT row, u = r + taps in [0, 2 taps]. `vpermb zmm, zidx, [row]` gathers the responses of 64
//    output channels at once (zidx = the 64 indices of those channels for that input channel),
//    reading the row straight from L1; `vpaddb` accumulates. That is 64 terms per vpermb, and
//    vpermb issues once per cycle (port 5), so the loop runs near 64 terms per cycle and core;
//    a 3x3 term stands for 9 binary MACs, i.e. ~576 binary MACs per cycle (vpopcntq: 512).
//  - uint8 lanes hold floor(255 / (2 taps)) terms (14 for 3x3); then each accumulator is
//    widened into two uint16 accumulators (even / odd channels: vpandd 0x00ff and vpsrlw 8,
//    both off port 5), and uint16 sums are flushed to int32 every floor(65535 / (2 taps)) terms.
//  - A register tile of 8 positions x 64 channels (8 uint8 + 16 uint16 accumulators) reuses each
//    index vector 8 times; the scalar work per term is one 32-bit offset load (its address).
//  - Patch ids of 64 input channels at once: vpermb + gf2p8affineqb transpose the (tap x channel)
//    bit matrix (patch_offsets_avx512), ~20 instructions per position and 64 channels.
#include "lut_kernel.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define SPARKS_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,gfni,bmi2")))

namespace sparks {
namespace cpu {
namespace {

// Patch ids of 64 channels at once: a bit-matrix transpose of the (tap x channel) bits. vpermb
// puts, in qword j, byte j of taps 7..0; gf2p8affineqb with one-hot data bytes then reads each
// 8x8 bit matrix by columns, giving per channel the byte of its first 8 tap bits. Taps 8 and 9
// are added with masked adds.
SPARKS_TARGET_AVX512 void patch_offsets_avx512(const uint64_t* const* pixels, int64_t taps,
                                               int64_t cin, uint32_t* offsets) {
  alignas(64) static const uint8_t kTranspose[64] = {
      56, 48, 40, 32, 24, 16, 8, 0, 57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2,
      59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36, 28, 20, 12, 4, 61, 53, 45, 37, 29, 21, 13, 5,
      62, 54, 46, 38, 30, 22, 14, 6, 63, 55, 47, 39, 31, 23, 15, 7};
  const __m512i transpose = _mm512_load_si512(kTranspose);
  const __m512i one_hot = _mm512_set1_epi64(0x8040201008040201ll);
  const int64_t low_taps = std::min<int64_t>(taps, 8);
  for (int64_t k = 0; k * 64 < cin; ++k) {
    uint64_t w[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = 0; t < low_taps; ++t) w[t] = pixels[t][k];
    const __m512i x = _mm512_set_epi64(w[7], w[6], w[5], w[4], w[3], w[2], w[1], w[0]);
    const __m512i ids = _mm512_gf2p8affine_epi64_epi8(
        one_hot, _mm512_permutexvar_epi8(transpose, x), 0);  // byte c: taps 0..7 of channel c
    const uint64_t high[2] = {taps > 8 ? pixels[8][k] : 0, taps > 9 ? pixels[9][k] : 0};
    const int64_t left = std::min<int64_t>(64, cin - 64 * k);
    const __m128i quarters[4] = {_mm512_extracti32x4_epi32(ids, 0), _mm512_extracti32x4_epi32(ids, 1),
                                 _mm512_extracti32x4_epi32(ids, 2), _mm512_extracti32x4_epi32(ids, 3)};
    for (int q = 0; q * 16 < left; ++q) {
      __m512i off = _mm512_slli_epi32(_mm512_cvtepu8_epi32(quarters[q]), 6);  // * kLutRowBytes
      off = _mm512_mask_add_epi32(off, static_cast<__mmask16>(high[0] >> (16 * q)), off,
                                  _mm512_set1_epi32(static_cast<int>(core::kLutRowBytes << 8)));
      off = _mm512_mask_add_epi32(off, static_cast<__mmask16>(high[1] >> (16 * q)), off,
                                  _mm512_set1_epi32(static_cast<int>(core::kLutRowBytes << 9)));
      const int64_t n16 = std::min<int64_t>(16, left - 16 * q);
      _mm512_mask_storeu_epi32(offsets + 64 * k + 16 * q, static_cast<__mmask16>((1u << n16) - 1), off);
    }
  }
}

SPARKS_TARGET_AVX512 void border_rows_avx512(uint8_t* base, uint32_t* offsets, int64_t cin,
                                             uint32_t plus, uint32_t scratch) {
  for (int64_t ci = 0; ci < cin; ++ci, scratch += core::kLutRowBytes) {
    const __m512i minus_row = _mm512_load_si512(base + offsets[ci]);
    const __m512i plus_row = _mm512_load_si512(base + (offsets[ci] | plus));
    _mm512_store_si512(base + scratch, _mm512_avg_epu8(minus_row, plus_row));
    offsets[ci] = scratch;
  }
}

template <int R>
SPARKS_TARGET_AVX512 void gather_rows(const uint8_t* base, const uint32_t* offsets, int64_t ld_off,
                                      const uint8_t* idx_t, int64_t ld_idx, int64_t cols,
                                      int64_t cin, int64_t taps, int32_t bias, int32_t* out) {
  const int64_t period = 255 / (2 * taps);                           // uint8 terms per lane
  const int64_t chunk = (65535 / (2 * taps)) / period * period;      // uint16 terms per lane
  const __mmask64 colmask = cols >= 64 ? ~__mmask64{0} : ((__mmask64{1} << cols) - 1);
  const __m512i low_byte = _mm512_set1_epi16(0x00ff);
  // Interleaves even (e) and odd (o) channel sums back into channel order.
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                               24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i perm_lo = _mm512_load_si512(kLo), perm_hi = _mm512_load_si512(kHi);
  const uint32_t* off[R];
  for (int r = 0; r < R; ++r) off[r] = offsets + r * ld_off;
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4; ++q) _mm512_store_si512(out + r * 64 + 16 * q, _mm512_set1_epi32(-bias));

  for (int64_t c0 = 0; c0 < cin; c0 += chunk) {
    const int64_t c1 = std::min(cin, c0 + chunk);
    __m512i even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_si512();
    for (int64_t w0 = c0; w0 < c1; w0 += period) {
      const int64_t w1 = std::min(c1, w0 + period);
      __m512i acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
      for (int64_t ci = w0; ci < w1; ++ci) {
        const __m512i idx = _mm512_maskz_loadu_epi8(colmask, idx_t + ci * ld_idx);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512i row = _mm512_loadu_si512(base + off[r][ci]);
          // This operand order lets GCC accumulate in place (no extra register move per term).
          acc[r] = _mm512_add_epi8(_mm512_permutexvar_epi8(idx, row), acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        even[r] = _mm512_add_epi16(even[r], _mm512_and_si512(acc[r], low_byte));
        odd[r] = _mm512_add_epi16(odd[r], _mm512_srli_epi16(acc[r], 8));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512i lo = _mm512_permutex2var_epi16(even[r], perm_lo, odd[r]);
      const __m512i hi = _mm512_permutex2var_epi16(even[r], perm_hi, odd[r]);
      const __m512i parts[4] = {
          _mm512_cvtepu16_epi32(_mm512_castsi512_si256(lo)),
          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(lo, 1)),
          _mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)),
          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1))};
      for (int q = 0; q < 4; ++q) {
        int32_t* o = out + r * 64 + 16 * q;
        _mm512_store_si512(o, _mm512_add_epi32(_mm512_load_si512(o), parts[q]));
      }
    }
  }
}

void gather_avx512(const uint8_t* base, const uint32_t* offsets, int64_t ld_off, int64_t rows,
                   const uint8_t* idx_t, int64_t ld_idx, int64_t cols, int64_t cin, int64_t taps,
                   int64_t /*n*/, int32_t bias, int32_t* out) {
  switch (rows) {
#define SPARKS_ROWS(R) \
  case R: return gather_rows<R>(base, offsets, ld_off, idx_t, ld_idx, cols, cin, taps, bias, out);
    SPARKS_ROWS(1) SPARKS_ROWS(2) SPARKS_ROWS(3) SPARKS_ROWS(4)
    SPARKS_ROWS(5) SPARKS_ROWS(6) SPARKS_ROWS(7) SPARKS_ROWS(8)
#undef SPARKS_ROWS
  }
}

}  // namespace

core::LutOps lut_ops_avx512() {
  return {&patch_offsets_avx512, &gather_avx512, &border_rows_avx512, 8};
}

}  // namespace cpu
}  // namespace sparks
#endif
