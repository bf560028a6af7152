// Argument checking and geometry shared by every backend of sparks::conv2d and
// sparks::binary_conv2d. Only metadata is checked here (ranks, shapes, dtypes, devices,
// hyper-parameters); value checks that read tensor data (index range, codebook entries)
// belong to each backend, which reads that data anyway when it packs it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace sparks {

// Everything a kernel needs to know about one convolution call.
struct ConvGeometry {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, groups;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;
  // pad_value as an int in {-1, 0, +1}.
  int pad_value;

  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
  int64_t taps() const { return kernel_h * kernel_w; }
};

// The kernel's taps are packed into one 64-bit word per input patch.
constexpr int64_t kMaxTaps = 64;

// Checks conv2d's arguments (codebook (n, kh, kw); indices (C_out, C_in/groups)) and
// returns the geometry. Throws c10::ValueError naming the offending argument.
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
