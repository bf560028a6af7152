// Which CPU kernel family runs: detected once from CPUID, chosen per call.
//
// amx = avx512 + AMX-TILE/AMX-INT8 with the OS's permission (Sapphire Rapids and later): the
// codebook conv runs on the int8 tile unit, everything else as avx512;
// avx512 = AVX-512 F/BW/VL/VBMI/VPOPCNTDQ + GFNI (Ice Lake, Sapphire Rapids, Zen 4 and later);
// avx2 = AVX2 + BMI2 + POPCNT (Haswell, Zen and later); portable = plain C++;
// neon = aarch64 Advanced SIMD (every aarch64 CPU: Cortex-A5x/A7x/X, Neoverse, Apple M).
// Every family computes the same exact integers; they differ only in the instructions used.
// SPARKS_CPU_KERNEL (read at every call, so tests can switch in-process) forces one:
//   auto (default) | amx | avx512 | avx2 | neon | portable
// Forcing a family this CPU cannot run raises a RuntimeError.
#pragma once

#include <string>
#include <vector>

// The AMX kernel needs a compiler that knows the AMX intrinsics (GCC 11, Clang 12) and Linux
// (the permission request); elsewhere the amx family is never available.
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define SPARKS_AMX_COMPILED 1
#else
#define SPARKS_AMX_COMPILED 0
#endif

#if defined(__x86_64__)
// The target of the AVX-512 F/BW/VL helpers the families share (input and weight packing, the
// output writer); the kernels' own files name the extensions they need.
#define SPARKS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif

namespace sparks {
namespace cpu {

// The x86 families are ordered: each includes the instructions of those before it, so
// `isa >= Isa::kAvx512` reads "may use AVX-512". neon sits below portable so that no such x86
// test ever holds for it (on aarch64 the x86 code is compiled out anyway).
enum class Isa { kNeon = -1, kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

const char* isa_name(Isa isa);

// The families this machine can run, portable first.
std::vector<Isa> available_isas();

// The family for this call: SPARKS_CPU_KERNEL if set, else the best available.
Isa selected_isa();

// Whether SPARKS_CPU_KERNEL names a family (not auto): then that family's kernels run wherever
// they can, also where auto would pick another as faster (so tests cover every kernel).
bool isa_forced();

}  // namespace cpu
}  // namespace sparks
