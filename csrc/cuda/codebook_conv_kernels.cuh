// Device code of sparks::conv2d on CUDA (the host side, csrc/cuda/codebook_conv.cu, explains the
// algorithm and launches these). Kept apart from the host code so that tests/cuda_emu can run the
// very same kernels on the CPU.
#pragma once

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
         + kPos * 8                                // output offset per position
         + kCoTile * chunk * 4                     // indices
         + 2 * kPos * 4;                           // window origin (ih0, iw0) per position
}

// Largest chunk of input channels (<= kMaxChunk) whose tile fits the shared-memory budget; the
// caller falls back to the direct kernel if even one channel does not fit.
template <typename word_t>
int64_t tiled_chunk(int64_t n_cw, int64_t cin_g) {
  int64_t chunk = cin_g < 1 ? 1 : (cin_g > kMaxChunk ? kMaxChunk : cin_g);
  while (chunk > 1 && tiled_smem_bytes<word_t>(n_cw, chunk) > kSmemBudget) --chunk;
  return chunk;
}

template <typename scalar_t, typename word_t>
__global__ void __launch_bounds__(kThreads)
codebook_conv_tiled_kernel(const InputView<scalar_t> x, const ConvGeometry g,
                           const word_t* __restrict__ cb_sign, const word_t* __restrict__ cb_mask,
                           const int32_t* __restrict__ indices, int n_cw, int chunk,
                           int64_t pos_tiles, int64_t co_tiles, bool channels_fastest,
                           const OutputTransform<scalar_t> transform) {
  SPARKS_DYNAMIC_SHARED(smem);
  // Carved in this order so that every array stays aligned: the response block is a multiple of
  // 64 bytes long, the word arrays (8-byte multiples together) come before the int64 offsets,
  // those before the int32 arrays.
  uint8_t* resp = smem;
  word_t* patch = reinterpret_cast<word_t*>(resp + int64_t{chunk} * n_cw * kPos);
  word_t* valid = patch + chunk * kPos;
  word_t* sign = valid + kPos;
  word_t* mask = sign + n_cw;
  int64_t* out_offset = reinterpret_cast<int64_t*>(mask + n_cw);
  int32_t* idx = reinterpret_cast<int32_t*>(out_offset + kPos);
  int32_t* ih0 = idx + kCoTile * chunk;
  int32_t* iw0 = ih0 + kPos;

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
  // Per position, once: window origin, validity, output offset (divisions are costly on GPUs).
  for (int p = tid; p < kPos; p += kThreads) {
    const int64_t pos = pos0 + p < out_hw ? pos0 + p : 0;
    const int64_t oh = pos / g.out_w, ow = pos % g.out_w;
    ih0[p] = static_cast<int32_t>(oh * g.stride_h - g.pad_h);
    iw0[p] = static_cast<int32_t>(ow * g.stride_w - g.pad_w);
    valid[p] = pos0 + p < out_hw ? valid_word<word_t>(g, ih0[p], iw0[p]) : word_t{0};
    out_offset[p] = transform.offset(n, oh, ow);
  }
  __syncthreads();
  // Tiles away from zero padding (all of them for pad_value = +-1) skip the validity masks: one
  // popcount per response instead of two. The flag is the same for the whole block.
  const word_t all_taps = low_bits<word_t>(taps);
  bool all_valid = true;
  for (int p = 0; p < kPos; ++p) all_valid = all_valid && (valid[p] == all_taps || pos0 + p >= out_hw);

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
      patch[ci_l * kPos + p] =
          pos0 + p < out_hw ? patch_word<word_t>(x, g, n, grp * cin_g + ci0 + ci_l, ih0[p], iw0[p])
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
      const word_t* pw = patch + ci_l * kPos + p4 * 4;
      uint32_t packed = 0;
      if (all_valid) {
        const int base = taps + popc(m);
#pragma unroll
        for (int q = 0; q < 4; ++q)
          packed |= static_cast<uint32_t>(base - 2 * popc(m & (pw[q] ^ s))) << (8 * q);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const word_t mv = m & valid[p4 * 4 + q];
          packed |= static_cast<uint32_t>(taps + popc(mv) - 2 * popc(mv & (pw[q] ^ s))) << (8 * q);
        }
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
    const int p = pq * kPosPerThread + i;
    if (pos0 + p < out_hw) transform.store_at(acc[i] - bias, out_offset[p], grp * cout_g + co0 + co_l);
  }
}

// One thread per output: for small groups and huge codebooks.
template <typename scalar_t, typename word_t>
__global__ void __launch_bounds__(kThreads)
codebook_conv_direct_kernel(const InputView<scalar_t> x, const ConvGeometry g,
                            const word_t* __restrict__ cb_sign, const word_t* __restrict__ cb_mask,
                            const int32_t* __restrict__ indices, const OutputTransform<scalar_t> transform) {
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
    const int64_t ih0 = oh * g.stride_h - g.pad_h, iw0 = ow * g.stride_w - g.pad_w;
    const word_t v = valid_word<word_t>(g, ih0, iw0);
    int32_t acc = 0;
    for (int64_t ci = 0; ci < cin_g; ++ci) {
      const int k = indices[co * cin_g + ci];
      const word_t mv = cb_mask[k] & v;
      const word_t p = patch_word<word_t>(x, g, n, grp * cin_g + ci, ih0, iw0);
      acc += popc(mv) - 2 * popc(mv & (p ^ cb_sign[k]));
    }
    transform.store(acc, n, co, oh, ow);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace sparks
