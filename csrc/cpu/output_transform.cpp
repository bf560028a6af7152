#include "output_transform.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparks {
namespace cpu {

#if defined(__x86_64__)
namespace {

// 16 channels of float32 / bfloat16 (widened exactly: a 16-bit shift) as float32 lanes.
SPARKS_AVX512 inline __m512 load_lanes(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
SPARKS_AVX512 inline __m512 load_lanes(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p))), 16));
}

// Stores 16 float32 lanes as float32, or as bfloat16 rounded to nearest even; NaN stays a
// (quiet) NaN, as c10's conversion makes it, instead of carrying into the exponent.
SPARKS_AVX512 inline void store_lanes(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
SPARKS_AVX512 inline void store_lanes(c10::BFloat16* p, __mmask16 m, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                  _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(p), m, _mm512_cvtepi32_epi16(rounded));
}

// Per-channel operands of one tile, offset to its first channel (nullptr when absent).
template <typename T>
struct RowOperands {
  const T *scale, *bias, *prelu, *post;
  const T* residual;  // residual[n, co0, 0, 0]; channels contiguous
  int64_t r_h, r_w;
};

// float32 / bfloat16 channels_last rows: per 16 channels one load of the sums (and of the
// residual), the transform in float32 lanes, one store. Same operations, in the same order and
// with the same roundings, as store_scalar. kFused = false (no residual, PReLU or post_bias,
// the plain op) leaves their tests out of the loop.
template <typename T, bool kFused>
SPARKS_AVX512 void store_rows_avx512(T* out, int64_t s_h, int64_t s_w, int64_t out_w,
                                     const int32_t* tile, int64_t ld, int64_t p0, int64_t rows,
                                     int64_t cols, const RowOperands<T>& op) {
  const __m512 zero = _mm512_setzero_ps();
  int64_t oh = p0 / out_w, ow = p0 % out_w;  // stepped, not divided, per row
  for (int64_t r = 0; r < rows; ++r, ++ow) {
    if (ow == out_w) ow = 0, ++oh;
    T* dst = out + oh * s_h + ow * s_w;
    const T* res = op.residual ? op.residual + oh * op.r_h + ow * op.r_w : nullptr;
    const int32_t* src = tile + r * ld;
    for (int64_t c = 0; c < cols; c += 16) {
      const int64_t left = std::min<int64_t>(16, cols - c);
      const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
      __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, src + c));
      if (op.scale) v = _mm512_mul_ps(v, load_lanes(op.scale + c, m));
      if (op.bias) v = _mm512_add_ps(v, load_lanes(op.bias + c, m));
      if (kFused) {
        if (res) v = _mm512_add_ps(v, load_lanes(res + c, m));
        if (op.prelu) {
          // Lanes with y >= 0 keep y; the others (negative, and NaN) become slope * y.
          const __mmask16 keep = _mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ);
          v = _mm512_mask_mul_ps(v, static_cast<__mmask16>(~keep), v, load_lanes(op.prelu + c, m));
        }
        if (op.post) v = _mm512_add_ps(v, load_lanes(op.post + c, m));
      }
      store_lanes(dst + c, m, v);
    }
  }
}

}  // namespace
#endif

OutputTransform::OutputTransform(const at::Tensor& output, const c10::optional<at::Tensor>& scale,
                                 const c10::optional<at::Tensor>& bias, const FusedArgs& fused,
                                 const ConvGeometry& g, Isa isa)
    : output_(output),
      scale_(scale.has_value() && scale->defined() ? scale->contiguous() : at::Tensor()),
      bias_(bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor()),
      residual_(fused.residual),
      prelu_(fused.prelu_weight.defined() ? fused.prelu_weight.contiguous() : at::Tensor()),
      post_(fused.post_bias.defined() ? fused.post_bias.contiguous() : at::Tensor()),
      out_w_(g.out_w) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "sparks_store",
                                  [&] { store_ = &OutputTransform::store_scalar<scalar_t>; });
  const bool residual_rows = !residual_.defined() || residual_.stride(1) == 1 || residual_.size(1) == 1;
  fast_rows_ = isa >= Isa::kAvx512 && output.stride(1) == 1 && residual_rows &&
               (output.scalar_type() == at::kFloat || output.scalar_type() == at::kBFloat16);
}

void OutputTransform::store(const int32_t* tile, int64_t ld, int64_t n, int64_t p0, int64_t rows,
                            int64_t co0, int64_t cols) const {
  if (fast_rows_) return store_fast_rows(tile, ld, n, p0, rows, co0, cols);
  store_(*this, tile, ld, n, p0, rows, co0, cols);
}

void OutputTransform::store_fast_rows(const int32_t* tile, int64_t ld, int64_t n, int64_t p0,
                                      int64_t rows, int64_t co0, int64_t cols) const {
#if defined(__x86_64__)
  const auto rows_of = [&](auto* data) {
    using T = std::remove_pointer_t<decltype(data)>;
    const auto at_co0 = [&](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() + co0 : nullptr; };
    RowOperands<T> op{at_co0(scale_), at_co0(bias_), at_co0(prelu_), at_co0(post_), nullptr, 0, 0};
    if (residual_.defined()) {
      op.residual = residual_.data_ptr<T>() + n * residual_.stride(0) + co0 * residual_.stride(1);
      op.r_h = residual_.stride(2);
      op.r_w = residual_.stride(3);
    }
    const at::Tensor& o = output_;
    const auto rows_fn = op.residual || op.prelu || op.post ? &store_rows_avx512<T, true>
                                                            : &store_rows_avx512<T, false>;
    rows_fn(data + n * o.stride(0) + co0, o.stride(2), o.stride(3), out_w_, tile, ld, p0, rows,
            cols, op);
  };
  if (output_.scalar_type() == at::kBFloat16) return rows_of(output_.data_ptr<at::BFloat16>());
  return rows_of(output_.data_ptr<float>());
#else
  (void)tile, (void)ld, (void)n, (void)p0, (void)rows, (void)co0, (void)cols;
  TORCH_INTERNAL_ASSERT(false, "AVX-512 rows need x86-64");
#endif
}

template <typename scalar_t>
void OutputTransform::store_scalar(const OutputTransform& w, const int32_t* tile, int64_t ld,
                                   int64_t n, int64_t p0, int64_t rows, int64_t co0, int64_t cols) {
  using opmath_t = at::opmath_type<scalar_t>;
  const at::Tensor& o = w.output_;
  scalar_t* out = o.data_ptr<scalar_t>() + n * o.stride(0) + co0 * o.stride(1);
  const int64_t s_c = o.stride(1), s_h = o.stride(2), s_w = o.stride(3);
  const auto at_co0 = [&](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() + co0 : nullptr; };
  const scalar_t* scale = at_co0(w.scale_);
  const scalar_t* bias = at_co0(w.bias_);
  const scalar_t* prelu = at_co0(w.prelu_);
  const scalar_t* post = at_co0(w.post_);
  const at::Tensor& rt = w.residual_;
  const scalar_t* residual =
      rt.defined() ? rt.data_ptr<scalar_t>() + n * rt.stride(0) + co0 * rt.stride(1) : nullptr;
  const int64_t r_c = rt.defined() ? rt.stride(1) : 0, r_h = rt.defined() ? rt.stride(2) : 0;
  const int64_t r_w = rt.defined() ? rt.stride(3) : 0;

  // Up to kChunk channels of one row at a time through an opmath buffer: each step is one
  // branch-free loop, which the compiler vectorizes for contiguous channels.
  constexpr int64_t kChunk = 64;
  opmath_t y[kChunk], z[kChunk];
  int64_t oh = p0 / w.out_w_, ow = p0 % w.out_w_;  // stepped, not divided, per row
  for (int64_t r = 0; r < rows; ++r, ++ow) {
    if (ow == w.out_w_) ow = 0, ++oh;
    scalar_t* dst = out + oh * s_h + ow * s_w;
    const scalar_t* res = residual ? residual + oh * r_h + ow * r_w : nullptr;
    for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
      const int64_t m = std::min(kChunk, cols - c0);
      const int32_t* src = tile + r * ld + c0;
      if (scale && bias) {
        for (int64_t c = 0; c < m; ++c)
          y[c] = static_cast<opmath_t>(src[c]) * static_cast<opmath_t>(scale[c0 + c]) +
                 static_cast<opmath_t>(bias[c0 + c]);
      } else if (scale) {
        for (int64_t c = 0; c < m; ++c) y[c] = static_cast<opmath_t>(src[c]) * static_cast<opmath_t>(scale[c0 + c]);
      } else if (bias) {
        for (int64_t c = 0; c < m; ++c) y[c] = static_cast<opmath_t>(src[c]) + static_cast<opmath_t>(bias[c0 + c]);
      } else {
        for (int64_t c = 0; c < m; ++c) y[c] = static_cast<opmath_t>(src[c]);
      }
      if (res) {
        if (r_c == 1) {
          for (int64_t c = 0; c < m; ++c) y[c] = y[c] + static_cast<opmath_t>(res[c0 + c]);
        } else {
          for (int64_t c = 0; c < m; ++c) y[c] = y[c] + static_cast<opmath_t>(res[(c0 + c) * r_c]);
        }
      }
      opmath_t* v = y;
      if (prelu) {
        // Both sides computed and selected into another buffer: an unconditional store, so the
        // compiler blends per lane instead of branching on the sign (which a random sign
        // mispredicts half the time).
        for (int64_t c = 0; c < m; ++c) z[c] = static_cast<opmath_t>(prelu[c0 + c]) * y[c];
        for (int64_t c = 0; c < m; ++c) z[c] = y[c] >= opmath_t(0) ? y[c] : z[c];
        v = z;
      }
      if (post)
        for (int64_t c = 0; c < m; ++c) v[c] = v[c] + static_cast<opmath_t>(post[c0 + c]);
      if (s_c == 1) {
        for (int64_t c = 0; c < m; ++c) dst[c0 + c] = static_cast<scalar_t>(v[c]);
      } else {
        for (int64_t c = 0; c < m; ++c) dst[(c0 + c) * s_c] = static_cast<scalar_t>(v[c]);
      }
    }
  }
}

}  // namespace cpu
}  // namespace sparks
