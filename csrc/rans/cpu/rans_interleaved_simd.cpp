// CPU coders of the interleaved stream (csrc/rans/rans_interleaved.h): scalar, AVX2 and AVX-512.
//
// Every ISA writes the scalar coder's bytes. The SIMD paths hold the W lane states in W/16
// (AVX-512) or W/8 (AVX2) registers and code one step (W symbols) per iteration:
//   decode: bucket gather -> (rare) masked binary search -> start/freq gather -> state update ->
//           the lanes needing a word take them from the shared cursor in lane order with an
//           expand (vpexpandd; AVX2: vpermd with a 256-entry rank table)
//   encode: offset/escape gathers -> start/freq gather -> the emitting lanes' low halves stored in
//           descending lane order (the decoder's order reversed) with a compress (vpcompressd;
//           AVX2: vpermd with a table) -> division as double (exact for 32-bit x, see below)
// Steps holding an escape (rare) run their bypass sub-steps in the scalar code, and so do the
// partial last step and the steps near the end of a group's words (the vector loads read 16 or 8
// words ahead). Functions carry their own target attributes and are chosen once at run time
// (no -march needed).

#include "rans/cpu/rans_interleaved_simd.h"

#include <immintrin.h>

#include <cstdlib>
#include <cstring>

namespace dualres::rans {

namespace {

// Bypass sub-steps of one encoder step (scalar, any ISA): chunks in descending sub-step and lane
// order, before the step's table symbols. Returns the new write pointer.
inline uint16_t* enc_bypass_step(uint32_t* x, const int32_t* sym, const int32_t* idx, int width, const IvTablesView& tb,
                                 uint16_t* p) {
  uint8_t chunks[kIvMaxWidth][kIvMaxChunks];
  int nch[kIvMaxWidth];
  int maxch = 0;
  for (int k = 0; k < width; ++k) {
    const int32_t t = idx[k];
    const int64_t max_value = tb.esc[t];
    const int64_t v = int64_t{sym[k]} - tb.off[t];
    nch[k] = (v < 0 || v >= max_value) ? iv_escape_chunks(v, max_value, chunks[k]) : 0;
    maxch = std::max(maxch, nch[k]);
  }
  for (int j = maxch - 1; j >= 0; --j)
    for (int k = width - 1; k >= 0; --k) {
      if (nch[k] <= j) continue;
      if (iv_enc_bypass_needs_word(x[k])) {
        *p++ = static_cast<uint16_t>(x[k]);
        x[k] >>= 16;
      }
      x[k] = iv_enc_bypass_code(x[k], chunks[k][j]);
    }
  return p;
}

// Room for one step's words (table symbols plus every bypass chunk) and a vector store's slack.
inline size_t step_room(int width) {
  return static_cast<size_t>(width) * (kIvMaxChunks + 1) + 32;
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL, DQ): 16 lanes per register
// ---------------------------------------------------------------------------------------------

#define IV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt")))

// floor(x / f) for uint32 x and 1 <= f <= 2^16: the double quotient of exact operands is within
// half an ulp, and x/f is at least 1/f >= 2^-16 from the next integer, far more than an ulp of a
// value below 2^32, so truncation gives the exact floor.
IV_AVX512 static inline __m512i div512(__m512i x, __m512i f) {
  const __m512d xl = _mm512_cvtepu32_pd(_mm512_castsi512_si256(x));
  const __m512d xh = _mm512_cvtepu32_pd(_mm512_extracti64x4_epi64(x, 1));
  const __m512d fl = _mm512_cvtepu32_pd(_mm512_castsi512_si256(f));
  const __m512d fh = _mm512_cvtepu32_pd(_mm512_extracti64x4_epi64(f, 1));
  const __m256i ql = _mm512_cvttpd_epu32(_mm512_div_pd(xl, fl));
  const __m256i qh = _mm512_cvttpd_epu32(_mm512_div_pd(xh, fh));
  return _mm512_inserti64x4(_mm512_castsi256_si512(ql), qh, 1);
}

// Up to 64 per-row int32 values held in four registers, looked up by row index with two
// two-register permutes and a blend (bit 5 of the index picks the pair): in place of a gather
// when a table set has at most 64 rows (CompressAI's Gaussian tables have 64).
constexpr int64_t kIvRegRows = 64;

struct IvRegTable64 {
  __m512i r[4];
};

IV_AVX512 static inline IvRegTable64 reg_table64(const int32_t* values, int64_t rows) {
  alignas(64) int32_t buf[kIvRegRows] = {};
  std::memcpy(buf, values, static_cast<size_t>(rows) * sizeof(int32_t));
  IvRegTable64 t;
  for (int k = 0; k < 4; ++k) t.r[k] = _mm512_load_si512(buf + 16 * k);
  return t;
}

// t[idx] for 0 <= idx < 64 (the callers' indexes were checked against the row count).
IV_AVX512 static inline __m512i reg_lookup64(const IvRegTable64& t, __m512i idx) {
  const __m512i lo = _mm512_permutex2var_epi32(t.r[0], idx, t.r[1]);
  const __m512i hi = _mm512_permutex2var_epi32(t.r[2], idx, t.r[3]);
  return _mm512_mask_mov_epi32(lo, _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), hi);
}

// REG: the offsets and escape bounds come from registers (tb.T <= kIvRegRows) instead of gathers.
template <int NV, bool REG>
IV_AVX512 void encode_avx512(const int32_t* sym, const int32_t* idx, int64_t s0, int64_t s1, const IvTablesView& tb,
                             uint32_t* x, std::vector<uint16_t>& out) {
  constexpr int W = 16 * NV;
  IvRegTable64 off_r{}, esc_r{};
  if constexpr (REG) {
    off_r = reg_table64(tb.off, tb.T);
    esc_r = reg_table64(tb.esc, tb.T);
  }
  const uint32_t P = tb.precision;
  const __m512i vstride = _mm512_set1_epi32(static_cast<int32_t>(tb.stride));
  const __m512i vM = _mm512_set1_epi32(static_cast<int32_t>(1u << P));
  const __m512i lowmask = _mm512_set1_epi32(static_cast<int32_t>((1u << (32 - P)) - 1u));
  const __m128i shP = _mm_cvtsi32_si128(static_cast<int>(32 - P));
  const __m512i ffff = _mm512_set1_epi32(0xFFFF), one = _mm512_set1_epi32(1);
  const __m512i rev = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i X[NV];
  for (int v = 0; v < NV; ++v) X[v] = _mm512_loadu_si512(x + 16 * v);
  size_t len = out.size();
  for (int64_t s = s1 - 1; s >= s0; --s) {
    const int64_t base = s * W;
    if (out.size() < len + step_room(W)) out.resize(std::max(len + step_room(W), 2 * out.size()));
    uint16_t* p = out.data() + len;
    __m512i T[NV], V[NV];
    __mmask16 any = 0;
    for (int v = 0; v < NV; ++v) {
      T[v] = _mm512_loadu_si512(idx + base + 16 * v);
      const __m512i S = _mm512_loadu_si512(sym + base + 16 * v);
      __m512i OFF, ESC;
      if constexpr (REG) {
        OFF = reg_lookup64(off_r, T[v]);
        ESC = reg_lookup64(esc_r, T[v]);
      } else {
        OFF = _mm512_i32gather_epi32(T[v], tb.off, 4);
        ESC = _mm512_i32gather_epi32(T[v], tb.esc, 4);
      }
      const __m512i D = _mm512_sub_epi32(S, OFF);
      // v = sym - off in 64 bits is in [0, esc) iff sym >= off and (sym - off) mod 2^32 < esc.
      const __mmask16 e = _mm512_cmplt_epi32_mask(S, OFF) | _mm512_cmpge_epu32_mask(D, ESC);
      V[v] = _mm512_mask_mov_epi32(D, e, ESC);
      any |= e;
    }
    if (__builtin_expect(any != 0, 0)) {
      alignas(64) uint32_t xa[W];
      for (int v = 0; v < NV; ++v) _mm512_store_si512(xa + 16 * v, X[v]);
      p = enc_bypass_step(xa, sym + base, idx + base, W, tb, p);
      for (int v = 0; v < NV; ++v) X[v] = _mm512_load_si512(xa + 16 * v);
    }
    for (int v = NV - 1; v >= 0; --v) {
      const __m512i SF = _mm512_i32gather_epi32(_mm512_add_epi32(_mm512_mullo_epi32(T[v], vstride), V[v]), tb.sf, 4);
      const __m512i FM1 = _mm512_srli_epi32(SF, 16);
      const __m512i LIM = _mm512_or_si512(_mm512_sll_epi32(FM1, shP), lowmask);
      const __mmask16 em = _mm512_cmpgt_epu32_mask(X[v], LIM);
      const __m512i XR = _mm512_permutexvar_epi32(rev, X[v]);
      const __mmask16 emr = _mm512_cmpgt_epu32_mask(XR, _mm512_permutexvar_epi32(rev, LIM));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(emr, XR)));
      p += __builtin_popcount(emr);
      __m512i Xv = _mm512_mask_srli_epi32(X[v], em, X[v], 16);
      const __m512i FREQ = _mm512_add_epi32(FM1, one);
      const __m512i Q = div512(Xv, FREQ);
      Xv = _mm512_add_epi32(_mm512_add_epi32(Xv, _mm512_and_si512(SF, ffff)),
                            _mm512_mullo_epi32(Q, _mm512_sub_epi32(vM, FREQ)));
      X[v] = Xv;
    }
    len = static_cast<size_t>(p - out.data());
  }
  out.resize(len);
  for (int v = 0; v < NV; ++v) _mm512_storeu_si512(x + 16 * v, X[v]);
}

template <int NV>
IV_AVX512 Status decode_avx512(const int32_t* idx, int64_t& s, int64_t s1, const IvTablesView& tb, uint32_t* x,
                               IvWordReader& r, int32_t* out) {
  constexpr int W = 16 * NV;
  const uint32_t P = tb.precision;
  const __m512i vstride = _mm512_set1_epi32(static_cast<int32_t>(tb.stride));
  const __m512i maskP = _mm512_set1_epi32(static_cast<int32_t>((1u << P) - 1u));
  const __m128i shP = _mm_cvtsi32_si128(static_cast<int>(P));
  const __m128i shB = _mm_cvtsi32_si128(static_cast<int>(tb.bbits));
  const __m128i shS = _mm_cvtsi32_si128(static_cast<int>(tb.bshift));
  const __m512i ffff = _mm512_set1_epi32(0xFFFF), one = _mm512_set1_epi32(1), low = _mm512_set1_epi32(1 << 16);
  const __m512i imax = _mm512_set1_epi32(INT32_MAX);
  __m512i X[NV];
  for (int v = 0; v < NV; ++v) X[v] = _mm512_loadu_si512(x + 16 * v);
  uint64_t cursor = r.pos;
  Status st = Status::kOk;
  for (; s < s1 && r.end - cursor >= static_cast<uint64_t>(W); ++s) {
    const int64_t base = s * W;
    uint32_t escm = 0;
    __mmask16 bad = 0;
    for (int v = 0; v < NV; ++v) {
      const __m512i T = _mm512_loadu_si512(idx + base + 16 * v);
      const __m512i SLOT = _mm512_and_si512(X[v], maskP);
      const __m512i B = _mm512_or_si512(_mm512_sll_epi32(T, shB), _mm512_srl_epi32(SLOT, shS));
      const __m512i E = _mm512_i32gather_epi32(B, tb.bucket, 4);
      __m512i LO = _mm512_and_si512(E, ffff), HI = _mm512_srli_epi32(E, 16);
      const __m512i RB = _mm512_mullo_epi32(T, vstride);
      for (__mmask16 m = _mm512_cmpgt_epu32_mask(HI, LO); m; m = _mm512_cmpgt_epu32_mask(HI, LO)) {
        const __m512i MID = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(LO, HI), one), 1);
        const __m512i ST = _mm512_and_si512(
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, _mm512_add_epi32(RB, MID), tb.sf, 4), ffff);
        const __mmask16 le = _mm512_mask_cmple_epu32_mask(m, ST, SLOT);
        LO = _mm512_mask_mov_epi32(LO, le, MID);
        HI = _mm512_mask_mov_epi32(HI, m & ~le, _mm512_sub_epi32(MID, one));
      }
      const __m512i SF = _mm512_i32gather_epi32(_mm512_add_epi32(RB, LO), tb.sf, 4);
      const __m512i FREQ = _mm512_add_epi32(_mm512_srli_epi32(SF, 16), one);
      __m512i Xv = _mm512_add_epi32(_mm512_mullo_epi32(FREQ, _mm512_srl_epi32(X[v], shP)),
                                    _mm512_sub_epi32(SLOT, _mm512_and_si512(SF, ffff)));
      const __m512i ESC = _mm512_i32gather_epi32(T, tb.esc, 4);
      const __m512i OFF = _mm512_i32gather_epi32(T, tb.off, 4);
      const __mmask16 em = _mm512_cmpeq_epi32_mask(LO, ESC);
      bad |= _mm512_mask_cmpgt_epi32_mask(static_cast<__mmask16>(~em), OFF, _mm512_sub_epi32(imax, LO));
      _mm512_storeu_si512(out + base + 16 * v, _mm512_add_epi32(LO, OFF));
      const __mmask16 need = _mm512_cmplt_epu32_mask(Xv, low);
      const __m512i WD =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.words + 2 * cursor)));
      Xv = _mm512_mask_or_epi32(Xv, need, _mm512_slli_epi32(Xv, 16), _mm512_maskz_expand_epi32(need, WD));
      cursor += static_cast<uint64_t>(__builtin_popcount(need));
      X[v] = Xv;
      escm |= static_cast<uint32_t>(em) << (16 * v);
    }
    if (bad) {
      st = Status::kCorrupt;
      break;
    }
    if (__builtin_expect(escm != 0, 0)) {
      alignas(64) uint32_t xa[W];
      for (int v = 0; v < NV; ++v) _mm512_store_si512(xa + 16 * v, X[v]);
      r.pos = cursor;
      st = iv_decode_bypass_scalar(xa, escm, W, idx + base, tb, r, out + base);
      cursor = r.pos;
      for (int v = 0; v < NV; ++v) X[v] = _mm512_load_si512(xa + 16 * v);
      if (st != Status::kOk) break;
    }
  }
  r.pos = cursor;
  for (int v = 0; v < NV; ++v) _mm512_storeu_si512(x + 16 * v, X[v]);
  return st;
}

// ---------------------------------------------------------------------------------------------
// AVX2: 8 lanes per register; expand and compress through 256-entry permutation tables
// ---------------------------------------------------------------------------------------------

#define IV_AVX2 __attribute__((target("avx2,popcnt")))

struct PermTables {
  alignas(32) int32_t expand[256][8];    // lane k <- word rank(k) (lanes not in the mask: ignored)
  alignas(32) int32_t compress[256][8];  // slot j <- the j-th highest lane of the mask
  PermTables() {
    for (int m = 0; m < 256; ++m) {
      int r = 0;
      for (int k = 0; k < 8; ++k) {
        expand[m][k] = r;
        r += (m >> k) & 1;
      }
      int j = 0;
      for (int k = 7; k >= 0; --k)
        if ((m >> k) & 1) compress[m][j++] = k;
      for (; j < 8; ++j) compress[m][j] = 0;
    }
  }
};
const PermTables kPerm;

IV_AVX2 static inline __m256d u32_to_pd(__m128i v) {
  return _mm256_add_pd(_mm256_cvtepi32_pd(_mm_xor_si128(v, _mm_set1_epi32(INT32_MIN))), _mm256_set1_pd(2147483648.0));
}
// floor(x / f), exact as in div512; the floored quotient is moved into int32 range for the conversion.
IV_AVX2 static inline __m128i div_half(__m128i x, __m128i f) {
  const __m256d q = _mm256_floor_pd(_mm256_div_pd(u32_to_pd(x), _mm256_cvtepi32_pd(f)));
  return _mm_xor_si128(_mm256_cvttpd_epi32(_mm256_sub_pd(q, _mm256_set1_pd(2147483648.0))), _mm_set1_epi32(INT32_MIN));
}
IV_AVX2 static inline __m256i div256(__m256i x, __m256i f) {
  const __m128i lo = div_half(_mm256_castsi256_si128(x), _mm256_castsi256_si128(f));
  const __m128i hi = div_half(_mm256_extracti128_si256(x, 1), _mm256_extracti128_si256(f, 1));
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
IV_AVX2 static inline int mask8(__m256i m) {
  return _mm256_movemask_ps(_mm256_castsi256_ps(m));
}

template <int NV>
IV_AVX2 void encode_avx2(const int32_t* sym, const int32_t* idx, int64_t s0, int64_t s1, const IvTablesView& tb,
                         uint32_t* x, std::vector<uint16_t>& out) {
  constexpr int W = 8 * NV;
  const uint32_t P = tb.precision;
  const __m256i vstride = _mm256_set1_epi32(static_cast<int32_t>(tb.stride));
  const __m256i vM = _mm256_set1_epi32(static_cast<int32_t>(1u << P));
  const __m256i lowmask = _mm256_set1_epi32(static_cast<int32_t>((1u << (32 - P)) - 1u));
  const __m128i shP = _mm_cvtsi32_si128(static_cast<int>(32 - P));
  const __m256i ffff = _mm256_set1_epi32(0xFFFF), one = _mm256_set1_epi32(1), sign = _mm256_set1_epi32(INT32_MIN);
  const __m256i pack16 = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9,
                                          12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
  __m256i X[NV];
  for (int v = 0; v < NV; ++v) X[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * v));
  size_t len = out.size();
  for (int64_t s = s1 - 1; s >= s0; --s) {
    const int64_t base = s * W;
    if (out.size() < len + step_room(W)) out.resize(std::max(len + step_room(W), 2 * out.size()));
    uint16_t* p = out.data() + len;
    __m256i T[NV], V[NV];
    int any = 0;
    for (int v = 0; v < NV; ++v) {
      T[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + base + 8 * v));
      const __m256i S = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sym + base + 8 * v));
      const __m256i OFF = _mm256_i32gather_epi32(tb.off, T[v], 4);
      const __m256i ESC = _mm256_i32gather_epi32(tb.esc, T[v], 4);
      const __m256i D = _mm256_sub_epi32(S, OFF);
      const __m256i inside = _mm256_cmpgt_epi32(_mm256_xor_si256(ESC, sign), _mm256_xor_si256(D, sign));
      const __m256i e = _mm256_or_si256(_mm256_cmpgt_epi32(OFF, S), _mm256_xor_si256(inside, _mm256_set1_epi32(-1)));
      V[v] = _mm256_blendv_epi8(D, ESC, e);
      any |= mask8(e);
    }
    if (__builtin_expect(any != 0, 0)) {
      alignas(32) uint32_t xa[W];
      for (int v = 0; v < NV; ++v) _mm256_store_si256(reinterpret_cast<__m256i*>(xa + 8 * v), X[v]);
      p = enc_bypass_step(xa, sym + base, idx + base, W, tb, p);
      for (int v = 0; v < NV; ++v) X[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(xa + 8 * v));
    }
    for (int v = NV - 1; v >= 0; --v) {
      const __m256i SF = _mm256_i32gather_epi32(reinterpret_cast<const int*>(tb.sf),
                                                _mm256_add_epi32(_mm256_mullo_epi32(T[v], vstride), V[v]), 4);
      const __m256i FM1 = _mm256_srli_epi32(SF, 16);
      const __m256i LIM = _mm256_or_si256(_mm256_sll_epi32(FM1, shP), lowmask);
      const __m256i EM = _mm256_cmpgt_epi32(_mm256_xor_si256(X[v], sign), _mm256_xor_si256(LIM, sign));
      const int em = mask8(EM);
      const __m256i C =
          _mm256_permutevar8x32_epi32(X[v], _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.compress[em])));
      const __m256i C16 = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(C, pack16), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(C16));
      p += __builtin_popcount(static_cast<unsigned>(em));
      __m256i Xv = _mm256_blendv_epi8(X[v], _mm256_srli_epi32(X[v], 16), EM);
      const __m256i FREQ = _mm256_add_epi32(FM1, one);
      const __m256i Q = div256(Xv, FREQ);
      Xv = _mm256_add_epi32(_mm256_add_epi32(Xv, _mm256_and_si256(SF, ffff)),
                            _mm256_mullo_epi32(Q, _mm256_sub_epi32(vM, FREQ)));
      X[v] = Xv;
    }
    len = static_cast<size_t>(p - out.data());
  }
  out.resize(len);
  for (int v = 0; v < NV; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8 * v), X[v]);
}

template <int NV>
IV_AVX2 Status decode_avx2(const int32_t* idx, int64_t& s, int64_t s1, const IvTablesView& tb, uint32_t* x,
                           IvWordReader& r, int32_t* out) {
  constexpr int W = 8 * NV;
  const uint32_t P = tb.precision;
  const __m256i vstride = _mm256_set1_epi32(static_cast<int32_t>(tb.stride));
  const __m256i maskP = _mm256_set1_epi32(static_cast<int32_t>((1u << P) - 1u));
  const __m128i shP = _mm_cvtsi32_si128(static_cast<int>(P));
  const __m128i shB = _mm_cvtsi32_si128(static_cast<int>(tb.bbits));
  const __m128i shS = _mm_cvtsi32_si128(static_cast<int>(tb.bshift));
  const __m256i ffff = _mm256_set1_epi32(0xFFFF), one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
  const __m256i imax = _mm256_set1_epi32(INT32_MAX);
  const int* sf = reinterpret_cast<const int*>(tb.sf);
  __m256i X[NV];
  for (int v = 0; v < NV; ++v) X[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * v));
  uint64_t cursor = r.pos;
  Status st = Status::kOk;
  for (; s < s1 && r.end - cursor >= static_cast<uint64_t>(W); ++s) {
    const int64_t base = s * W;
    uint32_t escm = 0;
    int bad = 0;
    for (int v = 0; v < NV; ++v) {
      const __m256i T = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + base + 8 * v));
      const __m256i SLOT = _mm256_and_si256(X[v], maskP);
      const __m256i B = _mm256_or_si256(_mm256_sll_epi32(T, shB), _mm256_srl_epi32(SLOT, shS));
      const __m256i E = _mm256_i32gather_epi32(reinterpret_cast<const int*>(tb.bucket), B, 4);
      __m256i LO = _mm256_and_si256(E, ffff), HI = _mm256_srli_epi32(E, 16);
      const __m256i RB = _mm256_mullo_epi32(T, vstride);
      for (__m256i M = _mm256_cmpgt_epi32(HI, LO); mask8(M); M = _mm256_cmpgt_epi32(HI, LO)) {
        const __m256i MID = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(LO, HI), one), 1);
        const __m256i ST =
            _mm256_and_si256(_mm256_mask_i32gather_epi32(zero, sf, _mm256_add_epi32(RB, MID), M, 4), ffff);
        const __m256i GT = _mm256_cmpgt_epi32(ST, SLOT);  // both < 2^16
        LO = _mm256_blendv_epi8(LO, MID, _mm256_andnot_si256(GT, M));
        HI = _mm256_blendv_epi8(HI, _mm256_sub_epi32(MID, one), _mm256_and_si256(GT, M));
      }
      const __m256i SF = _mm256_i32gather_epi32(sf, _mm256_add_epi32(RB, LO), 4);
      const __m256i FREQ = _mm256_add_epi32(_mm256_srli_epi32(SF, 16), one);
      __m256i Xv = _mm256_add_epi32(_mm256_mullo_epi32(FREQ, _mm256_srl_epi32(X[v], shP)),
                                    _mm256_sub_epi32(SLOT, _mm256_and_si256(SF, ffff)));
      const __m256i ESC = _mm256_i32gather_epi32(tb.esc, T, 4);
      const __m256i OFF = _mm256_i32gather_epi32(tb.off, T, 4);
      const __m256i EM = _mm256_cmpeq_epi32(LO, ESC);
      bad |= mask8(_mm256_andnot_si256(EM, _mm256_cmpgt_epi32(OFF, _mm256_sub_epi32(imax, LO))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + base + 8 * v), _mm256_add_epi32(LO, OFF));
      const __m256i NEED = _mm256_cmpeq_epi32(_mm256_srli_epi32(Xv, 16), zero);
      const int need = mask8(NEED);
      const __m256i WD = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.words + 2 * cursor)));
      const __m256i WE =
          _mm256_permutevar8x32_epi32(WD, _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.expand[need])));
      Xv = _mm256_blendv_epi8(Xv, _mm256_or_si256(_mm256_slli_epi32(Xv, 16), WE), NEED);
      cursor += static_cast<uint64_t>(__builtin_popcount(static_cast<unsigned>(need)));
      X[v] = Xv;
      escm |= static_cast<uint32_t>(mask8(EM)) << (8 * v);
    }
    if (bad) {
      st = Status::kCorrupt;
      break;
    }
    if (__builtin_expect(escm != 0, 0)) {
      alignas(32) uint32_t xa[W];
      for (int v = 0; v < NV; ++v) _mm256_store_si256(reinterpret_cast<__m256i*>(xa + 8 * v), X[v]);
      r.pos = cursor;
      st = iv_decode_bypass_scalar(xa, escm, W, idx + base, tb, r, out + base);
      cursor = r.pos;
      for (int v = 0; v < NV; ++v) X[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(xa + 8 * v));
      if (st != Status::kOk) break;
    }
  }
  r.pos = cursor;
  for (int v = 0; v < NV; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8 * v), X[v]);
  return st;
}

IvIsa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  IvIsa best = IvIsa::kScalar;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) best = IvIsa::kAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    best = IvIsa::kAvx512;
  return best;
#else
  return IvIsa::kScalar;
#endif
}

}  // namespace

bool iv_isa_supported(IvIsa isa) {
  static const IvIsa hw = detect_isa();
  return static_cast<int>(isa) <= static_cast<int>(hw);
}

IvIsa iv_best_isa() {
  static const IvIsa chosen = [] {
    IvIsa isa = detect_isa();
    if (const char* e = std::getenv("DUALRES_RANS_ISA")) {
      IvIsa want = isa;
      if (!std::strcmp(e, "scalar"))
        want = IvIsa::kScalar;
      else if (!std::strcmp(e, "avx2"))
        want = IvIsa::kAvx2;
      else if (!std::strcmp(e, "avx512"))
        want = IvIsa::kAvx512;
      if (static_cast<int>(want) < static_cast<int>(isa)) isa = want;
    }
    return isa;
  }();
  return chosen;
}

const char* iv_isa_name(IvIsa isa) {
  switch (isa) {
    case IvIsa::kAvx512:
      return "avx512";
    case IvIsa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

IV_AVX512 static void index_range_avx512(const int32_t* idx, int64_t n, int32_t& lo, int32_t& hi) {
  __m512i mn = _mm512_set1_epi32(idx[0]), mx = mn;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i v = _mm512_loadu_si512(idx + i);
    mn = _mm512_min_epi32(mn, v);
    mx = _mm512_max_epi32(mx, v);
  }
  int32_t l = _mm512_reduce_min_epi32(mn), h = _mm512_reduce_max_epi32(mx);
  for (; i < n; ++i) {
    l = std::min(l, idx[i]);
    h = std::max(h, idx[i]);
  }
  lo = l;
  hi = h;
}

IV_AVX2 static void index_range_avx2(const int32_t* idx, int64_t n, int32_t& lo, int32_t& hi) {
  __m256i mn = _mm256_set1_epi32(idx[0]), mx = mn;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i));
    mn = _mm256_min_epi32(mn, v);
    mx = _mm256_max_epi32(mx, v);
  }
  alignas(32) int32_t a[8], b[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), mn);
  _mm256_store_si256(reinterpret_cast<__m256i*>(b), mx);
  int32_t l = a[0], h = b[0];
  for (int k = 1; k < 8; ++k) {
    l = std::min(l, a[k]);
    h = std::max(h, b[k]);
  }
  for (; i < n; ++i) {
    l = std::min(l, idx[i]);
    h = std::max(h, idx[i]);
  }
  lo = l;
  hi = h;
}

void iv_index_range(const int32_t* idx, int64_t n, int32_t& lo, int32_t& hi) {
  const IvIsa isa = iv_best_isa();
  if (isa == IvIsa::kAvx512) return index_range_avx512(idx, n, lo, hi);
  if (isa == IvIsa::kAvx2) return index_range_avx2(idx, n, lo, hi);
  lo = hi = idx[0];
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, idx[i]);
    hi = std::max(hi, idx[i]);
  }
}

void iv_encode_steps(IvIsa isa, const int32_t* sym, const int32_t* idx, int64_t n, int width, int64_t s0, int64_t s1,
                     const IvTablesView& tb, uint32_t* x, std::vector<uint16_t>& out) {
  if (s1 <= s0) return;
  // The partial last step (fewer than W symbols) is always scalar; it is coded first.
  if (s1 * width > n) {
    iv_encode_steps_scalar(sym, idx, n, width, s1 - 1, s1, tb, x, out);
    --s1;
  }
  if (width < 16) isa = IvIsa::kScalar;  // the vector coders fill 16 or 32 lanes
  if (isa == IvIsa::kAvx512) {
    const bool reg = tb.T <= kIvRegRows;
    if (width == 32) {
      return reg ? encode_avx512<2, true>(sym, idx, s0, s1, tb, x, out)
                 : encode_avx512<2, false>(sym, idx, s0, s1, tb, x, out);
    }
    return reg ? encode_avx512<1, true>(sym, idx, s0, s1, tb, x, out)
               : encode_avx512<1, false>(sym, idx, s0, s1, tb, x, out);
  }
  if (isa == IvIsa::kAvx2) {
    if (width == 32) return encode_avx2<4>(sym, idx, s0, s1, tb, x, out);
    return encode_avx2<2>(sym, idx, s0, s1, tb, x, out);
  }
  iv_encode_steps_scalar(sym, idx, n, width, s0, s1, tb, x, out);
}

Status iv_decode_steps(IvIsa isa, const int32_t* idx, int64_t n, int width, int64_t s0, int64_t s1,
                       const IvTablesView& tb, uint32_t* x, IvWordReader& r, int32_t* out) {
  int64_t s = s0;
  const int64_t full = std::min<int64_t>(s1, n / width);  // steps with all W lanes active
  Status st = Status::kOk;
  if (width < 16) isa = IvIsa::kScalar;  // the vector coders fill 16 or 32 lanes
  if (isa == IvIsa::kAvx512) {
    st = width == 32 ? decode_avx512<2>(idx, s, full, tb, x, r, out) : decode_avx512<1>(idx, s, full, tb, x, r, out);
  } else if (isa == IvIsa::kAvx2) {
    st = width == 32 ? decode_avx2<4>(idx, s, full, tb, x, r, out) : decode_avx2<2>(idx, s, full, tb, x, r, out);
  }
  if (st != Status::kOk) return st;
  // The rest (near the end of the words, or the partial last step) with bounds-checked reads.
  return iv_decode_steps_scalar(idx, n, width, s, s1, tb, x, r, out);
}

}  // namespace dualres::rans
