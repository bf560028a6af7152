#include "neon_aten.h"

#if SPARKS_NEON_COMPILED
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "index_table.h"
#include "input_bytes.h"
#include "pixel_grid.h"

namespace sparks {
namespace cpu {
namespace {

core::ParallelFor aten_parallel() {
  return [](int64_t items, const std::function<void(int64_t, int64_t)>& body) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) { body(begin, end); });
  };
}

core::TileStore tile_store(const OutputTransform& writer) {
  return [&writer](const int32_t* tile, int64_t ld, int64_t n, int64_t p0, int64_t rows, int64_t co0,
                   int64_t cols) { writer.store(tile, ld, n, p0, rows, co0, cols); };
}

// Binarized by ATen (x >= threshold[c], or >= 0; NaN is -1, like the reference) into
// channels-last bytes, then packed 64 channels per NEON compare.
core::PixelGrid pack_input(const at::Tensor& input, const at::Tensor& threshold, const ConvGeometry& g) {
  check_padded_image_bounded(g);
  const at::Tensor bits = ge_threshold(input, threshold).contiguous(at::MemoryFormat::ChannelsLast);
  const core::InputBits view{reinterpret_cast<const uint8_t*>(bits.data_ptr<bool>()), bits.stride(0),
                             bits.stride(1), bits.stride(2), bits.stride(3)};
  return core::pack_grid(view, g, &neon::pack_bytes, aten_parallel());
}

}  // namespace

void codebook_conv_neon(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb, const at::Tensor& indices,
                        const ConvGeometry& g, const OutputTransform& writer) {
  const core::PixelGrid px = pack_input(input, threshold, g);
  const std::vector<uint8_t> lut = core::build_lut(cb.sign.data(), cb.mask.data(), cb.size(), g.taps());
  // (C_in/groups, C_out) bytes, free for uint8 indices stored transposed.
  const at::Tensor idx_t = index_table(indices);
  core::lut_conv(px, lut, idx_t.data_ptr<uint8_t>(), g.out_channels, g, cb.size(), neon::lut_ops(),
                 at::get_num_threads(), aten_parallel(), tile_store(writer));
}

void binary_conv_neon(const at::Tensor& input, const at::Tensor& threshold, const at::Tensor& packed_weight, const ConvGeometry& g,
                      const OutputTransform& writer) {
  const core::PixelGrid px = pack_input(input, threshold, g);
  neon::binary_conv(px, reinterpret_cast<const uint64_t*>(packed_weight.data_ptr<int64_t>()), g,
                    aten_parallel(), tile_store(writer));
}

}  // namespace cpu
}  // namespace sparks
#endif
