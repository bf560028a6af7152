#include "conv_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace sparks {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_pair(at::IntArrayRef v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 2, name, " must have 2 elements, got ", v.size());
}

void check_per_channel(const c10::optional<at::Tensor>& t, const char* name,
                       const at::Tensor& input, int64_t out_channels) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == out_channels, name,
                    " must have shape (C_out,) = (", out_channels, ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
                    input.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), name, " must be on the input's device ",
              input.device(), ", got ", t->device());
}

// Checks everything but the weight's own layout; `kernel_h/kernel_w/out_channels/in_per_group`
// come from the codebook+indices or from the dense weight.
ConvGeometry check_common(const at::Tensor& input, int64_t out_channels, int64_t weight_in_channels,
                          int64_t kernel_h, int64_t kernel_w,
                          const c10::optional<at::Tensor>& scale,
                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          double pad_value, const char* weight_name) {
  TORCH_CHECK_VALUE(input.dim() == 4, "input must be 4-D (N, C_in, H, W), got ", input.dim(),
                    "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(input.scalar_type()),
                    "input must be float16, bfloat16, float32 or float64, got ",
                    input.scalar_type());
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  check_pair(dilation, "dilation");
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, "stride must be positive, got ", stride);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "padding must be non-negative, got ",
                    padding);
  TORCH_CHECK_VALUE(dilation[0] > 0 && dilation[1] > 0, "dilation must be positive, got ",
                    dilation);
  TORCH_CHECK_VALUE(groups > 0, "groups must be positive, got ", groups);
  TORCH_CHECK_VALUE(pad_value == 0.0 || pad_value == 1.0 || pad_value == -1.0,
                    "pad_value must be 0, +1 or -1, got ", pad_value);
  TORCH_CHECK_VALUE(kernel_h > 0 && kernel_w > 0, weight_name,
                    " kernel size must be positive, got ", kernel_h, "x", kernel_w);
  TORCH_CHECK_VALUE(kernel_h * kernel_w <= kMaxTaps, weight_name, " kernel ", kernel_h, "x",
                    kernel_w, " has ", kernel_h * kernel_w,
                    " taps; at most 64 fit the bit packing");

  ConvGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.out_channels = out_channels;
  g.groups = groups;
  g.kernel_h = kernel_h;
  g.kernel_w = kernel_w;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  g.pad_value = static_cast<int>(pad_value);

  TORCH_CHECK_VALUE(g.in_channels % groups == 0, "groups (", groups,
                    ") must divide the input channels (", g.in_channels, ")");
  TORCH_CHECK_VALUE(out_channels % groups == 0, "groups (", groups,
                    ") must divide the output channels (", out_channels, ")");
  TORCH_CHECK_VALUE(weight_in_channels == g.in_channels / groups, weight_name,
                    " expects C_in/groups = ", weight_in_channels, " input channels per group, but input has ",
                    g.in_channels, " channels and groups = ", groups);

  const int64_t eff_h = g.dil_h * (kernel_h - 1) + 1;
  const int64_t eff_w = g.dil_w * (kernel_w - 1) + 1;
  TORCH_CHECK_VALUE(g.in_h + 2 * g.pad_h >= eff_h && g.in_w + 2 * g.pad_w >= eff_w,
                    "input spatial size (", g.in_h, "x", g.in_w, ") padded by (", g.pad_h, ", ",
                    g.pad_w, ") is smaller than the dilated kernel (", eff_h, "x", eff_w, ")");
  g.out_h = (g.in_h + 2 * g.pad_h - eff_h) / g.stride_h + 1;
  g.out_w = (g.in_w + 2 * g.pad_w - eff_w) / g.stride_w + 1;

  check_per_channel(scale, "scale", input, out_channels);
  check_per_channel(bias, "bias", input, out_channels);
  return g;
}

}  // namespace

ConvGeometry check_codebook_conv2d_args(
    const at::Tensor& input, const at::Tensor& codebook, const at::Tensor& indices,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    double pad_value) {
  TORCH_CHECK_VALUE(codebook.dim() == 3, "codebook must be 3-D (n, kh, kw), got ",
                    codebook.dim(), "-D with shape ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(0) > 0, "codebook must hold at least one codeword");
  TORCH_CHECK_VALUE(codebook.scalar_type() != at::kBool && !codebook.is_complex(),
                    "codebook must be an integer or floating tensor with entries in {-1, 0, +1}, got ",
                    codebook.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 2, "indices must be 2-D (C_out, C_in/groups), got ",
                    indices.dim(), "-D with shape ", indices.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(indices.scalar_type(), /*includeBool=*/false),
                    "indices must be an integer tensor, got ", indices.scalar_type());
  TORCH_CHECK(codebook.device() == input.device(), "codebook must be on the input's device ",
              input.device(), ", got ", codebook.device());
  TORCH_CHECK(indices.device() == input.device(), "indices must be on the input's device ",
              input.device(), ", got ", indices.device());
  return check_common(input, indices.size(0), indices.size(1), codebook.size(1), codebook.size(2),
                      scale, bias, stride, padding, dilation, groups, pad_value, "codebook");
}

ConvGeometry check_binary_conv2d_args(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, double pad_value) {
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight must be 4-D (C_out, C_in/groups, kh, kw), got ",
                    weight.dim(), "-D with shape ", weight.sizes());
  TORCH_CHECK_VALUE(!weight.is_complex(),
                    "weight must be a bool (True = +1) or real tensor with entries in {-1, +1}, got ",
                    weight.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "weight must be on the input's device ",
              input.device(), ", got ", weight.device());
  return check_common(input, weight.size(0), weight.size(1), weight.size(2), weight.size(3),
                      scale, bias, stride, padding, dilation, groups, pad_value, "weight");
}

namespace {

// A fused argument in the input's dtype and on its device.
void check_fused_tensor(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
                    input.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == input.device(), name, " must be on the input's device ",
                    input.device(), ", got ", t.device());
}

at::Tensor checked_vector(const c10::optional<at::Tensor>& t, const char* name,
                          const at::Tensor& input, int64_t size, const char* size_name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == size, name, " must have shape (", size_name,
                    ",) = (", size, ",), got ", t->sizes());
  check_fused_tensor(*t, name, input);
  return *t;
}

}  // namespace

FusedArgs check_fused_args(const at::Tensor& input, const ConvGeometry& g,
                           const c10::optional<at::Tensor>& threshold,
                           const c10::optional<at::Tensor>& residual,
                           const c10::optional<at::Tensor>& prelu_weight,
                           const c10::optional<at::Tensor>& post_bias) {
  FusedArgs f;
  f.threshold = checked_vector(threshold, "threshold", input, g.in_channels, "C_in");
  f.prelu_weight = checked_vector(prelu_weight, "prelu_weight", input, g.out_channels, "C_out");
  f.post_bias = checked_vector(post_bias, "post_bias", input, g.out_channels, "C_out");
  if (residual.has_value() && residual->defined()) {
    const at::Tensor& r = *residual;
    const std::vector<int64_t> want = {g.batch, g.out_channels, g.out_h, g.out_w};
    TORCH_CHECK_VALUE(r.dim() == 4 && r.sizes() == at::IntArrayRef(want),
                      "residual must have the output's shape (N, C_out, H_out, W_out) = ",
                      at::IntArrayRef(want), ", got ", r.sizes());
    check_fused_tensor(r, "residual", input);
    f.residual = r;
  }
  return f;
}

at::Tensor allocate_output(const at::Tensor& input, const ConvGeometry& g) {
  const bool channels_last = !input.is_contiguous() &&
                             input.is_contiguous(at::MemoryFormat::ChannelsLast);
  return at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                   input.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                               : at::MemoryFormat::Contiguous));
}

}  // namespace sparks
