// CUDA backend of sparks::conv2d: the codebook-indexed binary convolution.
//
// Same algorithm as the CPU kernel (csrc/cpu/conv2d.cpp), tiled for the GPU. A block owns
// 64 consecutive output positions of one image and up to 64 output channels of one group. For
// each chunk of input channels it
//   1. binarizes and bit-packs the input patches of its positions (one word per patch, read
//      straight from the input with its strides: NCHW, channels_last or any view),
//   2. computes every codeword's response to every patch once into shared memory, one byte per
//      response (response + taps, so that it is in [0, 128]),
//   3. lets every output channel gather, by index, the responses of its input channels: a
//      thread adds 16 positions' bytes at once as 16-bit lanes of 32-bit words (SWAR), so one
//      128-bit shared load and 8 integer ops serve 16 outputs of one channel.
// Integer sums throughout; the bias of the biased bytes is removed once at the end and the
// output transform (scale, bias, residual, PReLU, post_bias) is the CPU one, rounded the same
// way (cuda_helpers.cuh); the threshold binarization happens where the patches are read.
//
// Shapes that gain nothing from shared response tiles (few output channels per group, e.g.
// depthwise) or whose tile would not fit shared memory (very large codebooks) take a direct
// kernel: one thread per output, responses computed on the fly.
//
// Value checks: see cuda_helpers.cuh. Out-of-range indices and codebook entries outside
// {-1, 0, +1} trip a device-side assert; the kernels clamp indices and read bad entries as 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../conv_args.h"
#include "cuda_helpers.cuh"
#include "codebook_conv_kernels.cuh"

namespace sparks {
namespace cuda {
namespace {

template <typename scalar_t, typename word_t>
void launch_codebook_conv(const at::Tensor& input, const at::Tensor& threshold, const ConvGeometry& g,
                          const at::Tensor& cb_words, const at::Tensor& idx, int64_t n_cw,
                          const OutputTransform<scalar_t>& transform) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const InputView<scalar_t> x = make_input_view<scalar_t>(input, threshold);
  const word_t* sign = reinterpret_cast<const word_t*>(cb_words.const_data_ptr<int64_t>());
  const word_t* mask = sign + n_cw;
  const int32_t* indices = idx.const_data_ptr<int32_t>();
  const int64_t cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;

  const int64_t chunk = tiled_chunk<word_t>(n_cw, cin_g);
  const int64_t pos_tiles = (g.out_h * g.out_w + kPos - 1) / kPos;
  const int64_t co_tiles = (cout_g + kCoTile - 1) / kCoTile;
  const int64_t blocks = pos_tiles * co_tiles * g.groups * g.batch;
  const bool tiled = !force_portable_path() && cout_g >= 8 &&
                     tiled_smem_bytes<word_t>(n_cw, chunk) <= kSmemBudget &&
                     blocks <= int64_t{0x7fffffff};
  if (tiled) {
    // Channel-fastest patch building when the input's channels are its densest dimension.
    const bool channels_fastest = input.stride(1) < input.stride(3);
    const int smem = static_cast<int>(tiled_smem_bytes<word_t>(n_cw, chunk));
    codebook_conv_tiled_kernel<scalar_t, word_t>
        <<<static_cast<unsigned int>(blocks), kThreads, smem, stream>>>(
            x, g, sign, mask, indices, static_cast<int>(n_cw), static_cast<int>(chunk), pos_tiles,
            co_tiles, channels_fastest, transform);
  } else {
    const int64_t total = g.batch * g.out_channels * g.out_h * g.out_w;
    codebook_conv_direct_kernel<scalar_t, word_t>
        <<<grid_for(total, kThreads), kThreads, 0, stream>>>(x, g, sign, mask, indices, transform);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& codebook,
                       const at::Tensor& indices, const c10::optional<at::Tensor>& scale,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       double pad_value, const c10::optional<at::Tensor>& threshold,
                       const c10::optional<at::Tensor>& residual,
                       const c10::optional<at::Tensor>& prelu_weight,
                       const c10::optional<at::Tensor>& post_bias) {
  const ConvGeometry g = check_codebook_conv2d_args(input, codebook, indices, scale, bias, stride,
                                                    padding, dilation, groups, pad_value);
  const FusedArgs fused = check_fused_args(input, g, threshold, residual, prelu_weight, post_bias);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::Tensor output = allocate_output(input, g);
  if (output.numel() == 0) return output;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_cw = codebook.size(0);
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  const bool wide = taps > 32;

  // Codebook -> (sign, mask) words; float64 holds every integer and float entry exactly
  // enough to test for -1 / 0 / +1, as on the CPU.
  const at::Tensor cb_values = codebook.to(at::kDouble).contiguous();
  const at::Tensor cb_words = at::empty({2 * n_cw}, input.options().dtype(at::kLong));
  if (wide) {
    uint64_t* s = reinterpret_cast<uint64_t*>(cb_words.data_ptr<int64_t>());
    pack_codebook_kernel<uint64_t><<<grid_for(n_cw, 128), 128, 0, stream>>>(
        cb_values.const_data_ptr<double>(), n_cw, taps, s, s + n_cw);
  } else {
    uint32_t* s = reinterpret_cast<uint32_t*>(cb_words.data_ptr<int64_t>());
    pack_codebook_kernel<uint32_t><<<grid_for(n_cw, 128), 128, 0, stream>>>(
        cb_values.const_data_ptr<double>(), n_cw, taps, s, s + n_cw);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Indices compared in int64 so that wide values cannot wrap into range through the cast.
  const at::Tensor idx_values = indices.to(at::kLong).contiguous();
  const at::Tensor idx = at::empty(indices.sizes(), input.options().dtype(at::kInt));
  if (idx.numel() > 0) {
    clamp_indices_kernel<<<grid_for(idx.numel(), 256), 256, 0, stream>>>(
        idx_values.const_data_ptr<int64_t>(), idx.numel(), n_cw, idx.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const TransformTensors tensors = transform_tensors(output, scale, bias, fused);
  const at::Tensor thr = fused.threshold.defined() ? fused.threshold.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sparks_conv2d_cuda", [&] {
    const OutputTransform<scalar_t> transform = make_output_transform<scalar_t>(output, tensors);
    if (wide)
      launch_codebook_conv<scalar_t, uint64_t>(input, thr, g, cb_words, idx, n_cw, transform);
    else
      launch_codebook_conv<scalar_t, uint32_t>(input, thr, g, cb_words, idx, n_cw, transform);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparks, CUDA, m) { m.impl("conv2d", &conv2d_cuda); }

}  // namespace cuda
}  // namespace sparks
