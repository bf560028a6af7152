// The NEON (aarch64 Advanced SIMD) kernels, ATen-free: lut_neon.cpp (conv2d's LUT
// kernel with TBL) and binary_neon.cpp (binary_conv2d with EOR + CNT + UADALP). Every
// aarch64 CPU has Advanced SIMD, so these are compiled for aarch64 only and always available
// there. The op entries (lut_kernel.cpp, binary_conv2d.cpp) call them through core_adapters.h;
// tests/cpp/test_neon_core.cpp checks them under qemu.
#pragma once

#include <cstdint>

#include "kernel_core.h"

#if defined(__aarch64__)
#define SPARKS_NEON_COMPILED 1
#else
#define SPARKS_NEON_COMPILED 0
#endif

namespace sparks {
namespace cpu {
namespace neon {

#if SPARKS_NEON_COMPILED
// The inner loops of the LUT kernel (core::lut_conv): max_rows = 4 positions per register tile.
core::LutOps lut_ops();

// core::PackBytes with 16-byte compares and pairwise adds.
uint64_t pack_bytes(const uint8_t* bytes, int64_t count);

// binary_conv2d: `weight` is the (C_out, taps, words) channel-packed dense weight (weight_packing.h's
// pack_weight_channels layout), `px` the packed input.
void binary_conv(const core::PixelGrid& px, const uint64_t* weight, const ConvGeometry& g,
                 const core::ParallelFor& par, const core::TileStore& store);
#endif

}  // namespace neon
}  // namespace cpu
}  // namespace sparks
