// The output transform of every CPU kernel family: int32 sums -> output dtype.
//
// For output (n, co, oh, ow) with integer sum acc, in opmath (float for float16 / bfloat16 /
// float32 outputs, double for float64), each step rounded as written:
//     y = acc * scale[co] + bias[co]          (each optional)
//     y = y + residual[n, co, oh, ow]          (optional, read by its strides)
//     y = y >= 0 ? y : prelu_weight[co] * y    (optional)
//     y = y + post_bias[co]                    (optional)
//     out[n, co, oh, ow] = y rounded once to the output dtype (output's strides).
// No step is contracted into a fused multiply-add, so every kernel family, the CUDA kernels
// (csrc/cuda/cuda_helpers.cuh) and sparks_ext/reference.py give the same bits.
//
// Kernels hand over tiles of sums: rows x cols values, row r = flat output position p0 + r
// (p = oh * out_w + ow), column c = output channel co0 + c, row stride ld.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../conv_args.h"
#include "cpu_features.h"

namespace sparks {
namespace cpu {

class OutputTransform {
 public:
  // scale, bias: the op's optional (C_out,) arguments; the rest from check_fused_args.
  OutputTransform(const at::Tensor& output, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& bias, const FusedArgs& fused,
                  const ConvGeometry& g, Isa isa);

  void store(const int32_t* tile, int64_t ld, int64_t n, int64_t p0, int64_t rows, int64_t co0,
             int64_t cols) const;

 private:
  at::Tensor output_, scale_, bias_, residual_, prelu_, post_;  // undefined when absent
  int64_t out_w_;
  // AVX-512 rows for float32 / bfloat16 channels_last outputs (and residuals with contiguous
  // channels): 16 channels per instruction.
  bool fast_rows_ = false;
  void (*store_)(const OutputTransform&, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                 int64_t, int64_t);
  template <typename scalar_t>
  static void store_scalar(const OutputTransform& w, const int32_t* tile, int64_t ld, int64_t n,
                           int64_t p0, int64_t rows, int64_t co0, int64_t cols);
  void store_fast_rows(const int32_t* tile, int64_t ld, int64_t n, int64_t p0, int64_t rows,
                       int64_t co0, int64_t cols) const;
};

}  // namespace cpu
}  // namespace sparks
