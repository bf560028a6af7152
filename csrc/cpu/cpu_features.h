// Which CPU kernel family runs: detected once from CPUID, chosen per call.
//
// avx512 = AVX-512 F/BW/VL/VBMI/VPOPCNTDQ + GFNI (Ice Lake, Sapphire Rapids, Zen 4 and later);
// avx2 = AVX2 + BMI2 + POPCNT (Haswell, Zen and later); portable = plain C++.
// Every family computes the same exact integers; they differ only in the instructions used.
// SPARKS_CPU_KERNEL (read at every call, so tests can switch in-process) forces one:
//   auto (default) | avx512 | avx2 | portable
// Forcing a family this CPU cannot run raises a RuntimeError.
#pragma once

#include <string>
#include <vector>

namespace sparks {
namespace cpu {

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);

// The families this machine can run, portable first.
std::vector<Isa> available_isas();

// The family for this call: SPARKS_CPU_KERNEL if set, else the best available.
Isa selected_isa();

}  // namespace cpu
}  // namespace sparks
