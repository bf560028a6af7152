// NEON (aarch64 Advanced SIMD) inner loops of the LUT codebook kernel (lut_kernel.h explains
// the algorithm, kernel_core.cpp's lut_conv drives it; the LUT and its zero-padding border rows
// are those of the x86 kernels).
//
// Instruction-level reasoning, with the throughputs of a two-ASIMD-pipe Cortex-A7x core (the
// A76 has two; figures from Arm's Cortex-A720 Software Optimization Guide: TBL with 1 or 2 table
// registers 2 per cycle, 3 registers 1 per cycle, 4 registers 2/3 per cycle; ADD, CMTST, BIT,
// ZIP, URHADD 2 per cycle; loads 2 per cycle on their own pipes). The work is one term per (position, input channel,
// output channel): the LUT row of the patch, read at that output channel's index.
//  - NEON has no 64-lane byte permute. `TBL Vd.16B, {table}, Vidx.16B` looks up 16 byte lanes
//    in a table of 1-4 registers (16-64 bytes): the row's first ceil(n / 16) x 16 bytes are the
//    table, the 16 indices of 16 output channels for that input channel the index vector. Out-
//    of-range lanes read 0, but indices are < n, so no masking is needed (unlike AVX2's
//    vpshufb sub-tables). One TBL + one ADD = 16 terms, both on the ASIMD pipes.
//  - n <= 32 fits the 2-register table (the full 2-per-cycle rate), n <= 48 takes 3 registers
//    (1 per cycle), n <= 64 4 registers (2/3 per cycle). The table is picked per call from n,
//    so a codebook of 32 pays nothing for the 64-entry case.
//  - Register tile: 4 positions x 64 output channels = 16 uint8 accumulators, 4 index vectors
//    (reused by the 4 positions) and the T table registers of one row (reused by the 4 channel
//    vectors): 20 + T of the 32 vector registers. Per input channel and tile: 4 row loads (LD1
//    of T registers) + 4 index loads on the load pipes, 16 TBL + 16 ADD on the ASIMD pipes: 16
//    cycles for 256 terms at n <= 32 (16 terms per cycle, 144 binary MACs for 3x3). For n > 32
//    the 3-4 consecutive table registers do not fit beside that tile (GCC 12 then keeps the
//    accumulators in memory), so the tile is 2 positions x 64 channels: per input channel 2 row
//    and 4 index loads, 8 TBL + 8 ADD = 12 cycles for 128 terms at n <= 48 (TBL 1 per cycle),
//    16 at n <= 64 (2/3 per cycle): 10.7 and 8 terms per cycle.
//  - uint8 lanes hold floor(255 / (2 taps)) terms (14 for 3x3); then UADDW / UADDW2 widen each
//    accumulator into two uint16 sums (2 more ASIMD ops per 14 x 2: 7%), kept in memory (they
//    do not fit beside the tile); uint16 sums go to int32 every floor(65535 / (2 taps)) terms.
//  - Patch ids, 16 input channels per vector: the 16 channel bits of a tap are broadcast as a
//    halfword (LD1R on the load pipe, or DUP), CMTST against a per-lane bit gives 0xff where the
//    channel is +1, and BIT inserts that as bit t of the id: 2 ASIMD ops per tap. Lanes come out
//    in (byte, bit) order, which one TBL per 8 taps undoes; ZIP1 / ZIP2 join the low and high id
//    bytes (taps 8, 9) and USHLL scales by the 64-byte row to 32-bit offsets. For 3x3 and 64
//    channels that is ~100 ASIMD ops per position, against 512 for the gather.
//  - Zero padding: URHADD averages the -1 and +1 rows (exact: they differ by an even amount).
#include "neon_kernels.h"

#if SPARKS_NEON_COMPILED
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace sparks {
namespace cpu {
namespace neon {
namespace {

using core::kLutRowBytes;
constexpr int kMaxRows = 4;

void patch_offsets_neon(const uint64_t* const* pixels, int64_t taps, int64_t cin, uint32_t* offsets) {
  // A halfword broadcast puts byte j & 1 of the 16 channel bits in lane j: lane j tests
  // bit j >> 1 of it, i.e. channel 8 (j & 1) + (j >> 1). kChannelOrder puts channel c back in lane c.
  static const uint8_t kLaneBit[16] = {1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64, 128, 128};
  static const uint8_t kChannelOrder[16] = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15};
  const uint8x16_t lane_bit = vld1q_u8(kLaneBit), order = vld1q_u8(kChannelOrder);
  uint8x16_t tap_bit[8];
  for (int t = 0; t < 8; ++t) tap_bit[t] = vdupq_n_u8(static_cast<uint8_t>(1u << t));
  for (int64_t c0 = 0; c0 < cin; c0 += 16) {
    uint8x16_t low = vdupq_n_u8(0), high = vdupq_n_u8(0);  // id bits 0-7 and 8-9
    const int64_t word = c0 >> 6, byte = (c0 & 63) >> 3;
    const auto channel_bits = [&](int64_t t) {  // 0xff in the lanes of the +1 channels of tap t
      uint16_t bits;
      std::memcpy(&bits, reinterpret_cast<const uint8_t*>(pixels[t] + word) + byte, sizeof bits);
      return vtstq_u8(vreinterpretq_u8_u16(vdupq_n_u16(bits)), lane_bit);
    };
    const int64_t low_taps = std::min<int64_t>(taps, 8);
    for (int64_t t = 0; t < low_taps; ++t) low = vbslq_u8(tap_bit[t], channel_bits(t), low);
    for (int64_t t = 8; t < taps; ++t) high = vbslq_u8(tap_bit[t - 8], channel_bits(t), high);
    low = vqtbl1q_u8(low, order);
    if (taps > 8) high = vqtbl1q_u8(high, order);
    const uint16x8_t ids0 = vreinterpretq_u16_u8(vzip1q_u8(low, high));  // channels 0-7
    const uint16x8_t ids1 = vreinterpretq_u16_u8(vzip2q_u8(low, high));  // channels 8-15
    const uint32x4_t o[4] = {vshll_n_u16(vget_low_u16(ids0), 6), vshll_high_n_u16(ids0, 6),
                             vshll_n_u16(vget_low_u16(ids1), 6), vshll_high_n_u16(ids1, 6)};
    static_assert(kLutRowBytes == 64, "offsets are ids << 6");
    if (cin - c0 >= 16) {
      for (int q = 0; q < 4; ++q) vst1q_u32(offsets + c0 + 4 * q, o[q]);
    } else {
      uint32_t tmp[16];
      for (int q = 0; q < 4; ++q) vst1q_u32(tmp + 4 * q, o[q]);
      std::memcpy(offsets + c0, tmp, (cin - c0) * sizeof(uint32_t));
    }
  }
}

void border_rows_neon(uint8_t* base, uint32_t* offsets, int64_t cin, uint32_t plus, uint32_t scratch) {
  for (int64_t ci = 0; ci < cin; ++ci, scratch += kLutRowBytes) {
    const uint8_t* minus_row = base + offsets[ci];
    const uint8_t* plus_row = base + (offsets[ci] | plus);
    for (int q = 0; q < 4; ++q)
      vst1q_u8(base + scratch + 16 * q, vrhaddq_u8(vld1q_u8(minus_row + 16 * q), vld1q_u8(plus_row + 16 * q)));
    offsets[ci] = scratch;
  }
}

// The first 16 T bytes of a LUT row as a TBL table.
template <int T> struct Table;
template <> struct Table<1> {
  uint8x16_t v;
  static Table load(const uint8_t* p) { return {vld1q_u8(p)}; }
  uint8x16_t operator[](uint8x16_t idx) const { return vqtbl1q_u8(v, idx); }
};
template <> struct Table<2> {
  uint8x16x2_t v;
  static Table load(const uint8_t* p) { return {vld1q_u8_x2(p)}; }
  uint8x16_t operator[](uint8x16_t idx) const { return vqtbl2q_u8(v, idx); }
};
template <> struct Table<3> {
  uint8x16x3_t v;
  static Table load(const uint8_t* p) { return {vld1q_u8_x3(p)}; }
  uint8x16_t operator[](uint8x16_t idx) const { return vqtbl3q_u8(v, idx); }
};
template <> struct Table<4> {
  uint8x16x4_t v;
  static Table load(const uint8_t* p) { return {vld1q_u8_x4(p)}; }
  uint8x16_t operator[](uint8x16_t idx) const { return vqtbl4q_u8(v, idx); }
};

// R positions x C vectors of 16 output channels; idx_t has at least 16 C readable columns.
// Writes all 16 C columns of `out` (row stride 64).
template <int R, int C, int T>
void gather_tile(const uint8_t* base, const uint32_t* offsets, int64_t ld_off, const uint8_t* idx_t,
                 int64_t ld_idx, int64_t cin, int64_t taps, int32_t bias, int32_t* out) {
  const int64_t period = 255 / (2 * taps);                       // uint8 terms per lane
  const int64_t chunk = (65535 / (2 * taps)) / period * period;  // uint16 terms per lane
  const uint32_t* off[R];
  for (int r = 0; r < R; ++r) off[r] = offsets + r * ld_off;
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < 4 * C; ++q) vst1q_s32(out + r * 64 + 4 * q, vdupq_n_s32(-bias));

  for (int64_t c0 = 0; c0 < cin; c0 += chunk) {
    const int64_t c1 = std::min(cin, c0 + chunk);
    uint16x8_t sums[R][C][2];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) sums[r][c][0] = sums[r][c][1] = vdupq_n_u16(0);
    for (int64_t w0 = c0; w0 < c1; w0 += period) {
      const int64_t w1 = std::min(c1, w0 + period);
      uint8x16_t acc[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = vdupq_n_u8(0);
      for (int64_t ci = w0; ci < w1; ++ci) {
        uint8x16_t idx[C];
        for (int c = 0; c < C; ++c) idx[c] = vld1q_u8(idx_t + ci * ld_idx + 16 * c);
        for (int r = 0; r < R; ++r) {
          const Table<T> row = Table<T>::load(base + off[r][ci]);
          for (int c = 0; c < C; ++c) acc[r][c] = vaddq_u8(acc[r][c], row[idx[c]]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
          sums[r][c][0] = vaddw_u8(sums[r][c][0], vget_low_u8(acc[r][c]));
          sums[r][c][1] = vaddw_high_u8(sums[r][c][1], acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c)
        for (int h = 0; h < 2; ++h) {
          int32_t* o = out + r * 64 + 16 * c + 8 * h;
          const uint16x8_t s = sums[r][c][h];
          vst1q_s32(o, vaddq_s32(vld1q_s32(o), vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(s)))));
          vst1q_s32(o + 4, vaddq_s32(vld1q_s32(o + 4), vreinterpretq_s32_u32(vmovl_high_u16(s))));
        }
  }
}

using GatherTile = void (*)(const uint8_t*, const uint32_t*, int64_t, const uint8_t*, int64_t, int64_t,
                            int64_t, int32_t, int32_t*);

template <int R, int C>
GatherTile pick_table(int64_t n) {
  switch ((n + 15) / 16) {
    case 1: return &gather_tile<R, C, 1>;
    case 2: return &gather_tile<R, C, 2>;
    case 3: return &gather_tile<R, C, 3>;
    default: return &gather_tile<R, C, 4>;
  }
}

template <int R>
GatherTile pick_cols(int64_t cols, int64_t n) {
  switch ((cols + 15) / 16) {
    case 1: return pick_table<R, 1>(n);
    case 2: return pick_table<R, 2>(n);
    case 3: return pick_table<R, 3>(n);
    default: return pick_table<R, 4>(n);
  }
}

void gather_neon(const uint8_t* base, const uint32_t* offsets, int64_t ld_off, int64_t rows,
                 const uint8_t* idx_t, int64_t ld_idx, int64_t cols, int64_t cin, int64_t taps,
                 int64_t n, int32_t bias, int32_t* out) {
  const int64_t vectors = (cols + 15) / 16;
  if (cols != 16 * vectors) {
    // A partial channel vector: copy the indices into whole vectors (index 0 past cols: a
    // valid row entry whose sums nobody reads) rather than branch in the inner loop.
    static thread_local std::vector<uint8_t> padded;
    padded.assign(cin * 16 * vectors, 0);
    for (int64_t ci = 0; ci < cin; ++ci) std::memcpy(padded.data() + ci * 16 * vectors, idx_t + ci * ld_idx, cols);
    idx_t = padded.data();
    ld_idx = 16 * vectors;
  }
  // A 3- or 4-register table (TBL wants them consecutive) beside 16 accumulators and 4 index
  // vectors leaves the compiler no registers (it keeps the accumulators in memory): those run
  // 2 positions at a time, reloading the index vectors (the load pipes have room).
  const int64_t step = n > 32 ? 2 : kMaxRows;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    GatherTile tile = nullptr;
    switch (std::min(step, rows - r0)) {
      case 1: tile = pick_cols<1>(cols, n); break;
      case 2: tile = pick_cols<2>(cols, n); break;
      case 3: tile = pick_cols<3>(cols, n); break;
      default: tile = pick_cols<4>(cols, n); break;
    }
    tile(base, offsets + r0 * ld_off, ld_off, idx_t, ld_idx, cin, taps, bias, out + r0 * 64);
  }
}

}  // namespace

core::LutOps lut_ops() { return {&patch_offsets_neon, &gather_neon, &border_rows_neon, kMaxRows}; }

uint64_t pack_bytes(const uint8_t* bytes, int64_t count) {
  if (count < 64) return core::pack_bytes_portable(bytes, count);
  // Non-zero bytes -> 0xff, keep bit (i % 8) of byte i, then three pairwise adds fold each
  // group of 8 bytes into one (the bits are disjoint, so adding is OR).
  static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t bit = vld1q_u8(kBit);
  uint8x16_t v[4];
  for (int q = 0; q < 4; ++q) {
    const uint8x16_t x = vld1q_u8(bytes + 16 * q);
    v[q] = vandq_u8(vtstq_u8(x, x), bit);
  }
  const uint8x16_t s = vpaddq_u8(vpaddq_u8(v[0], v[1]), vpaddq_u8(v[2], v[3]));
  return vgetq_lane_u64(vreinterpretq_u64_u8(vpaddq_u8(s, s)), 0);
}

}  // namespace neon
}  // namespace cpu
}  // namespace sparks
#endif
