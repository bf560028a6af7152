#include "cpu_features.h"

#include <ATen/core/List.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

namespace sparks {
namespace cpu {
namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (isa) {
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
  }
  return false;
#else
  return isa == Isa::kPortable;
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kPortable: return "portable";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

std::vector<Isa> available_isas() {
  static const std::vector<Isa> isas = [] {
    std::vector<Isa> v;
    for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512})
      if (cpu_has(isa)) v.push_back(isa);
    return v;
  }();
  return isas;
}

Isa selected_isa() {
  const std::vector<Isa>& isas = available_isas();
  const char* env = std::getenv("SPARKS_CPU_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return isas.back();
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
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
  TORCH_CHECK(false, "SPARKS_CPU_KERNEL must be auto, avx512, avx2 or portable, got '", env, "'");
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
