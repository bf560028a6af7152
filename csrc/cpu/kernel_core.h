// ATen-free cores of the CPU kernels, in the manner of torchao's CPU kernels: plain pointers,
// strides and a geometry struct in, int32 tiles out through a callback, parallelism through a
// callback. The pixel grid and the LUT codebook driver here serve every family (x86 and NEON;
// core_adapters.h turns at::parallel_for and the output transform into the callbacks); the
// C++ test (tests/cpp/test_neon_core.cpp) and the instruction-count benchmark drive them
// directly, cross-compiled for aarch64 and run under qemu, where no PyTorch exists. Nothing
// here includes ATen or c10.
//
// Layouts and conventions are those of pixel_grid.h and codebook_packing.h: the channel-packed
// pixel grid (a pixel is `words` 64-bit words of channel bits, set = +1, padding pixels all
// ones for pad_value = +1 and zero otherwise), tap t = i * kw + j, and the LUT of lut_kernel.h
// (row x = the responses of the n codewords to patch x, plus taps).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "../conv_geometry.h"

namespace sparks {
namespace cpu {
namespace core {

// The n lowest bits set (all 64 for n >= 64).
inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1); }

// Runs body(begin, end) over ranges that together cover [0, items), possibly on several threads.
using ParallelFor =
    std::function<void(int64_t items, const std::function<void(int64_t, int64_t)>& body)>;
void serial_for(int64_t items, const std::function<void(int64_t, int64_t)>& body);

// Receives an int32 result tile: rows x cols values, row r = flat output position p0 + r of
// image n (p = oh * out_w + ow), column c = output channel co0 + c, row stride ld. Called from
// the threads of ParallelFor, on disjoint parts of the output.
using TileStore = std::function<void(const int32_t* tile, int64_t ld, int64_t n, int64_t p0,
                                     int64_t rows, int64_t co0, int64_t cols)>;

// The binarized input: one byte per (n, c, h, w), non-zero = +1, at
// data[n * s_n + c * s_c + h * s_h + w * s_w]. Channels-contiguous (s_c == 1) packs fastest.
struct InputBits {
  const uint8_t* data;
  int64_t s_n, s_c, s_h, s_w;
};

// Packs count <= 64 contiguous channel bytes into one word (bit i = byte i != 0).
using PackBytes = uint64_t (*)(const uint8_t* bytes, int64_t count);
uint64_t pack_bytes_portable(const uint8_t* bytes, int64_t count);

// The channel-packed, padded input grid: uint64 (N, G, Hp, Wp, words), the layout pixel_grid.h
// describes.
struct PixelGrid {
  std::unique_ptr<uint64_t[]> storage;
  const uint64_t* data = nullptr;
  int64_t groups = 0, hp = 0, wp = 0, words = 0, stride_h = 1, stride_w = 1;
  // Word offset of each tap's pixel from the window's top-left pixel; taps inside the image by
  // output row and by output column (all ones unless pad_value = 0).
  std::vector<int64_t> tap_offset;
  std::vector<uint64_t> row_valid, col_valid;

  const uint64_t* pixel(int64_t n, int64_t grp, int64_t h, int64_t w) const {
    return data + (((n * groups + grp) * hp + h) * wp + w) * words;
  }
  // The pixel of each tap of output position (oh, ow) and the mask of taps inside the image.
  uint64_t tap_pixels(int64_t n, int64_t grp, int64_t oh, int64_t ow, const uint64_t** pixels) const {
    const uint64_t* corner = pixel(n, grp, oh * stride_h, ow * stride_w);
    for (size_t t = 0; t < tap_offset.size(); ++t) pixels[t] = corner + tap_offset[t];
    return row_valid[oh] & col_valid[ow];
  }
};

// Runs on the packing thread right after padded row h of (n, grp) is complete, while it is
// still in cache (the tile kernel expands it to int8 there).
using RowDone = std::function<void(const PixelGrid& px, int64_t n, int64_t grp, int64_t h)>;

// Writes the in_w pixels of image row ih (unpadded coordinates) of (n, grp) to `pixels`.
using PackRow = std::function<void(int64_t n, int64_t grp, int64_t ih, uint64_t* pixels)>;

// The grid of `g`, its padding pixels filled and its image pixels from pack_row, parallel over
// padded rows. The caller has bounded the padding (pixel_grid.h's padded_image_bounded).
PixelGrid pack_grid_rows(const ConvGeometry& g, const PackRow& pack_row, const ParallelFor& par,
                         const RowDone& row_done = {});

// The same from the binarized input bytes, `pack` per 64 channels of a pixel.
PixelGrid pack_grid(const InputBits& in, const ConvGeometry& g, PackBytes pack, const ParallelFor& par,
                    const RowDone& row_done = {});

// ---------------------------------------------------------------------------------------------
// The LUT codebook kernel of every family (lut_kernel.h explains the algorithm).

constexpr int64_t kLutMaxTaps = 10;
constexpr int64_t kLutMaxCodewords = 64;
constexpr int64_t kLutRowBytes = 64;

// The driver (lut_conv) addresses its LUT copy and the border scratch rows behind it
// (C_in/groups rows per position of a tile, zero padding only) with uint32 byte offsets (a
// 4-byte load per term, half the traffic of 64-bit ones); it shrinks the tile to fit below
// 2^32, so one position's rows must fit: C_in/groups up to about 67.1 M.
constexpr int64_t kMaxLutOffsetBytes = int64_t{1} << 32;
inline bool lut_offsets_fit(const ConvGeometry& g) {
  const bool border_rows = g.pad_value == 0 && (g.pad_h > 0 || g.pad_w > 0);
  return !border_rows ||
         ((int64_t{1} << g.taps()) + g.in_per_group()) * kLutRowBytes <= kMaxLutOffsetBytes;
}

inline bool lut_applies(const ConvGeometry& g, int64_t n) {
  return g.taps() <= kLutMaxTaps && n <= kLutMaxCodewords && g.in_per_group() > 0 &&
         lut_offsets_fit(g);
}

// (1 << taps) rows of kLutRowBytes: row x, byte k = r_k(x) + taps for codeword k (sign / mask
// bits as in codebook_packing.h's PackedCodebook), bytes past n zero.
std::vector<uint8_t> build_lut(const uint64_t* sign, const uint64_t* mask, int64_t n, int64_t taps);

// Positions per register tile that any family's gather may use.
constexpr int64_t kLutMaxRows = 8;

// One ISA's inner loops (AVX-512, AVX2, NEON), driven by lut_conv.
struct LutOps {
  // offsets[ci] = kLutRowBytes * (patch id of input channel ci), ci < cin, from the tap pixels.
  void (*patch_offsets)(const uint64_t* const* pixels, int64_t taps, int64_t cin, uint32_t* offsets);
  // out[r][c] = sum_ci base[offsets[r * ld_off + ci] + idx_t[ci * ld_idx + c]] - bias, for
  // r < rows <= max_rows, c < cols <= 64, out row stride 64.
  void (*gather)(const uint8_t* base, const uint32_t* offsets, int64_t ld_off, int64_t rows,
                 const uint8_t* idx_t, int64_t ld_idx, int64_t cols, int64_t cin, int64_t taps,
                 int64_t n, int32_t bias, int32_t* out);
  // Zero padding: row at offsets[ci] | plus averaged with the row at offsets[ci] into scratch
  // row ci (an offset from base); offsets[ci] then points to it.
  void (*border_rows)(uint8_t* base, uint32_t* offsets, int64_t cin, uint32_t plus, uint32_t scratch);
  int64_t max_rows;  // in [1, kLutMaxRows]
};

// Border scratch per thread that a tile may need before it is cut to fewer positions: a very
// wide layer's (C_in/groups rows per position) would otherwise take gigabytes per thread.
constexpr int64_t kLutScratchBudget = int64_t{64} << 20;

// conv2d through the LUT kernel; lut_applies(g, n) must hold. idx_t: the (C_in/groups, C_out)
// uint8 index table (row ci = the index of every output channel for input channel ci),
// row stride ld_idx. `threads` only sizes the work split. Each thread keeps its LUT copy and
// border scratch between calls, at most Workspace::kKeptBytes of it (workspace.h).
void lut_conv(const PixelGrid& px, const std::vector<uint8_t>& lut, const uint8_t* idx_t,
              int64_t ld_idx, const ConvGeometry& g, int64_t n, const LutOps& ops, int threads,
              const ParallelFor& par, const TileStore& store);

// ---------------------------------------------------------------------------------------------
// Dense XNOR-popcount binary_conv2d.

// popcount of each (output channel, tap) row of a (C_out, taps, words) packed weight: what a tap
// on the zero padding gives back.
std::vector<int32_t> weight_tap_counts(const uint64_t* weight, int64_t rows, int64_t words);

}  // namespace core
}  // namespace cpu
}  // namespace sparks
