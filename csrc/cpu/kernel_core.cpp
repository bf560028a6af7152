#include "kernel_core.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "workspace.h"

namespace sparks {
namespace cpu {
namespace core {

void serial_for(int64_t items, const std::function<void(int64_t, int64_t)>& body) {
  if (items > 0) body(0, items);
}

uint64_t pack_bytes_portable(const uint8_t* bytes, int64_t count) {
  uint64_t word = 0;
  for (int64_t i = 0; i < count; ++i) word |= uint64_t{bytes[i] != 0} << i;
  return word;
}

PixelGrid pack_grid_rows(const ConvGeometry& g, const PackRow& pack_row, const ParallelFor& par,
                         const RowDone& row_done) {
  PixelGrid px;
  px.groups = g.groups;
  px.hp = g.in_h + 2 * g.pad_h;
  px.wp = g.in_w + 2 * g.pad_w;
  const int64_t cin_g = g.in_per_group();
  px.words = (cin_g + 63) / 64;
  px.storage.reset(new uint64_t[std::max<int64_t>(1, g.batch * g.groups * px.hp * px.wp * px.words)]);
  px.data = px.storage.get();
  px.stride_h = g.stride_h;
  px.stride_w = g.stride_w;
  const bool zero_pad = g.pad_value == 0;
  px.row_valid.assign(g.out_h, 0);
  px.col_valid.assign(g.out_w, 0);
  for (int64_t i = 0, t = 0; i < g.kernel_h; ++i) {
    for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
      px.tap_offset.push_back((i * g.dil_h * px.wp + j * g.dil_w) * px.words);
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const int64_t h = oh * g.stride_h + i * g.dil_h;  // padded coordinates
        if (!zero_pad || (h >= g.pad_h && h < g.pad_h + g.in_h)) px.row_valid[oh] |= uint64_t{1} << t;
      }
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const int64_t w = ow * g.stride_w + j * g.dil_w;
        if (!zero_pad || (w >= g.pad_w && w < g.pad_w + g.in_w)) px.col_valid[ow] |= uint64_t{1} << t;
      }
    }
  }
  // The pad pixel: all valid channel bits set for pad_value = +1, else 0.
  std::vector<uint64_t> pad(px.words, 0);
  if (g.pad_value > 0)
    for (int64_t k = 0; k < px.words; ++k) pad[k] = low_bits(std::min<int64_t>(64, cin_g - 64 * k));

  uint64_t* dst = px.storage.get();
  par(g.batch * px.hp, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / px.hp, h = row % px.hp, ih = h - g.pad_h;
      const bool pad_row = ih < 0 || ih >= g.in_h;
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        uint64_t* out = dst + (((n * g.groups + grp) * px.hp + h) * px.wp) * px.words;
        for (int64_t w = 0; w < px.wp; ++w) {
          if (pad_row || w < g.pad_w || w >= g.pad_w + g.in_w)
            std::copy(pad.begin(), pad.end(), out + w * px.words);
        }
        if (!pad_row) pack_row(n, grp, ih, out + g.pad_w * px.words);
        if (row_done) row_done(px, n, grp, h);
      }
    }
  });
  return px;
}

PixelGrid pack_grid(const InputBits& in, const ConvGeometry& g, PackBytes pack, const ParallelFor& par,
                    const RowDone& row_done) {
  const int64_t cin_g = g.in_per_group(), words = (cin_g + 63) / 64;
  const auto pack_row = [&](int64_t n, int64_t grp, int64_t ih, uint64_t* pixels) {
    // Channels with a stride are gathered into a contiguous run first.
    uint8_t gathered[64];
    const uint8_t* row = in.data + n * in.s_n + ih * in.s_h + grp * cin_g * in.s_c;
    for (int64_t iw = 0; iw < g.in_w; ++iw, pixels += words) {
      const uint8_t* src = row + iw * in.s_w;
      for (int64_t k = 0; k < words; ++k) {
        const int64_t count = std::min<int64_t>(64, cin_g - 64 * k);
        if (in.s_c == 1) {
          pixels[k] = pack(src + 64 * k, count);
        } else {
          for (int64_t c = 0; c < count; ++c) gathered[c] = src[(64 * k + c) * in.s_c];
          pixels[k] = pack(gathered, count);
        }
      }
    }
  };
  return pack_grid_rows(g, pack_row, par, row_done);
}

std::vector<uint8_t> build_lut(const uint64_t* sign, const uint64_t* mask, int64_t n, int64_t taps) {
  // Row x differs from row x without its top bit t by 2 * w_k[t] (w in {-1, 0, +1}), so each
  // row is one add of the row before.
  const int64_t rows = int64_t{1} << taps;
  std::vector<uint8_t> lut(rows * kLutRowBytes, 0);
  std::vector<uint8_t> step(taps * kLutRowBytes, 0);  // 2 * w_k[t] mod 256
  for (int64_t k = 0; k < n; ++k) {
    int64_t r = 0;  // response to the all -1 patch
    for (int64_t t = 0; t < taps; ++t) {
      const bool nonzero = (mask[k] >> t) & 1, plus = (sign[k] >> t) & 1;
      const int w = nonzero ? (plus ? 1 : -1) : 0;
      r -= w;
      step[t * kLutRowBytes + k] = static_cast<uint8_t>(2 * w);
    }
    lut[k] = static_cast<uint8_t>(r + taps);
  }
  for (int64_t x = 1; x < rows; ++x) {
    const int64_t t = 63 - __builtin_clzll(static_cast<uint64_t>(x));
    const uint8_t* prev = lut.data() + (x ^ (int64_t{1} << t)) * kLutRowBytes;
    const uint8_t* s = step.data() + t * kLutRowBytes;
    uint8_t* row = lut.data() + x * kLutRowBytes;
    for (int64_t b = 0; b < kLutRowBytes; ++b) row[b] = static_cast<uint8_t>(prev[b] + s[b]);
  }
  return lut;
}

void lut_conv(const PixelGrid& px, const std::vector<uint8_t>& lut, const uint8_t* idx_t,
              int64_t ld_idx, const ConvGeometry& g, int64_t n, const LutOps& ops, int threads,
              const ParallelFor& par, const TileStore& store) {
  const int64_t taps = g.taps(), cin_g = g.in_per_group(), cout_g = g.out_per_group();
  const int64_t positions = g.out_h * g.out_w;
  const int64_t lut_bytes = static_cast<int64_t>(lut.size());
  if (ops.max_rows < 1 || ops.max_rows > kLutMaxRows) throw std::logic_error("LutOps::max_rows out of range");
  // Work item = (image, group, tile of positions, range of 64-channel blocks). A tile's border
  // scratch area (positions x C_in/groups rows) stays under ~256 KiB so it lives in L2. Small
  // images (batch 1, 7x7) split the output channels too, so every thread gets a fair share.
  const bool zero_pad = g.pad_value == 0 && (g.pad_h > 0 || g.pad_w > 0);
  const int64_t want_items = 4 * std::max(1, threads);
  const int64_t per_image = g.batch * g.groups;
  const int64_t co_blocks = (cout_g + 63) / 64;
  int64_t tile = std::min(positions, std::max<int64_t>(ops.max_rows, (256 << 10) / (cin_g * kLutRowBytes)));
  int64_t tiles = (positions + tile - 1) / tile;
  const int64_t co_split = std::min(co_blocks, (want_items + per_image * tiles - 1) / (per_image * tiles));
  if (per_image * tiles * co_split < want_items) {
    tile = std::max<int64_t>(1, (per_image * positions + want_items - 1) / want_items);
    tiles = (positions + tile - 1) / tile;
  }
  if (zero_pad) {
    // The border scratch rows must stay addressable by uint32 offsets (lut_applies admits only
    // layers where one position fits), and a very wide layer's should stay within
    // kLutScratchBudget per thread: a tile of fewer positions only costs index reuse, on layers
    // far wider than any real one.
    const int64_t row_bytes = cin_g * kLutRowBytes;
    const int64_t addressable = (kMaxLutOffsetBytes - lut_bytes) / row_bytes;
    const int64_t max_tile = std::max<int64_t>(1, std::min(addressable, kLutScratchBudget / row_bytes));
    if (tile > max_tile) {
      tile = max_tile;
      tiles = (positions + tile - 1) / tile;
    }
  }
  const int64_t scratch_rows = zero_pad ? tile * cin_g : 0;
  const int32_t bias = static_cast<int32_t>(cin_g * taps);

  par(per_image * tiles * co_split, [&](int64_t begin, int64_t end) {
    // This thread's LUT copy with its border scratch rows behind it, so that one 32-bit offset
    // from one base addresses any row.
    static thread_local Workspace rows_space;
    uint8_t* base = rows_space.get(lut_bytes + scratch_rows * kLutRowBytes);
    std::memcpy(base, lut.data(), lut_bytes);
    std::vector<uint32_t> offsets(tile * cin_g);
    std::vector<const uint64_t*> pixels(taps);
    alignas(64) int32_t out[kLutMaxRows * 64];

    for (int64_t work = begin; work < end; ++work) {
      const int64_t split = work % co_split, item = work / co_split;
      const int64_t p0 = (item % tiles) * tile, grp = (item / tiles) % g.groups;
      const int64_t img = item / (tiles * g.groups);
      const int64_t rows = std::min(tile, positions - p0);
      int64_t scratch = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = p0 + r;
        const uint64_t valid = px.tap_pixels(img, grp, p / g.out_w, p % g.out_w, pixels.data());
        uint32_t* off = offsets.data() + r * cin_g;
        ops.patch_offsets(pixels.data(), taps, cin_g, off);
        const uint64_t outside = low_bits(taps) & ~valid;
        if (outside == 0) continue;
        // Outside taps read 0 bits (-1); their +1 twin sets them.
        ops.border_rows(base, off, cin_g, static_cast<uint32_t>(outside * kLutRowBytes),
                        static_cast<uint32_t>(lut_bytes + scratch * kLutRowBytes));
        scratch += cin_g;
      }
      const int64_t b0 = split * co_blocks / co_split, b1 = (split + 1) * co_blocks / co_split;
      for (int64_t c0 = 64 * b0; c0 < 64 * b1; c0 += 64) {
        const int64_t cols = std::min<int64_t>(64, cout_g - c0);
        for (int64_t r0 = 0; r0 < rows; r0 += ops.max_rows) {
          const int64_t sub = std::min(ops.max_rows, rows - r0);
          ops.gather(base, offsets.data() + r0 * cin_g, cin_g, sub, idx_t + grp * cout_g + c0, ld_idx,
                     cols, cin_g, taps, n, bias, out);
          store(out, 64, img, p0 + r0, sub, grp * cout_g + c0, cols);
        }
      }
    }
    // A wide layer's border scratch (C_in/groups rows per tile position) can reach
    // kLutScratchBudget: keep at most Workspace::kKeptBytes per thread after the call.
    rows_space.trim();
  });
}

std::vector<int32_t> weight_tap_counts(const uint64_t* weight, int64_t rows, int64_t words) {
  std::vector<int32_t> counts(rows);
  for (int64_t r = 0; r < rows; ++r) {
    int32_t c = 0;
    for (int64_t k = 0; k < words; ++k) c += __builtin_popcountll(weight[r * words + k]);
    counts[r] = c;
  }
  return counts;
}

}  // namespace core
}  // namespace cpu
}  // namespace sparks
