// CPU backend of sparks::binary_conv2d: the dense XNOR-popcount binary convolution, the honest
// baseline of the codebook op (what larq / daBNN / bitorch-engine do).
//
// Input and weight are packed along channels (pixel_grid.h, weight_packing.h): a kernel tap of
// one output channel and one input pixel are each C_in/groups bits, and their dot product over
// +-1 values is C_in/groups - 2 * popcount(x ^ w). For zero padding a tap outside the image
// contributes 0: the kernels sum every tap (padding pixels hold zero bits) and take back
// popcount(w) for the outside taps, which only border positions have.
//
// Every CPU kernel counts XOR mismatches. The CUDA GEMM (csrc/cuda/binary_conv.cu) computes the
// same integers with AND algebra instead, 4 popc(x & w) - 2 popc(x) - 2 popc(w) + taps, because
// AND + popcount is what the tensor cores do natively.
//
// AVX-512 (VPOPCNTDQ): 8 output channels per zmm lane group, 4 positions x 32 channels of
// accumulators; per (tap, word): 4 weight loads, 4 broadcasts, 16 x (vpxorq, vpopcntq, vpaddq).
// vpopcntq issues on one port (p5), so the kernel is bound at about 1/8 cycle per
// (output, 64 input channels, tap): 1.1 cycle per output for 64 channels of a 3x3 kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../conv_args.h"
#include "core_adapters.h"
#include "cpu_features.h"
#include "kernel_choice.h"
#include "neon_kernels.h"
#include "output_transform.h"
#include "pixel_grid.h"
#include "weight_packing.h"

namespace sparks {
namespace cpu {
namespace {

struct BinaryProblem {
  const core::PixelGrid& px;
  const uint64_t* weight;  // (C_out, taps, words)
  const ConvGeometry& g;
  const OutputTransform& out;
  int64_t taps() const { return g.taps(); }
};

// Output rows [begin, end) of (n, group, oh): the portable kernel, also compiled with the
// popcnt instruction as the "avx2" path.
__attribute__((always_inline)) inline void binary_rows_scalar(const BinaryProblem& bp,
                                                              int64_t begin, int64_t end) {
  const ConvGeometry& g = bp.g;
  const int64_t taps = bp.taps(), words = bp.px.words, cin_g = g.in_per_group();
  const int64_t cout_g = g.out_per_group();
  std::vector<const uint64_t*> pixels(taps);
  std::vector<int32_t> tile(cout_g);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t oh = item % g.out_h, grp = (item / g.out_h) % g.groups;
    const int64_t n = item / (g.out_h * g.groups);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const uint64_t valid = bp.px.tap_pixels(n, grp, oh, ow, pixels.data());
      const int32_t total = static_cast<int32_t>(__builtin_popcountll(valid) * cin_g);
      for (int64_t co = 0; co < cout_g; ++co) {
        const uint64_t* w = bp.weight + (grp * cout_g + co) * taps * words;
        int32_t mismatches = 0;
        for (int64_t t = 0; t < taps; ++t) {
          if (!((valid >> t) & 1)) continue;
          for (int64_t k = 0; k < words; ++k)
            mismatches += __builtin_popcountll(pixels[t][k] ^ w[t * words + k]);
        }
        tile[co] = total - 2 * mismatches;
      }
      bp.out.store(tile.data(), cout_g, n, oh * g.out_w + ow, 1, grp * cout_g, cout_g);
    }
  }
}

// Output rows [begin, end) of (n, group, oh), compiled for one family.
using BinaryRows = void (*)(const BinaryProblem& bp, int64_t begin, int64_t end);

void binary_rows_portable(const BinaryProblem& bp, int64_t begin, int64_t end) {
  binary_rows_scalar(bp, begin, end);
}

#if defined(__x86_64__)
__attribute__((target("avx2,popcnt,bmi2"))) void binary_rows_avx2(const BinaryProblem& bp,
                                                                  int64_t begin, int64_t end) {
  binary_rows_scalar(bp, begin, end);
}
#endif

void binary_conv_rows(const BinaryProblem& bp, BinaryRows rows) {
  const ConvGeometry& g = bp.g;
  at::parallel_for(0, g.batch * g.groups * g.out_h, 1, [&](int64_t begin, int64_t end) { rows(bp, begin, end); });
}

#if defined(__x86_64__)
constexpr int64_t kPos = 4;    // positions per register tile
constexpr int64_t kCols = 32;  // output channels per register tile (4 zmm of 8 qwords)

struct BinaryAvx512Plan {
  std::vector<uint64_t> wt;          // (group, tap, word, padded output channel)
  std::vector<int32_t> tap_counts;   // (output channel, tap)
  int64_t cout_pad, tiles;
};

// Position tiles [begin, end) of (n, group, tile).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt"))) void binary_tiles_avx512(
    const BinaryProblem& bp, const BinaryAvx512Plan& plan, int64_t begin, int64_t end) {
  const ConvGeometry& g = bp.g;
  const int64_t taps = bp.taps(), words = bp.px.words, cin_g = g.in_per_group();
  const int64_t cout_g = g.out_per_group(), cout_pad = plan.cout_pad, tiles = plan.tiles;
  const int64_t positions = g.out_h * g.out_w;
  std::vector<const uint64_t*> pixels(kPos * taps);
  alignas(64) int64_t sums[kPos][kCols];
  int32_t tile[kPos * kCols];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t p0 = (item % tiles) * kPos, grp = (item / tiles) % g.groups;
    const int64_t n = item / (tiles * g.groups);
    const int64_t rows = std::min(kPos, positions - p0);
    uint64_t valid[kPos];
    for (int64_t r = 0; r < kPos; ++r) {
      const int64_t p = p0 + std::min(r, rows - 1);  // a short tile repeats its last position
      valid[r] = bp.px.tap_pixels(n, grp, p / g.out_w, p % g.out_w, pixels.data() + r * taps);
    }
    for (int64_t c0 = 0; c0 < cout_g; c0 += kCols) {
      __m512i acc[kPos][4];
      for (auto& row : acc)
        for (auto& a : row) a = _mm512_setzero_si512();
      const uint64_t* w = plan.wt.data() + grp * taps * words * cout_pad + c0;
      for (int64_t t = 0; t < taps; ++t) {
        for (int64_t k = 0; k < words; ++k, w += cout_pad) {
          const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 8);
          const __m512i w2 = _mm512_loadu_si512(w + 16), w3 = _mm512_loadu_si512(w + 24);
          for (int64_t r = 0; r < kPos; ++r) {
            const __m512i x = _mm512_set1_epi64(static_cast<long long>(pixels[r * taps + t][k]));
            acc[r][0] = _mm512_add_epi64(acc[r][0], _mm512_popcnt_epi64(_mm512_xor_si512(x, w0)));
            acc[r][1] = _mm512_add_epi64(acc[r][1], _mm512_popcnt_epi64(_mm512_xor_si512(x, w1)));
            acc[r][2] = _mm512_add_epi64(acc[r][2], _mm512_popcnt_epi64(_mm512_xor_si512(x, w2)));
            acc[r][3] = _mm512_add_epi64(acc[r][3], _mm512_popcnt_epi64(_mm512_xor_si512(x, w3)));
          }
        }
      }
      const int64_t cols = std::min(kCols, cout_g - c0);
      for (int64_t r = 0; r < rows; ++r) {
        for (int q = 0; q < 4; ++q) _mm512_store_si512(sums[r] + 8 * q, acc[r][q]);
        const int32_t total = static_cast<int32_t>(__builtin_popcountll(valid[r]) * cin_g);
        const uint64_t outside = low_bits(taps) & ~valid[r];
        for (int64_t c = 0; c < cols; ++c) {
          int64_t mismatches = sums[r][c];
          for (uint64_t o = outside; o; o &= o - 1)
            mismatches -= plan.tap_counts[(grp * cout_g + c0 + c) * taps + __builtin_ctzll(o)];
          tile[r * kCols + c] = total - 2 * static_cast<int32_t>(mismatches);
        }
      }
      bp.out.store(tile, kCols, n, p0, rows, grp * cout_g + c0, cols);
    }
  }
}

void binary_conv_avx512(const BinaryProblem& bp) {
  const ConvGeometry& g = bp.g;
  const int64_t taps = bp.taps(), words = bp.px.words, cout_g = g.out_per_group();
  BinaryAvx512Plan plan;
  plan.cout_pad = (cout_g + kCols - 1) / kCols * kCols;
  plan.tiles = (g.out_h * g.out_w + kPos - 1) / kPos;
  plan.wt.assign(g.groups * taps * words * plan.cout_pad, 0);
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t co = 0; co < cout_g; ++co)
      for (int64_t tk = 0; tk < taps * words; ++tk)
        plan.wt[(grp * taps * words + tk) * plan.cout_pad + co] =
            bp.weight[(grp * cout_g + co) * taps * words + tk];
  plan.tap_counts = core::weight_tap_counts(bp.weight, g.out_channels * taps, words);
  at::parallel_for(0, g.batch * g.groups * plan.tiles, 1, [&](int64_t begin, int64_t end) {
    binary_tiles_avx512(bp, plan, begin, end);
  });
}
#endif

at::Tensor binary_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
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
  const Isa isa = selected_isa();
  const at::Tensor packed_weight = pack_weight_channels(weight, isa);
  at::Tensor output = allocate_output(input, g);
  if (output.numel() == 0) return output;

  const core::PixelGrid px = pack_pixels(input, fused.threshold, g, isa);
  const OutputTransform writer(output, scale, bias, fused, g, isa);
  const uint64_t* weight_bits = reinterpret_cast<const uint64_t*>(packed_weight.data_ptr<int64_t>());
  const BinaryProblem bp{px, weight_bits, g, writer};
  const BinaryKernel kernel = choose_binary_kernel(isa);
  switch (kernel) {
#if defined(__x86_64__)
    case BinaryKernel::kVpopcntAvx512: binary_conv_avx512(bp); break;
    case BinaryKernel::kPopcntAvx2: binary_conv_rows(bp, &binary_rows_avx2); break;
#endif
#if SPARKS_NEON_COMPILED
    case BinaryKernel::kNeon: neon::binary_conv(px, weight_bits, g, aten_parallel(), tile_store(writer)); break;
#endif
    case BinaryKernel::kPortable: binary_conv_rows(bp, &binary_rows_portable); break;
    default:
      TORCH_INTERNAL_ASSERT(false, "the ", kernel_name(kernel), " kernel is not compiled for this CPU");
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparks, CPU, m) { m.impl("binary_conv2d", &binary_conv2d_cpu); }

}  // namespace cpu
}  // namespace sparks
