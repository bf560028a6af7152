#include "weight_packing.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>

#include "channel_bytes.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparks {
namespace cpu {
namespace {

// Bits of one (output channel, tap) row of a dense weight: channel ci of the row is
// w[ci * stride]. Bool entries are bits; others must be -1 or +1 (ValueError otherwise).
template <typename scalar_t>
void pack_weight_row(const scalar_t* w, int64_t stride, int64_t cin, uint64_t* out,
                     const at::Tensor& weight, int64_t co, int64_t t) {
  for (int64_t k = 0; k * 64 < cin; ++k) out[k] = 0;
  for (int64_t ci = 0; ci < cin; ++ci) {
    bool plus;
    if constexpr (std::is_same_v<scalar_t, bool>) {
      // Read as a byte: a bool tensor can hold any byte (a view of uint8 data), and loading a
      // byte other than 0/1 as bool is undefined. Any nonzero byte is true, as torch reads it.
      plus = reinterpret_cast<const uint8_t*>(w)[ci * stride] != 0;
    } else {
      const scalar_t v = w[ci * stride];
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
          pack_channel_bytes(reinterpret_cast<const uint8_t*>(row), cin, words, isa, dst);
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

}  // namespace cpu
}  // namespace sparks
