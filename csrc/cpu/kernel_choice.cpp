#include "kernel_choice.h"

#include "kernel_core.h"
#include "pixel_grid.h"

namespace sparks {
namespace cpu {
namespace {

// The tile kernel decodes through a 64-entry table per tap, so n <= 64 codewords; any kernel
// size, stride, dilation and groups; at least one input channel per group; padding small
// enough to materialise in its int8 image (4 channels per byte group, rounded up).
bool tile_kernel_applies(const ConvGeometry& g, int64_t n) {
  return n <= 64 && g.in_per_group() > 0 && padded_image_bounded(g, (g.in_per_group() + 3) / 4 * 4);
}

// Whether the tile kernel is the faster choice: its 16 x 64 x 16 tiles need enough channels;
// thin layers (depthwise, C_in/groups < 16, a 16 x 16 layer) run the LUT kernel faster
// (benchmarks/RESULTS.md).
bool tile_kernel_pays(const ConvGeometry& g) {
  return g.in_per_group() >= 16 && g.in_per_group() * g.out_per_group() >= 1024;
}

// The LUT kernel: kh * kw <= 10 taps, n <= 64 codewords, at least one input channel per group
// (its tiling divides by C_in/groups; with none the result is the empty sum), uint32 offsets
// that fit (core::lut_applies), and padding small enough to materialise in the pixel grid
// (8 bytes per 64 channels of a pixel).
bool lut_kernel_applies(const ConvGeometry& g, int64_t n) {
  return core::lut_applies(g, n) && padded_image_bounded(g, (g.in_per_group() + 63) / 64 * 8);
}

}  // namespace

const char* kernel_name(CodebookKernel kernel) {
  switch (kernel) {
    case CodebookKernel::kPortable: return "portable";
    case CodebookKernel::kLutAvx2: return "lut_avx2";
    case CodebookKernel::kLutAvx512: return "lut_avx512";
    case CodebookKernel::kLutNeon: return "lut_neon";
    case CodebookKernel::kTileAmx: return "tile_amx";
  }
  return "?";
}

const char* kernel_name(BinaryKernel kernel) {
  switch (kernel) {
    case BinaryKernel::kPortable: return "portable";
    case BinaryKernel::kPopcntAvx2: return "popcnt_avx2";
    case BinaryKernel::kVpopcntAvx512: return "vpopcnt_avx512";
    case BinaryKernel::kNeon: return "neon";
  }
  return "?";
}

CodebookKernel choose_codebook_kernel(const ConvGeometry& g, int64_t n, Isa isa, bool forced) {
  // 1. Family amx: the tile kernel where it applies and pays. A forced amx runs it wherever it
  //    applies, so that the tests cover it on every shape; otherwise amx continues as avx512.
  if (isa == Isa::kAmx && tile_kernel_applies(g, n) && (forced || tile_kernel_pays(g)))
    return CodebookKernel::kTileAmx;
  // 2. Every family but portable: its LUT kernel where that applies.
  if (lut_kernel_applies(g, n)) {
    switch (isa) {
      case Isa::kAmx:
      case Isa::kAvx512: return CodebookKernel::kLutAvx512;
      case Isa::kAvx2: return CodebookKernel::kLutAvx2;
      case Isa::kNeon: return CodebookKernel::kLutNeon;
      case Isa::kPortable: break;
    }
  }
  // 3. Everything else (family portable, n > 64, kh * kw > 10, C_in/groups = 0, padding too
  //    large to materialise): the portable kernel, which reads padding on the fly.
  return CodebookKernel::kPortable;
}

BinaryKernel choose_binary_kernel(Isa isa) {
  switch (isa) {
    case Isa::kAmx:  // no tile kernel for the dense op: it is the XNOR-popcount baseline
    case Isa::kAvx512: return BinaryKernel::kVpopcntAvx512;
    case Isa::kAvx2: return BinaryKernel::kPopcntAvx2;
    case Isa::kNeon: return BinaryKernel::kNeon;
    case Isa::kPortable: break;
  }
  return BinaryKernel::kPortable;
}

}  // namespace cpu
}  // namespace sparks
