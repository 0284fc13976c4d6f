// rans_interleaved_simd.h -- the CPU coders of the interleaved stream (csrc/rans/rans_interleaved.h)
// per instruction set, chosen once at run time (iv_best_isa) and forcible for tests.
#pragma once

#include <cstdint>
#include <vector>

#include "rans/rans_interleaved.h"

namespace dualres::rans {

enum class IvIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this CPU runs (CPUID), lowered by the environment variable DUALRES_RANS_ISA
// (scalar, avx2 or avx512) when set; read once.
IvIsa iv_best_isa();
bool iv_isa_supported(IvIsa isa);
const char* iv_isa_name(IvIsa isa);
// [the isa number -1 resolves to, the best this CPU supports] (op rans_iv_isa; csrc/register.cpp).
std::vector<int64_t> rans_iv_isa();

// lo, hi = the minimum and maximum of idx[0..n) (n > 0), with the widest ISA this CPU runs: the
// index check of every call reads all indexes, and the baseline build has no 32-bit vector min/max.
void iv_index_range(const int32_t* idx, int64_t n, int32_t& lo, int32_t& hi);

// Encodes steps [s0, s1) backwards from states x (updated), appending words in encoder order
// (the caller reverses a group's words). Indexes must be validated.
void iv_encode_steps(IvIsa isa, const int32_t* sym, const int32_t* idx, int64_t n, int width, int64_t s0, int64_t s1,
                     const IvTablesView& tb, uint32_t* x, std::vector<uint16_t>& out);

// Decodes steps [s0, s1) from states x and the reader (bounds-checked); the caller checks the end.
Status iv_decode_steps(IvIsa isa, const int32_t* idx, int64_t n, int width, int64_t s0, int64_t s1,
                       const IvTablesView& tb, uint32_t* x, IvWordReader& r, int32_t* out);

}  // namespace dualres::rans
