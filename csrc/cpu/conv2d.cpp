// CPU backend of sparks::conv2d: the codebook-indexed binary convolution.
//
// Which kernel runs is kernel_choice.h's choose_codebook_kernel: the tile kernel (amx), the
// LUT kernel (avx512, avx2, neon; lut_kernel.h) or the portable kernel below; all give
// identical integers.
//
// Algorithm (portable path): for every output row, bit-pack each input channel's patches
// (one 64-bit word per patch, input_bytes.h), compute the n codeword responses of each
// patch once with XOR + popcount, then let every output channel gather and sum, over its
// C_in/groups input channels, the response named by its index. Integer accumulation; the
// output transform (output_transform.h) is applied once at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../conv_args.h"
#include "tile_amx.h"
#include "codebook_packing.h"
#include "cpu_features.h"
#include "index_table.h"
#include "input_bytes.h"
#include "kernel_choice.h"
#include "lut_kernel.h"
#include "neon_kernels.h"
#include "output_transform.h"

namespace sparks {
namespace cpu {
namespace {

// Output positions whose responses are computed together; the response tile is
// kTile x C_in/groups x n int16, small enough to stay in L1/L2 while every output channel
// gathers from it.
constexpr int64_t kTile = 8;

void codebook_conv_portable(const at::Tensor& bits, const PackedCodebook& cb,
                            const at::Tensor& indices, const ConvGeometry& g,
                            const OutputTransform& writer) {
  const int64_t cin_g = g.in_per_group(), cout_g = g.out_per_group(), n_cw = cb.size();
  const uint8_t* bits_ptr = bits.data_ptr<uint8_t>();
  const int32_t* idx_ptr = indices.data_ptr<int32_t>();
  const int64_t plane = g.in_h * g.in_w;
  const int64_t work = g.batch * g.groups * g.out_h;

  at::parallel_for(0, work, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> patch(cin_g * g.out_w), valid(g.out_w);
    std::vector<int16_t> base(kTile * n_cw), resp(kTile * cin_g * n_cw);
    std::vector<int32_t> sums(kTile * cout_g);  // (position, output channel) of one tile
    for (int64_t item = begin; item < end; ++item) {
      const int64_t oh = item % g.out_h;
      const int64_t grp = (item / g.out_h) % g.groups;
      const int64_t n = item / (g.out_h * g.groups);
      for (int64_t ci = 0; ci < cin_g; ++ci) {
        const uint8_t* p = bits_ptr + (n * g.in_channels + grp * cin_g + ci) * plane;
        patch_row(p, g, oh, patch.data() + ci * g.out_w);
      }
      valid_row(g, oh, valid.data());

      for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += kTile) {
        const int64_t tile = std::min(kTile, g.out_w - ow0);
        // Each codeword's response to each patch of the tile, computed once.
        for (int64_t t = 0; t < tile; ++t) {
          const uint64_t v = valid[ow0 + t];
          for (int64_t k = 0; k < n_cw; ++k)
            base[t * n_cw + k] = static_cast<int16_t>(__builtin_popcountll(cb.mask[k] & v));
          for (int64_t ci = 0; ci < cin_g; ++ci) {
            const uint64_t x = patch[ci * g.out_w + ow0 + t];
            int16_t* r = resp.data() + (t * cin_g + ci) * n_cw;
            for (int64_t k = 0; k < n_cw; ++k)
              r[k] = static_cast<int16_t>(
                  base[t * n_cw + k] -
                  2 * __builtin_popcountll(cb.mask[k] & v & (x ^ cb.sign[k])));
          }
        }
        // Every output channel gathers its C_in/groups responses by index.
        for (int64_t co = 0; co < cout_g; ++co) {
          const int32_t* idx = idx_ptr + (grp * cout_g + co) * cin_g;
          for (int64_t t = 0; t < tile; ++t) {
            const int16_t* r = resp.data() + t * cin_g * n_cw;
            int32_t acc = 0;
            for (int64_t ci = 0; ci < cin_g; ++ci) acc += r[ci * n_cw + idx[ci]];
            sums[t * cout_g + co] = acc;
          }
        }
        writer.store(sums.data(), cout_g, n, oh * g.out_w + ow0, tile, grp * cout_g, cout_g);
      }
    }
  });
}

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& codebook,
                      const at::Tensor& indices, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      double pad_value, const c10::optional<at::Tensor>& threshold,
                      const c10::optional<at::Tensor>& residual,
                      const c10::optional<at::Tensor>& prelu_weight,
                      const c10::optional<at::Tensor>& post_bias) {
  const ConvGeometry g = check_codebook_conv2d_args(input, codebook, indices, scale, bias, stride,
                                                    padding, dilation, groups, pad_value);
  const FusedArgs fused = check_fused_args(input, g, threshold, residual, prelu_weight, post_bias);
  const Isa isa = selected_isa();
  const PackedCodebook cb = pack_codebook(codebook);
  check_index_range(indices, cb.size());
  at::Tensor output = allocate_output(input, g);
  if (output.numel() == 0) return output;

  const OutputTransform writer(output, scale, bias, fused, g, isa);
  const CodebookKernel kernel = choose_codebook_kernel(g, cb.size(), isa, isa_forced());
  switch (kernel) {
    case CodebookKernel::kTileAmx:
      codebook_conv_amx(input, fused.threshold, cb, indices, g, writer);
      break;
#if defined(__x86_64__)
    case CodebookKernel::kLutAvx512:
      codebook_conv_lut(input, fused.threshold, cb, indices, g, writer, isa, lut_ops_avx512());
      break;
    case CodebookKernel::kLutAvx2:
      codebook_conv_lut(input, fused.threshold, cb, indices, g, writer, isa, lut_ops_avx2());
      break;
#endif
#if SPARKS_NEON_COMPILED
    case CodebookKernel::kLutNeon:
      codebook_conv_lut(input, fused.threshold, cb, indices, g, writer, isa, neon::lut_ops());
      break;
#endif
    case CodebookKernel::kPortable:
      codebook_conv_portable(binarize_input(input, fused.threshold), cb, indices.to(at::kInt).contiguous(), g,
                             writer);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "the ", kernel_name(kernel), " kernel is not compiled for this CPU");
  }
  return output;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparks, CPU, m) { m.impl("conv2d", &conv2d_cpu); }

}  // namespace cpu
}  // namespace sparks
