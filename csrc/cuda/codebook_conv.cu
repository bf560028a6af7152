// CUDA backend of sparks::conv2d: the codebook-indexed binary convolution.
//
// Same algorithm as the CPU kernel (csrc/cpu/codebook_conv.cpp), tiled for the GPU. A block owns
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
// scale/bias epilogue is the CPU one, rounded the same way (cuda_helpers.cuh).
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

#include <algorithm>

#include "../conv_args.h"
#include "cuda_helpers.cuh"

namespace sparks {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPos = 64;        // output positions per block
constexpr int kCoTile = 64;     // output channels per block
constexpr int kPosPerThread = 16;  // gather: kThreads = kCoTile * (kPos / kPosPerThread)
constexpr int kMaxChunk = 64;   // input channels per shared-memory stage (keeps 16-bit lanes exact)
constexpr int kSmemBudget = 48 * 1024;  // no opt-in needed on any architecture
static_assert(kThreads == kCoTile * (kPos / kPosPerThread), "gather mapping");

// Packs the (n, kh, kw) codebook, given as float64, into (sign, mask) words.
template <typename word_t>
__global__ void pack_codebook_kernel(const double* __restrict__ values, int64_t n, int taps,
                                     word_t* __restrict__ sign, word_t* __restrict__ mask) {
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k < n;
       k += int64_t{gridDim.x} * blockDim.x) {
    word_t s = 0, m = 0;
    for (int t = 0; t < taps; ++t) {
      const double x = values[k * taps + t];
      CUDA_KERNEL_ASSERT_MSG(x == 1.0 || x == -1.0 || x == 0.0,
                             "sparks::conv2d: codebook entries must be -1, 0 or +1");
      if (x == 1.0 || x == -1.0) m |= word_t{1} << t;  // anything else reads as 0
      if (x == 1.0) s |= word_t{1} << t;
    }
    sign[k] = s;
    mask[k] = m;
  }
}

// int32 copy of the (C_out, C_in/groups) indices, clamped to [0, n).
__global__ void clamp_indices_kernel(const int64_t* __restrict__ in, int64_t count, int64_t n,
                                     int32_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t v = in[i];
    CUDA_KERNEL_ASSERT_MSG(v >= 0 && v < n, "sparks::conv2d: indices must lie in [0, n)");
    out[i] = static_cast<int32_t>(v < 0 ? 0 : (v >= n ? n - 1 : v));
  }
}

// Bytes of dynamic shared memory of the tiled kernel for `chunk` input channels per stage.
template <typename word_t>
int64_t tiled_smem_bytes(int64_t n_cw, int64_t chunk) {
  return chunk * n_cw * kPos                       // responses (uint8)
         + chunk * kPos * int64_t{sizeof(word_t)}  // patches
         + kPos * int64_t{sizeof(word_t)}          // validity
         + 2 * n_cw * int64_t{sizeof(word_t)}      // codebook sign, mask
         + kCoTile * chunk * 4;                    // indices
}

template <typename scalar_t, typename word_t>
__global__ void __launch_bounds__(kThreads)
codebook_conv_tiled_kernel(const InputView<scalar_t> x, const ConvGeometry g,
                           const word_t* __restrict__ cb_sign, const word_t* __restrict__ cb_mask,
                           const int32_t* __restrict__ indices, int n_cw, int chunk,
                           int64_t pos_tiles, int64_t co_tiles, bool channels_fastest,
                           const Epilogue<scalar_t> epilogue) {
  extern __shared__ __align__(16) unsigned char smem[];
  // Carved in this order so that every array stays aligned: the response block is a multiple of
  // 64 bytes long, the word arrays come before the int array.
  uint8_t* resp = smem;
  word_t* patch = reinterpret_cast<word_t*>(resp + int64_t{chunk} * n_cw * kPos);
  word_t* valid = patch + chunk * kPos;
  word_t* sign = valid + kPos;
  word_t* mask = sign + n_cw;
  int32_t* idx = reinterpret_cast<int32_t*>(mask + n_cw);

  const int tid = threadIdx.x;
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  const int64_t cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;
  const int64_t out_hw = g.out_h * g.out_w;

  int64_t tile = blockIdx.x;
  const int64_t pos0 = (tile % pos_tiles) * kPos;
  tile /= pos_tiles;
  const int64_t co0 = (tile % co_tiles) * kCoTile;
  tile /= co_tiles;
  const int64_t grp = tile % g.groups;
  const int64_t n = tile / g.groups;

  for (int k = tid; k < n_cw; k += kThreads) {
    sign[k] = cb_sign[k];
    mask[k] = cb_mask[k];
  }
  for (int p = tid; p < kPos; p += kThreads) {
    const int64_t pos = pos0 + p;
    valid[p] = pos < out_hw ? valid_word<word_t>(g, pos / g.out_w, pos % g.out_w) : word_t{0};
  }

  // Gather role of this thread: output channel co0 + co_l, positions pq * 16 .. pq * 16 + 15.
  const int co_l = tid / (kPos / kPosPerThread);
  const int pq = tid % (kPos / kPosPerThread);
  const bool co_active = co0 + co_l < cout_g;
  int32_t acc[kPosPerThread];
#pragma unroll
  for (int i = 0; i < kPosPerThread; ++i) acc[i] = 0;

  for (int64_t ci0 = 0; ci0 < cin_g; ci0 += chunk) {
    const int cc = static_cast<int>(cin_g - ci0 < chunk ? cin_g - ci0 : chunk);
    // 1. Patch words. Consecutive threads take consecutive positions (coalesced for NCHW) or
    //    consecutive channels (coalesced for channels_last).
    for (int item = tid; item < cc * kPos; item += kThreads) {
      const int ci_l = channels_fastest ? item % cc : item / kPos;
      const int p = channels_fastest ? item / cc : item % kPos;
      const int64_t pos = pos0 + p;
      patch[ci_l * kPos + p] =
          pos < out_hw ? patch_word<word_t>(x, g, n, grp * cin_g + ci0 + ci_l, pos / g.out_w,
                                            pos % g.out_w)
                       : word_t{0};
    }
    for (int item = tid; item < kCoTile * cc; item += kThreads) {
      const int c = item / cc, ci_l = item % cc;
      idx[c * chunk + ci_l] =
          co0 + c < cout_g ? indices[(grp * cout_g + co0 + c) * cin_g + ci0 + ci_l] : 0;
    }
    __syncthreads();

    // 2. Responses, biased by +taps into [0, 2 * taps] <= 128: four positions per 32-bit store.
    uint32_t* resp32 = reinterpret_cast<uint32_t*>(resp);
    for (int item = tid; item < cc * n_cw * (kPos / 4); item += kThreads) {
      const int p4 = item % (kPos / 4);
      const int row = item / (kPos / 4);  // ci_l * n_cw + k
      const int k = row % n_cw, ci_l = row / n_cw;
      const word_t s = sign[k], m = mask[k];
      uint32_t packed = 0;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int p = p4 * 4 + q;
        const word_t mv = m & valid[p];
        const int r = taps + popc(mv) - 2 * popc(mv & (patch[ci_l * kPos + p] ^ s));
        packed |= static_cast<uint32_t>(r) << (8 * q);
      }
      resp32[row * (kPos / 4) + p4] = packed;
    }
    __syncthreads();

    // 3. Gather. Bytes 0 and 2 of each word go to the 16-bit lanes of `lo`, bytes 1 and 3 to
    //    those of `hi`; a lane sums at most kMaxChunk bytes <= 128, so it cannot carry over.
    if (co_active) {
      uint32_t lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
      const uint4* resp128 = reinterpret_cast<const uint4*>(resp);
      for (int ci_l = 0; ci_l < cc; ++ci_l) {
        const int k = idx[co_l * chunk + ci_l];
        const uint4 w = resp128[(ci_l * n_cw + k) * (kPos / 16) + pq];
        lo[0] += w.x & 0x00FF00FFu;
        hi[0] += (w.x >> 8) & 0x00FF00FFu;
        lo[1] += w.y & 0x00FF00FFu;
        hi[1] += (w.y >> 8) & 0x00FF00FFu;
        lo[2] += w.z & 0x00FF00FFu;
        hi[2] += (w.z >> 8) & 0x00FF00FFu;
        lo[3] += w.w & 0x00FF00FFu;
        hi[3] += (w.w >> 8) & 0x00FF00FFu;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[4 * j + 0] += static_cast<int32_t>(lo[j] & 0xFFFFu);
        acc[4 * j + 1] += static_cast<int32_t>(hi[j] & 0xFFFFu);
        acc[4 * j + 2] += static_cast<int32_t>(lo[j] >> 16);
        acc[4 * j + 3] += static_cast<int32_t>(hi[j] >> 16);
      }
    }
    __syncthreads();  // the next chunk overwrites patches, indices and responses
  }

  if (!co_active) return;
  const int32_t bias = taps * static_cast<int32_t>(cin_g);
#pragma unroll
  for (int i = 0; i < kPosPerThread; ++i) {
    const int64_t pos = pos0 + pq * kPosPerThread + i;
    if (pos < out_hw)
      epilogue.store(acc[i] - bias, n, grp * cout_g + co0 + co_l, pos / g.out_w, pos % g.out_w);
  }
}

// One thread per output: for small groups and huge codebooks.
template <typename scalar_t, typename word_t>
__global__ void __launch_bounds__(kThreads)
codebook_conv_direct_kernel(const InputView<scalar_t> x, const ConvGeometry g,
                            const word_t* __restrict__ cb_sign, const word_t* __restrict__ cb_mask,
                            const int32_t* __restrict__ indices, const Epilogue<scalar_t> epilogue) {
  const int64_t cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;
  const int64_t out_hw = g.out_h * g.out_w;
  const int64_t total = g.batch * g.out_channels * out_hw;
  for (int64_t item = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; item < total;
       item += int64_t{gridDim.x} * blockDim.x) {
    const int64_t pos = item % out_hw;
    const int64_t co = (item / out_hw) % g.out_channels;
    const int64_t n = item / (out_hw * g.out_channels);
    const int64_t oh = pos / g.out_w, ow = pos % g.out_w;
    const int64_t grp = co / cout_g;
    const word_t v = valid_word<word_t>(g, oh, ow);
    int32_t acc = 0;
    for (int64_t ci = 0; ci < cin_g; ++ci) {
      const int k = indices[co * cin_g + ci];
      const word_t mv = cb_mask[k] & v;
      const word_t p = patch_word<word_t>(x, g, n, grp * cin_g + ci, oh, ow);
      acc += popc(mv) - 2 * popc(mv & (p ^ cb_sign[k]));
    }
    epilogue.store(acc, n, co, oh, ow);
  }
}

template <typename scalar_t, typename word_t>
void launch_codebook_conv(const at::Tensor& input, const ConvGeometry& g, const at::Tensor& cb_words,
                          const at::Tensor& idx, int64_t n_cw, const Epilogue<scalar_t>& epilogue) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const InputView<scalar_t> x = make_input_view<scalar_t>(input);
  const word_t* sign = reinterpret_cast<const word_t*>(cb_words.const_data_ptr<int64_t>());
  const word_t* mask = sign + n_cw;
  const int32_t* indices = idx.const_data_ptr<int32_t>();
  const int64_t cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;

  // Largest chunk of input channels whose tile fits the shared-memory budget.
  int64_t chunk = std::min<int64_t>(std::max<int64_t>(cin_g, 1), kMaxChunk);
  while (chunk > 1 && tiled_smem_bytes<word_t>(n_cw, chunk) > kSmemBudget) --chunk;
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
            co_tiles, channels_fastest, epilogue);
  } else {
    const int64_t total = g.batch * g.out_channels * g.out_h * g.out_w;
    codebook_conv_direct_kernel<scalar_t, word_t>
        <<<grid_for(total, kThreads), kThreads, 0, stream>>>(x, g, sign, mask, indices, epilogue);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor conv2d_cuda(const at::Tensor& input, const at::Tensor& codebook,
                       const at::Tensor& indices, const c10::optional<at::Tensor>& scale,
                       const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       double pad_value) {
  const ConvGeometry g = check_codebook_conv2d_args(input, codebook, indices, scale, bias, stride,
                                                    padding, dilation, groups, pad_value);
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

  const at::Tensor scale_c = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sparks_conv2d_cuda", [&] {
    const Epilogue<scalar_t> epilogue = make_epilogue<scalar_t>(output, scale_c, bias_c);
    if (wide)
      launch_codebook_conv<scalar_t, uint64_t>(input, g, cb_words, idx, n_cw, epilogue);
    else
      launch_codebook_conv<scalar_t, uint32_t>(input, g, cb_words, idx, n_cw, epilogue);
  });
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparks, CUDA, m) { m.impl("conv2d", &conv2d_cuda); }

}  // namespace cuda
}  // namespace sparks
