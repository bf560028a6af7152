// One ResNet-18 3x3 layer at batch 1 through one CPU kernel, for qemu's instruction counting
// (benchmarks/arm/insn_table.py runs it with and without the op and takes the difference).
//   insn_count KERNEL LAYER N RUN
// KERNEL: lut (the NEON LUT codebook kernel, n codewords), dense (the NEON binary_conv2d) or
// portable (the portable codebook kernel); LAYER: index into kLayers; RUN: 0 = set-up only,
// 1 = set-up + one op, 2 = the lut op checked against the portable one. Serial (one thread),
// float32 channels_last output, no scale / bias. Each op
// counts from the binarized input bytes to the float output: input packing, LUT / weight
// layout, the kernel, the store.
//
// `portable` is csrc/cpu/conv2d.cpp's codebook_conv_portable (and input_bytes.cpp's
// patch_row / valid_row) loop for loop on plain arrays: the library's portable path is written
// against ATen, which does not exist under qemu.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/kernel_core.h"
#include "cpu/neon_kernels.h"

namespace {

using sparks::ConvGeometry;
namespace core = sparks::cpu::core;
namespace neon = sparks::cpu::neon;

struct Layer {
  int64_t cin, cout, hw, stride;
};
// The 3x3 convolutions of ResNet-18 (padding 1) at batch 1.
constexpr Layer kLayers[] = {{64, 64, 56, 1},   {64, 128, 56, 2},  {128, 128, 28, 1}, {128, 256, 28, 2},
                             {256, 256, 14, 1}, {256, 512, 14, 2}, {512, 512, 7, 1}};

ConvGeometry geometry(const Layer& l) {
  ConvGeometry g{};
  g.batch = 1;
  g.in_channels = l.cin;
  g.in_h = g.in_w = l.hw;
  g.out_channels = l.cout;
  g.groups = 1;
  g.kernel_h = g.kernel_w = 3;
  g.stride_h = g.stride_w = l.stride;
  g.pad_h = g.pad_w = 1;
  g.dil_h = g.dil_w = 1;
  g.out_h = g.out_w = (l.hw + 2 - 2 - 1) / l.stride + 1;
  g.pad_value = 0;
  return g;
}

// codebook_conv_portable on plain arrays (see the file comment).
void portable_conv(const uint8_t* bits, const uint64_t* sign, const uint64_t* mask, int64_t n_cw,
                   const int32_t* idx_ptr, const ConvGeometry& g, float* out) {
  constexpr int64_t kTile = 8;
  const int64_t cin_g = g.in_per_group(), cout_g = g.out_per_group();
  const int64_t plane = g.in_h * g.in_w;
  std::vector<uint64_t> patch(cin_g * g.out_w), valid(g.out_w);
  std::vector<int16_t> base(kTile * n_cw), resp(kTile * cin_g * n_cw);
  const uint64_t pad_bit = g.pad_value > 0 ? 1 : 0;
  for (int64_t item = 0; item < g.batch * g.groups * g.out_h; ++item) {
    const int64_t oh = item % g.out_h, grp = (item / g.out_h) % g.groups, n = item / (g.out_h * g.groups);
    for (int64_t ci = 0; ci < cin_g; ++ci) {  // patch_row
      const uint8_t* p = bits + (n * g.in_channels + grp * cin_g + ci) * plane;
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        uint64_t word = 0;
        int64_t t = 0;
        for (int64_t i = 0; i < g.kernel_h; ++i) {
          const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
          const bool row_inside = ih >= 0 && ih < g.in_h;
          for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
            const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
            const uint64_t bit = (row_inside && iw >= 0 && iw < g.in_w) ? p[ih * g.in_w + iw] : pad_bit;
            word |= bit << t;
          }
        }
        patch[ci * g.out_w + ow] = word;
      }
    }
    for (int64_t ow = 0; ow < g.out_w; ++ow) {  // valid_row
      uint64_t word = 0;
      int64_t t = 0;
      for (int64_t i = 0; i < g.kernel_h; ++i) {
        const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
        for (int64_t j = 0; j < g.kernel_w; ++j, ++t) {
          const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
          if (g.pad_value != 0 || (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)) word |= uint64_t{1} << t;
        }
      }
      valid[ow] = word;
    }
    for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += kTile) {
      const int64_t tile = std::min(kTile, g.out_w - ow0);
      for (int64_t t = 0; t < tile; ++t) {
        const uint64_t v = valid[ow0 + t];
        for (int64_t k = 0; k < n_cw; ++k) base[t * n_cw + k] = static_cast<int16_t>(__builtin_popcountll(mask[k] & v));
        for (int64_t ci = 0; ci < cin_g; ++ci) {
          const uint64_t x = patch[ci * g.out_w + ow0 + t];
          int16_t* r = resp.data() + (t * cin_g + ci) * n_cw;
          for (int64_t k = 0; k < n_cw; ++k)
            r[k] = static_cast<int16_t>(base[t * n_cw + k] - 2 * __builtin_popcountll(mask[k] & v & (x ^ sign[k])));
        }
      }
      for (int64_t co = 0; co < cout_g; ++co) {
        const int32_t* idx = idx_ptr + (grp * cout_g + co) * cin_g;
        for (int64_t t = 0; t < tile; ++t) {
          const int16_t* r = resp.data() + t * cin_g * n_cw;
          int32_t acc = 0;
          for (int64_t ci = 0; ci < cin_g; ++ci) acc += r[ci * n_cw + idx[ci]];
          out[((n * g.out_h + oh) * g.out_w + ow0 + t) * g.out_channels + grp * cout_g + co] = static_cast<float>(acc);
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s lut|dense|portable LAYER N RUN\n", argv[0]);
    return 2;
  }
  const std::string kernel = argv[1];
  const Layer layer = kLayers[std::atoi(argv[2])];
  const int64_t n_cw = std::atoi(argv[3]);
  const int run = std::atoi(argv[4]);
  const ConvGeometry g = geometry(layer);
  const int64_t taps = 9, cin = g.in_channels, cout = g.out_channels, words = (cin + 63) / 64;

  std::mt19937_64 rng(7);
  std::vector<uint8_t> nchw(cin * g.in_h * g.in_w);
  for (auto& b : nchw) b = rng() & 1;
  std::vector<uint8_t> nhwc(nchw.size());  // what the ATen adapter hands the NEON kernels
  for (int64_t c = 0; c < cin; ++c)
    for (int64_t p = 0; p < g.in_h * g.in_w; ++p) nhwc[p * cin + c] = nchw[c * g.in_h * g.in_w + p];
  std::vector<uint64_t> sign(n_cw), mask(n_cw);
  for (int64_t k = 0; k < n_cw; ++k) {
    sign[k] = rng() & 511;
    mask[k] = 511 & ~(rng() & rng() & 511);  // ternary
  }
  std::vector<int32_t> idx(cout * cin);
  for (auto& i : idx) i = static_cast<int32_t>(rng() % n_cw);
  std::vector<uint8_t> idx_t(cin * cout);
  for (int64_t co = 0; co < cout; ++co)
    for (int64_t ci = 0; ci < cin; ++ci) idx_t[ci * cout + co] = static_cast<uint8_t>(idx[co * cin + ci]);
  std::vector<uint64_t> weight(cout * taps * words);
  for (auto& w : weight) w = rng();
  if (cin < 64)
    for (auto& w : weight) w &= core::low_bits(cin);
  // A channels_last float32 output (the layout the README recommends): contiguous channel rows.
  std::vector<float> out(cout * g.out_h * g.out_w), check(out.size());
  const int64_t positions = g.out_h * g.out_w;
  const core::TileStore store = [&](const int32_t* tile, int64_t ld, int64_t n, int64_t p0, int64_t rows,
                                    int64_t co0, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = out.data() + (n * positions + p0 + r) * cout + co0;
      const int32_t* src = tile + r * ld;
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<float>(src[c]);
    }
  };
  const core::InputBits in{nhwc.data(), g.in_h * g.in_w * cin, 1, g.in_w * cin, cin};
  if (!run) return 0;
  if (kernel == "lut") {
    const core::PixelGrid px = core::pack_grid(in, g, &neon::pack_bytes, core::serial_for);
    const std::vector<uint8_t> lut = core::build_lut(sign.data(), mask.data(), n_cw, taps);
    core::lut_conv(px, lut, idx_t.data(), cout, g, n_cw, neon::lut_ops(), 1, core::serial_for, store);
    if (run == 1) return 0;
    check = out;
    portable_conv(nchw.data(), sign.data(), mask.data(), n_cw, idx.data(), g, out.data());
  } else if (kernel == "dense") {
    const core::PixelGrid px = core::pack_grid(in, g, &neon::pack_bytes, core::serial_for);
    neon::binary_conv(px, weight.data(), g, core::serial_for, store);
    return 0;  // checked against a reference by tests/cpp/test_neon_core.cpp
  } else if (kernel == "portable") {
    portable_conv(nchw.data(), sign.data(), mask.data(), n_cw, idx.data(), g, out.data());
    return 0;
  } else {
    return 2;
  }
  if (check != out) {
    std::fprintf(stderr, "lut and portable kernels disagree\n");
    return 1;
  }
  return 0;
}
