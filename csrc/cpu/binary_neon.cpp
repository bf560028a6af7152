// NEON (aarch64 Advanced SIMD) binary_conv2d: dense XNOR-popcount over channel-packed bits,
// the shape of Larq Compute Engine's aarch64 bgemm (EOR, CNT, byte adds, UADALP), written for
// this library's packed layout (pixel_grid.h, weight_packing.h): a pixel / weight tap is
// `words` 64-bit words of C_in/groups channel bits, and a (position, output channel) dot
// product over +-1 values is valid taps x C_in/groups - 2 x popcount(x ^ w) summed over taps
// and words. For zero padding the padded pixels hold zero bits and each outside tap gives back
// popcount(w) (as the x86 kernels do).
//
// Instruction-level reasoning (a two-ASIMD-pipe Cortex-A7x such as the A76; figures from Arm's
// Cortex-A720 Software Optimization Guide: EOR, CNT, ADD 2 per cycle; UADALP 1 per cycle on V1;
// LD1 / LD1R 2 per cycle on the load pipes):
//  - A 128-bit vector holds one 64-bit word of 2 output channels' weights (lanes = channels
//    co, co + 1); the input word of a position is broadcast to both lanes with LD1R (a load, no
//    ASIMD op). EOR + CNT give the mismatches per byte; ADD accumulates them in bytes.
//  - A CNT byte is <= 8, so byte lanes take 31 steps (248); then UADALP folds byte pairs (of
//    the same 64-bit lane, i.e. the same output channel) into uint16 sums, once per 31 steps
//    instead of once per step: 3 ASIMD ops per vector per step + 1/31 UADALP. The uint16 sums
//    are folded to uint32 every 128 flushes (128 x 2 x 248 < 65536) and reduced per lane at the end.
//  - Register tile: 4 positions x 4 vectors (8 output channels): 16 byte accumulators, 4 weight
//    vectors (reused by the 4 positions), 4 broadcast inputs (reused by the 4 vectors). Per (tap,
//    word) step: 8 loads, 48 ASIMD ops = 24 cycles for 32 (position, channel) pairs x 64
//    channels: 0.75 cycle per output and 64 input channels of one tap, 6.75 cycles per output of a
//    3x3 layer with 64 input channels.
#include "neon_kernels.h"

#if SPARKS_NEON_COMPILED
#include <arm_neon.h>

#include <algorithm>
#include <vector>

namespace sparks {
namespace cpu {
namespace neon {
namespace {

constexpr int kPos = 4;                 // positions per register tile
constexpr int kPairs = 4;               // vectors of 2 output channels per register tile
constexpr int64_t kCols = 2 * kPairs;   // output channels per register tile
constexpr int kByteSteps = 31;          // steps a byte lane of CNT sums holds (31 x 8 = 248)
constexpr int kHalfFlushes = 128;       // byte flushes a uint16 lane holds (128 x 2 x 248 < 65536)

// One 64-bit word in both lanes, by LD1R: a load-pipe op. GCC 12 compiles vld1q_dup_u64 to
// LDR + DUP, which spends an ASIMD op per position and step (+8% on the ASIMD pipes).
inline uint64x2_t load_broadcast(const uint64_t* p) {
  uint64x2_t x;
  __asm__("ld1r {%0.2d}, [%1]" : "=w"(x) : "r"(p), "m"(*p));
  return x;
}

struct Plan {
  std::vector<uint64_t> wt;           // (group, channel block, tap, word, kCols)
  std::vector<int32_t> tap_counts;    // (output channel, tap)
  int64_t blocks, tiles;
};

void binary_tiles(const core::PixelGrid& px, const Plan& plan, const ConvGeometry& g,
                  const core::TileStore& store, int64_t begin, int64_t end) {
  const int64_t taps = g.taps(), words = px.words, cin_g = g.in_per_group(), cout_g = g.out_per_group();
  const int64_t positions = g.out_h * g.out_w, steps = taps * words;
  std::vector<const uint64_t*> pixels(kPos * taps);
  int32_t tile[kPos * kCols];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t p0 = (item % plan.tiles) * kPos, grp = (item / plan.tiles) % g.groups;
    const int64_t n = item / (plan.tiles * g.groups);
    const int64_t rows = std::min<int64_t>(kPos, positions - p0);
    uint64_t valid[kPos];
    for (int r = 0; r < kPos; ++r) {
      const int64_t p = p0 + std::min<int64_t>(r, rows - 1);  // a short tile repeats its last position
      valid[r] = px.tap_pixels(n, grp, p / g.out_w, p % g.out_w, pixels.data() + r * taps);
    }
    for (int64_t b = 0; b < plan.blocks; ++b) {
      const uint64_t* w = plan.wt.data() + (grp * plan.blocks + b) * steps * kCols;
      uint32x4_t wide[kPos][kPairs];
      uint16x8_t half[kPos][kPairs];
      uint8x16_t acc[kPos][kPairs];
      for (int r = 0; r < kPos; ++r)
        for (int c = 0; c < kPairs; ++c) {
          wide[r][c] = vdupq_n_u32(0);
          half[r][c] = vdupq_n_u16(0);
          acc[r][c] = vdupq_n_u8(0);
        }
      int pending = 0, flushes = 0;
      const auto flush_bytes = [&] {
        for (int r = 0; r < kPos; ++r)
          for (int c = 0; c < kPairs; ++c) {
            half[r][c] = vpadalq_u8(half[r][c], acc[r][c]);  // UADALP
            acc[r][c] = vdupq_n_u8(0);
          }
        pending = 0;
        if (++flushes < kHalfFlushes) return;
        for (int r = 0; r < kPos; ++r)
          for (int c = 0; c < kPairs; ++c) {
            wide[r][c] = vpadalq_u16(wide[r][c], half[r][c]);
            half[r][c] = vdupq_n_u16(0);
          }
        flushes = 0;
      };
      for (int64_t t = 0; t < taps; ++t) {
        for (int64_t k = 0; k < words; ++k, w += kCols) {
          uint8x16_t wv[kPairs];
          for (int c = 0; c < kPairs; ++c) wv[c] = vreinterpretq_u8_u64(vld1q_u64(w + 2 * c));
          for (int r = 0; r < kPos; ++r) {
            const uint8x16_t x = vreinterpretq_u8_u64(load_broadcast(pixels[r * taps + t] + k));
            for (int c = 0; c < kPairs; ++c) acc[r][c] = vaddq_u8(acc[r][c], vcntq_u8(veorq_u8(x, wv[c])));
          }
          if (++pending == kByteSteps) flush_bytes();
        }
      }
      flush_bytes();
      const int64_t co0 = b * kCols, cols = std::min(kCols, cout_g - co0);
      for (int r = 0; r < rows; ++r) {
        // total - 2 mismatches, 4 channels per vector; outside taps give back their weight bits.
        const int32x4_t total = vdupq_n_s32(static_cast<int32_t>(__builtin_popcountll(valid[r]) * cin_g));
        for (int c = 0; c < kPairs; c += 2) {
          const uint64x2_t lo = vpaddlq_u32(vpadalq_u16(wide[r][c], half[r][c]));
          const uint64x2_t hi = vpaddlq_u32(vpadalq_u16(wide[r][c + 1], half[r][c + 1]));
          const int32x4_t mismatches = vreinterpretq_s32_u32(vcombine_u32(vmovn_u64(lo), vmovn_u64(hi)));
          vst1q_s32(tile + r * kCols + 2 * c, vsubq_s32(total, vshlq_n_s32(mismatches, 1)));
        }
        const uint64_t outside = core::low_bits(taps) & ~valid[r];
        if (outside == 0) continue;
        for (int64_t col = 0; col < cols; ++col) {
          const int32_t* counts = plan.tap_counts.data() + (grp * cout_g + co0 + col) * taps;
          int32_t back = 0;
          for (uint64_t o = outside; o; o &= o - 1) back += counts[__builtin_ctzll(o)];
          tile[r * kCols + col] += 2 * back;
        }
      }
      store(tile, kCols, n, p0, rows, grp * cout_g + co0, cols);
    }
  }
}

}  // namespace

void binary_conv(const core::PixelGrid& px, const uint64_t* weight, const ConvGeometry& g,
                 const core::ParallelFor& par, const core::TileStore& store) {
  const int64_t taps = g.taps(), words = px.words, cout_g = g.out_per_group(), steps = taps * words;
  Plan plan;
  plan.blocks = (cout_g + kCols - 1) / kCols;
  plan.tiles = (g.out_h * g.out_w + kPos - 1) / kPos;
  plan.wt.assign(g.groups * plan.blocks * steps * kCols, 0);
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t co = 0; co < cout_g; ++co)
      for (int64_t s = 0; s < steps; ++s)
        plan.wt[((grp * plan.blocks + co / kCols) * steps + s) * kCols + co % kCols] =
            weight[(grp * cout_g + co) * steps + s];
  plan.tap_counts = core::weight_tap_counts(weight, g.out_channels * taps, words);
  par(g.batch * g.groups * plan.tiles,
      [&](int64_t begin, int64_t end) { binary_tiles(px, plan, g, store, begin, end); });
}

}  // namespace neon
}  // namespace cpu
}  // namespace sparks
#endif
