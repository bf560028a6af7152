// Bit-packing shared by the CPU kernels.
//
// Bit convention (the same in every kernel and in sparks_ext/packing.py): tap t = i * kw + j of
// a kh x kw window is bit t of a 64-bit word; a set bit means +1. A codeword (or a dense
// kernel) is a pair (sign, mask): mask bit set = non-zero tap. Binary codewords have a full
// mask; ternary / signed-binary ones clear the mask at their zeros. For an input patch p with
// validity mask v (taps that fall on zero padding are invalid), the response is
//     sum_t x_t * w_t = popcount(mask & v) - 2 * popcount(mask & v & (p ^ sign)),
// because each valid non-zero tap contributes +1 when the signs agree and -1 when they differ.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../conv_args.h"

namespace sparks {
namespace cpu {

inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1); }

struct PackedCodebook {
  std::vector<uint64_t> sign;  // (n,)
  std::vector<uint64_t> mask;  // (n,)
  bool ternary = false;        // some codeword has a zero entry
  int64_t size() const { return static_cast<int64_t>(sign.size()); }
};

// Packs a (n, kh, kw) codebook; throws ValueError naming `codebook` if an entry is not in
// {-1, 0, +1}.
PackedCodebook pack_codebook(const at::Tensor& codebook);

// Packs a dense (C_out, C_in/groups, kh, kw) weight into one sign word per kernel (row-major
// (co, ci)); bool weights are bits, others must be in {-1, +1} (ValueError naming `weight`).
std::vector<uint64_t> pack_dense_weight(const at::Tensor& weight);

// Indices as a contiguous int32 (C_out, C_in/groups) tensor; throws ValueError naming
// `indices` if a value is outside [0, n).
at::Tensor checked_indices(const at::Tensor& indices, int64_t n);

// Binarized input as contiguous uint8 (N, C, H, W): 1 where input >= 0 (sign(0) = +1;
// NaN gives 0, i.e. -1, exactly as the reference's where(input >= 0, 1, -1)).
at::Tensor binarize_input(const at::Tensor& input);

// Builds the patch words of output row `oh` for one input channel plane (contiguous H x W of
// 0/1 bytes): patch[ow] for ow in [0, out_w). Taps outside the image read `pad_bit`.
void patch_row(const uint8_t* plane, const ConvGeometry& g, int64_t oh, uint64_t* patch);

// Validity words of output row `oh` (bit set = tap inside the image). Only zero padding
// needs them; for pad_value = +-1 every tap is valid.
void valid_row(const ConvGeometry& g, int64_t oh, uint64_t* valid);

// Writes out[n, co, oh, ow] = acc * scale[co] + bias[co] (scale/bias optional) in the output
// dtype, following the output's strides (NCHW or channels_last). The multiply-add runs in
// opmath (float, or double for float64 inputs) and is rounded once.
template <typename scalar_t>
struct Epilogue {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* out;
  int64_t s_n, s_c, s_h, s_w;
  const scalar_t* scale;  // nullptr if absent
  const scalar_t* bias;   // nullptr if absent

  Epilogue(const at::Tensor& output, const at::Tensor& scale_t, const at::Tensor& bias_t)
      : out(output.data_ptr<scalar_t>()),
        s_n(output.stride(0)), s_c(output.stride(1)), s_h(output.stride(2)), s_w(output.stride(3)),
        scale(scale_t.defined() ? scale_t.data_ptr<scalar_t>() : nullptr),
        bias(bias_t.defined() ? bias_t.data_ptr<scalar_t>() : nullptr) {}

  void store(int32_t acc, int64_t n, int64_t co, int64_t oh, int64_t ow) const {
    opmath_t v = static_cast<opmath_t>(acc);
    if (scale) v = v * static_cast<opmath_t>(scale[co]);
    if (bias) v = v + static_cast<opmath_t>(bias[co]);
    out[n * s_n + co * s_c + oh * s_h + ow * s_w] = static_cast<scalar_t>(v);
  }
};

}  // namespace cpu
}  // namespace sparks
