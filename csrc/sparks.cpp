// The one schema file: every op of the `sparks` namespace is declared here.
// Backends register their kernels with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda;
// Python adds the fake (meta) kernels and the autograd formulas (sparks_ext/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(sparks, m) {
  // Both convs take the same optional fused arguments, applied in this order (sparks_ext/ops.py):
  // binarize input >= threshold[c]; after the integer sums, * scale + bias, + residual,
  // per-channel PReLU (prelu_weight), + post_bias, rounded once to the input's dtype.
  // Codebook-indexed binary convolution: each kernel (co, ci) is codebook[indices[co, ci]].
  m.def(
      "conv2d(Tensor input, Tensor codebook, Tensor indices, Tensor? scale, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, float pad_value, "
      "Tensor? threshold=None, Tensor? residual=None, Tensor? prelu_weight=None, "
      "Tensor? post_bias=None) -> Tensor");
  // Dense XNOR-popcount binary convolution with a {-1,+1} weight (C_out, C_in/groups, kh, kw).
  m.def(
      "binary_conv2d(Tensor input, Tensor weight, Tensor? scale, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, float pad_value, "
      "Tensor? threshold=None, Tensor? residual=None, Tensor? prelu_weight=None, "
      "Tensor? post_bias=None) -> Tensor");
  // The CPU kernel families this machine can run ("portable", "avx2", "avx512").
  m.def("cpu_kernels() -> str[]");
}
