#include "packing.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#define SPARKS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

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

namespace {

// input >= threshold[c] (or >= 0) as bool, compared in the input's dtype by ATen.
at::Tensor ge_threshold(const at::Tensor& input, const at::Tensor& threshold) {
  return threshold.defined() ? at::ge(input, threshold.reshape({1, -1, 1, 1})) : at::ge(input, 0);
}

}  // namespace

at::Tensor binarize_input(const at::Tensor& input, const at::Tensor& threshold) {
  return ge_threshold(input, threshold).contiguous().view(at::kByte);
}

void patch_row(const uint8_t* plane, const ConvGeometry& g, int64_t oh, uint64_t* patch) {
  const uint64_t pad_bit = g.pad_value > 0 ? 1 : 0;
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    uint64_t word = 0;
    int64_t t = 0;
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
      const bool row_inside = ih >= 0 && ih < g.in_h;
      for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
        const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
        const uint64_t bit =
            (row_inside && iw >= 0 && iw < g.in_w) ? plane[ih * g.in_w + iw] : pad_bit;
        word |= bit << t;
      }
    }
    patch[ow] = word;
  }
}

void valid_row(const ConvGeometry& g, int64_t oh, uint64_t* valid) {
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    uint64_t word = 0;
    int64_t t = 0;
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
      for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
        const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
        if (g.pad_value != 0 || (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w))
          word |= uint64_t{1} << t;
      }
    }
    valid[ow] = word;
  }
}

}  // namespace cpu
}  // namespace sparks

// ---------------------------------------------------------------------------------------------
// Channel-packed layout (fast kernels).

namespace sparks {
namespace cpu {
namespace {

inline uint64_t pack_bytes_portable(const uint8_t* b, int64_t count) {
  uint64_t word = 0;
  for (int64_t i = 0; i < count; ++i) word |= uint64_t{b[i] != 0} << i;
  return word;
}

#if defined(__x86_64__)
SPARKS_AVX512 inline uint64_t pack_bytes_avx512(const uint8_t* b, int64_t count) {
  const __mmask64 m = count >= 64 ? ~__mmask64{0} : ((__mmask64{1} << count) - 1);
  const __m512i v = _mm512_maskz_loadu_epi8(m, b);
  return _mm512_test_epi8_mask(v, v);
}

// The thresholds of channels c .. c + 15: loaded (kThreshold), else 0.
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

// Packs `cin_g` 0/1 bytes (contiguous) into `words` words.
void pack_pixel(const uint8_t* bytes, int64_t cin_g, int64_t words, Isa isa, uint64_t* out) {
  for (int64_t k = 0; k < words; ++k) {
    const int64_t count = std::min<int64_t>(64, cin_g - 64 * k);
#if defined(__x86_64__)
    if (isa >= Isa::kAvx512) {
      out[k] = pack_bytes_avx512(bytes + 64 * k, count);
      continue;
    }
#endif
    out[k] = pack_bytes_portable(bytes + 64 * k, count);
  }
}

// `pixels` consecutive pixels (stride s_w) of one image row.
void pack_row_portable(const uint8_t* bytes, int64_t s_w, int64_t pixels, int64_t cin_g,
                       int64_t words, uint64_t* out) {
  for (int64_t w = 0; w < pixels; ++w)
    for (int64_t k = 0; k < words; ++k)
      out[w * words + k] = pack_bytes_portable(bytes + w * s_w + 64 * k, std::min<int64_t>(64, cin_g - 64 * k));
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

PackedPixels pack_pixels(const at::Tensor& input, const at::Tensor& threshold, const ConvGeometry& g, Isa isa,
                         const std::function<void(const PackedPixels&, int64_t, int64_t, int64_t)>& row_done) {
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

namespace {

// Bits of one (output channel, tap) row of a dense weight: channel ci of the row is
// w[ci * stride]. Bool entries are bits; others must be -1 or +1 (ValueError otherwise).
template <typename scalar_t>
void pack_weight_row(const scalar_t* w, int64_t stride, int64_t cin, uint64_t* out,
                     const at::Tensor& weight, int64_t co, int64_t t) {
  for (int64_t k = 0; k * 64 < cin; ++k) out[k] = 0;
  for (int64_t ci = 0; ci < cin; ++ci) {
    const scalar_t v = w[ci * stride];
    bool plus;
    if constexpr (std::is_same_v<scalar_t, bool>) {
      plus = v;
    } else {
      plus = v == scalar_t(1);
      TORCH_CHECK_VALUE(plus || v == scalar_t(-1), "weight entries must be -1 or +1 (or bool), got ",
                        static_cast<double>(v), " at weight[", co, ", ", ci, ", ", t / weight.size(3),
                        ", ", t % weight.size(3), "]");
    }
    out[ci >> 6] |= uint64_t{plus} << (ci & 63);
  }
}

#if defined(__x86_64__)
// Same for a channels-contiguous float32 row, 16 channels per compare.
SPARKS_AVX512 bool pack_weight_row_f32_avx512(const float* w, int64_t cin, uint64_t* out) {
  const __m512 one = _mm512_set1_ps(1.f), minus_one = _mm512_set1_ps(-1.f);
  for (int64_t k = 0; k * 64 < cin; ++k) out[k] = 0;
  for (int64_t c = 0; c < cin; c += 16) {
    const int64_t left = std::min<int64_t>(16, cin - c);
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, w + c);
    const __mmask16 plus = _mm512_mask_cmp_ps_mask(m, v, one, _CMP_EQ_OQ);
    const __mmask16 minus = _mm512_mask_cmp_ps_mask(m, v, minus_one, _CMP_EQ_OQ);
    if ((plus | minus) != m) return false;
    out[c >> 6] |= uint64_t{plus} << (c & 63);
  }
  return true;
}
#endif

template <typename scalar_t>
void pack_weight_rows(const at::Tensor& weight, bool rows_contiguous, Isa isa, uint64_t* out) {
  const int64_t cout = weight.size(0), cin = weight.size(1), kw = weight.size(3);
  const int64_t taps = weight.size(2) * kw, words = (cin + 63) / 64;
  const scalar_t* w = weight.data_ptr<scalar_t>();
  at::parallel_for(0, cout * taps, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t co = r / taps, t = r % taps;
      const scalar_t* row = w + co * weight.stride(0) + (t / kw) * weight.stride(2) + (t % kw) * weight.stride(3);
      uint64_t* dst = out + r * words;
#if defined(__x86_64__)
      if (isa >= Isa::kAvx512 && rows_contiguous) {
        if constexpr (std::is_same_v<scalar_t, bool>) {
          pack_pixel(reinterpret_cast<const uint8_t*>(row), cin, words, isa, dst);
          continue;
        } else if constexpr (std::is_same_v<scalar_t, float>) {
          if (pack_weight_row_f32_avx512(row, cin, dst)) continue;  // else: report below
        }
      }
#endif
      pack_weight_row(row, weight.stride(1), cin, dst, weight, co, t);
    }
  });
}

}  // namespace

at::Tensor pack_weight_channels(const at::Tensor& weight, Isa isa) {
  const int64_t cout = weight.size(0), cin = weight.size(1), kw = weight.size(3);
  const int64_t taps = weight.size(2) * kw, words = (cin + 63) / 64;
  at::Tensor packed = at::empty({cout, taps, words}, weight.options().dtype(at::kLong));
  uint64_t* out = reinterpret_cast<uint64_t*>(packed.data_ptr<int64_t>());
  // A channels-last weight (channels contiguous per (output channel, tap)) packs 64 channels
  // per instruction; any other layout is read element by element.
  const bool rows_contiguous = weight.stride(1) == 1 || cin == 1;
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, weight.scalar_type(), "pack_weight", [&] {
    pack_weight_rows<scalar_t>(weight, rows_contiguous, isa, out);
  });
  return packed;
}

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
  if (indices.scalar_type() == at::kByte && indices.t().is_contiguous()) return indices.t();
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
