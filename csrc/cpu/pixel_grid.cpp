#include "pixel_grid.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "channel_bytes.h"
#include "input_bytes.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define SPARKS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
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
#endif

// `pixels` consecutive pixels (stride s_w) of one image row.
void pack_row_portable(const uint8_t* bytes, int64_t s_w, int64_t pixels, int64_t cin_g,
                       int64_t words, uint64_t* out) {
  for (int64_t w = 0; w < pixels; ++w)
    for (int64_t k = 0; k < words; ++k)
      out[w * words + k] = core::pack_bytes_portable(bytes + w * s_w + 64 * k, std::min<int64_t>(64, cin_g - 64 * k));
}

#if defined(__x86_64__)
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
          : type == at::kBFloat16 ? pack_bf16_avx512<kThreshold>(static_cast<const uint16_t*>(src) + at, count, t)
                                  : pack_bytes_avx512(static_cast<const uint8_t*>(src) + at, count);
    }
}
#endif

// `src` holds 0/1 bytes (kBool), or float32 / bfloat16 values on the AVX-512 path, compared
// with the thresholds `thr` of the row's channels (null: with 0).
void pack_row(const void* src, at::ScalarType type, int64_t s_c, int64_t s_w, int64_t pixels,
              int64_t cin_g, int64_t words, Isa isa, const float* thr, uint64_t* out) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512) {
    if (thr != nullptr) return pack_row_avx512<true>(src, type, s_c, s_w, pixels, cin_g, words, thr, out);
    return pack_row_avx512<false>(src, type, s_c, s_w, pixels, cin_g, words, nullptr, out);
  }
#endif
  (void)isa;
  (void)s_c;
  (void)thr;
  pack_row_portable(static_cast<const uint8_t*>(src), s_w, pixels, cin_g, words, out);
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

PackedPixels pack_pixels(const at::Tensor& input, const at::Tensor& threshold, const ConvGeometry& g, Isa isa,
                         const std::function<void(const PackedPixels&, int64_t, int64_t, int64_t)>& row_done) {
  check_padded_image_bounded(g);
  PackedPixels px;
  px.groups = g.groups;
  px.hp = g.in_h + 2 * g.pad_h;
  px.wp = g.in_w + 2 * g.pad_w;
  const int64_t cin_g = g.in_per_group();
  px.words = (cin_g + 63) / 64;
  px.storage = at::empty({g.batch, g.groups, px.hp, px.wp, px.words}, input.options().dtype(at::kLong));
  px.data = reinterpret_cast<const uint64_t*>(px.storage.data_ptr<int64_t>());
  px.stride_h = g.stride_h;
  px.stride_w = g.stride_w;
  const bool zero_pad = g.pad_value == 0;
  px.row_valid.assign(g.out_h, 0);
  px.col_valid.assign(g.out_w, 0);
  for (int64_t i = 0, t = 0; i < g.kernel_h; ++i) {
    for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
      px.tap_offset.push_back((i * g.dil_h * px.wp + j * g.dil_w) * px.words);
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const int64_t h = oh * g.stride_h + i * g.dil_h;  // padded coordinates
        if (!zero_pad || (h >= g.pad_h && h < g.pad_h + g.in_h)) px.row_valid[oh] |= uint64_t{1} << t;
      }
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const int64_t w = ow * g.stride_w + j * g.dil_w;
        if (!zero_pad || (w >= g.pad_w && w < g.pad_w + g.in_w)) px.col_valid[ow] |= uint64_t{1} << t;
      }
    }
  }

  // float32 input is read directly (one compare per 16 channels with their thresholds: loads
  // for channels_last, gathers with 32-bit offsets otherwise), and so is channels_last
  // bfloat16; anything else is binarized by ATen into channels-last bytes first.
  const int64_t span = (input.size(1) - 1) * input.stride(1) + 16 * input.stride(1);
  const bool direct = isa >= Isa::kAvx512 &&
                      ((input.scalar_type() == at::kFloat && input.stride(1) > 0 && span < (int64_t{1} << 31)) ||
                       (input.scalar_type() == at::kBFloat16 && input.stride(1) == 1));
  const at::Tensor src =
      direct ? input : ge_threshold(input, threshold).contiguous(at::MemoryFormat::ChannelsLast);
  // The direct packers' float32 thresholds (exact for bfloat16); none for 0.
  std::vector<float> thr(direct && threshold.defined() ? g.in_channels : 0);
  if (!thr.empty()) {
    const at::Tensor t = threshold.to(at::kFloat).contiguous();
    std::copy(t.data_ptr<float>(), t.data_ptr<float>() + g.in_channels, thr.begin());
  }
  const int64_t s_n = src.stride(0), s_c = src.stride(1), s_h = src.stride(2), s_w = src.stride(3);
  TORCH_INTERNAL_ASSERT(direct || s_c == 1 || g.in_channels == 1);
  const at::ScalarType type = src.scalar_type();
  const char* base = static_cast<const char*>(src.data_ptr());
  const int64_t item = src.element_size();

  // The pad pixel: all valid channel bits set for pad_value = +1, else 0.
  std::vector<uint64_t> pad(px.words, 0);
  if (g.pad_value > 0)
    for (int64_t k = 0; k < px.words; ++k) pad[k] = low_bits(std::min<int64_t>(64, cin_g - 64 * k));

  uint64_t* dst = reinterpret_cast<uint64_t*>(px.storage.data_ptr<int64_t>());
  at::parallel_for(0, g.batch * px.hp, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / px.hp, h = row % px.hp, ih = h - g.pad_h;
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        uint64_t* out = dst + (((n * g.groups + grp) * px.hp + h) * px.wp) * px.words;
        const bool pad_row = ih < 0 || ih >= g.in_h;
        for (int64_t w = 0; w < px.wp; ++w) {
          if (pad_row || w < g.pad_w || w >= g.pad_w + g.in_w)
            std::copy(pad.begin(), pad.end(), out + w * px.words);
        }
        if (!pad_row) {
          const int64_t offset = n * s_n + ih * s_h + grp * cin_g * s_c;
          pack_row(base + offset * item, type, s_c, s_w, g.in_w, cin_g, px.words, isa,
                   thr.empty() ? nullptr : thr.data() + grp * cin_g, out + g.pad_w * px.words);
        }
        if (row_done) row_done(px, n, grp, h);
      }
    }
  });
  return px;
}

}  // namespace cpu
}  // namespace sparks
