// Device code of sparks::binary_conv2d on CUDA (the host side, csrc/cuda/binary_conv.cu, explains
// the algorithm and launches these). Kept apart from the host code so that tests/cuda_emu can run
// the very same kernels on the CPU.
#pragma once

#include "../conv_args.h"
#include "cuda_helpers.cuh"

namespace sparks {
namespace cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64;  // block tile of the MMA GEMM
constexpr int kStepWords = 8;            // one m16n8k256 K step = 256 bits = 8 words
constexpr int kRowWords = 12;            // shared row stride: conflict-free fragment loads
constexpr int kMmaThreads = 128;         // 4 warps, 2 x 2, each 32 x 32
constexpr int kDenseThreads = 256;

// Weight bit (1 = +1) of a bool weight (read as bytes) or a float64 one.
__device__ __forceinline__ uint32_t weight_bit(uint8_t v) { return v != 0 ? 1u : 0u; }
__device__ __forceinline__ uint32_t weight_bit(double v) { return v == 1.0 ? 1u : 0u; }

__device__ __forceinline__ void check_weight(uint8_t) {}
__device__ __forceinline__ void check_weight(double v) {
  CUDA_KERNEL_ASSERT_MSG(v == 1.0 || v == -1.0,
                         "sparks::binary_conv2d: weight entries must be -1 or +1 (or bool)");
}

// Thread (co, j): word j of B's row co (j < kwords_padded) and tap_counts[co][j], the count of
// +1 weights of tap j over the channels (j < taps). weight is (C_out, cin_g, kh, kw) contiguous.
template <typename weight_t>
__global__ void pack_weight_kernel(const weight_t* __restrict__ weight, int64_t out_channels,
                                   int64_t cin_g, int taps, int64_t kwords_padded,
                                   uint32_t* __restrict__ b, int32_t* __restrict__ tap_counts) {
  const int64_t per_co = kwords_padded > taps ? kwords_padded : taps;
  const int64_t kbits = cin_g * taps;
  for (int64_t item = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; item < out_channels * per_co;
       item += int64_t{gridDim.x} * blockDim.x) {
    const int64_t co = item / per_co, j = item % per_co;
    const weight_t* w = weight + co * kbits;  // w[c * taps + t]
    if (j < kwords_padded) {
      uint32_t word = 0;
      for (int bit = 0; bit < 32; ++bit) {
        const int64_t k = j * 32 + bit;
        if (k >= kbits) break;
        const int64_t t = k / cin_g, c = k % cin_g;
        check_weight(w[c * taps + t]);  // every entry is checked exactly once, here
        word |= weight_bit(w[c * taps + t]) << bit;
      }
      b[co * kwords_padded + j] = word;
    }
    if (j < taps) {
      int32_t count = 0;
      for (int64_t c = 0; c < cin_g; ++c) count += static_cast<int32_t>(weight_bit(w[c * taps + j]));
      tap_counts[co * taps + j] = count;
    }
  }
}

// A, general case (any C_in/groups): thread (grp, m) packs row m of group grp bit by bit,
// straight from the input's strides. Rows are written whole, K padding included.
template <typename scalar_t>
__global__ void pack_input_bits_kernel(const InputView<scalar_t> x, const ConvGeometry g,
                                       int64_t rows, int64_t kwords_padded,
                                       uint32_t* __restrict__ a) {
  const int64_t cin_g = g.in_channels / g.groups;
  const int64_t out_hw = g.out_h * g.out_w;
  const uint32_t pad_bit = g.pad_value > 0 ? 1u : 0u;
  for (int64_t item = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; item < g.groups * rows;
       item += int64_t{gridDim.x} * blockDim.x) {
    const int64_t grp = item / rows, m = item % rows;
    const int64_t n = m / out_hw, pos = m % out_hw;
    const int64_t oh = pos / g.out_w, ow = pos % g.out_w;
    uint32_t* row = a + item * kwords_padded;
    uint32_t word = 0;
    int bit = 0;
    int64_t w_out = 0;
    for (int64_t i = 0; i < g.kernel_h; ++i) {
      const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
      for (int64_t j = 0; j < g.kernel_w; ++j) {
        const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
        const bool inside = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
        for (int64_t c = 0; c < cin_g; ++c) {
          word |= (inside ? x.bit(n, grp * cin_g + c, ih, iw) : pad_bit) << bit;
          if (++bit == 32) {
            row[w_out++] = word;
            word = 0;
            bit = 0;
          }
        }
      }
    }
    if (bit > 0) row[w_out++] = word;
    for (; w_out < kwords_padded; ++w_out) row[w_out] = 0;
  }
}

// A when C_in/groups is a multiple of 32, in two cheap passes. First every input pixel's channel
// signs, 32 per word: pixels (n, grp, h, w) x cwords words. With channels_last input a warp
// reads 32 consecutive channels and __ballot_sync forms the word; otherwise a thread loops over
// 32 channel planes while its neighbours read the neighbouring pixels.
template <typename scalar_t>
__global__ void pack_pixels_kernel(const InputView<scalar_t> x, const ConvGeometry g,
                                   int64_t cwords, bool channels_contiguous,
                                   uint32_t* __restrict__ pixels) {
  const int64_t cin_g = g.in_channels / g.groups;
  const int64_t hw = g.in_h * g.in_w;
  const int64_t total = g.batch * g.groups * hw * cwords;
  if (channels_contiguous) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = int64_t{gridDim.x} * blockDim.x / 32;
    for (int64_t item = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32; item < total;
         item += warps) {  // item is the same for the whole warp: the ballot is uniform
      const int64_t cw = item % cwords, pixel = item / cwords;
      const int64_t p = pixel % hw, ng = pixel / hw;
      const int64_t grp = ng % g.groups, n = ng / g.groups;
      const uint32_t bit = x.bit(n, grp * cin_g + cw * 32 + lane, p / g.in_w, p % g.in_w);
      const uint32_t word = __ballot_sync(0xffffffffu, bit != 0);
      if (lane == 0) pixels[item] = word;
    }
  } else {
    for (int64_t item = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; item < total;
         item += int64_t{gridDim.x} * blockDim.x) {
      // Pixel fastest across threads (coalesced reads of each channel plane).
      const int64_t p = item % hw, rest = item / hw;
      const int64_t cw = rest % cwords, ng = rest / cwords;
      const int64_t grp = ng % g.groups, n = ng / g.groups;
      const int64_t h = p / g.in_w, w = p % g.in_w;
      uint32_t word = 0;
      for (int b = 0; b < 32; ++b) word |= x.bit(n, grp * cin_g + cw * 32 + b, h, w) << b;
      pixels[(ng * hw + p) * cwords + cw] = word;
    }
  }
}

// Then thread (grp, m, t) copies tap t's pixel words into row m of A (word t * cwords + cw is
// channels cw*32 .. cw*32+31 of tap t: the same bit order as the general packer), or the
// padding's words; the last tap's thread also zeroes the K padding.
__global__ void gather_patches_kernel(const uint32_t* __restrict__ pixels, const ConvGeometry g,
                                      int64_t rows, int64_t cwords, int64_t kwords_padded,
                                      uint32_t* __restrict__ a) {
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  const int64_t out_hw = g.out_h * g.out_w;
  const uint32_t pad_word = g.pad_value > 0 ? 0xFFFFFFFFu : 0u;
  for (int64_t item = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; item < g.groups * rows * taps;
       item += int64_t{gridDim.x} * blockDim.x) {
    const int t = static_cast<int>(item % taps);
    const int64_t row_index = item / taps;  // grp * rows + m
    const int64_t grp = row_index / rows, m = row_index % rows;
    const int64_t n = m / out_hw, pos = m % out_hw;
    const int64_t ih = (pos / g.out_w) * g.stride_h - g.pad_h + (t / g.kernel_w) * g.dil_h;
    const int64_t iw = (pos % g.out_w) * g.stride_w - g.pad_w + (t % g.kernel_w) * g.dil_w;
    uint32_t* dst = a + row_index * kwords_padded + t * cwords;
    if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w) {
      const uint32_t* src = pixels + (((n * g.groups + grp) * g.in_h + ih) * g.in_w + iw) * cwords;
      for (int64_t cw = 0; cw < cwords; ++cw) dst[cw] = src[cw];
    } else {
      for (int64_t cw = 0; cw < cwords; ++cw) dst[cw] = pad_word;
    }
    if (t == taps - 1)
      for (int64_t w = taps * cwords; w < kwords_padded; ++w) a[row_index * kwords_padded + w] = 0;
  }
}

// The integer dot product of one output. The CPU kernels count XOR mismatches,
// dot = K - 2 popc(x ^ w) over the valid taps (K = |valid taps| * cin_g); the tensor cores' b1
// MMA only has AND + popc, so both CUDA GEMMs use the AND form of the same integer
// (popc(x ^ w) = popc(x) + popc(w) - 2 popc(x & w)):
//   dot = 4 popc(A & B) - 2 popc(A) - 2 popc(B over valid taps) + |valid taps| * cin_g,
// with A the packed input patch, B the packed weight, b_total = popc(B) over all taps and
// tap_counts_row the popc of B per tap (only zero padding leaves taps invalid).
__device__ __forceinline__ int32_t and_popc_dot(int32_t and_popc, int32_t a_popc, uint64_t valid,
                                                int32_t b_total,
                                                const int32_t* __restrict__ tap_counts_row,
                                                const ConvGeometry& g) {
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  const int32_t cin_g = static_cast<int32_t>(g.in_channels / g.groups);
  int32_t b_popc = b_total, valid_taps = taps;
  if (valid != low_bits<uint64_t>(taps)) {
    valid_taps = __popcll(valid);
    b_popc = 0;
    for (uint64_t v = valid; v != 0; v &= v - 1) b_popc += tap_counts_row[__ffsll(v) - 1];
  }
  return 4 * and_popc - 2 * a_popc - 2 * b_popc + valid_taps * cin_g;
}

// and_popc_dot of one output through the output transform, at its position's offset
// (OutputTransform::offset) in channel co.
template <typename scalar_t>
__device__ __forceinline__ void store_and_popc_output(int32_t and_popc, int32_t a_popc,
                                                      uint64_t valid, int32_t b_total,
                                                      const int32_t* __restrict__ tap_counts_row,
                                                      const ConvGeometry& g,
                                                      int64_t position_offset, int64_t co,
                                                      const OutputTransform<scalar_t>& transform) {
  transform.store_at(and_popc_dot(and_popc, a_popc, valid, b_total, tap_counts_row, g),
                     position_offset, co);
}

__device__ __forceinline__ void mma_and_popc(int32_t (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(SPARKS_CUDA_EMULATION)
  emulated_mma_and_popc(d, a, b);  // tests/cuda_emu: the PTX semantics, run on the CPU
#else
  CUDA_KERNEL_ASSERT_MSG(false, "sparks::binary_conv2d: tensor-core path needs sm_80+");
#endif
}

// Dynamic shared memory of the implicit MMA kernel, and the largest K it takes.
constexpr int64_t kMaxImplicitWords = 2048;
inline int64_t implicit_smem_bytes(int64_t kwords_padded) { return 12 * kwords_padded; }

// Shared-memory rows of one K step: A's 64 rows or B's 64 columns, 8 words each (row stride
// kRowWords).
using StepRows = uint32_t[kTileM][kRowWords];
static_assert(kTileM == kTileN, "A and B step rows share one shape");

// Per A row of the block, once (divisions are costly): the window origin, the pixel plane
// (n * groups + grp), the validity word and the output offset. Rows past `rows` take row 0's
// position (their results are never stored).
template <typename scalar_t>
__device__ __forceinline__ void mma_row_origins(int tid, const ConvGeometry& g, int64_t rows,
                                                int64_t m0, int64_t grp,
                                                const OutputTransform<scalar_t>& transform,
                                                int32_t* ih0_s, int32_t* iw0_s, int64_t* image_s,
                                                uint64_t* valid_s, int64_t* offset_s) {
  const int64_t out_hw = g.out_h * g.out_w;
  for (int r = tid; r < kTileM; r += kMmaThreads) {
    const int64_t m = m0 + r < rows ? m0 + r : 0;
    const int64_t n = m / out_hw, pos = m % out_hw;
    const int64_t oh = pos / g.out_w, ow = pos % g.out_w;
    ih0_s[r] = static_cast<int32_t>(oh * g.stride_h - g.pad_h);
    iw0_s[r] = static_cast<int32_t>(ow * g.stride_w - g.pad_w);
    image_s[r] = n * g.groups + grp;
    valid_s[r] = valid_word<uint64_t>(g, ih0_s[r], iw0_s[r]);
    offset_s[r] = transform.offset(n, oh, ow);
  }
}

// The implicit GEMM's per-K-word tables: K word w is channel word cw_s[w] of the pixel at
// offset (dy_s[w], dx_s[w]) from the window origin; cw_s[w] = -1 marks K padding.
__device__ __forceinline__ void implicit_k_tables(int tid, const ConvGeometry& g, int taps,
                                                  int64_t cwords, int64_t kwords_padded,
                                                  int32_t* dy_s, int32_t* dx_s, int32_t* cw_s) {
  for (int64_t w = tid; w < kwords_padded; w += kMmaThreads) {
    const int64_t t = w / cwords;
    const bool real = t < taps;  // else K padding
    dy_s[w] = real ? static_cast<int32_t>((t / g.kernel_w) * g.dil_h) : 0;
    dx_s[w] = real ? static_cast<int32_t>((t % g.kernel_w) * g.dil_w) : 0;
    cw_s[w] = real ? static_cast<int32_t>(w % cwords) : -1;
  }
}

// popc(B) over all taps of the block's output channels co0 .. co0 + kTileN - 1 (0 past cout_g).
__device__ __forceinline__ void weight_totals(int tid, const int32_t* __restrict__ tap_counts,
                                              int64_t grp, int64_t cout_g, int64_t co0, int taps,
                                              int32_t* b_total_s) {
  for (int c = tid; c < kTileN; c += kMmaThreads) {
    const int64_t co = co0 + c;
    int32_t total = 0;
    if (co < cout_g)
      for (int t = 0; t < taps; ++t) total += tap_counts[(grp * cout_g + co) * taps + t];
    b_total_s[c] = total;
  }
}

// A thread's 16-byte piece (half a K step) of A row m0 + ld_row for K step s: read from A, or
// (kImplicit) gathered from the pixel words through the K-word tables (the padding's word
// outside the image). The per-row and K-word tables are read from shared memory.
template <bool kImplicit>
struct APieceLoader {
  const uint4* a_src;  // !kImplicit: this piece's row in A, nullptr past the rows
  const uint32_t* __restrict__ pixels;
  int64_t cwords;
  const ConvGeometry& g;
  const int32_t *dy_s, *dx_s, *cw_s, *ih0_s, *iw0_s;
  const int64_t* image_s;
  int ld_row, ld_half;
  bool row_inside;     // m0 + ld_row < rows
  uint32_t pad_word;   // all 32 channels of a word are real (C_in/groups a multiple of 32)

  __device__ __forceinline__ uint4 operator()(int64_t s) const {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    if constexpr (!kImplicit) {
      return a_src ? a_src[s * 2] : zero;
    } else {
      if (!row_inside) return zero;
      uint32_t v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t w = s * kStepWords + ld_half * 4 + q;
        const int32_t cw = cw_s[w];
        const int64_t ih = ih0_s[ld_row] + dy_s[w], iw = iw0_s[ld_row] + dx_s[w];
        v[q] = cw < 0 ? 0u
               : (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)
                   ? pixels[((image_s[ld_row] * g.in_h + ih) * g.in_w + iw) * cwords + cw]
                   : pad_word;
      }
      return make_uint4(v[0], v[1], v[2], v[3]);
    }
  }
};

// Warp (wm, wn)'s 2 x 4 m16n8k256 products of one K step from the step's shared rows, in the
// fragment layout described at binary_gemm_mma_kernel.
__device__ __forceinline__ void mma_step(int32_t (&acc)[2][4][4], const StepRows& as,
                                         const StepRows& bs, int wm, int wn, int gid, int tig) {
  uint32_t af[2][4], bf[4][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = wm + i * 16 + gid;
    af[i][0] = as[r][tig];
    af[i][1] = as[r + 8][tig];
    af[i][2] = as[r][tig + 4];
    af[i][3] = as[r + 8][tig + 4];
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = wn + j * 8 + gid;
    bf[j][0] = bs[c][tig];
    bf[j][1] = bs[c][tig + 4];
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_and_popc(acc[i][j], af[i], bf[j]);
}

// The K loop over `steps` steps, double-buffered: the next step is fetched into registers while
// this one multiplies; one barrier per step suffices because a buffer is rewritten only two
// steps after it was read. Returns popc of the A pieces this thread loaded.
template <bool kImplicit>
__device__ __forceinline__ int32_t mma_k_loop(int32_t (&acc)[2][4][4],
                                              const APieceLoader<kImplicit>& load_a,
                                              const uint4* b_src, int64_t steps,
                                              StepRows (&as)[2], StepRows (&bs)[2], int wm, int wn,
                                              int gid, int tig) {
  const int ld_row = load_a.ld_row, ld_half = load_a.ld_half;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  int32_t a_count = 0;
  if (steps > 0) {
    const uint4 a_first = load_a(0);
    a_count += popc(a_first.x) + popc(a_first.y) + popc(a_first.z) + popc(a_first.w);
    *reinterpret_cast<uint4*>(&as[0][ld_row][ld_half * 4]) = a_first;
    *reinterpret_cast<uint4*>(&bs[0][ld_row][ld_half * 4]) = b_src ? b_src[0] : zero;
  }
  __syncthreads();
  for (int64_t s = 0; s < steps; ++s) {
    const int buf = static_cast<int>(s & 1);
    uint4 a_next = zero, b_next = zero;
    if (s + 1 < steps) {
      a_next = load_a(s + 1);
      if (b_src) b_next = b_src[(s + 1) * 2];
    }
    mma_step(acc, as[buf], bs[buf], wm, wn, gid, tig);
    if (s + 1 < steps) {
      a_count += popc(a_next.x) + popc(a_next.y) + popc(a_next.z) + popc(a_next.w);
      *reinterpret_cast<uint4*>(&as[buf ^ 1][ld_row][ld_half * 4]) = a_next;
      *reinterpret_cast<uint4*>(&bs[buf ^ 1][ld_row][ld_half * 4]) = b_next;
    }
    __syncthreads();
  }
  return a_count;
}

// Block (m tile, group x co tile); warp (wm, wn) computes rows wm*32 .. +32, columns wn*32 .. +32
// as 2 x 4 m16n8 tiles. Fragment layout of m16n8k256 .b1 (PTX ISA): lane = 4 * gid + tig;
// A regs {row gid word tig, row gid+8 word tig, row gid word tig+4, row gid+8 word tig+4},
// B regs {col gid word tig, col gid word tig+4}, D regs {(gid, 2tig), (gid, 2tig+1),
// (gid+8, 2tig), (gid+8, 2tig+1)}. Each D entry is a sum over the 8 words of
// popc(A word & B word), whatever the bit order inside a word, since A and B share it
// (and_popc_dot turns it into the output).
//
// A holds the packed input patches (rows m), B the packed weight (rows co), tap_counts the
// popc of B per (co, tap) (pack_weight_kernel). kImplicit: A is never materialised; its tile is
// read straight from the pixel words (pack_pixels_kernel, C_in/groups a multiple of 32) through
// a per-K-word table of tap offsets in dynamic shared memory (implicit_smem_bytes), which saves
// writing and re-reading the im2col matrix. Otherwise A is the (groups, M, kwords_padded) matrix
// of the packers.
template <typename scalar_t, bool kImplicit>
__global__ void __launch_bounds__(kMmaThreads)
binary_gemm_mma_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ pixels,
                       int64_t cwords, const uint32_t* __restrict__ b,
                       const int32_t* __restrict__ tap_counts, const ConvGeometry g, int64_t rows,
                       int64_t kwords_padded, int64_t co_tiles,
                       const OutputTransform<scalar_t> transform) {
  SPARKS_DYNAMIC_SHARED(smem);  // kImplicit: K-word tables dy, dx, cw (int32 each)
  __shared__ int32_t ih0_s[kTileM], iw0_s[kTileM];
  __shared__ int64_t image_s[kTileM];  // n * groups + grp: the row's pixel plane
  __shared__ __align__(16) uint32_t as[2][kTileM][kRowWords];
  __shared__ __align__(16) uint32_t bs[2][kTileN][kRowWords];
  __shared__ int32_t a_popc_s[kTileM];
  __shared__ uint64_t valid_s[kTileM];
  __shared__ int64_t offset_s[kTileM];
  __shared__ int32_t b_total_s[kTileN];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  const int64_t cout_g = g.out_channels / g.groups;
  const int64_t m0 = int64_t{blockIdx.x} * kTileM;
  const int64_t grp = blockIdx.y / co_tiles;
  const int64_t co0 = (blockIdx.y % co_tiles) * kTileN;

  mma_row_origins(tid, g, rows, m0, grp, transform, ih0_s, iw0_s, image_s, valid_s, offset_s);
  int32_t* dy_s = reinterpret_cast<int32_t*>(smem);
  int32_t* dx_s = dy_s + kwords_padded;
  int32_t* cw_s = dx_s + kwords_padded;
  if constexpr (kImplicit)
    implicit_k_tables(tid, g, taps, cwords, kwords_padded, dy_s, dx_s, cw_s);
  weight_totals(tid, tap_counts, grp, cout_g, co0, taps, b_total_s);

  // Loader role: one 16-byte piece (half a K step) of one A row and one B row per stage.
  const int ld_row = tid / 2, ld_half = tid % 2;
  const int64_t a_m = m0 + ld_row, b_co = co0 + ld_row;
  const uint4* a_src =
      !kImplicit && a_m < rows
          ? reinterpret_cast<const uint4*>(a + (grp * rows + a_m) * kwords_padded) + ld_half
          : nullptr;
  const uint4* b_src =
      b_co < cout_g
          ? reinterpret_cast<const uint4*>(b + (grp * cout_g + b_co) * kwords_padded) + ld_half
          : nullptr;
  const int64_t steps = kwords_padded / kStepWords;
  const APieceLoader<kImplicit> load_a{a_src, pixels, cwords, g, dy_s, dx_s, cw_s, ih0_s,
                                       iw0_s, image_s, ld_row, ld_half, a_m < rows,
                                       g.pad_value > 0 ? 0xFFFFFFFFu : 0u};
  __syncthreads();  // row data and K tables

  int32_t acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  const int gid = lane / 4, tig = lane % 4;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  int32_t a_count = mma_k_loop(acc, load_a, b_src, steps, as, bs, wm, wn, gid, tig);
  // The two halves of a row are loaded by neighbouring lanes of one warp.
  a_count += __shfl_xor_sync(0xffffffffu, a_count, 1);
  if (ld_half == 0) a_popc_s[ld_row] = a_count;
  __syncthreads();

  // Warp (wm, wn)'s 32 x 32 results (D fragment layout), rows and columns past the GEMM's edges
  // dropped.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = wm + i * 16 + gid + (r >= 2 ? 8 : 0);
        const int col = wn + j * 8 + 2 * tig + (r & 1);
        const int64_t m = m0 + row, co = co0 + col;
        if (m < rows && co < cout_g) {
          const int64_t co_global = grp * cout_g + co;
          store_and_popc_output(acc[i][j][r], a_popc_s[row], valid_s[row], b_total_s[col],
                                tap_counts + co_global * taps, g, offset_s[row], co_global,
                                transform);
        }
      }
}

// One thread per output (grp, m, co): the CUDA-core fallback.
template <typename scalar_t>
__global__ void __launch_bounds__(kDenseThreads)
binary_gemm_popc_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b,
                        const int32_t* __restrict__ tap_counts, const ConvGeometry g, int64_t rows,
                        int64_t kwords_padded, const OutputTransform<scalar_t> transform) {
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  const int64_t cout_g = g.out_channels / g.groups;
  const int64_t total = g.groups * rows * cout_g;
  for (int64_t item = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; item < total;
       item += int64_t{gridDim.x} * blockDim.x) {
    const int64_t co = item % cout_g;
    const int64_t m = (item / cout_g) % rows;
    const int64_t grp = item / (cout_g * rows);
    const int64_t co_global = grp * cout_g + co;
    const uint32_t* a_row = a + (grp * rows + m) * kwords_padded;
    const uint32_t* b_row = b + co_global * kwords_padded;
    int32_t and_popc = 0, a_popc = 0;
    for (int64_t w = 0; w < kwords_padded; ++w) {
      and_popc += popc(a_row[w] & b_row[w]);
      a_popc += popc(a_row[w]);
    }
    const int32_t* tap_counts_row = tap_counts + co_global * taps;
    int32_t b_total = 0;
    for (int t = 0; t < taps; ++t) b_total += tap_counts_row[t];
    const int64_t out_hw = g.out_h * g.out_w;
    const int64_t n = m / out_hw, oh = (m % out_hw) / g.out_w, ow = m % g.out_w;
    store_and_popc_output(
        and_popc, a_popc,
        valid_word<uint64_t>(g, oh * g.stride_h - g.pad_h, ow * g.stride_w - g.pad_w), b_total,
        tap_counts_row, g, transform.offset(n, oh, ow), co_global, transform);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace sparks
