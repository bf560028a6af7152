#include "codebook_lut.h"
#include "index_table.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace sparks {
namespace cpu {
namespace {

// LUT[x][k] = r_k(x) + taps. Row x differs from row x without its top bit t by 2 * w_k[t]
// (w in {-1, 0, +1}), so each row is one 64-byte add of the row before.
at::Tensor build_lut(const PackedCodebook& cb, int64_t taps) {
  const int64_t rows = int64_t{1} << taps;
  at::Tensor lut = at::empty({rows, kLutRow}, at::kByte);
  uint8_t* l = lut.data_ptr<uint8_t>();
  std::memset(l, 0, kLutRow);
  std::vector<uint8_t> step(taps * kLutRow, 0);  // 2 * w_k[t] mod 256
  for (int64_t k = 0; k < cb.size(); ++k) {
    int64_t r = 0;  // response to the all -1 patch
    for (int64_t t = 0; t < taps; ++t) {
      const bool nonzero = (cb.mask[k] >> t) & 1, plus = (cb.sign[k] >> t) & 1;
      const int w = nonzero ? (plus ? 1 : -1) : 0;
      r -= w;
      step[t * kLutRow + k] = static_cast<uint8_t>(2 * w);
    }
    l[k] = static_cast<uint8_t>(r + taps);
  }
  for (int64_t x = 1; x < rows; ++x) {
    const int64_t t = 63 - __builtin_clzll(static_cast<uint64_t>(x));
    const uint8_t* prev = l + (x ^ (int64_t{1} << t)) * kLutRow;
    const uint8_t* s = step.data() + t * kLutRow;
    uint8_t* row = l + x * kLutRow;
    for (int64_t b = 0; b < kLutRow; ++b) row[b] = static_cast<uint8_t>(prev[b] + s[b]);
  }
  return lut;
}


// Border scratch per thread that a tile may need before it is cut to fewer positions.
constexpr int64_t kScratchBudget = int64_t{64} << 20;

}  // namespace

void codebook_conv_lut(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb,
                       const at::Tensor& indices, const ConvGeometry& g,
                       const OutputTransform& writer, Isa isa) {
#if defined(__x86_64__)
  const LutKernel kernel = isa >= Isa::kAvx512 ? lut_kernel_avx512() : lut_kernel_avx2();
#else
  TORCH_INTERNAL_ASSERT(false, "the LUT kernel needs x86-64");
  const LutKernel kernel{};
#endif
  const int64_t taps = g.taps(), n = cb.size(), cin_g = g.in_per_group(), cout_g = g.out_per_group();
  const int64_t positions = g.out_h * g.out_w;
  const PackedPixels px = pack_pixels(input, threshold, g, isa);
  const at::Tensor lut = build_lut(cb, taps);
  const int64_t lut_bytes = lut.numel();
  // (C_in/groups, C_out) bytes: one contiguous row of output channels per input channel. A
  // uint8 indices tensor stored transposed (indices.t() contiguous) is used as it is.
  const at::Tensor idx_t = index_table(indices);
  const uint8_t* idx_ptr = idx_t.data_ptr<uint8_t>();
  const int64_t ld_idx = g.out_channels;

  // Work item = (image, group, tile of positions, range of 64-channel blocks). A tile's border
  // scratch area (positions x C_in/groups rows) stays under ~256 KiB so it lives in L2. Small
  // images (batch 1, 7x7) split the output channels too, so every thread gets a fair share.
  const bool zero_pad = g.pad_value == 0 && (g.pad_h > 0 || g.pad_w > 0);
  const int64_t want_items = 4 * at::get_num_threads();
  const int64_t per_image = g.batch * g.groups;
  const int64_t co_blocks = (cout_g + 63) / 64;
  int64_t tile = std::min(positions, std::max<int64_t>(kernel.max_rows, (256 << 10) / (cin_g * kLutRow)));
  int64_t tiles = (positions + tile - 1) / tile;
  const int64_t co_split = std::min(co_blocks, (want_items + per_image * tiles - 1) / (per_image * tiles));
  if (per_image * tiles * co_split < want_items) {
    tile = std::max<int64_t>(1, (per_image * positions + want_items - 1) / want_items);
    tiles = (positions + tile - 1) / tile;
  }
  if (zero_pad) {
    // The border scratch rows must stay addressable by uint32 offsets, and a very wide layer's
    // (C_in/groups rows per position) should not take gigabytes per thread: a tile of fewer
    // positions only costs index reuse, on layers far wider than any real one.
    const int64_t row_bytes = cin_g * kLutRow;
    const int64_t addressable = (kMaxLutOffsetBytes - lut_bytes) / row_bytes;
    TORCH_INTERNAL_ASSERT(addressable >= 1, "lut_kernel_applies admits only fitting offsets");
    const int64_t max_tile = std::min(addressable, std::max<int64_t>(1, kScratchBudget / row_bytes));
    if (tile > max_tile) {
      tile = max_tile;
      tiles = (positions + tile - 1) / tile;
    }
  }
  const int64_t scratch_rows = zero_pad ? tile * cin_g : 0;
  const int32_t bias = static_cast<int32_t>(cin_g * taps);

  at::parallel_for(0, per_image * tiles * co_split, 1, [&](int64_t begin, int64_t end) {
    // This thread's LUT copy with its border scratch rows behind it, so that one 32-bit offset
    // from one base addresses any row.
    static thread_local Workspace rows_space;
    uint8_t* base = rows_space.get(lut_bytes + scratch_rows * kLutRow);
    std::memcpy(base, lut.data_ptr<uint8_t>(), lut_bytes);
    std::vector<uint32_t> offsets(tile * cin_g);
    std::vector<const uint64_t*> pixels(taps);
    alignas(64) int32_t out[8 * 64];
    TORCH_INTERNAL_ASSERT(kernel.max_rows <= 8);

    for (int64_t work = begin; work < end; ++work) {
      const int64_t split = work % co_split, item = work / co_split;
      const int64_t p0 = (item % tiles) * tile, grp = (item / tiles) % g.groups;
      const int64_t img = item / (tiles * g.groups);
      const int64_t rows = std::min(tile, positions - p0);
      int64_t scratch = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = p0 + r;
        const uint64_t valid = tap_pixels(px, img, grp, p / g.out_w, p % g.out_w, pixels.data());
        uint32_t* off = offsets.data() + r * cin_g;
        kernel.patch_offsets(pixels.data(), taps, cin_g, off);
        const uint64_t outside = low_bits(taps) & ~valid;
        if (outside == 0) continue;
        // Outside taps read 0 bits (-1); their +1 twin sets them.
        kernel.border_rows(base, off, cin_g, static_cast<uint32_t>(outside * kLutRow),
                           static_cast<uint32_t>(lut_bytes + scratch * kLutRow));
        scratch += cin_g;
      }
      const int64_t b0 = split * co_blocks / co_split, b1 = (split + 1) * co_blocks / co_split;
      for (int64_t c0 = 64 * b0; c0 < 64 * b1; c0 += 64) {
        const int64_t cols = std::min<int64_t>(64, cout_g - c0);
        for (int64_t r0 = 0; r0 < rows; r0 += kernel.max_rows) {
          const int64_t sub = std::min(kernel.max_rows, rows - r0);
          kernel.gather(base, offsets.data() + r0 * cin_g, cin_g, sub,
                        idx_ptr + grp * cout_g + c0, ld_idx, cols, cin_g, taps, n, bias, out);
          writer.store(out, 64, img, p0 + r0, sub, grp * cout_g + c0, cols);
        }
      }
    }
    // A wide layer's border scratch (C_in/groups rows per tile position) can reach gigabytes:
    // keep at most Workspace::kKeptBytes per thread after the call.
    rows_space.trim();
  });
}

}  // namespace cpu
}  // namespace sparks
