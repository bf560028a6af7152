// Argument checking and geometry shared by every backend of sparks::conv2d and
// sparks::binary_conv2d. Only metadata is checked here (ranks, shapes, dtypes, devices,
// hyper-parameters); value checks that read tensor data (index range, codebook entries)
// belong to each backend, which reads that data anyway when it packs it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

#include "conv_geometry.h"

namespace sparks {

// At most this many terms (C_in/groups x kh x kw) per output: the kernels' int32 sums, and twice
// them, must not overflow. Larger layers are refused with a ValueError.
constexpr int64_t kMaxTerms = (int64_t{1} << 30) - 1;

// Checks conv2d's arguments (codebook (n, kh, kw); indices (C_out, C_in/groups)) and
// returns the geometry. Throws c10::ValueError naming the offending argument. Every size derived
// from the arguments (dilated kernel extent, padded input size, output element count) is checked
// to fit int64, so kernels can compute with them unchecked.
ConvGeometry check_codebook_conv2d_args(
    const at::Tensor& input, const at::Tensor& codebook, const at::Tensor& indices,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, double pad_value);

// Same for binary_conv2d (weight (C_out, C_in/groups, kh, kw)).
ConvGeometry check_binary_conv2d_args(
    const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, double pad_value);

// The optional fused arguments of both ops (see sparks_ext/ops.py for their semantics), as
// checked tensors; an absent argument is an undefined tensor.
struct FusedArgs {
  at::Tensor threshold;     // (C_in,): binarize input >= threshold[c] instead of input >= 0
  at::Tensor residual;      // (N, C_out, H_out, W_out), any strides
  at::Tensor prelu_weight;  // (C_out,)
  at::Tensor post_bias;     // (C_out,)
};

// Checks the fused arguments against the input and the geometry (ValueError naming the
// argument for a wrong rank, shape, dtype or device).
FusedArgs check_fused_args(const at::Tensor& input, const ConvGeometry& g,
                           const c10::optional<at::Tensor>& threshold,
                           const c10::optional<at::Tensor>& residual,
                           const c10::optional<at::Tensor>& prelu_weight,
                           const c10::optional<at::Tensor>& post_bias);

// The output tensor: input's dtype and device, channels_last iff the input is
// channels_last (and not also plainly contiguous), else contiguous NCHW.
at::Tensor allocate_output(const at::Tensor& input, const ConvGeometry& g);

}  // namespace sparks
