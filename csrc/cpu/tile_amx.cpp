// AMX int8 tile kernel of the codebook conv (tile_amx.h).
//
// Instruction-level reasoning. A 3x3 layer does C_in x C_out x positions terms, each a 9-tap
// response. The LUT kernel (lut_avx512.cpp) gathers 64 terms per `vpermb`, at most one
// per cycle (port 5): 64 terms per cycle and core. The tile unit's `tdpbssd` multiplies a 16 x 64
// int8 tile by a 64 x 16 one into 16 x 16 int32 sums: 16384 products in 16 cycles, 1024 per cycle
// (benchmarks/RESULTS.md has the rates measured on registers and in the loop below).
// A term is 9 products, so that is ~113 terms per cycle: 1.8x the gather's bound, and the tiles
// are exact (+-1 and 0 times +-1 and 0, int32 sums). So on CPUs with AMX the codebook is used to
// *decode* weights, and the products run on tiles:
//  - Weights: W[o][t][c] = codebook[idx[c][o]][t] as int8, in the tile unit's VNNI layout (per
//    block of 16 output channels, rows of 16 channels x 4 consecutive K entries). One `vpermb`
//    of a 64-byte per-tap table decodes one such row (64 weights) from 64 index bytes, so the
//    whole decode is C_out x C_in x taps / 64 permutes per call, into a per-thread workspace of
//    at most kWeightBudget (L2) per range of output channels; no dense weight is kept.
//  - Input: the padded image as int8 pixels (+1 / -1, 0 for zero padding: pad_value = 0 needs
//    no correction, and ternary codewords decode to 0 the same way), compared straight from
//    float32 input with contiguous channels (channels_last), else expanded from packed bits
//    (pixel_grid.h). With stride 1 and C_in/groups a multiple of 64, tile loads read A straight
//    from that image (direct mode, make_plan); otherwise each 32-position block's patch rows are
//    copied into a panel first (patch mode).
//  - Product: 2 x 2 tiles (32 positions x 32 channels) per step of 64 K bytes: 2 A and 2 B tile
//    loads for 4 `tdpbssd`, the most reuse the 8 tile registers allow.
#include "tile_amx.h"

#include "cpu_features.h"
#include "workspace.h"

#if SPARKS_AMX_COMPILED
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#define SPARKS_TARGET_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,amx-tile,amx-int8")))

namespace sparks {
namespace cpu {
namespace {

constexpr int64_t kTileRows = 16;  // positions per A / C tile, output channels per B / C tile
constexpr int64_t kTileK = 64;     // K bytes per tile row
constexpr int64_t kBlock = 2 * kTileRows;  // 32 positions x 32 channels per step

struct Plan {
  int64_t cin_g, cout_g, taps;
  int64_t cp;        // bytes per tap in a patch row: C_in/groups rounded up to 4
  int64_t k_pad;     // patch row bytes: taps * cp rounded up to 64
  int64_t n_blocks;  // 16-channel output blocks per group, rounded up to even
  int64_t positions, m_blocks;  // A rows (out_h x width) and their 32-row blocks
  bool direct;       // A read straight from the int8 image (make_plan), else from patch panels
  int64_t width;     // A rows per output row
  int64_t block_bytes() const { return k_pad * kTileRows; }  // one block's decoded weights
};

// ldtilecfg's 64-byte operand: palette 1, tiles 0-7 of 16 rows x 64 bytes. Static storage: GCC
// does not model the instruction's memory read, so a stack copy's stores can be dropped.
struct alignas(64) TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
constexpr uint16_t kC = kTileK;
constexpr uint8_t kR = kTileRows;
alignas(64) constexpr TileConfig kTileConfig = {
    1, 0, {}, {kC, kC, kC, kC, kC, kC, kC, kC}, {kR, kR, kR, kR, kR, kR, kR, kR}};

// tables[t][k] = codeword k's value at tap t (int8 -1 / 0 / +1; 0 for k >= n).
std::vector<int8_t> tap_tables(const PackedCodebook& cb, int64_t taps) {
  std::vector<int8_t> tables(taps * 64, 0);
  for (int64_t k = 0; k < cb.size(); ++k)
    for (int64_t t = 0; t < taps; ++t)
      if ((cb.mask[k] >> t) & 1) tables[t * 64 + k] = ((cb.sign[k] >> t) & 1) ? 1 : -1;
  return tables;
}

// Decoded weights of one 16-channel output block in VNNI order: row j (64 bytes) holds, for
// output channel o < 16 and q < 4, W[o][k = 4j + q] at byte 4o + q, with k = t * cp + c. Indices
// past C_in/groups or `cols` are taken as 0, i.e. those weights are codeword 0's: harmless,
// because the image holds 0 for channels past C_in/groups and columns past `cols` are not
// stored.
// `quads` is scratch for cp / 4 rows of 64 bytes.
SPARKS_TARGET_AMX void decode_block(const uint8_t* idx, int64_t ld_idx, int64_t cols,
                                    const int8_t* tables, const Plan& p, uint8_t* quads,
                                    uint8_t* out) {
  // byte 4o + q <- byte o of lane q: a 4 x 16 byte transpose.
  alignas(64) static const uint8_t kQuad[64] = {
      0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53,
      6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
      12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
  const __m512i quad_perm = _mm512_load_si512(kQuad);
  const __mmask16 colmask = static_cast<__mmask16>(cols >= 16 ? 0xffff : (1u << cols) - 1);
  const int64_t cq_count = p.cp / 4;
  for (int64_t cq = 0; cq < cq_count; ++cq) {
    // Input channel 4cq + q's 16 indices in lane q (masked loads do not fault past the table),
    // then byte 4o + q = idx[4cq + q][o].
    const int64_t c = 4 * cq;
    __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(colmask, idx + c * ld_idx));
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(c + 1 < p.cin_g ? colmask : 0, idx + (c + 1) * ld_idx), 1);
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(c + 2 < p.cin_g ? colmask : 0, idx + (c + 2) * ld_idx), 2);
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(c + 3 < p.cin_g ? colmask : 0, idx + (c + 3) * ld_idx), 3);
    _mm512_store_si512(quads + cq * 64, _mm512_permutexvar_epi8(quad_perm, v));
  }
  // Tap-major, so that the stores run sequentially through `out`.
  for (int64_t t = 0; t < p.taps; ++t) {
    const __m512i table = _mm512_loadu_si512(tables + 64 * t);
    uint8_t* row = out + t * cq_count * 64;
    for (int64_t cq = 0; cq < cq_count; ++cq)
      _mm512_store_si512(row + cq * 64, _mm512_permutexvar_epi8(_mm512_load_si512(quads + cq * 64), table));
  }
  const int64_t used = p.taps * cq_count;
  std::memset(out + used * 64, 0, (p.k_pad / 4 - used) * 64);
}

// The padded input of one (image, group) row h as int8 pixels of cp bytes: +1 / -1 per channel
// bit, 0 past C_in/groups, and 0 for the padding pixels of pad_value = 0 (zero is neither bit).
SPARKS_TARGET_AMX void expand_row(const core::PixelGrid& px, const ConvGeometry& g, const Plan& p,
                                  int64_t n, int64_t grp, int64_t h, uint8_t* out) {
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  const bool zero_row = g.pad_value == 0 && (h < g.pad_h || h >= g.pad_h + g.in_h);
  const uint64_t* bits = px.pixel(n, grp, h, 0);
  for (int64_t w = 0; w < px.wp; ++w, bits += px.words, out += p.cp) {
    const bool zero = zero_row || (g.pad_value == 0 && (w < g.pad_w || w >= g.pad_w + g.in_w));
    for (int64_t k = 0; k < px.words; ++k) {
      const __mmask64 channels = zero ? 0 : low_bits(std::min<int64_t>(64, p.cin_g - 64 * k));
      const __m512i v = _mm512_maskz_mov_epi8(channels, _mm512_mask_blend_epi8(bits[k], minus, plus));
      _mm512_mask_storeu_epi8(out + 64 * k, low_bits(std::min<int64_t>(64, p.cp - 64 * k)), v);
    }
  }
}

// Row h of the padded int8 image straight from float32 input whose channels are contiguous
// (channels_last): `row` points at input pixel (h - pad_h, 0), channel grp * C_in/groups, and is
// only read for rows and columns inside the image (null for padding rows); `thr` holds the
// thresholds of those channels (+1 where x >= thr). Padding rows and columns hold the pad value
// (0, or +-1 on the channels).
SPARKS_TARGET_AMX void binarize_row(const float* row, int64_t s_w, const float* thr,
                                    const ConvGeometry& g, const Plan& p, int64_t h, uint8_t* out) {
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  const int64_t chunks = (p.cp + 63) / 64, wp = g.in_w + 2 * g.pad_w;
  const int8_t pad = g.pad_value > 0 ? 1 : g.pad_value < 0 ? -1 : 0;
  const bool pad_row = h < g.pad_h || h >= g.pad_h + g.in_h;
  for (int64_t w = 0; w < wp; ++w, out += p.cp) {
    const bool pad_pixel = pad_row || w < g.pad_w || w >= g.pad_w + g.in_w;
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t count = std::min<int64_t>(64, p.cin_g - 64 * k);
      const __mmask64 channels = low_bits(count);
      __m512i v;
      if (pad_pixel) {
        v = _mm512_maskz_mov_epi8(channels, _mm512_set1_epi8(pad));
      } else {
        const float* px = row + (w - g.pad_w) * s_w + 64 * k;
        uint64_t bits = 0;
        for (int64_t c = 0; c < count; c += 16) {
          const __mmask16 m = static_cast<__mmask16>(low_bits(std::min<int64_t>(16, count - c)));
          bits |= uint64_t{_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, px + c),
                                                   _mm512_maskz_loadu_ps(m, thr + 64 * k + c), _CMP_GE_OQ)}
                  << c;
        }
        v = _mm512_maskz_mov_epi8(channels, _mm512_mask_blend_epi8(bits, minus, plus));
      }
      _mm512_mask_storeu_epi8(out + 64 * k, low_bits(std::min<int64_t>(64, p.cp - 64 * k)), v);
    }
  }
}

// Patch rows of positions p0 .. p0 + 31 from the int8 image of one (image, group): row r, bytes
// [t * cp, t * cp + cp) = the pixel under tap t. Rows past `rows` are zero, and so are the bytes
// past taps * cp, from the workspace's zeroing when this thread's panel was made.
SPARKS_TARGET_AMX void patch_rows(const uint8_t* image, const ConvGeometry& g, const Plan& p,
                                  const int64_t* tap_offset, int64_t p0, int64_t rows, uint8_t* a) {
  const int64_t chunks = (p.cp + 63) / 64;
  const __mmask64 last = low_bits(p.cp - 64 * (chunks - 1));
  const int64_t wp = g.in_w + 2 * g.pad_w;
  int64_t oh = p0 / g.out_w, ow = p0 % g.out_w;
  for (int64_t r = 0; r < kBlock; ++r, ++ow) {
    uint8_t* row = a + r * p.k_pad;
    if (r >= rows) {
      std::memset(row, 0, p.taps * p.cp);
      continue;
    }
    if (ow == g.out_w) ow = 0, ++oh;
    const uint8_t* corner = image + (oh * g.stride_h * wp + ow * g.stride_w) * p.cp;
    for (int64_t t = 0; t < p.taps; ++t) {
      const uint8_t* src = corner + tap_offset[t];
      uint8_t* dst = row + t * p.cp;
      for (int64_t k = 0; k + 1 < chunks; ++k)
        _mm512_storeu_si512(dst + 64 * k, _mm512_loadu_si512(src + 64 * k));
      const int64_t k = chunks - 1;
      _mm512_mask_storeu_epi8(dst + 64 * k, last, _mm512_maskz_loadu_epi8(last, src + 64 * k));
    }
  }
}

// C[32 x 32] int32 (row stride 32) = A (32 rows x K) times the two decoded blocks b0, b1 (K x 16
// each, VNNI rows of 64 bytes). A's K step s of tile rows 0-15 starts at a + a_step[s], rows
// a_ld bytes apart; rows 16-31 start a_half bytes later.
// GCC's tile intrinsics are asm statements that do not declare the memory they read or write:
// out of line, and with compiler barriers, so the panel / weight stores before and the reads of
// `c` after are not moved across them.
__attribute__((noinline)) SPARKS_TARGET_AMX void tile_product(const uint8_t* a, int64_t a_ld, const int64_t* a_step,
                                    int64_t steps, int64_t a_half, const uint8_t* b0,
                                    const uint8_t* b1, int32_t* c) {
  asm volatile("" ::: "memory");
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    const uint8_t* as = a + a_step[s];
    _tile_loadd(4, as, a_ld);
    _tile_loadd(6, b0 + s * kTileRows * 64, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_loadd(7, b1 + s * kTileRows * 64, 64);
    _tile_dpbssd(1, 4, 7);
    _tile_loadd(5, as + a_half, a_ld);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  constexpr int64_t ld = kBlock * sizeof(int32_t);
  _tile_stored(0, c, ld);
  _tile_stored(1, c + kTileRows, ld);
  _tile_stored(2, c + kTileRows * kBlock, ld);
  _tile_stored(3, c + kTileRows * kBlock + kTileRows, ld);
  asm volatile("" ::: "memory");
}

SPARKS_TARGET_AMX void load_tile_config() { _tile_loadconfig(&kTileConfig); }
SPARKS_TARGET_AMX void release_tiles() { _tile_release(); }

// How many ranges of output-channel pairs the work is split into: each range's decoded weights
// stay under kWeightBudget (L2), and there are enough (range, position block) items to keep every
// thread busy with little imbalance. Ranges are outermost, so a thread decodes few of them.
constexpr int64_t kWeightBudget = 512 << 10;

int64_t channel_splits(int64_t blocks, int64_t pairs, int64_t pair_bytes, int64_t threads) {
  const int64_t pairs_per_range = std::max<int64_t>(1, kWeightBudget / pair_bytes);
  const int64_t least = (pairs + pairs_per_range - 1) / pairs_per_range;
  int64_t best = least;
  double best_eff = 0;
  for (int64_t s = least; s <= pairs; ++s) {
    const int64_t items = blocks * s;
    const double eff = static_cast<double>(items) / (threads * ((items + threads - 1) / threads));
    if (eff > best_eff + 0.05) best = s, best_eff = eff;
    if (best_eff >= 0.95) break;
  }
  return best;
}

// The call's shapes. Direct mode (stride 1, channels a multiple of 64): A tiles are read
// straight from the int8 image. Output position (oh, ow) is virtual row q = oh * Wp + ow, whose
// tap (i, j) pixel is q + i * dil_h * Wp + j * dil_w: consecutive rows are consecutive pixels, so
// one tile load with a row stride of cp bytes covers 16 positions; rows with ow >= out_w are
// computed and dropped (2 of every Wp). Otherwise (patch mode) patch_rows copies each
// 32-position block's patches into a panel first.
Plan make_plan(const ConvGeometry& g) {
  Plan p;
  p.cin_g = g.in_per_group();
  p.cout_g = g.out_per_group();
  p.taps = g.taps();
  p.cp = (p.cin_g + 3) / 4 * 4;
  p.k_pad = (p.taps * p.cp + kTileK - 1) / kTileK * kTileK;
  p.n_blocks = (p.cout_g + kBlock - 1) / kBlock * 2;
  p.direct = g.stride_h == 1 && g.stride_w == 1 && p.cp % kTileK == 0;
  p.width = p.direct ? g.in_w + 2 * g.pad_w : g.out_w;
  p.positions = g.out_h * p.width;
  p.m_blocks = (p.positions + kBlock - 1) / kBlock;
  return p;
}

// The input as int8 pixels, (N, groups, Hp, Wp, cp) bytes, plus slack for the reads of the
// direct mode's last block.
struct Int8Image {
  uint8_t* data;
  int64_t hp, wp;  // padded rows and columns
  int64_t bytes;   // one (image, group)'s pixels: hp * wp * cp
  const uint8_t* plane(int64_t img, int64_t grp, int64_t groups) const {
    return data + (img * groups + grp) * bytes;
  }
};

// float32 with contiguous channels (channels_last, the fastest input): compares with the
// thresholds straight into int8 pixels, skipping the packed bits (benchmarks/RESULTS.md).
void binarize_float_image(const at::Tensor& input, const at::Tensor& threshold,
                          const ConvGeometry& g, const Plan& p, const Int8Image& image) {
  const float* x = input.data_ptr<float>();
  std::vector<float> thr(g.in_channels, 0.0f);
  if (threshold.defined()) {
    const at::Tensor t = threshold.contiguous();
    std::copy(t.data_ptr<float>(), t.data_ptr<float>() + g.in_channels, thr.begin());
  }
  const int64_t hp = image.hp, wp = image.wp;
  at::parallel_for(0, g.batch * g.groups * hp, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % hp, grp = (row / hp) % g.groups, n = row / (hp * g.groups);
      const bool inside = h >= g.pad_h && h < g.pad_h + g.in_h;
      const float* in_row = inside ? x + n * input.stride(0) + (h - g.pad_h) * input.stride(2) +
                                         grp * p.cin_g
                                   : nullptr;
      binarize_row(in_row, input.stride(3), thr.data() + grp * p.cin_g, g, p, h,
                   image.data + row * wp * p.cp);
    }
  });
}

// Any dtype and layout: packed bits (pixel_grid.h), expanded row by row while in cache.
void expand_packed_image(const at::Tensor& input, const at::Tensor& threshold,
                         const ConvGeometry& g, const Plan& p, const Int8Image& image) {
  pack_pixels(input, threshold, g, Isa::kAmx,
      [&](const core::PixelGrid& packed, int64_t n, int64_t grp, int64_t h) {
        expand_row(packed, g, p, n, grp, h,
                   image.data + ((n * g.groups + grp) * image.hp + h) * image.wp * p.cp);
      });
}

// The int8 image in `space` (a per-thread workspace the caller trims after the call).
Int8Image make_int8_image(const at::Tensor& input, const at::Tensor& threshold,
                          const ConvGeometry& g, const Plan& p, Workspace& space) {
  Int8Image image;
  image.hp = g.in_h + 2 * g.pad_h;
  image.wp = g.in_w + 2 * g.pad_w;
  image.bytes = image.hp * image.wp * p.cp;
  const int64_t slack = (kBlock + (g.kernel_w - 1) * g.dil_w) * p.cp;
  image.data = space.get(g.batch * g.groups * image.bytes + slack);
  std::memset(image.data + g.batch * g.groups * image.bytes, 0, slack);
  if (input.scalar_type() == at::kFloat && input.stride(1) == 1)
    binarize_float_image(input, threshold, g, p, image);
  else
    expand_packed_image(input, threshold, g, p, image);
  return image;
}

// Where tile_product finds A's K steps: from the int8 image through the taps' offsets (direct
// mode) or from a patch panel's rows.
struct AOperand {
  std::vector<int64_t> tap_offset;  // bytes from a window's top-left pixel to tap t's
  std::vector<int64_t> step;        // K step s of a row starts step[s] bytes after the row
  int64_t steps;                    // K steps of 64 bytes
  int64_t ld;                       // bytes from one A row to the next
};

AOperand a_operand(const ConvGeometry& g, const Plan& p, int64_t wp) {
  AOperand a;
  for (int64_t i = 0; i < g.kernel_h; ++i)
    for (int64_t j = 0; j < g.kernel_w; ++j)
      a.tap_offset.push_back((i * g.dil_h * wp + j * g.dil_w) * p.cp);
  a.steps = p.k_pad / kTileK;
  a.step.resize(a.steps);
  for (int64_t s = 0; s < a.steps; ++s)
    a.step[s] = p.direct ? a.tap_offset[s * kTileK / p.cp] + s * kTileK % p.cp : s * kTileK;
  a.ld = p.direct ? p.cp : p.k_pad;
  return a;
}

// The parallel work: splits x per_split items, each a (range of output-channel pairs, group,
// image, 32-position block).
struct WorkSplit {
  int64_t splits;     // ranges of output-channel pairs (channel_splits)
  int64_t per_split;  // items per range: groups x images x position blocks
  int64_t pairs;      // pairs of 16-channel output blocks per group
  int64_t pair_begin(int64_t split) const { return split * pairs / splits; }
  int64_t most_pairs() const { return (pairs + splits - 1) / splits; }  // in any one range
};

WorkSplit split_work(const ConvGeometry& g, const Plan& p, int64_t threads) {
  WorkSplit w;
  w.per_split = g.batch * g.groups * p.m_blocks;
  w.pairs = p.n_blocks / 2;
  w.splits = channel_splits(w.per_split, w.pairs, 2 * p.block_bytes(), threads);
  return w;
}

struct WorkItem {
  int64_t split, item;  // range of pairs; item within it
  int64_t m, img, grp;  // position block, image, group
};

// Items run position blocks fastest, then images, then groups, so that a thread's decoded
// weights (of one group) serve all its images.
WorkItem work_item(int64_t work, const WorkSplit& w, const Plan& p, const ConvGeometry& g) {
  WorkItem it;
  it.split = work / w.per_split;
  it.item = work % w.per_split;
  it.m = it.item % p.m_blocks;
  it.img = it.item / p.m_blocks % g.batch;
  it.grp = it.item / (p.m_blocks * g.batch);
  return it;
}

// The decoded weights of output-channel pairs [pair0, pair1) of group grp, block after block
// into `weights`: one vpermb per 64 of them (decode_block).
void decode_pairs(const uint8_t* idx, const int8_t* tables, const ConvGeometry& g, const Plan& p,
                  int64_t grp, int64_t pair0, int64_t pair1, uint8_t* quads, uint8_t* weights) {
  for (int64_t ob = 2 * pair0; ob < 2 * pair1; ++ob) {
    const int64_t co0 = ob * kTileRows;
    const int64_t cols = std::clamp<int64_t>(p.cout_g - co0, 0, kTileRows);
    decode_block(idx + grp * p.cout_g + co0, g.out_channels, cols, tables, p, quads,
                 weights + (ob - 2 * pair0) * p.block_bytes());
  }
}

// C's rows q0 .. q0 + rows - 1 (channels co .. co + cols - 1) to the output of image img, in
// runs within one output row (direct mode drops ow >= out_w).
void store_rows(const OutputTransform& writer, const int32_t* c, const ConvGeometry& g,
                const Plan& p, int64_t img, int64_t q0, int64_t rows, int64_t co, int64_t cols) {
  for (int64_t r = 0; r < rows;) {
    const int64_t oh = (q0 + r) / p.width, ow = (q0 + r) % p.width;
    const int64_t run = std::min(rows - r, p.width - ow);
    if (ow < g.out_w)
      writer.store(c + r * kBlock, kBlock, img, oh * g.out_w + ow, std::min(run, g.out_w - ow),
                   co, cols);
    r += run;
  }
}

// What every worker reads.
struct TileJob {
  const ConvGeometry& g;
  const Plan& p;
  const Int8Image& image;
  const AOperand& a;
  const uint8_t* idx;     // (C_in/groups, C_out) index table
  const int8_t* tables;   // tap_tables
  const WorkSplit& work;
  const OutputTransform& writer;
};

// One thread's items [begin, end): each decodes its range's weights unless this thread holds
// them already, fills the patch panel (patch mode), and runs the tile products of every pair.
void run_items(const TileJob& job, int64_t begin, int64_t end) {
  const ConvGeometry& g = job.g;
  const Plan& p = job.p;
  const AOperand& a_op = job.a;
  const WorkSplit& w = job.work;
  static thread_local Workspace panel_space, weight_space, quad_space;
  uint8_t* quads = quad_space.get(p.cp / 4 * 64);
  uint8_t* panel = p.direct ? nullptr : panel_space.get(kBlock * p.k_pad);
  if (!p.direct)
    for (int64_t r = 0; r < kBlock; ++r)
      std::memset(panel + r * p.k_pad + p.taps * p.cp, 0, p.k_pad - p.taps * p.cp);
  uint8_t* weights = weight_space.get(w.most_pairs() * 2 * p.block_bytes());
  alignas(64) int32_t c[kBlock * kBlock];
  load_tile_config();
  int64_t decoded = -1, filled = -1;  // the weights and patch rows in the workspaces
  for (int64_t work = begin; work < end; ++work) {
    const WorkItem it = work_item(work, w, p, g);
    const int64_t pair0 = w.pair_begin(it.split), pair1 = w.pair_begin(it.split + 1);
    if (decoded != it.split * g.groups + it.grp) {
      decode_pairs(job.idx, job.tables, g, p, it.grp, pair0, pair1, quads, weights);
      decoded = it.split * g.groups + it.grp;
    }
    const uint8_t* image_data = job.image.plane(it.img, it.grp, g.groups);
    const int64_t q0 = it.m * kBlock, rows = std::min(kBlock, p.positions - q0);
    const uint8_t* a = p.direct ? image_data + q0 * p.cp : panel;
    if (!p.direct && filled != it.item) {
      patch_rows(image_data, g, p, a_op.tap_offset.data(), q0, rows, panel);
      filled = it.item;
    }
    for (int64_t pair = pair0; pair < pair1; ++pair) {
      const uint8_t* b0 = weights + 2 * (pair - pair0) * p.block_bytes();
      tile_product(a, a_op.ld, a_op.step.data(), a_op.steps, kTileRows * a_op.ld, b0,
                   b0 + p.block_bytes(), c);
      const int64_t co = it.grp * p.cout_g + pair * kBlock;
      const int64_t cols = std::min(kBlock, p.cout_g - pair * kBlock);
      store_rows(job.writer, c, g, p, it.img, q0, rows, co, cols);
    }
  }
  release_tiles();
  panel_space.trim();
  weight_space.trim();
}

}  // namespace

void codebook_conv_amx(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb,
                       const at::Tensor& indices, const ConvGeometry& g,
                       const OutputTransform& writer) {
  const Plan p = make_plan(g);
  static thread_local Workspace image_space;
  const Int8Image image = make_int8_image(input, threshold, g, p, image_space);
  const AOperand a = a_operand(g, p, image.wp);
  const at::Tensor idx_t = index_table(indices);  // (C_in/groups, C_out)
  const std::vector<int8_t> tables = tap_tables(cb, p.taps);
  const WorkSplit work = split_work(g, p, at::get_num_threads());
  const TileJob job{g, p, image, a, idx_t.data_ptr<uint8_t>(), tables.data(), work, writer};
  at::parallel_for(0, work.splits * work.per_split, 1,
                   [&](int64_t begin, int64_t end) { run_items(job, begin, end); });
  image_space.trim();
}

}  // namespace cpu
}  // namespace sparks

#else  // !SPARKS_AMX_COMPILED

namespace sparks {
namespace cpu {
void codebook_conv_amx(const at::Tensor&, const at::Tensor&, const PackedCodebook&, const at::Tensor&,
                       const ConvGeometry&, const OutputTransform&) {
  TORCH_INTERNAL_ASSERT(false, "this build has no AMX kernel");
}
}  // namespace cpu
}  // namespace sparks

#endif
