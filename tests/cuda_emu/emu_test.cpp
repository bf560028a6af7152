// Runs the real CUDA kernels of sparks::conv2d and sparks::binary_conv2d under the CPU emulator
// (emu_cuda.h) on random geometries and checks every code path against a naive integer
// convolution: codebook tiled + direct kernels, dense bit / pixel packers, MMA + popc GEMMs, the
// threshold binarization and the output transform (scale, bias, residual, PReLU, post_bias). Built and run by .ci/emulate_cuda.sh.
#include "emu_cuda.h"

#include "../../csrc/cuda/cuda_helpers.cuh"
#include "../../csrc/cuda/binary_conv_kernels.cuh"
#include "../../csrc/cuda/codebook_conv_kernels.cuh"

#include <cinttypes>
#include <random>

using sparks::ConvGeometry;
using namespace sparks::cuda;

namespace {

std::mt19937_64 rng(1234);
int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

struct Problem {
  ConvGeometry g;
  bool channels_last;
  std::vector<float> x;          // stored NCHW or NHWC
  std::vector<float> threshold;  // per input channel; empty: binarize at 0
  InputView<float> view() const {
    const int64_t C = g.in_channels, H = g.in_h, W = g.in_w;
    const float* t = threshold.empty() ? nullptr : threshold.data();
    if (channels_last) return {x.data(), H * W * C, 1, W * C, C, t};
    return {x.data(), C * H * W, H * W, W, 1, t};
  }
  float at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    const InputView<float> v = view();
    return x[n * v.s_n + c * v.s_c + h * v.s_h + w * v.s_w];
  }
  float threshold_of(int64_t c) const { return threshold.empty() ? 0.0f : threshold[c]; }
  int64_t outputs() const { return g.batch * g.out_channels * g.out_h * g.out_w; }
};

// out[n, co, oh, ow] = sum over the group's channels and taps of sign-or-pad * weight(co, ci, t).
template <typename WeightFn>
std::vector<int32_t> reference(const Problem& p, WeightFn weight) {
  const ConvGeometry& g = p.g;
  const int64_t cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;
  std::vector<int32_t> out(p.outputs());
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (int64_t oh = 0; oh < g.out_h; ++oh)
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          int32_t acc = 0;
          for (int64_t ci = 0; ci < cin_g; ++ci)
            for (int64_t i = 0; i < g.kernel_h; ++i)
              for (int64_t j = 0; j < g.kernel_w; ++j) {
                const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
                const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
                const bool inside = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
                const int64_t c = (co / cout_g) * cin_g + ci;
                const int xb = inside ? (p.at(n, c, ih, iw) >= p.threshold_of(c) ? 1 : -1) : g.pad_value;
                acc += xb * weight(co, ci, i * g.kernel_w + j);
              }
          out[((n * g.out_channels + co) * g.out_h + oh) * g.out_w + ow] = acc;
        }
  return out;
}

// The operands of a full output transform (scale, bias, residual laid out like the NCHW output,
// PReLU slopes of both signs, post_bias).
struct TransformOperands {
  std::vector<float> scale, bias, residual, prelu, post;
  explicit TransformOperands(const Problem& p) {
    const ConvGeometry& g = p.g;
    for (int64_t c = 0; c < g.out_channels; ++c) {
      scale.push_back(0.5f + 0.37f * static_cast<float>(c % 7));
      bias.push_back(-1.25f + 0.1f * static_cast<float>(c % 5));
      prelu.push_back(-0.3f + 0.17f * static_cast<float>(c % 6));
      post.push_back(0.75f - 0.2f * static_cast<float>(c % 4));
    }
    std::normal_distribution<float> normal;
    for (int64_t i = 0; i < p.outputs(); ++i) residual.push_back(4.0f * normal(rng));
  }
  // The CPU transform (csrc/cpu/output_transform.h) of output i, written out step by step.
  float apply(int32_t acc, int64_t i, int64_t co) const {
    float v = static_cast<float>(acc);
    v = v * scale[co];
    v = v + bias[co];
    v = v + residual[i];
    v = v >= 0.0f ? v : prelu[co] * v;
    return v + post[co];
  }
};

// NCHW float output; with `ops`, the full transform, else the plain sums.
OutputTransform<float> transform(const Problem& p, std::vector<float>& out, const TransformOperands* ops) {
  out.assign(p.outputs(), -12345.0f);
  const ConvGeometry& g = p.g;
  OutputTransform<float> t{out.data(), g.out_channels * g.out_h * g.out_w, g.out_h * g.out_w, g.out_w, 1,
                           nullptr, nullptr, nullptr, nullptr, nullptr};
  if (ops) {
    t.scale = ops->scale.data();
    t.bias = ops->bias.data();
    t.residual = ops->residual.data();
    t.prelu = ops->prelu.data();
    t.post = ops->post.data();
  }
  return t;
}

int failures = 0;
void expect_equal(const std::vector<float>& got, const std::vector<int32_t>& want, const char* what,
                  int case_id) {
  for (size_t i = 0; i < want.size(); ++i)
    if (got[i] != static_cast<float>(want[i])) {
      std::printf("FAIL case %d %s: output %zu is %g, want %d\n", case_id, what, i, got[i], want[i]);
      ++failures;
      return;
    }
}

void expect_transformed(const std::vector<float>& got, const std::vector<int32_t>& want,
                        const Problem& p, const TransformOperands& ops, const char* what, int case_id) {
  const int64_t hw = p.g.out_h * p.g.out_w;
  for (size_t i = 0; i < want.size(); ++i) {
    const int64_t co = (static_cast<int64_t>(i) / hw) % p.g.out_channels;
    const float v = ops.apply(want[i], static_cast<int64_t>(i), co);
    if (got[i] != v) {
      std::printf("FAIL case %d %s: output %zu is %g, want %g\n", case_id, what, i, got[i], v);
      ++failures;
      return;
    }
  }
}

Problem random_problem() {
  for (;;) {
    Problem p;
    ConvGeometry& g = p.g;
    const int shapes[][2] = {{3, 3}, {1, 1}, {5, 5}, {1, 7}, {6, 6}, {8, 8}, {2, 3}};
    const auto& k = shapes[uniform(0, 6)];
    g.kernel_h = k[0];
    g.kernel_w = k[1];
    g.groups = uniform(0, 3) == 0 ? uniform(2, 3) : 1;
    const int cin_choices[] = {1, 3, 32, 37, 64, 70};
    const int cout_choices[] = {1, 5, 16, 24, 70, 130};
    const int64_t cin_g = cin_choices[uniform(0, 5)], cout_g = cout_choices[uniform(0, 5)];
    g.in_channels = cin_g * g.groups;
    g.out_channels = cout_g * g.groups;
    g.batch = uniform(1, 2);
    g.in_h = uniform(1, 12);
    g.in_w = uniform(1, 12);
    g.stride_h = uniform(1, 2);
    g.stride_w = uniform(1, 3);
    g.dil_h = uniform(1, 2);
    g.dil_w = uniform(1, 2);
    g.pad_h = uniform(0, 3);
    g.pad_w = uniform(0, 3);
    g.pad_value = uniform(-1, 1);
    const int64_t eff_h = g.dil_h * (g.kernel_h - 1) + 1, eff_w = g.dil_w * (g.kernel_w - 1) + 1;
    if (g.in_h + 2 * g.pad_h < eff_h || g.in_w + 2 * g.pad_w < eff_w) continue;
    g.out_h = (g.in_h + 2 * g.pad_h - eff_h) / g.stride_h + 1;
    g.out_w = (g.in_w + 2 * g.pad_w - eff_w) / g.stride_w + 1;
    // Keep each case small enough for the emulator (fibers are slow).
    if (g.batch * g.out_h * g.out_w * g.out_channels * g.in_channels / g.groups > 3000000) continue;
    p.channels_last = uniform(0, 1) == 1;
    p.x.resize(g.batch * g.in_channels * g.in_h * g.in_w);
    std::normal_distribution<float> normal;
    for (float& v : p.x) v = uniform(0, 19) == 0 ? 0.0f : normal(rng);
    if (uniform(0, 1) == 1) {  // thresholds, some equal to an input value (the >= edge)
      for (int64_t c = 0; c < g.in_channels; ++c)
        p.threshold.push_back(uniform(0, 3) == 0 ? p.at(0, c, 0, 0) : 0.5f * normal(rng));
    }
    return p;
  }
}

template <typename word_t>
void run_codebook(const Problem& p, int case_id) {
  const ConvGeometry& g = p.g;
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  const int64_t cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;
  const int64_t n_cw = std::vector<int64_t>{1, 4, 16, 64, 300, 600}[uniform(0, 5)];
  const bool ternary = uniform(0, 1) == 1;
  std::vector<double> cb(n_cw * taps);
  for (double& v : cb) v = ternary ? uniform(-1, 1) : (uniform(0, 1) ? 1 : -1);
  std::vector<int64_t> idx64(g.out_channels * cin_g);
  for (int64_t& v : idx64) v = uniform(0, static_cast<int>(n_cw) - 1);

  std::vector<word_t> words(2 * n_cw);
  emu::launch(Dim3{grid_for(n_cw, 128)}, 128, 0, [&] {
    pack_codebook_kernel<word_t>(cb.data(), n_cw, taps, words.data(), words.data() + n_cw);
  });
  std::vector<int32_t> idx(idx64.size());
  if (!idx.empty())
    emu::launch(Dim3{grid_for(idx.size(), 256)}, 256, 0, [&] {
      clamp_indices_kernel(idx64.data(), static_cast<int64_t>(idx.size()), n_cw, idx.data());
    });
  const std::vector<int32_t> want = reference(p, [&](int64_t co, int64_t ci, int t) {
    return static_cast<int>(cb[idx64[co * cin_g + ci] * taps + t]);
  });
  const word_t* sign = words.data();
  const word_t* mask = words.data() + n_cw;
  std::vector<float> out;

  const TransformOperands ops(p);
  const int64_t chunk = tiled_chunk<word_t>(n_cw, cin_g);
  for (const bool with_transform : {false, true}) {
    const TransformOperands* t_ops = with_transform ? &ops : nullptr;
    if (tiled_smem_bytes<word_t>(n_cw, chunk) <= kSmemBudget) {
      const int64_t pos_tiles = (g.out_h * g.out_w + kPos - 1) / kPos;
      const int64_t co_tiles = (cout_g + kCoTile - 1) / kCoTile;
      const OutputTransform<float> e = transform(p, out, t_ops);
      const bool channels_fastest = p.channels_last;
      emu::launch(Dim3{static_cast<unsigned int>(pos_tiles * co_tiles * g.groups * g.batch)}, kThreads,
                  tiled_smem_bytes<word_t>(n_cw, chunk), [&] {
                    codebook_conv_tiled_kernel<float, word_t>(p.view(), g, sign, mask, idx.data(),
                                                              static_cast<int>(n_cw), static_cast<int>(chunk),
                                                              pos_tiles, co_tiles, channels_fastest, e);
                  });
      if (with_transform)
        expect_transformed(out, want, p, ops, "codebook tiled transform", case_id);
      else
        expect_equal(out, want, "codebook tiled", case_id);
    }
    const OutputTransform<float> e = transform(p, out, t_ops);
    emu::launch(Dim3{grid_for(p.outputs(), kThreads)}, kThreads, 0, [&] {
      codebook_conv_direct_kernel<float, word_t>(p.view(), g, sign, mask, idx.data(), e);
    });
    if (with_transform)
      expect_transformed(out, want, p, ops, "codebook direct transform", case_id);
    else
      expect_equal(out, want, "codebook direct", case_id);
  }
  std::printf("case %d codebook: %" PRId64 "x%" PRId64 " taps, n=%" PRId64 ", chunk %" PRId64 ", cin_g %" PRId64 ", cout_g %" PRId64 "\n",
              case_id, g.kernel_h, g.kernel_w, n_cw, chunk, cin_g, cout_g);
}

void run_dense(const Problem& p, int case_id) {
  const ConvGeometry& g = p.g;
  const int taps = static_cast<int>(g.kernel_h * g.kernel_w);
  const int64_t cin_g = g.in_channels / g.groups, cout_g = g.out_channels / g.groups;
  std::vector<double> w(g.out_channels * cin_g * taps);
  for (double& v : w) v = uniform(0, 1) ? 1.0 : -1.0;
  const std::vector<int32_t> want = reference(p, [&](int64_t co, int64_t ci, int t) {
    return static_cast<int>(w[(co * cin_g + ci) * taps + t]);
  });
  const int64_t rows = g.batch * g.out_h * g.out_w;
  const int64_t kwords = (cin_g * taps + 31) / 32;
  const TransformOperands ops(p);
  for (const bool mma : {false, true}) {
    const int64_t kwp = mma ? (kwords + kStepWords - 1) / kStepWords * kStepWords : kwords;
    std::vector<uint32_t> b(g.out_channels * kwp);
    std::vector<int32_t> wcount(g.out_channels * taps);
    emu::launch(Dim3{grid_for(g.out_channels * std::max<int64_t>(kwp, taps), kDenseThreads)},
                kDenseThreads, 0, [&] {
                  pack_weight_kernel<double>(w.data(), g.out_channels, cin_g, taps, kwp, b.data(),
                                             wcount.data());
                });
    std::vector<uint32_t> a(g.groups * rows * kwp, 0xDEADBEEF);
    std::vector<uint32_t> pixels;
    emu::launch(Dim3{grid_for(g.groups * rows, kDenseThreads)}, kDenseThreads, 0, [&] {
      pack_input_bits_kernel<float>(p.view(), g, rows, kwp, a.data());
    });
    if (cin_g % 32 == 0) {
      const int64_t cwords = cin_g / 32;
      pixels.assign(g.batch * g.groups * g.in_h * g.in_w * cwords, 0);
      const bool contiguous_channels = p.channels_last;
      emu::launch(Dim3{grid_for((contiguous_channels ? 32 : 1) * static_cast<int64_t>(pixels.size()),
                                kDenseThreads)},
                  kDenseThreads, 0, [&] {
                    pack_pixels_kernel<float>(p.view(), g, cwords, contiguous_channels, pixels.data());
                  });
      std::vector<uint32_t> a2(a.size(), 0xDEADBEEF);
      emu::launch(Dim3{grid_for(g.groups * rows * taps, kDenseThreads)}, kDenseThreads, 0, [&] {
        gather_patches_kernel(pixels.data(), g, rows, cwords, kwp, a2.data());
      });
      if (a2 != a) {
        std::printf("FAIL case %d: pixel packer differs from bit packer\n", case_id);
        ++failures;
      }
    }
    for (const int variant : {0, 1, 2, 3}) {  // (transform?, implicit A?)
      const bool with_transform = variant % 2 == 1, implicit = variant >= 2;
      if (implicit && !(mma && cin_g % 32 == 0 && kwp <= kMaxImplicitWords)) continue;
      std::vector<float> out;
      const OutputTransform<float> e = transform(p, out, with_transform ? &ops : nullptr);
      if (mma) {
        const int64_t co_tiles = (cout_g + kTileN - 1) / kTileN;
        const Dim3 grid{static_cast<unsigned int>((rows + kTileM - 1) / kTileM),
                        static_cast<unsigned int>(g.groups * co_tiles)};
        if (implicit)
          emu::launch(grid, kMmaThreads, implicit_smem_bytes(kwp), [&] {
            binary_gemm_mma_kernel<float, true>(nullptr, pixels.data(), cin_g / 32, b.data(),
                                                wcount.data(), g, rows, kwp, co_tiles, e);
          });
        else
          emu::launch(grid, kMmaThreads, 0, [&] {
            binary_gemm_mma_kernel<float, false>(a.data(), nullptr, 0, b.data(), wcount.data(), g,
                                                 rows, kwp, co_tiles, e);
          });
      } else {
        emu::launch(Dim3{grid_for(g.groups * rows * cout_g, kDenseThreads)}, kDenseThreads, 0, [&] {
          binary_gemm_popc_kernel<float>(a.data(), b.data(), wcount.data(), g, rows, kwp, e);
        });
      }
      const char* what = implicit ? "dense mma implicit" : mma ? "dense mma" : "dense popc";
      if (with_transform)
        expect_transformed(out, want, p, ops, what, case_id);
      else
        expect_equal(out, want, what, case_id);
    }
  }
  std::printf("case %d dense: %" PRId64 "x%" PRId64 ", cin_g %" PRId64 ", cout_g %" PRId64 ", groups %" PRId64 ", kwords %" PRId64 ", pad %d, %s%s\n",
              case_id, g.kernel_h, g.kernel_w, cin_g, cout_g, g.groups, kwords, g.pad_value,
              p.channels_last ? "channels_last" : "nchw", p.threshold.empty() ? "" : ", threshold");
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 40;
  for (int c = 0; c < cases; ++c) {
    const Problem p = random_problem();
    if (p.g.kernel_h * p.g.kernel_w > 32)
      run_codebook<uint64_t>(p, c);
    else
      run_codebook<uint32_t>(p, c);
    run_dense(p, c);
    std::fflush(stdout);
  }
  std::printf("%s: %d cases, %d failures\n", failures ? "FAILED" : "OK", cases, failures);
  return failures ? 1 : 0;
}
