// Run-time choice of the instruction set the CPU kernels use.
//
// The library is compiled for the baseline of its target (plain x86-64: SSE2) unless the build
// asks for -march=native, so that one binary runs on every x86-64 CPU. The hot loops are compiled
// a second and third time for AVX2 and AVX-512, with GCC's target attribute, and every op picks
// one version per call from kernels(): the best set this CPU (and OS) supports, or the one named
// by the environment variable DUALRES_CPU_KERNELS (scalar, avx2, avx512, auto), or the one set
// with the op set_cpu_kernels. All versions give bit-identical results: they run the same
// IEEE operations in the same order (the build passes -ffp-contract=off, so that no version
// fuses a multiply and an add that another does not), and the explicit vector code only uses
// correctly rounded instructions (add, mul, div, sqrt, round to nearest even, compares).
//
// Two ways to compile a loop for a set:
//  * explicit intrinsics: a function carrying the set's attribute (DUALRES_TARGET_AVX512) and
//    everything it inlines carrying it too -- an intrinsic cannot be inlined into a function
//    compiled for less;
//  * plain C++ that the compiler vectorises: the loop goes into a lambda marked
//    DUALRES_CPU_INLINE and is run with run(isa, lambda), which inlines it into a function
//    compiled for that set. Lambdas do not inherit the target of the function they are written
//    in, hence the explicit run().
#pragma once

#include <string>

#if defined(__x86_64__) || defined(__i386__)
#define DUALRES_CPU_X86 1
#include <immintrin.h>
// AVX2 kernels: the x86-64-v3 features that __builtin_cpu_supports can check.
#define DUALRES_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
// AVX-512 kernels: the x86-64-v4 set (F, BW, DQ, VL, CD) on top of the AVX2 one.
#define DUALRES_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx2,fma,bmi,bmi2,popcnt")))
#else
#define DUALRES_CPU_X86 0
#define DUALRES_TARGET_AVX2
#define DUALRES_TARGET_AVX512
#endif

#define DUALRES_CPU_INLINE __attribute__((always_inline))

namespace dualres::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Tags for templates that differ per set (dispatch() hands one to its callback).
struct Scalar {
  static constexpr Isa isa = Isa::kScalar;
};
struct Avx2 {
  static constexpr Isa isa = Isa::kAvx2;
};
struct Avx512 {
  static constexpr Isa isa = Isa::kAvx512;
};

// The set in use. The first call reads DUALRES_CPU_KERNELS; an unknown value, or a set this CPU
// cannot run, raises a ValueError (at that call and every later one, until set_kernels).
Isa kernels();
// Uses `name` (scalar, avx2, avx512, or auto: the best supported) from now on, for every thread;
// returns the name of the set used before. Raises a ValueError like kernels() does.
std::string set_kernels(const std::string& name);
const char* isa_name(Isa isa);
// The sets this CPU supports, best last: "scalar,avx2,avx512".
std::string supported_kernels();

// Runs f (a DUALRES_CPU_INLINE lambda) inlined into a function compiled for the tag's set.
template <class F>
void run(Scalar, const F& f) {
  f();
}
template <class F>
DUALRES_TARGET_AVX2 void run(Avx2, const F& f) {
  f();
}
template <class F>
DUALRES_TARGET_AVX512 void run(Avx512, const F& f) {
  f();
}

// Calls f(tag) with the tag of kernels().
template <class F>
decltype(auto) dispatch(F&& f) {
#if DUALRES_CPU_X86
  switch (kernels()) {
    case Isa::kAvx512:
      return f(Avx512{});
    case Isa::kAvx2:
      return f(Avx2{});
    default:
      break;
  }
#endif
  return f(Scalar{});
}

}  // namespace dualres::cpu
