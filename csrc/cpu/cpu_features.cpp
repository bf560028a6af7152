#include "cpu_features.h"

#include <ATen/core/List.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace sparks {
namespace cpu {
namespace {

// AMX needs the CPU bits (CPUID.7.0:EDX 24 tile, 25 int8), the OS saving tile state (XCR0 bits
// 17-18) and, on Linux, the process's permission to use it (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_usable() {
#if SPARKS_AMX_COMPILED
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (isa) {
    case Isa::kNeon:
      return false;
    case Isa::kPortable:
      return true;
    case Isa::kAvx2:
      // __builtin_cpu_supports also checks that the OS saves the wide register state.
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") &&
             __builtin_cpu_supports("bmi2");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
             __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("gfni") &&
             cpu_has(Isa::kAvx2);
    case Isa::kAmx:
      return cpu_has(Isa::kAvx512) && amx_usable();
  }
  return false;
#elif defined(__aarch64__)
  // Advanced SIMD is mandatory in AArch64.
  return isa == Isa::kPortable || isa == Isa::kNeon;
#else
  return isa == Isa::kPortable;
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kNeon: return "neon";
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAmx: return "amx";
  }
  return "?";
}

std::vector<Isa> available_isas() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> v;
    for (Isa isa : {Isa::kPortable, Isa::kNeon, Isa::kAvx2, Isa::kAvx512, Isa::kAmx})
      if (cpu_has(isa)) v.push_back(isa);
    return v;
  }();
  return isas;
}

Isa selected_isa() {
  const std::vector<Isa>& isas = available_isas();
  const char* env = std::getenv("SPARKS_CPU_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return isas.back();
  for (Isa isa : {Isa::kPortable, Isa::kNeon, Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (std::strcmp(env, isa_name(isa)) != 0) continue;
    for (Isa ok : isas)
      if (ok == isa) return isa;
    TORCH_CHECK(false, "SPARKS_CPU_KERNEL=", env, " but this CPU cannot run the ", env,
                " kernels (it lacks the instructions); available: ", [&] {
                  std::string s;
                  for (Isa a : isas) s += std::string(s.empty() ? "" : ", ") + isa_name(a);
                  return s;
                }());
  }
  TORCH_CHECK(false, "SPARKS_CPU_KERNEL must be auto, amx, avx512, avx2, neon or portable, got '", env, "'");
}

bool isa_forced() {
  const char* env = std::getenv("SPARKS_CPU_KERNEL");
  return env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0;
}

namespace {

std::vector<std::string> cpu_kernels() {
  std::vector<std::string> names;
  for (Isa isa : available_isas()) names.emplace_back(isa_name(isa));
  return names;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparks, CatchAll, m) { m.impl("cpu_kernels", &cpu_kernels); }

}  // namespace cpu
}  // namespace sparks
