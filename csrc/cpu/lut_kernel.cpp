#include "lut_kernel.h"

#include <ATen/ATen.h>

#include <vector>

#include "core_adapters.h"
#include "index_table.h"

namespace sparks {
namespace cpu {

void codebook_conv_lut(const at::Tensor& input, const at::Tensor& threshold, const PackedCodebook& cb,
                       const at::Tensor& indices, const ConvGeometry& g, const OutputTransform& writer,
                       Isa isa, const core::LutOps& ops) {
  const core::PixelGrid px = pack_pixels(input, threshold, g, isa);
  const std::vector<uint8_t> lut = core::build_lut(cb.sign.data(), cb.mask.data(), cb.size(), g.taps());
  // (C_in/groups, C_out) bytes: one contiguous row of output channels per input channel. A
  // uint8 indices tensor stored transposed (indices.t() contiguous) is used as it is.
  const at::Tensor idx_t = index_table(indices);
  core::lut_conv(px, lut, idx_t.data_ptr<uint8_t>(), g.out_channels, g, cb.size(), ops,
                 at::get_num_threads(), aten_parallel(), tile_store(writer));
}

}  // namespace cpu
}  // namespace sparks
