// The geometry of one convolution call: plain integers, no ATen, so that the kernels' ATen-free
// cores (csrc/cpu/kernel_core.h) and their tests can use it without PyTorch.
#pragma once

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

}  // namespace sparks
