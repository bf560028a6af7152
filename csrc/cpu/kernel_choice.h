// Which CPU kernel runs each op: every rule of the choice, in one place. The op entries
// (conv2d.cpp, binary_conv2d.cpp) switch on the result.
//
// The family (cpu_features.h: SPARKS_CPU_KERNEL or the best this CPU runs) says which
// instructions a call may use; the layer's shape then picks the kernel. Every kernel gives the
// same integers, so a choice only changes speed. Below the kernel level two implementation
// details also look at the family, with no effect on results: the input packer
// (pixel_grid.cpp: AVX-512 compares straight from float32 / bfloat16 input) and the output
// writer (output_transform.cpp: AVX-512 rows for float32 / bfloat16 channels_last outputs).
#pragma once

#include <cstdint>

#include "../conv_geometry.h"
#include "cpu_features.h"

namespace sparks {
namespace cpu {

enum class CodebookKernel {
  kPortable,   // per output row: XOR + popcount responses, gathered by index (conv2d.cpp)
  kLutAvx2,    // the LUT kernel (lut_kernel.h) with the vpshufb inner loops (lut_avx2.cpp)
  kLutAvx512,  // the LUT kernel with the vpermb inner loops (lut_avx512.cpp)
  kLutNeon,    // the LUT kernel with the TBL inner loops (lut_neon.cpp)
  kTileAmx,    // decoded int8 weights on the AMX tile unit (tile_amx.h)
};

enum class BinaryKernel {
  kPortable,        // scalar XOR + popcount per (position, output channel) (binary_conv2d.cpp)
  kPopcntAvx2,      // the same loop compiled with the popcnt instruction
  kVpopcntAvx512,   // 4 positions x 32 output channels of vpopcntq accumulators
  kNeon,            // EOR + CNT + UADALP (binary_neon.cpp)
};

const char* kernel_name(CodebookKernel kernel);
const char* kernel_name(BinaryKernel kernel);

// conv2d with an n-codeword codebook on layer `g`, family `isa`; `forced`: the family was named by
// SPARKS_CPU_KERNEL (cpu_features.h's isa_forced).
CodebookKernel choose_codebook_kernel(const ConvGeometry& g, int64_t n, Isa isa, bool forced);

// binary_conv2d: every layer runs its family's kernel.
BinaryKernel choose_binary_kernel(Isa isa);

}  // namespace cpu
}  // namespace sparks
