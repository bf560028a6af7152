// CUDA backend of sparks::binary_conv2d: the dense XNOR-popcount binary convolution as a
// bit-packed implicit GEMM.
//
// GEMM view, per group: rows m = (n, oh, ow), columns co, reduction k = t * (C_in/groups) + c
// over taps t and channels c, packed 32 bits per word (bit k % 32 of word k / 32), the same
// order for the input (A) and the weight (B). With x, w in {0, 1} for -1, +1, each valid tap
// contributes (2x - 1)(2w - 1) = 4xw - 2x - 2w + 1, so over the set S(m) of valid taps
//     out(m, co) = 4 popc(A_m & B_co) - 2 popc(A_m) - 2 popc(B_co over S(m)) + |S(m)|.
// AND + popcount is what the sm_80+ tensor cores do natively (on sm_90 the XOR form is emulated
// with two ANDs). Taps on zero padding are simply 0 bits in A, so the AND term and popc(A) skip
// them; their weight bits are removed from popc(B) with a per-(co, tap) count table, and |S| is
// (valid taps) * C_in/groups. With pad_value = +-1 every tap is valid and A holds the padding's
// bit. Channel and K padding are 0 bits on both sides and count nowhere.
//
// Kernels:
//   pack_weight_kernel   B (C_out, kwords) and tap_counts, the per-(co, tap) counts of +1
//                        weights (the CPU kernels' tap_counts),
//   pack_input_bits_kernel   A (groups, M, kwords) straight from the input's strides; or, when
//                        C_in/groups is a multiple of 32, pack_pixels_kernel (32 channel signs
//                        per word, once per pixel) + gather_patches_kernel (im2col of words),
//   binary_gemm_mma_kernel   64x64 tiles, mma.sync m16n8k256 b1 AND.POPC (sm_80+); when the
//                        pixel words exist it reads A's tiles straight from them (implicit GEMM,
//                        no im2col matrix in memory),
//   binary_gemm_popc_kernel  CUDA-core fallback (__popc), one thread per output: used below
//                        sm_80, for small groups (depthwise) and when SPARKS_CUDA_PORTABLE=1.
// popc(A) and the validity of each row are computed by the GEMMs themselves. Both end in the
// same integer formula and the CPU's output transform (cuda_helpers.cuh); the packers binarize
// against the threshold.
//
// Value checks: weight entries outside {-1, +1} trip a device-side assert (cuda_helpers.cuh)
// and read as -1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../conv_args.h"
#include "cuda_helpers.cuh"
#include "binary_conv_kernels.cuh"

namespace sparks {
namespace cuda {
namespace {

// Whether the MMA kernel was compiled for an sm_80+ target on this device (not only JIT-ed
// from older PTX); asked once per device, before any graph capture needs the answer.
bool mma_available(int device) {
  static std::atomic<int> cache[64] = {};  // 0 unknown, 1 no, 2 yes
  if (device < 0 || device >= 64) return false;
  int state = cache[device].load(std::memory_order_relaxed);
  if (state == 0) {
    cudaFuncAttributes attr;
    const bool ok =
        cudaFuncGetAttributes(&attr, binary_gemm_mma_kernel<float, false>) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();  // no image for this device: not sticky, just clear it
    // ptxVersion is the virtual architecture the code was compiled from (__CUDA_ARCH__):
    // sm_90 running PTX JIT-ed from compute_75 must not take the MMA path.
    state = ok && attr.ptxVersion >= 80 && attr.binaryVersion >= 80 ? 2 : 1;
    cache[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

// The GEMM's shapes and which kernels run.
struct GemmPlan {
  int taps;
  int64_t cin_g, cout_g;
  int64_t rows;           // M: output positions of all images
  int64_t kwords_padded;  // K words per row of A and B (a multiple of kStepWords for the MMA)
  int64_t co_tiles;       // kTileN-column tiles per group
  bool use_mma;           // tensor-core GEMM, else the CUDA-core one
  bool by_pixels;         // A from pixel words (C_in/groups a multiple of 32)
  bool implicit;          // the MMA GEMM reads A's tiles straight from the pixel words
  int64_t cwords;         // words per pixel when by_pixels
};

GemmPlan plan_gemm(const ConvGeometry& g, int device) {
  GemmPlan p;
  p.taps = static_cast<int>(g.kernel_h * g.kernel_w);
  p.cin_g = g.in_channels / g.groups;
  p.cout_g = g.out_channels / g.groups;
  p.rows = g.batch * g.out_h * g.out_w;
  const int64_t kwords = (p.cin_g * p.taps + 31) / 32;
  p.co_tiles = (p.cout_g + kTileN - 1) / kTileN;
  p.use_mma = !force_portable_path() && p.cout_g >= 16 && g.groups * p.co_tiles <= 65535 &&
              (p.rows + kTileM - 1) / kTileM <= 0x7fffffff && mma_available(device);
  p.kwords_padded = p.use_mma ? (kwords + kStepWords - 1) / kStepWords * kStepWords : kwords;
  p.by_pixels = p.cin_g % 32 == 0 && p.cin_g > 0;
  p.implicit = p.use_mma && p.by_pixels && p.kwords_padded <= kMaxImplicitWords;
  p.cwords = p.cin_g / 32;
  return p;
}

// B (C_out, kwords_padded) words and tap_counts (C_out, taps), on the stream.
struct PackedWeight {
  at::Tensor b, tap_counts;
};

PackedWeight pack_weight(const at::Tensor& weight, const ConvGeometry& g, const GemmPlan& p,
                         const at::TensorOptions& i32, cudaStream_t stream) {
  PackedWeight packed{at::empty({g.out_channels, p.kwords_padded}, i32),
                      at::empty({g.out_channels, p.taps}, i32)};
  const int64_t per_co = std::max<int64_t>(p.kwords_padded, p.taps);
  const unsigned int grid = grid_for(g.out_channels * per_co, kDenseThreads);
  uint32_t* b_ptr = reinterpret_cast<uint32_t*>(packed.b.data_ptr<int32_t>());
  if (weight.scalar_type() == at::kBool) {
    const at::Tensor w = weight.contiguous();
    pack_weight_kernel<uint8_t><<<grid, kDenseThreads, 0, stream>>>(
        reinterpret_cast<const uint8_t*>(w.const_data_ptr<bool>()), g.out_channels, p.cin_g,
        p.taps, p.kwords_padded, b_ptr, packed.tap_counts.data_ptr<int32_t>());
  } else {
    // float64 holds every integer and float entry exactly enough to test for -1 / +1.
    const at::Tensor w = weight.to(at::kDouble).contiguous();
    pack_weight_kernel<double><<<grid, kDenseThreads, 0, stream>>>(
        w.const_data_ptr<double>(), g.out_channels, p.cin_g, p.taps, p.kwords_padded, b_ptr,
        packed.tap_counts.data_ptr<int32_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

// A's source: the pixel words (by_pixels) and, unless the GEMM is implicit, the
// (groups, M, kwords_padded) patch matrix, from the pixel words or straight from the input.
template <typename scalar_t>
void launch_pack_input(const InputView<scalar_t>& x, bool channels_contiguous,
                       const ConvGeometry& g, const GemmPlan& p, uint32_t* pixels,
                       int64_t pixel_words, uint32_t* a, cudaStream_t stream) {
  if (p.by_pixels) {
    pack_pixels_kernel<scalar_t>
        <<<grid_for(channels_contiguous ? 32 * pixel_words : pixel_words, kDenseThreads),
           kDenseThreads, 0, stream>>>(x, g, p.cwords, channels_contiguous, pixels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!p.implicit)
      gather_patches_kernel<<<grid_for(g.groups * p.rows * p.taps, kDenseThreads), kDenseThreads,
                              0, stream>>>(pixels, g, p.rows, p.cwords, p.kwords_padded, a);
  } else {
    pack_input_bits_kernel<scalar_t>
        <<<grid_for(g.groups * p.rows, kDenseThreads), kDenseThreads, 0, stream>>>(
            x, g, p.rows, p.kwords_padded, a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_gemm(const ConvGeometry& g, const GemmPlan& p, const uint32_t* a,
                 const uint32_t* pixels, const PackedWeight& packed,
                 const OutputTransform<scalar_t>& transform, cudaStream_t stream) {
  const uint32_t* b = reinterpret_cast<const uint32_t*>(packed.b.const_data_ptr<int32_t>());
  const int32_t* tap_counts = packed.tap_counts.const_data_ptr<int32_t>();
  if (p.use_mma) {
    const dim3 grid(static_cast<unsigned int>((p.rows + kTileM - 1) / kTileM),
                    static_cast<unsigned int>(g.groups * p.co_tiles));
    if (p.implicit)
      binary_gemm_mma_kernel<scalar_t, true>
          <<<grid, kMmaThreads, implicit_smem_bytes(p.kwords_padded), stream>>>(
              nullptr, pixels, p.cwords, b, tap_counts, g, p.rows, p.kwords_padded, p.co_tiles,
              transform);
    else
      binary_gemm_mma_kernel<scalar_t, false><<<grid, kMmaThreads, 0, stream>>>(
          a, pixels, p.cwords, b, tap_counts, g, p.rows, p.kwords_padded, p.co_tiles, transform);
  } else {
    binary_gemm_popc_kernel<scalar_t>
        <<<grid_for(g.groups * p.rows * p.cout_g, kDenseThreads), kDenseThreads, 0, stream>>>(
            a, b, tap_counts, g, p.rows, p.kwords_padded, transform);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor binary_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              double pad_value, const c10::optional<at::Tensor>& threshold,
                              const c10::optional<at::Tensor>& residual,
                              const c10::optional<at::Tensor>& prelu_weight,
                              const c10::optional<at::Tensor>& post_bias) {
  const ConvGeometry g = check_binary_conv2d_args(input, weight, scale, bias, stride, padding,
                                                  dilation, groups, pad_value);
  const FusedArgs fused = check_fused_args(input, g, threshold, residual, prelu_weight, post_bias);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::Tensor output = allocate_output(input, g);
  if (output.numel() == 0) return output;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const GemmPlan p = plan_gemm(g, input.get_device());
  const at::TensorOptions i32 = input.options().dtype(at::kInt);
  const PackedWeight packed = pack_weight(weight, g, p, i32, stream);
  const at::Tensor a = at::empty({p.implicit ? 0 : g.groups * p.rows * p.kwords_padded}, i32);
  const at::Tensor pixels =
      at::empty({p.by_pixels ? g.batch * g.groups * g.in_h * g.in_w * p.cwords : 0}, i32);
  const TransformTensors tensors = transform_tensors(output, scale, bias, fused);
  const at::Tensor thr = fused.threshold.defined() ? fused.threshold.contiguous() : at::Tensor();
  uint32_t* a_ptr = reinterpret_cast<uint32_t*>(a.data_ptr<int32_t>());
  uint32_t* pixels_ptr = reinterpret_cast<uint32_t*>(pixels.data_ptr<int32_t>());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sparks_binary_conv2d_cuda", [&] {
    launch_pack_input<scalar_t>(make_input_view<scalar_t>(input, thr), input.stride(1) == 1, g, p,
                                pixels_ptr, pixels.numel(), a_ptr, stream);
    launch_gemm<scalar_t>(g, p, a_ptr, pixels_ptr, packed,
                          make_output_transform<scalar_t>(output, tensors), stream);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparks, CUDA, m) { m.impl("binary_conv2d", &binary_conv2d_cuda); }

}  // namespace cuda
}  // namespace sparks
