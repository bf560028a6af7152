// ATen-free test of the NEON kernels (csrc/cpu/neon_kernels.h) through their cores
// (csrc/cpu/kernel_core.h), against a direct integer convolution. Built for aarch64 and run
// under qemu by .ci/aarch64.sh (no PyTorch there); exits non-zero on any mismatch.
//
// The grid: every geometry below (kernel sizes 1x1 .. 7x7, strides, dilations, symmetric and
// asymmetric padding, groups, odd channel counts, more than 64 input channels) x pad values
// 0 / +1 / -1 x binary and ternary codebooks x codebook sizes n across the 1-, 2-, 3- and 4-
// register TBL tables (all of 1..64 on one geometry), for conv2d's LUT kernel (kh * kw <= 10)
// and the dense binary_conv2d (any kernel), serial and on 3 threads, NCHW and NHWC input bytes.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cpu/kernel_core.h"
#include "cpu/neon_kernels.h"

#if !SPARKS_NEON_COMPILED
#error "test_neon_core is built for aarch64 (see .ci/aarch64.sh)"
#endif

namespace {

using sparks::ConvGeometry;
namespace core = sparks::cpu::core;
namespace neon = sparks::cpu::neon;

struct Shape {
  int64_t cin, cout, h, w, kh, kw, sh, sw, ph, pw, dh, dw, groups;
};

ConvGeometry geometry(const Shape& s, int64_t batch, int pad_value) {
  ConvGeometry g{};
  g.batch = batch;
  g.in_channels = s.cin;
  g.in_h = s.h;
  g.in_w = s.w;
  g.out_channels = s.cout;
  g.groups = s.groups;
  g.kernel_h = s.kh;
  g.kernel_w = s.kw;
  g.stride_h = s.sh;
  g.stride_w = s.sw;
  g.pad_h = s.ph;
  g.pad_w = s.pw;
  g.dil_h = s.dh;
  g.dil_w = s.dw;
  g.out_h = (s.h + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  g.out_w = (s.w + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  g.pad_value = pad_value;
  return g;
}

// The binarized input as +-1, read with padding.
int input_at(const std::vector<uint8_t>& bits, const ConvGeometry& g, int64_t n, int64_t c, int64_t h, int64_t w) {
  if (h < 0 || h >= g.in_h || w < 0 || w >= g.in_w) return g.pad_value;
  return bits[((n * g.in_channels + c) * g.in_h + h) * g.in_w + w] ? 1 : -1;
}

// out[n, co, oh, ow] = sum over ci, i, j of x * weight(co, ci, i, j).
template <typename Weight>
std::vector<int32_t> reference(const std::vector<uint8_t>& bits, const ConvGeometry& g, Weight weight) {
  const int64_t cin_g = g.in_per_group(), cout_g = g.out_per_group();
  std::vector<int32_t> out(g.batch * g.out_channels * g.out_h * g.out_w);
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (int64_t oh = 0; oh < g.out_h; ++oh)
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          int32_t acc = 0;
          const int64_t grp = co / cout_g;
          for (int64_t ci = 0; ci < cin_g; ++ci)
            for (int64_t i = 0; i < g.kernel_h; ++i)
              for (int64_t j = 0; j < g.kernel_w; ++j)
                acc += input_at(bits, g, n, grp * cin_g + ci, oh * g.stride_h - g.pad_h + i * g.dil_h,
                                ow * g.stride_w - g.pad_w + j * g.dil_w) *
                       weight(co, ci, i * g.kernel_w + j);
          out[((n * g.out_channels + co) * g.out_h + oh) * g.out_w + ow] = acc;
        }
  return out;
}

// Collects tiles into an NCHW int32 buffer and counts writes per element.
struct Collector {
  const ConvGeometry& g;
  std::vector<int32_t> out;
  std::vector<int32_t> writes;
  explicit Collector(const ConvGeometry& geom)
      : g(geom), out(geom.batch * geom.out_channels * geom.out_h * geom.out_w, 0), writes(out.size(), 0) {}
  core::TileStore store() {
    return [this](const int32_t* tile, int64_t ld, int64_t n, int64_t p0, int64_t rows, int64_t co0, int64_t cols) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t i = (n * g.out_channels + co0 + c) * g.out_h * g.out_w + p0 + r;
          out[i] = tile[r * ld + c];
          ++writes[i];
        }
    };
  }
  bool complete() const {
    return std::all_of(writes.begin(), writes.end(), [](int32_t w) { return w == 1; });
  }
};

core::ParallelFor threads(int count) {
  if (count <= 1) return core::serial_for;
  return [count](int64_t items, const std::function<void(int64_t, int64_t)>& body) {
    std::vector<std::thread> pool;
    for (int t = 0; t < count; ++t) {
      const int64_t b = items * t / count, e = items * (t + 1) / count;
      if (b < e) pool.emplace_back([&body, b, e] { body(b, e); });
    }
    for (auto& th : pool) th.join();
  };
}

// The input bytes in NCHW or NHWC order.
struct Layout {
  std::vector<uint8_t> bytes;
  core::InputBits view;
};

Layout layout(const std::vector<uint8_t>& nchw, const ConvGeometry& g, bool channels_last) {
  Layout l;
  const int64_t C = g.in_channels, H = g.in_h, W = g.in_w;
  if (!channels_last) {
    l.bytes = nchw;
    l.view = {nullptr, C * H * W, H * W, W, 1};
  } else {
    l.bytes.resize(nchw.size());
    for (int64_t n = 0; n < g.batch; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w)
            l.bytes[((n * H + h) * W + w) * C + c] = nchw[((n * C + c) * H + h) * W + w];
    l.view = {nullptr, H * W * C, 1, W * C, C};
  }
  l.view.data = l.bytes.data();
  return l;
}

int failures = 0, cases = 0;

void check(bool ok, const std::string& what) {
  ++cases;
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

std::string describe(const Shape& s, int pad_value) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "cin=%lld cout=%lld %lldx%lld k=%lldx%lld s=%lld,%lld p=%lld,%lld d=%lld,%lld g=%lld pad=%d",
                (long long)s.cin, (long long)s.cout, (long long)s.h, (long long)s.w, (long long)s.kh,
                (long long)s.kw, (long long)s.sh, (long long)s.sw, (long long)s.ph, (long long)s.pw,
                (long long)s.dh, (long long)s.dw, (long long)s.groups, pad_value);
  return buf;
}

std::mt19937_64 rng(2024);

// conv2d through the NEON LUT kernel for one codebook.
void check_lut(const Shape& s, int pad_value, int64_t n_cw, bool ternary, int thread_count, bool channels_last,
               int64_t batch) {
  const ConvGeometry g = geometry(s, batch, pad_value);
  const int64_t taps = g.taps(), cin_g = g.in_per_group();
  std::vector<uint8_t> bits(g.batch * g.in_channels * g.in_h * g.in_w);
  for (auto& b : bits) b = rng() & 1;
  // Codewords in {-1, +1} (binary) or {-1, 0, +1} (ternary), as sign / mask bits and values.
  std::vector<uint64_t> sign(n_cw, 0), mask(n_cw, 0);
  std::vector<int> value(n_cw * taps);
  for (int64_t k = 0; k < n_cw; ++k)
    for (int64_t t = 0; t < taps; ++t) {
      const int v = ternary ? static_cast<int>(rng() % 3) - 1 : ((rng() & 1) ? 1 : -1);
      value[k * taps + t] = v;
      if (v != 0) mask[k] |= uint64_t{1} << t;
      if (v == 1) sign[k] |= uint64_t{1} << t;
    }
  std::vector<uint8_t> idx(g.out_channels * cin_g);  // (C_out, C_in/groups)
  for (auto& i : idx) i = static_cast<uint8_t>(rng() % n_cw);
  if (n_cw > 1) idx[0] = static_cast<uint8_t>(n_cw - 1);  // the table's last entry is read
  std::vector<uint8_t> idx_t(cin_g * g.out_channels);    // (C_in/groups, C_out)
  for (int64_t co = 0; co < g.out_channels; ++co)
    for (int64_t ci = 0; ci < cin_g; ++ci) idx_t[ci * g.out_channels + co] = idx[co * cin_g + ci];

  const std::vector<int32_t> want = reference(bits, g, [&](int64_t co, int64_t ci, int64_t t) {
    return value[idx[co * cin_g + ci] * taps + t];
  });
  const Layout in = layout(bits, g, channels_last);
  const core::ParallelFor par = threads(thread_count);
  const core::PixelGrid px = core::pack_grid(in.view, g, &neon::pack_bytes, par);
  const std::vector<uint8_t> lut = core::build_lut(sign.data(), mask.data(), n_cw, taps);
  Collector got(g);
  core::lut_conv(px, lut, idx_t.data(), g.out_channels, g, n_cw, neon::lut_ops(), thread_count, par, got.store());
  check(got.complete() && got.out == want,
        "conv2d neon " + describe(s, pad_value) + " n=" + std::to_string(n_cw) + (ternary ? " ternary" : " binary") +
            " threads=" + std::to_string(thread_count) + (channels_last ? " nhwc" : " nchw"));
}

// binary_conv2d through the NEON dense kernel.
void check_dense(const Shape& s, int pad_value, int thread_count, bool channels_last, int64_t batch) {
  const ConvGeometry g = geometry(s, batch, pad_value);
  const int64_t taps = g.taps(), cin_g = g.in_per_group(), words = (cin_g + 63) / 64;
  std::vector<uint8_t> bits(g.batch * g.in_channels * g.in_h * g.in_w);
  for (auto& b : bits) b = rng() & 1;
  std::vector<uint8_t> wbits(g.out_channels * cin_g * taps);  // (C_out, C_in/groups, taps)
  for (auto& b : wbits) b = rng() & 1;
  std::vector<uint64_t> packed(g.out_channels * taps * words, 0);  // (C_out, taps, words)
  for (int64_t co = 0; co < g.out_channels; ++co)
    for (int64_t ci = 0; ci < cin_g; ++ci)
      for (int64_t t = 0; t < taps; ++t)
        if (wbits[(co * cin_g + ci) * taps + t])
          packed[(co * taps + t) * words + ci / 64] |= uint64_t{1} << (ci % 64);
  const std::vector<int32_t> want = reference(bits, g, [&](int64_t co, int64_t ci, int64_t t) {
    return wbits[(co * cin_g + ci) * taps + t] ? 1 : -1;
  });
  const Layout in = layout(bits, g, channels_last);
  const core::ParallelFor par = threads(thread_count);
  const core::PixelGrid px = core::pack_grid(in.view, g, &neon::pack_bytes, par);
  Collector got(g);
  neon::binary_conv(px, packed.data(), g, par, got.store());
  check(got.complete() && got.out == want,
        "binary_conv2d neon " + describe(s, pad_value) + " threads=" + std::to_string(thread_count) +
            (channels_last ? " nhwc" : " nchw"));
}

// The NEON byte packer against the portable one, every count and byte value pattern.
void check_pack_bytes() {
  std::vector<uint8_t> b(64);
  for (int rep = 0; rep < 200; ++rep) {
    for (auto& x : b) x = (rng() % 3 == 0) ? 0 : static_cast<uint8_t>(rng());
    for (int64_t count = 0; count <= 64; ++count)
      check(neon::pack_bytes(b.data(), count) == core::pack_bytes_portable(b.data(), count),
            "pack_bytes count=" + std::to_string(count));
  }
}

}  // namespace

int main() {
  check_pack_bytes();
  // cin, cout, h, w, kh, kw, sh, sw, ph, pw, dh, dw, groups
  const std::vector<Shape> lut_shapes = {
      {64, 64, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1},     // ResNet-like block
      {16, 32, 9, 7, 3, 3, 2, 2, 1, 1, 1, 1, 1},     // stride 2, odd sizes
      {13, 17, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1},     // odd channel counts
      {3, 7, 7, 9, 3, 3, 1, 2, 2, 0, 1, 1, 1},       // asymmetric padding and stride
      {8, 70, 7, 7, 3, 3, 1, 1, 2, 2, 2, 2, 1},      // dilation 2, C_out over 64
      {130, 20, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1},    // more than 64 input channels (3 words)
      {24, 36, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, 4},     // groups
      {12, 12, 5, 5, 3, 3, 2, 1, 1, 1, 1, 2, 3},     // groups, mixed stride / dilation
      {20, 5, 6, 6, 1, 1, 1, 1, 0, 0, 1, 1, 1},      // 1x1
      {10, 9, 6, 8, 1, 3, 1, 1, 0, 1, 1, 1, 1},      // 1x3
      {10, 9, 8, 6, 3, 1, 1, 1, 1, 0, 1, 1, 1},      // 3x1
      {17, 18, 7, 8, 2, 5, 1, 1, 1, 2, 1, 1, 1},     // 10 taps, the largest LUT
      {9, 40, 8, 6, 5, 2, 3, 1, 2, 1, 1, 1, 1},      // 10 taps, stride 3
      {1, 1, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1},       // one channel
      {33, 66, 4, 4, 2, 2, 1, 1, 0, 0, 1, 1, 3},     // even kernel, groups of 11 channels
      {3300, 5, 2, 6, 2, 5, 1, 1, 0, 1, 1, 1, 1},    // uint16 sums flushed to int32 mid-way
  };
  const std::vector<int64_t> sizes = {1, 2, 7, 16, 17, 31, 32, 33, 45, 48, 49, 63, 64};
  for (const Shape& s : lut_shapes)
    for (int pad_value : {0, 1, -1})
      for (bool ternary : {false, true})
        for (int64_t n_cw : sizes) check_lut(s, pad_value, n_cw, ternary, 1, (n_cw & 1) != 0, 1);
  for (int64_t n_cw = 1; n_cw <= 64; ++n_cw)  // every codebook size on one geometry
    check_lut(lut_shapes[1], 0, n_cw, n_cw % 2 == 0, 1, false, 1);
  for (const Shape& s : {lut_shapes[0], lut_shapes[4], lut_shapes[6]})  // threads, batch 3
    for (int pad_value : {0, 1})
      check_lut(s, pad_value, 32, true, 3, pad_value == 0, 3);

  std::vector<Shape> dense_shapes = lut_shapes;
  dense_shapes.push_back({20, 24, 9, 9, 5, 5, 1, 1, 2, 2, 1, 1, 1});      // 5x5
  dense_shapes.push_back({7, 9, 12, 11, 7, 7, 2, 2, 3, 3, 1, 1, 1});      // 7x7 stride 2 (49 taps)
  dense_shapes.push_back({256, 16, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2});     // 2 words per group
  dense_shapes.push_back({65, 3, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1});       // 2 words, 1 bit in the second
  dense_shapes.push_back({2048, 8, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1});     // 288 steps: byte flushes
  dense_shapes.push_back({5184, 3, 7, 7, 7, 7, 1, 1, 0, 0, 1, 1, 1});     // 3969 steps: uint16 -> uint32
  for (const Shape& s : dense_shapes)
    for (int pad_value : {0, 1, -1})
      for (bool channels_last : {false, true}) check_dense(s, pad_value, 1, channels_last, 1);
  for (const Shape& s : {dense_shapes[0], dense_shapes[6], dense_shapes[17]})
    for (int pad_value : {0, -1}) check_dense(s, pad_value, 3, true, 3);

  std::printf("%s: %d of %d cases exact\n", failures ? "FAIL" : "PASS", cases - failures, cases);
  return failures ? 1 : 0;
}
