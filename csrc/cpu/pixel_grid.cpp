#include "pixel_grid.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "channel_bytes.h"
#include "core_adapters.h"
#include "input_bytes.h"
#include "neon_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparks {
namespace cpu {
namespace {

#if defined(__x86_64__)
template <bool kThreshold>
SPARKS_AVX512 inline __m512 thresholds(const float* t, int64_t c, __mmask16 m) {
  if constexpr (kThreshold) return _mm512_maskz_loadu_ps(m, t + c);
  (void)t, (void)c, (void)m;
  return _mm512_setzero_ps();
}

// Bits x >= t of `count` <= 64 float32 channels (stride s_c), straight from the input: contiguous
// loads for channels_last, gathers for NCHW; t holds the channels' thresholds (contiguous; unread
// without kThreshold, t = 0).
template <bool kThreshold>
SPARKS_AVX512 inline uint64_t pack_floats_avx512(const float* x, int64_t count, int64_t s_c,
                                                 const float* t) {
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(s_c)));
  uint64_t word = 0;
  for (int64_t c = 0; c < count; c += 16) {
    const int64_t left = std::min<int64_t>(16, count - c);
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
    const __m512 v = s_c == 1 ? _mm512_maskz_loadu_ps(m, x + c)
                              : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, lanes, x + c * s_c, 4);
    word |= uint64_t{_mm512_mask_cmp_ps_mask(m, v, thresholds<kThreshold>(t, c, m), _CMP_GE_OQ)} << c;
  }
  return word;
}

// Same for channels-contiguous bfloat16: widened to float32 exactly (a 16-bit shift), like its
// bfloat16 thresholds, so that the float32 compare is the bfloat16 one.
template <bool kThreshold>
SPARKS_AVX512 inline uint64_t pack_bf16_avx512(const uint16_t* x, int64_t count, const float* t) {
  uint64_t word = 0;
  for (int64_t c = 0; c < count; c += 16) {
    const int64_t left = std::min<int64_t>(16, count - c);
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
    const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x + c)), 16);
    word |= uint64_t{_mm512_mask_cmp_ps_mask(m, _mm512_castsi512_ps(wide), thresholds<kThreshold>(t, c, m), _CMP_GE_OQ)} << c;
  }
  return word;
}

template <bool kThreshold>
SPARKS_AVX512 void pack_row_avx512(const void* src, at::ScalarType type, int64_t s_c, int64_t s_w,
                                   int64_t pixels, int64_t cin_g, int64_t words, const float* thr,
                                   uint64_t* out) {
  for (int64_t w = 0; w < pixels; ++w)
    for (int64_t k = 0; k < words; ++k) {
      const int64_t count = std::min<int64_t>(64, cin_g - 64 * k), at = w * s_w + 64 * k * s_c;
      const float* t = kThreshold ? thr + 64 * k : nullptr;
      out[w * words + k] =
          type == at::kFloat ? pack_floats_avx512<kThreshold>(static_cast<const float*>(src) + at, count, s_c, t)
                             : pack_bf16_avx512<kThreshold>(static_cast<const uint16_t*>(src) + at, count, t);
    }
}
#endif

// The byte packer of `isa` for binarized input.
core::PackBytes pack_bytes_for(Isa isa) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512) return &pack_bytes_avx512;
#endif
#if SPARKS_NEON_COMPILED
  if (isa == Isa::kNeon) return &neon::pack_bytes;
#endif
  (void)isa;
  return &core::pack_bytes_portable;
}

}  // namespace

bool padded_image_bounded(const ConvGeometry& g, int64_t bytes_per_pixel) {
  int64_t images = 0, padded = 0, plain = 0, limit = 0;
  const int64_t hp = g.in_h + 2 * g.pad_h, wp = g.in_w + 2 * g.pad_w;  // fit: conv_args checks
  if (__builtin_mul_overflow(g.batch, g.groups, &images) ||
      __builtin_mul_overflow(images, bytes_per_pixel, &images))
    return false;
  if (__builtin_mul_overflow(images, hp, &padded) || __builtin_mul_overflow(padded, wp, &padded))
    return false;
  // The unpadded image is no larger than the padded one, so it fits too.
  plain = images * g.in_h * g.in_w;
  if (__builtin_mul_overflow(plain, int64_t{4}, &limit) ||
      __builtin_add_overflow(limit, kPaddingSlackBytes, &limit))
    return true;  // 4x the image already exceeds int64, which the padded size does not
  return padded <= limit;
}

void check_padded_image_bounded(const ConvGeometry& g) {
  const int64_t pixel_bytes = (g.in_per_group() + 63) / 64 * 8;
  TORCH_CHECK_VALUE(padded_image_bounded(g, pixel_bytes), "padding [", g.pad_h, ", ", g.pad_w,
                    "] is too large for the CPU kernels, which store the padded bit-packed input: ",
                    g.batch, " x ", g.groups, " x (", g.in_h, " + 2 x ", g.pad_h, ") x (", g.in_w,
                    " + 2 x ", g.pad_w, ") pixels x ", pixel_bytes,
                    " bytes, more than 4x the unpadded input plus 1 GiB");
}

core::PixelGrid pack_pixels(const at::Tensor& input, const at::Tensor& threshold, const ConvGeometry& g, Isa isa,
                            const core::RowDone& row_done) {
  check_padded_image_bounded(g);
  const core::ParallelFor par = aten_parallel(16);
  // float32 input is read directly (one compare per 16 channels with their thresholds: loads
  // for channels_last, gathers with 32-bit offsets otherwise), and so is channels_last
  // bfloat16; anything else is binarized by ATen into channels-last bytes first.
  const int64_t span = (input.size(1) - 1) * input.stride(1) + 16 * input.stride(1);
  const bool direct = isa >= Isa::kAvx512 &&
                      ((input.scalar_type() == at::kFloat && input.stride(1) > 0 && span < (int64_t{1} << 31)) ||
                       (input.scalar_type() == at::kBFloat16 && input.stride(1) == 1));
  if (!direct) {
    const at::Tensor bits = ge_threshold(input, threshold).contiguous(at::MemoryFormat::ChannelsLast);
    const core::InputBits view{reinterpret_cast<const uint8_t*>(bits.data_ptr<bool>()), bits.stride(0),
                               bits.stride(1), bits.stride(2), bits.stride(3)};
    return core::pack_grid(view, g, pack_bytes_for(isa), par, row_done);
  }
#if defined(__x86_64__)
  // The direct packers' float32 thresholds (exact for bfloat16); none for 0.
  std::vector<float> thr(threshold.defined() ? g.in_channels : 0);
  if (!thr.empty()) {
    const at::Tensor t = threshold.to(at::kFloat).contiguous();
    std::copy(t.data_ptr<float>(), t.data_ptr<float>() + g.in_channels, thr.begin());
  }
  const int64_t s_n = input.stride(0), s_c = input.stride(1), s_h = input.stride(2), s_w = input.stride(3);
  const at::ScalarType type = input.scalar_type();
  const char* base = static_cast<const char*>(input.data_ptr());
  const int64_t item = input.element_size(), cin_g = g.in_per_group(), words = (cin_g + 63) / 64;
  const auto pack_row = [&](int64_t n, int64_t grp, int64_t ih, uint64_t* pixels) {
    const char* row = base + (n * s_n + ih * s_h + grp * cin_g * s_c) * item;
    if (thr.empty()) return pack_row_avx512<false>(row, type, s_c, s_w, g.in_w, cin_g, words, nullptr, pixels);
    pack_row_avx512<true>(row, type, s_c, s_w, g.in_w, cin_g, words, thr.data() + grp * cin_g, pixels);
  };
  return core::pack_grid_rows(g, pack_row, par, row_done);
#else
  TORCH_INTERNAL_ASSERT(false, "direct packing needs AVX-512");
#endif
}

}  // namespace cpu
}  // namespace sparks
