// Device helpers shared by the CUDA kernels of sparks::conv2d and sparks::binary_conv2d.
//
// The bit conventions are those of csrc/cpu/codebook_packing.h: tap t = i * kw + j of a window is bit t,
// a set bit means +1, a codeword is a (sign, mask) pair and its response to a patch p with
// validity v is popcount(mask & v) - 2 * popcount(mask & v & (p ^ sign)).
//
// Value checks differ from the CPU backend on purpose: the CPU op reads the indices and the
// codebook on the host and raises ValueError; a CUDA op that did so would synchronise with the
// device on every call and could not be captured in a CUDA graph. The CUDA kernels instead
// check every index / codebook / weight value on the device with CUDA_KERNEL_ASSERT (as torch's
// own index kernels do: the failure surfaces as a device-side assert on the next synchronising
// call) and clamp what they read, so that bad data never makes them read out of bounds.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../conv_args.h"

// The kernels' dynamic shared memory (tests/cuda_emu defines its own).
#ifndef SPARKS_DYNAMIC_SHARED
#define SPARKS_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace sparks {
namespace cuda {

// Words holding one patch: 32 bits when the kernel has at most 32 taps (3x3, 5x5), else 64.
__device__ __forceinline__ int popc(uint32_t x) { return __popc(x); }
__device__ __forceinline__ int popc(uint64_t x) { return __popcll(x); }

template <typename word_t>
__host__ __device__ __forceinline__ word_t low_bits(int n) {
  return n >= static_cast<int>(8 * sizeof(word_t)) ? ~word_t{0}
                                                    : static_cast<word_t>((word_t{1} << n) - 1);
}

// The input bit of x: 1 for x >= t, 0 for x < t and for NaN, compared in opmath (widening
// float16 / bfloat16 to float is exact, so this is the compare in the input's dtype), exactly
// as the CPU backend and the reference's where(input >= threshold, 1, -1). Without a threshold
// t = 0: sign(0) = +1.
template <typename scalar_t>
__device__ __forceinline__ uint32_t ge_bit(scalar_t x, const scalar_t* t) {
  using opmath_t = at::opmath_type<scalar_t>;
  return static_cast<opmath_t>(x) >= (t != nullptr ? static_cast<opmath_t>(*t) : opmath_t(0)) ? 1u : 0u;
}

// Explicitly rounded multiply and add: nvcc would otherwise contract v * scale + bias into one
// FMA (one rounding), while the CPU transform rounds after every step.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// The output transform, the CPU one (csrc/cpu/output_transform.h) step for step: for output
// (n, co, oh, ow) with integer sum acc, in opmath (float, or double for float64),
//     y = acc * scale[co] + bias[co]  ->  + residual  ->  PReLU(prelu_weight[co])  ->  + post_bias[co]
// each step rounded, then one cast to the output dtype at the output's strides. The residual
// is laid out like the output (the host copies it otherwise), so one offset serves both.
// Trivially copyable so that it can be passed to kernels by value.
template <typename scalar_t>
struct OutputTransform {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* out;
  int64_t s_n, s_c, s_h, s_w;
  const scalar_t* scale;     // nullptr if absent (as the four below)
  const scalar_t* bias;
  const scalar_t* residual;  // same strides as out
  const scalar_t* prelu;
  const scalar_t* post;

  // Offset of out[n, 0, oh, ow]: kernels compute it once per output position.
  __device__ __forceinline__ int64_t offset(int64_t n, int64_t oh, int64_t ow) const {
    return n * s_n + oh * s_h + ow * s_w;
  }

  __device__ __forceinline__ opmath_t value(int32_t acc, int64_t at, int64_t co) const {
    opmath_t v = static_cast<opmath_t>(acc);
    if (scale != nullptr) v = mul_rn(v, static_cast<opmath_t>(scale[co]));
    if (bias != nullptr) v = add_rn(v, static_cast<opmath_t>(bias[co]));
    if (residual != nullptr) v = add_rn(v, static_cast<opmath_t>(residual[at]));
    if (prelu != nullptr) v = v >= opmath_t(0) ? v : mul_rn(static_cast<opmath_t>(prelu[co]), v);
    if (post != nullptr) v = add_rn(v, static_cast<opmath_t>(post[co]));
    return v;
  }

  __device__ __forceinline__ void store_at(int32_t acc, int64_t position_offset, int64_t co) const {
    const int64_t at = position_offset + co * s_c;
    out[at] = static_cast<scalar_t>(value(acc, at, co));
  }

  __device__ __forceinline__ void store(int32_t acc, int64_t n, int64_t co, int64_t oh,
                                        int64_t ow) const {
    store_at(acc, offset(n, oh, ow), co);
  }
};

// The (C_out,) tensors contiguous and the residual laid out like the output; the returned
// tensors must stay alive while the kernel runs.
struct TransformTensors {
  at::Tensor scale, bias, residual, prelu, post;
};

inline TransformTensors transform_tensors(const at::Tensor& output,
                                          const c10::optional<at::Tensor>& scale,
                                          const c10::optional<at::Tensor>& bias,
                                          const FusedArgs& fused) {
  const auto vec = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : at::Tensor(); };
  TransformTensors t;
  t.scale = scale.has_value() ? vec(*scale) : at::Tensor();
  t.bias = bias.has_value() ? vec(*bias) : at::Tensor();
  t.prelu = vec(fused.prelu_weight);
  t.post = vec(fused.post_bias);
  t.residual = fused.residual;
  if (t.residual.defined() && t.residual.strides() != output.strides())
    t.residual = at::empty_like(output).copy_(fused.residual);
  return t;
}

template <typename scalar_t>
OutputTransform<scalar_t> make_output_transform(const at::Tensor& output, const TransformTensors& t) {
  const auto ptr = [](const at::Tensor& x) { return x.defined() ? x.const_data_ptr<scalar_t>() : nullptr; };
  OutputTransform<scalar_t> e;
  e.out = output.data_ptr<scalar_t>();
  e.s_n = output.stride(0);
  e.s_c = output.stride(1);
  e.s_h = output.stride(2);
  e.s_w = output.stride(3);
  e.scale = ptr(t.scale);
  e.bias = ptr(t.bias);
  e.residual = ptr(t.residual);
  e.prelu = ptr(t.prelu);
  e.post = ptr(t.post);
  return e;
}

// The input as kernels read it: any strides (NCHW, channels_last, sliced views), no copy, and
// the per-channel thresholds of its binarization (nullptr: 0).
template <typename scalar_t>
struct InputView {
  const scalar_t* data;
  int64_t s_n, s_c, s_h, s_w;
  const scalar_t* threshold;

  __device__ __forceinline__ uint32_t bit(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return ge_bit(data[n * s_n + c * s_c + h * s_h + w * s_w],
                  threshold != nullptr ? threshold + c : nullptr);
  }
};

// `threshold` (contiguous or undefined) must stay alive while the kernel runs.
template <typename scalar_t>
InputView<scalar_t> make_input_view(const at::Tensor& input, const at::Tensor& threshold) {
  return {input.const_data_ptr<scalar_t>(), input.stride(0), input.stride(1), input.stride(2),
          input.stride(3), threshold.defined() ? threshold.const_data_ptr<scalar_t>() : nullptr};
}

// Patch word on input channel c of image n of the output position whose window starts at input
// row ih0 = oh * stride_h - pad_h and column iw0 = ow * stride_w - pad_w: bit t = i * kw + j is
// the sign bit of the tap, or the padding's bit (1 for pad_value = +1, else 0) outside the image.
template <typename word_t, typename scalar_t>
__device__ __forceinline__ word_t patch_word(const InputView<scalar_t>& x, const ConvGeometry& g,
                                             int64_t n, int64_t c, int64_t ih0, int64_t iw0) {
  const word_t pad_bit = g.pad_value > 0 ? 1 : 0;
  word_t word = 0;
  int t = 0;
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    const int64_t ih = ih0 + i * g.dil_h;
    const bool row_inside = ih >= 0 && ih < g.in_h;
    for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
      const int64_t iw = iw0 + j * g.dil_w;
      const word_t bit = (row_inside && iw >= 0 && iw < g.in_w)
                             ? static_cast<word_t>(x.bit(n, c, ih, iw))
                             : pad_bit;
      word |= bit << t;
    }
  }
  return word;
}

// Validity word of the output position whose window starts at (ih0, iw0): bit t set when tap t
// counts. Only zero padding makes taps invalid; with pad_value = +-1 every tap is valid (it
// reads the padding's sign).
template <typename word_t>
__device__ __forceinline__ word_t valid_word(const ConvGeometry& g, int64_t ih0, int64_t iw0) {
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  if (g.pad_value != 0) return low_bits<word_t>(taps);
  word_t word = 0;
  int t = 0;
  for (int64_t i = 0; i < g.kernel_h; ++i) {
    const int64_t ih = ih0 + i * g.dil_h;
    const bool row_inside = ih >= 0 && ih < g.in_h;
    for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
      const int64_t iw = iw0 + j * g.dil_w;
      if (row_inside && iw >= 0 && iw < g.in_w) word |= word_t{1} << t;
    }
  }
  return word;
}

// Launch size for grid-stride loops over `items`: enough blocks to fill the GPU, never more than
// the grid allows.
inline unsigned int grid_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks));
}

// Debug / test switch: SPARKS_CUDA_PORTABLE=1 makes both ops take their CUDA-core paths
// (no tensor cores, no shared-memory response tiles), so that tests on an sm_80+ GPU can check
// those paths too. Read on every call so that a test can flip it.
inline bool force_portable_path() {
  const char* v = std::getenv("SPARKS_CUDA_PORTABLE");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace cuda
}  // namespace sparks
