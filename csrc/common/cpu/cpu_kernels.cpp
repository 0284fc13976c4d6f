// CPU detection and the choice of kernel set (common/cpu_kernels.h).
#include "common/cpu_kernels.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace dualres::cpu {
namespace {

// __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers (XCR0).
bool supported(Isa isa) {
#if DUALRES_CPU_X86
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    case Isa::kAvx512:
      return supported(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512cd");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa best_supported() {
  if (supported(Isa::kAvx512)) return Isa::kAvx512;
  if (supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

// Parses a set name; `source` names where it came from in the error message.
Isa parse(const std::string& name, const char* source) {
  if (name == "auto" || name.empty()) return best_supported();
  Isa isa;
  if (name == "scalar")
    isa = Isa::kScalar;
  else if (name == "avx2")
    isa = Isa::kAvx2;
  else if (name == "avx512")
    isa = Isa::kAvx512;
  else
    TORCH_CHECK_VALUE(false, source, ": unknown CPU kernel set '", name, "', expected scalar, avx2, avx512 or auto");
  TORCH_CHECK_VALUE(supported(isa), source, ": this CPU cannot run the ", name, " kernels (it supports ",
                    supported_kernels(), ")");
  return isa;
}

constexpr int kUnset = -1;
std::atomic<int> selected{kUnset};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

std::string supported_kernels() {
  std::string out = "scalar";
  if (supported(Isa::kAvx2)) out += ",avx2";
  if (supported(Isa::kAvx512)) out += ",avx512";
  return out;
}

Isa kernels() {
  const int v = selected.load(std::memory_order_relaxed);
  if (v != kUnset) return static_cast<Isa>(v);
  // Concurrent first calls all compute the same value; an invalid setting is not stored, so
  // every call raises until it is fixed.
  const char* env = std::getenv("DUALRES_CPU_KERNELS");
  const Isa isa = parse(env ? env : "", "DUALRES_CPU_KERNELS");
  int expected = kUnset;
  selected.compare_exchange_strong(expected, static_cast<int>(isa));
  return static_cast<Isa>(selected.load());
}

std::string set_kernels(const std::string& name) {
  const Isa isa = parse(name, "set_cpu_kernels");
  const int before = selected.exchange(static_cast<int>(isa));
  if (before != kUnset) return isa_name(static_cast<Isa>(before));
  // Not chosen yet: what kernels() would have used (an invalid environment value reads "auto").
  const char* env = std::getenv("DUALRES_CPU_KERNELS");
  try {
    return isa_name(parse(env ? env : "", "DUALRES_CPU_KERNELS"));
  } catch (const c10::Error&) {
    return "auto";
  }
}

}  // namespace dualres::cpu
