// rans_core.h -- header-only, torch-free rANS coder for dualres_ext.
//
// Two coders share the table preparation below:
//  * the NATIVE coder: 32-bit state, byte-wise renormalisation (ryg_rans' rans_byte.h design),
//    precision 1..16 bits, K interleaved states per lane, many independent lanes in one stream
//    (container format: csrc/rans/FORMAT.md, implemented in rans_stream.h);
//  * the COMPAT coder: CompressAI 1.2.8's exact byte format (ryg's Rans64: 64-bit state,
//    32-bit words, precision 16, 4-bit bypass chunks), so streams are interchangeable with
//    compressai.ans.
//
// Tables use CompressAI's layout: table t is a row of an int32 [T, W] array holding a CDF that
// starts at 0 and ends at 1 << precision after cdf_lengths[t] entries; symbol value v (after
// subtracting offsets[t]) in [0, cdf_lengths[t] - 2) is coded with the table, everything else is
// signalled by the last entry (the escape symbol, value cdf_lengths[t] - 2) followed by the value
// in 4-bit bypass chunks.
//
// Decoding treats the stream as hostile: every byte read is bounds-checked, loops are bounded,
// and failures come back as a Status code (no exceptions, no aborts) so the core can be fuzzed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

// Hot-path functions are forced inline: inside a large translation unit (the torch op file)
// GCC's unit-growth limits otherwise left them as calls, with the coder state passed through
// memory -- measured 3-4x slower decoding than the same code in a small file.
#if defined(__GNUC__)
#define DUALRES_RANS_INLINE inline __attribute__((always_inline))
#else
#define DUALRES_RANS_INLINE inline
#endif

// The per-symbol coding functions below are shared verbatim by the CPU ops and the CUDA kernels
// (csrc/rans/cuda/rans_cuda.cu): nvcc compiles them for both sides, which is what makes GPU and
// CPU streams byte-identical. Anything marked DUALRES_HD must stay free of std:: containers.
#if defined(__CUDACC__)
#define DUALRES_HD __host__ __device__
#define DUALRES_UNROLL _Pragma("unroll")
#else
#define DUALRES_HD
#define DUALRES_UNROLL _Pragma("GCC unroll 4")
#endif

namespace dualres::rans {

enum class Status : int {
  kOk = 0,
  kTruncated,    // the stream ended before all symbols were decoded
  kCorrupt,      // impossible state / bypass count / value, or a lane that does not end cleanly
  kBadHeader,    // container header malformed (magic, version, lengths)
  kMismatch,     // stream describes a different symbol count or precision than the caller's
  kBadIndex,     // an index outside [0, T)
  kUnencodable,  // a symbol the format cannot represent (compat: |value| >= 2^30)
};

inline const char* status_message(Status s) {
  switch (s) {
    case Status::kOk:
      return "ok";
    case Status::kTruncated:
      return "rANS stream is truncated";
    case Status::kCorrupt:
      return "rANS stream is corrupt (decoder state or escape data invalid)";
    case Status::kBadHeader:
      return "rANS stream header is malformed (wrong magic/version or inconsistent lengths)";
    case Status::kMismatch:
      return "rANS stream does not match the given indexes/tables (symbol count or precision differ)";
    case Status::kBadIndex:
      return "index out of range of the CDF tables";
    case Status::kUnencodable:
      return "symbol value outside the range the CompressAI format can represent";
  }
  return "unknown rANS error";
}

constexpr int kBypassBits = 4;  // CompressAI's bypass chunk width
constexpr uint32_t kBypassMax = (1u << kBypassBits) - 1;

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

// A non-owning view of CompressAI-layout tables.
struct TableView {
  const int32_t* cdfs = nullptr;     // [T, W] row-major
  const int32_t* lengths = nullptr;  // [T]
  const int32_t* offsets = nullptr;  // [T]
  int64_t T = 0, W = 0;
};

// Returns nullptr when row t is a valid CDF, else a message. precision_out gets log2 of its total.
inline const char* check_table(const TableView& tv, int64_t t, int* precision_out) {
  const int32_t len = tv.lengths[t];
  if (len < 2) return "cdf_lengths: every table needs at least 2 entries";
  if (len > tv.W) return "cdf_lengths: a length exceeds the row width of cdfs";
  const int32_t* c = tv.cdfs + t * tv.W;
  if (c[0] != 0) return "cdfs: every row must start at 0";
  for (int32_t j = 1; j < len; ++j)
    if (c[j] <= c[j - 1]) return "cdfs: rows must be strictly increasing (every symbol needs frequency >= 1)";
  const uint32_t total = static_cast<uint32_t>(c[len - 1]);
  if ((total & (total - 1)) != 0 || total < 2 || total > (1u << 16))
    return "cdfs: every row must end at a power of two 1 << precision with 1 <= precision <= 16";
  int p = 0;
  while ((1u << p) < total) ++p;
  *precision_out = p;
  return nullptr;
}

// start | (freq - 1) << 16 of symbol s of CDF row c: a decoder gets both with one 32-bit load
// (freq - 1 fits 16 bits for every precision <= 16).
DUALRES_HD inline uint32_t packed_start_freq(const int32_t* c, int32_t s) {
  return static_cast<uint32_t>(c[s]) | static_cast<uint32_t>(c[s + 1] - c[s] - 1) << 16;
}

// The bucket lookup of a valid CDF row c of length len: b[k] = the symbol holding slot k << shift
// for k < 2^bits, and b[2^bits] = len - 2 (the last symbol), so the symbols of bucket k are
// always b[k] .. b[k + 1]. Shared by every decoder's table preparation.
template <class T>
inline void bucket_first_symbols(const int32_t* c, int32_t len, int bits, int shift, T* b) {
  const int64_t nb = int64_t{1} << bits;
  int32_t s = 0;
  for (int64_t k = 0; k < nb; ++k) {
    const int32_t slot = static_cast<int32_t>(k << shift);
    while (c[s + 1] <= slot) ++s;  // c[len-1] = 2^precision > slot, so s stays <= len - 2
    b[k] = static_cast<T>(s);
  }
  b[nb] = static_cast<T>(len - 2);
}

constexpr uint32_t kLow = 1u << 23;  // native state lives in [kLow, kLow << 8)
constexpr int kCompatPrecision = 16;
// The compat decoder's buckets: 64 per row (CompatTables). On the benchmark's Gaussian latent (43
// of CompressAI's 64 tables in use) the 17 KB of lookup they need stays in L1 beside the streams
// through it, which outweighs the 2.8% of slots left to the bisection (128 buckets: 1.1%, 34 KB);
// measured 5.1 vs 5.4 ns per symbol. Wide rows bisect more often with 64: on tables 40-62 (scales
// 15 to 226) 15.3 vs 12.7 ns.
constexpr int kCompatBucketBits = 6;

// Tables validated and converted once per call. With fewer symbols than table entries only the
// rows named by the indexes are prepared, so a per-position decode_stream call stays cheap.
struct Prepared {
  TableView tv;
  int precision = -1;  // common precision of all prepared rows
  int bucket_bits = 0, bucket_shift = 0;
  std::vector<uint16_t> bucket;  // [T, 2^bucket_bits + 1]: bucket_first_symbols of each row

  int64_t bucket_stride() const { return (int64_t{1} << bucket_bits) + 1; }

  // Validates the rows used by idx[0..n) and, unless for_encode, builds their decoding search
  // structures (an encoder needs none: building them cost a small stream's encode as much again).
  // A Prepared made for decoding also serves encoding. Returns nullptr or an error message.
  // required_precision > 0 demands that precision. The compat encoder validates with
  // prepare_compat; the compat decoder has its own tables (CompatTables).
  const char* prepare(const TableView& v, const int32_t* idx, int64_t n, bool for_encode, int required_precision) {
    return prepare_impl(v, idx, n, for_encode, required_precision);
  }
  const char* prepare_compat(const TableView& v, const int32_t* idx, int64_t n) {
    return prepare_impl(v, idx, n, /*for_encode=*/true, kCompatPrecision);
  }

 private:
  const char* prepare_impl(const TableView& v, const int32_t* idx, int64_t n, bool for_encode, int required_precision) {
    tv = v;
    int32_t lo = 0, hi = 0;
    if (n > 0) {
      lo = hi = idx[0];
      for (int64_t i = 0; i < n; ++i) {  // vectorised min/max
        lo = lo < idx[i] ? lo : idx[i];
        hi = hi > idx[i] ? hi : idx[i];
      }
      if (lo < 0 || hi >= tv.T) return "indexes: value out of range [0, number of CDF tables)";
    }
    // With at least as many symbols as table entries, all rows in [lo, hi] are prepared when
    // they are all valid (marking the rows used cost a pass over the indexes as long as the decode
    // loop's first 5%); otherwise, or when one is invalid, only the rows used.
    std::vector<uint8_t> used(static_cast<size_t>(tv.T), 0);
    // Precision first: the bucket layout depends on it.
    auto check_used = [&]() -> const char* {
      precision = -1;
      for (int64_t t = 0; t < tv.T; ++t) {
        if (!used[t]) continue;
        int p = 0;
        if (const char* e = check_table(tv, t, &p)) return e;
        if (precision < 0) precision = p;
        if (p != precision) return "cdfs: all rows used must share one precision (same final value)";
      }
      return nullptr;
    };
    bool all = n > 0 && n >= (int64_t{hi} - lo + 1) * tv.W;
    if (all) {
      std::fill(used.begin() + lo, used.begin() + hi + 1, uint8_t{1});
      if (check_used() != nullptr) {
        all = false;
        std::fill(used.begin(), used.end(), uint8_t{0});
      }
    }
    if (!all) {
      for (int64_t i = 0; i < n; ++i) used[idx[i]] = 1;
      if (const char* e = check_used()) return e;
    }
    if (precision < 0) precision = required_precision > 0 ? required_precision : 16;
    if (required_precision > 0 && precision != required_precision)
      return "cdfs: CompressAI's format needs 16-bit tables (rows ending at 65536)";
    bucket_bits = precision < 8 ? precision : 8;
    bucket_shift = precision - bucket_bits;
    if (for_encode) return nullptr;
    bucket.assign(static_cast<size_t>(tv.T * bucket_stride()), 0);
    for (int64_t t = 0; t < tv.T; ++t) {
      if (!used[t]) continue;
      bucket_first_symbols(tv.cdfs + t * tv.W, tv.lengths[t], bucket_bits, bucket_shift,
                           bucket.data() + t * bucket_stride());
    }
    return nullptr;
  }
};

// CompressAI's mapping of an out-of-table value to the non-negative raw bypass value.
// v is value - offset as int64 (no overflow); max_value is the escape symbol.
DUALRES_HD DUALRES_RANS_INLINE uint64_t raw_from_value(int64_t v, int64_t max_value) {
  return v < 0 ? static_cast<uint64_t>(-2 * v - 1) : static_cast<uint64_t>(2 * (v - max_value));
}
DUALRES_HD DUALRES_RANS_INLINE int64_t value_from_raw(uint64_t raw, int64_t max_value) {
  const int64_t h = static_cast<int64_t>(raw >> 1);
  return (raw & 1) ? -h - 1 : h + max_value;
}
DUALRES_HD inline int n_chunks(uint64_t raw) {
  int n = 0;
  while ((raw >> (n * kBypassBits)) != 0) ++n;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Native coder: 32-bit state, byte renormalisation, writes backwards into a growable buffer.
// ---------------------------------------------------------------------------------------------

// Output written from the end towards the front (rANS encodes in reverse).
// One cache line each: lanes are encoded by different threads from one std::vector<BackBuffer>,
// and two buffers sharing a line made the 2-thread encoder no faster than one thread.
struct alignas(64) BackBuffer {
  std::vector<uint8_t> buf;
  size_t pos = 0;  // first written byte
  explicit BackBuffer(size_t cap) : buf(cap < 64 ? 64 : cap), pos(buf.size()) {}
  // Ensures at least `need` free bytes in front of pos (moving what was written to a new end).
  inline void reserve_front(size_t need) {
    if (pos >= need) return;
    const size_t used = buf.size() - pos;
    std::vector<uint8_t> bigger(2 * buf.size() + need);
    std::memcpy(bigger.data() + bigger.size() - used, buf.data() + pos, used);
    buf.swap(bigger);
    pos = buf.size() - used;
  }
  const uint8_t* data() const { return buf.data() + pos; }
  size_t size() const { return buf.size() - pos; }
};

DUALRES_HD DUALRES_RANS_INLINE void enc_put_bits(uint32_t& x, uint8_t*& p, uint32_t val) {
  constexpr uint32_t x_max = (kLow >> kBypassBits) << 8;
  while (x >= x_max) {
    *--p = static_cast<uint8_t>(x);
    x >>= 8;
  }
  x = (x << kBypassBits) | val;
}

// Puts one symbol (value incl. escapes). Worst case 12 bytes: 9 raw chunks + 1 count chunk + 2.
constexpr size_t kMaxBytesPerSymbol = 16;

// x = C(s, x). A plain division: with 4 interleaved states it measured as fast as ryg's
// precomputed reciprocals (hardware 32-bit division is cheap on current x86) and needs no
// [T, W] reciprocal table rebuilt on every call. Renormalisation is branch-free: precision <= 16
// needs at most 2 bytes (x < 2^31, x_max >= 2^15); both candidate bytes are stored and the
// pointer moves by the number actually emitted.
DUALRES_HD DUALRES_RANS_INLINE void enc_put_div(uint32_t& x, uint8_t*& p, uint32_t start, uint32_t freq,
                                                uint32_t precision) {
  const uint32_t x_max = ((kLow >> precision) << 8) * freq;
  const uint32_t nbytes = (x >= x_max) + (uint64_t{x} >= (uint64_t{x_max} << 8));
  p[-1] = static_cast<uint8_t>(x);
  p[-2] = static_cast<uint8_t>(x >> 8);
  p -= nbytes;
  x >>= 8 * nbytes;
  x = ((x / freq) << precision) + (x % freq) + start;
}

DUALRES_HD DUALRES_RANS_INLINE void native_encode_one(uint32_t& x, uint8_t*& p, const TableView& tv, uint32_t precision,
                                                      int32_t t, int32_t sym) {
  const int64_t max_value = tv.lengths[t] - 2;
  int64_t v = int64_t{sym} - tv.offsets[t];
  if (v < 0 || v >= max_value) {
    const uint64_t raw = raw_from_value(v, max_value);
    int nb = n_chunks(raw);
    // Reverse of the decoder's order: the decoder reads count chunks, then raw chunks low first.
    for (int j = nb - 1; j >= 0; --j) enc_put_bits(x, p, static_cast<uint32_t>(raw >> (j * kBypassBits)) & kBypassMax);
    int cnt = nb;
    // count = sum of chunks, a chunk == 15 means "more follows"; written last-first.
    int full = cnt / static_cast<int>(kBypassMax);
    enc_put_bits(x, p, static_cast<uint32_t>(cnt - full * static_cast<int>(kBypassMax)));
    for (int j = 0; j < full; ++j) enc_put_bits(x, p, kBypassMax);
    v = max_value;
  }
  const int32_t* c = tv.cdfs + int64_t{t} * tv.W;
  enc_put_div(x, p, static_cast<uint32_t>(c[v]), static_cast<uint32_t>(c[v + 1] - c[v]), precision);
}

DUALRES_RANS_INLINE void native_encode_one(uint32_t& x, uint8_t*& p, const Prepared& pt, int32_t t, int32_t sym) {
  native_encode_one(x, p, pt.tv, static_cast<uint32_t>(pt.precision), t, sym);
}

// Encodes the block of symbols [jb, jb + K) (those < n) backwards, symbol j with state j % K.
// Writes at most K * kMaxBytesPerSymbol bytes in front of p.
template <int K>
DUALRES_HD DUALRES_RANS_INLINE void native_encode_block(uint32_t* x, uint8_t*& p, const TableView& tv,
                                                        uint32_t precision, const int32_t* sym, const int32_t* idx,
                                                        int64_t jb, int64_t n) {
  DUALRES_UNROLL
  for (int k = K - 1; k >= 0; --k) {
    const int64_t j = jb + k;
    if (j < n) native_encode_one(x[k], p, tv, precision, idx[j], sym[j]);
  }
}

// The K final states as little-endian 32-bit words, state 0 first (4 * K bytes in front of p).
template <int K>
DUALRES_HD DUALRES_RANS_INLINE void native_flush_states(const uint32_t* x, uint8_t*& p) {
  for (int k = K - 1; k >= 0; --k)
    for (int b = 3; b >= 0; --b) *--p = static_cast<uint8_t>(x[k] >> (8 * b));
}

// A whole lane into a caller-sized buffer ending at `end` (capacity >= n * kMaxBytesPerSymbol
// + 4 * K + 2); returns the first byte written. The CUDA encoder's per-lane path.
template <int K>
DUALRES_HD inline uint8_t* native_encode_lane_raw(const int32_t* sym, const int32_t* idx, int64_t n,
                                                  const TableView& tv, uint32_t precision, uint8_t* end) {
  uint32_t x[K];
  for (int k = 0; k < K; ++k) x[k] = kLow;
  uint8_t* p = end;
  const int64_t last_block = n > 0 ? ((n - 1) / K) * K : -K;
  for (int64_t jb = last_block; jb >= 0; jb -= K) native_encode_block<K>(x, p, tv, precision, sym, idx, jb, n);
  native_flush_states<K>(x, p);
  return p;
}

// Encodes symbols [0, n) of one lane with K interleaved states (symbol j uses state j % K).
// Output: K little-endian 32-bit states (state 0 first) followed by the renormalisation bytes.
template <int K>
void native_encode_lane(const int32_t* sym, const int32_t* idx, int64_t n, const Prepared& pt, BackBuffer& out) {
  uint32_t x[K];
  for (int k = 0; k < K; ++k) x[k] = kLow;
  const int64_t last_block = n > 0 ? ((n - 1) / K) * K : -K;
  const uint32_t precision = static_cast<uint32_t>(pt.precision);
  // The write pointer lives in a register: the byte stores through it may alias any memory, so
  // keeping it in `out` made the compiler store and reload it around every block.
  uint8_t* p = out.buf.data() + out.pos;
  for (int64_t jb = last_block; jb >= 0; jb -= K) {
    if (static_cast<size_t>(p - out.buf.data()) < K * kMaxBytesPerSymbol) {
      out.pos = static_cast<size_t>(p - out.buf.data());
      out.reserve_front(K * kMaxBytesPerSymbol);
      p = out.buf.data() + out.pos;
    }
    native_encode_block<K>(x, p, pt.tv, precision, sym, idx, jb, n);
  }
  out.pos = static_cast<size_t>(p - out.buf.data());
  out.reserve_front(4 * K);
  p = out.buf.data() + out.pos;
  native_flush_states<K>(x, p);
  out.pos = static_cast<size_t>(p - out.buf.data());
}

// Bounds-checked byte reader for the native decoder.
struct ByteReader {
  const uint8_t* p;
  const uint8_t* end;
  bool overrun = false;
  DUALRES_HD DUALRES_RANS_INLINE uint32_t next() {
    if (p < end) return *p++;
    overrun = true;
    return 0;
  }
};

DUALRES_HD inline void dec_renorm_slow(uint32_t& x, ByteReader& r) {
  // x >= 1 always here, so at most 3 iterations (precision <= 16 needs at most 2).
  while (x < kLow && !r.overrun) x = (x << 8) | r.next();
}

// After a decode step x >= 2^7 * freq >= 2^7, so at most 2 bytes are needed (precision <= 16).
// With 2 bytes left, read both and select without branches (the byte count is unpredictable).
DUALRES_HD DUALRES_RANS_INLINE void dec_renorm(uint32_t& x, ByteReader& r) {
  if (r.end - r.p >= 2) {
    // Pure arithmetic (no ?: that the compiler might turn back into a branch).
    const uint32_t n = (x < kLow) + (x < (kLow >> 8));
    const uint32_t two = (uint32_t{r.p[0]} << 8) | r.p[1];
    x = (x << (8 * n)) | (two >> (8 * (2 - n)));
    r.p += n;
  } else {
    dec_renorm_slow(x, r);
  }
}

// Escape path (rare): reads the bypass count and chunks after the escape symbol. It takes and
// returns the coder state by value: passing the hot loop's state or reader by reference would
// force them into memory, and their stack slots would then alias (modulo 4 KiB) with the output
// stores on some calls -- measured as a 3x slowdown depending on where the output was allocated.
struct BypassResult {
  uint32_t x;
  const uint8_t* p;
  bool overrun;
  Status status;
  int64_t v;
};

[[gnu::noinline]] DUALRES_HD inline BypassResult native_decode_bypass(uint32_t x, ByteReader r, int64_t max_value) {
  auto get = [&]() {
    const uint32_t val = x & kBypassMax;
    x >>= kBypassBits;
    dec_renorm(x, r);
    return val;
  };
  uint32_t val = get();
  int nb = static_cast<int>(val);
  while (val == kBypassMax) {
    if (nb > 9 || r.overrun) return {x, r.p, r.overrun, Status::kCorrupt, 0};  // 34-bit raw: <= 9 chunks
    val = get();
    nb += static_cast<int>(val);
  }
  if (nb > 9) return {x, r.p, r.overrun, Status::kCorrupt, 0};
  uint64_t raw = 0;
  for (int j = 0; j < nb; ++j) raw |= uint64_t{get()} << (j * kBypassBits);
  return {x, r.p, r.overrun, Status::kOk, value_from_raw(raw, max_value)};
}

// Hot-loop copies of the prepared tables (locals, so stores to the output cannot alias them).
struct DecodeCtx {
  const int32_t* cdfs;
  const int32_t* lengths;
  const int32_t* offsets;
  const uint16_t* bucket;
  int64_t W, bstride;
  uint32_t precision, mask, bshift;
  DecodeCtx() = default;  // the CUDA path fills it with device pointers
  explicit DecodeCtx(const Prepared& pt)
      : cdfs(pt.tv.cdfs),
        lengths(pt.tv.lengths),
        offsets(pt.tv.offsets),
        bucket(pt.bucket.data()),
        W(pt.tv.W),
        bstride(pt.bucket_stride()),
        precision(static_cast<uint32_t>(pt.precision)),
        mask((1u << pt.precision) - 1),
        bshift(static_cast<uint32_t>(pt.bucket_shift)) {}
};

// The symbol s of table t with cdf[s] <= slot < cdf[s + 1], and its start and frequency. The
// bucket narrows s to [lo, hi] (almost always one or two candidates), a binary search handles the
// rare wider range (tails), and the last step is branch-free -- never a linear scan. Shared by
// the native and compat decoders; forced inline, because both hot loops are sensitive to it.
DUALRES_HD DUALRES_RANS_INLINE uint32_t bucket_search(const DecodeCtx& d, int32_t t, uint32_t slot, uint32_t& start,
                                                      uint32_t& freq) {
  const int32_t* c = d.cdfs + int64_t{t} * d.W;
  const uint16_t* b = d.bucket + t * d.bstride + (slot >> d.bshift);
  uint32_t lo = b[0], hi = b[1];
  while (hi > lo + 1) {
    const uint32_t mid = (lo + hi) >> 1;
    if (static_cast<uint32_t>(c[mid]) <= slot)
      lo = mid;
    else
      hi = mid - 1;
  }
  const uint32_t s = lo + (static_cast<uint32_t>(c[lo + 1]) <= slot);
  start = static_cast<uint32_t>(c[s]);
  freq = static_cast<uint32_t>(c[s + 1]) - start;
  return s;
}

DUALRES_HD DUALRES_RANS_INLINE Status native_decode_one(uint32_t& x, ByteReader& r, const DecodeCtx& d, int32_t t,
                                                        int32_t* out) {
  const uint32_t slot = x & d.mask;
  uint32_t start, freq;
  const uint32_t s = bucket_search(d, t, slot, start, freq);
  x = freq * (x >> d.precision) + slot - start;
  dec_renorm(x, r);
  const int64_t max_value = d.lengths[t] - 2;
  int64_t v = s;
  if (__builtin_expect(v == max_value, 0)) {
    const BypassResult b = native_decode_bypass(x, r, max_value);
    x = b.x;
    r.p = b.p;
    r.overrun = b.overrun;
    if (b.status != Status::kOk) return b.status;
    v = b.v;
  }
  const int64_t o = v + d.offsets[t];
  if (__builtin_expect(o < INT32_MIN || o > INT32_MAX, 0)) return Status::kCorrupt;
  *out = static_cast<int32_t>(o);
  return Status::kOk;
}

// One lane with tables in `ctx` (host or device pointers). Indexes must already be validated.
// Forced inline: the CPU entry point below builds its context in place, and as a call the loop
// ran ~13% slower (the context went through memory).
template <int K>
DUALRES_HD DUALRES_RANS_INLINE Status native_decode_lane(const uint8_t* data, size_t size, const int32_t* idx,
                                                         int64_t n, const DecodeCtx& ctx, int32_t* out) {
  if (size < 4 * K) return Status::kTruncated;
  ByteReader r{data, data + size};
  const DecodeCtx d = ctx;  // a local copy: stores to `out` cannot alias it
  uint32_t x[K];
  for (int k = 0; k < K; ++k) {
    x[k] = uint32_t{data[4 * k]} | uint32_t{data[4 * k + 1]} << 8 | uint32_t{data[4 * k + 2]} << 16 |
           uint32_t{data[4 * k + 3]} << 24;
    if (x[k] < kLow || x[k] >= (kLow << 8)) return Status::kCorrupt;
  }
  r.p += 4 * K;
  int64_t j = 0;
  for (; j + K <= n; j += K) {
    DUALRES_UNROLL
    for (int k = 0; k < K; ++k) {
      const Status st = native_decode_one(x[k], r, d, idx[j + k], out + j + k);
      if (st != Status::kOk) return st;
    }
    if (r.overrun) return Status::kTruncated;
  }
  for (int k = 0; j < n; ++j, ++k) {
    const Status st = native_decode_one(x[k], r, d, idx[j], out + j);
    if (st != Status::kOk) return st;
  }
  if (r.overrun) return Status::kTruncated;
  // A clean lane ends with every state back at its initial value and every byte consumed:
  // this catches nearly all corruptions (a random pass has probability ~2^-23 per state).
  for (int k = 0; k < K; ++k)
    if (x[k] != kLow) return Status::kCorrupt;
  if (r.p != r.end) return Status::kCorrupt;
  return Status::kOk;
}

// The CPU ops' entry point: the same lane loop with the context built from the host tables.
template <int K>
inline Status native_decode_lane(const uint8_t* data, size_t size, const int32_t* idx, int64_t n, const Prepared& pt,
                                 int32_t* out) {
  return native_decode_lane<K>(data, size, idx, n, DecodeCtx(pt), out);
}

// ---------------------------------------------------------------------------------------------
// Compat coder: CompressAI 1.2.8 / ryg Rans64 byte format.
//   state x in [2^31, 2^63); 32-bit little-endian words; encoder writes backwards and finally
//   the 64-bit state as two words (low first); precision 16; bypass chunks of 4 bits coded as
//   symbols of frequency 1 in a 4-bit range.
// ---------------------------------------------------------------------------------------------

constexpr uint64_t kLow64 = uint64_t{1} << 31;

struct WordBackBuffer {
  std::vector<uint32_t> buf;
  size_t pos;
  explicit WordBackBuffer(size_t cap) : buf(cap < 16 ? 16 : cap), pos(buf.size()) {}
  inline void reserve_front(size_t need) {
    if (pos >= need) return;
    const size_t used = buf.size() - pos;
    std::vector<uint32_t> bigger(2 * buf.size() + need);
    std::memcpy(bigger.data() + bigger.size() - used, buf.data() + pos, used * 4);
    buf.swap(bigger);
    pos = buf.size() - used;
  }
};

DUALRES_RANS_INLINE void compat_put(uint64_t& x, uint32_t*& p, uint32_t start, uint32_t freq, int bits) {
  const uint64_t x_max = ((kLow64 >> bits) << 32) * freq;
  if (x >= x_max) {
    *--p = static_cast<uint32_t>(x);
    x >>= 32;
  }
  x = ((x / freq) << bits) + (x % freq) + start;
}

// Encodes all symbols into CompressAI's format. Symbols whose bypass value does not fit the
// int32 arithmetic CompressAI uses (|value| >= 2^30) are rejected (CompressAI itself hangs).
inline Status compat_encode(const int32_t* sym, const int32_t* idx, int64_t n, const Prepared& pt,
                            std::vector<uint8_t>& out) {
  WordBackBuffer wb(static_cast<size_t>(n / 4 + 64));
  uint64_t x = kLow64;
  for (int64_t i = n - 1; i >= 0; --i) {
    wb.reserve_front(12);
    uint32_t* p = wb.buf.data() + wb.pos;
    const int32_t t = idx[i];
    const int32_t* c = pt.tv.cdfs + int64_t{t} * pt.tv.W;
    const int64_t max_value = pt.tv.lengths[t] - 2;
    int64_t v = int64_t{sym[i]} - pt.tv.offsets[t];
    if (v < 0 || v >= max_value) {
      const uint64_t raw = raw_from_value(v, max_value);
      if (raw >= (uint64_t{1} << 31)) return Status::kUnencodable;
      int nb = n_chunks(raw);
      for (int j = nb - 1; j >= 0; --j)
        compat_put(x, p, static_cast<uint32_t>(raw >> (j * kBypassBits)) & kBypassMax, 1, kBypassBits);
      while (nb >= static_cast<int>(kBypassMax)) {
        nb -= kBypassMax;
        compat_put(x, p, kBypassMax, 1, kBypassBits);
      }
      compat_put(x, p, static_cast<uint32_t>(nb), 1, kBypassBits);
      v = max_value;
    }
    compat_put(x, p, static_cast<uint32_t>(c[v]), static_cast<uint32_t>(c[v + 1] - c[v]), kCompatPrecision);
    wb.pos = static_cast<size_t>(p - wb.buf.data());
  }
  wb.reserve_front(2);
  wb.buf[--wb.pos] = static_cast<uint32_t>(x >> 32);
  wb.buf[--wb.pos] = static_cast<uint32_t>(x);
  const size_t words = wb.buf.size() - wb.pos;
  out.resize(words * 4);
  for (size_t w = 0; w < words; ++w) {
    const uint32_t v = wb.buf[wb.pos + w];
    for (int b = 0; b < 4; ++b) out[4 * w + b] = static_cast<uint8_t>(v >> (8 * b));
  }
  return Status::kOk;
}

// The compat decoder's tables (FORMAT.md, "Compat stream"): per row, 64 buckets of 1024 slots,
// each naming the symbol that holds its first slot and that symbol's packed start and frequency.
// Built once per set of tables (prepare_all: the RansCompatTables handle, kept across calls) or
// per call for the rows the indexes name (prepare_used). Self-contained: the decoder reads these
// arrays only, never the tensors they were built from, so a handle stays memory-safe whatever
// later happens to those tensors.
struct CompatTables {
  static constexpr int kBuckets = 1 << kCompatBucketBits;
  struct Row {
    uint32_t sf[kBuckets + 1] = {};   // packed_start_freq of sym[k]
    uint16_t sym[kBuckets + 1] = {};  // bucket_first_symbols (sym[kBuckets]: the last symbol)
    int32_t offset = 0;
    int32_t max_value = -1;  // the escape symbol, cdf_lengths - 2; -1: the row cannot decode
    int64_t cdf = 0;         // the row's CDF in `cdf` (0: the placeholder of rows that cannot decode)
  };
  std::vector<Row> rows;
  // The CDFs of the rows built, back to back, for the bisection; it starts with {0, 2^16}, the
  // CDF the rows that cannot decode point at, so that no row can lead a read astray.
  std::vector<int32_t> cdf;
  std::vector<const char*> row_error;  // prepare_all: why row t cannot decode (nullptr: it can)
  int64_t T = 0;
  bool all_usable = false;  // prepare_all: every row can decode (no index needs checking)

  // Every row. A row that is not a 16-bit CDF is recorded and is an error only for the indexes
  // naming it (check_indexes).
  void prepare_all(const TableView& tv) {
    T = tv.T;
    row_error.assign(static_cast<size_t>(T), nullptr);
    std::vector<uint8_t> use(static_cast<size_t>(T), 1);
    all_usable = true;
    for (int64_t t = 0; t < T; ++t) {
      row_error[t] = row_problem(tv, t);
      if (row_error[t] != nullptr) {
        use[t] = 0;
        all_usable = false;
      }
    }
    build(tv, use.data());
  }

  // The rows named by idx[0..n), each of which must be a 16-bit CDF; an index outside [0, T) or
  // a row that is not is an error (nullptr or its message). With at least as many symbols as
  // table entries all rows between the smallest and largest index are built when they all can
  // decode (marking the rows used cost a pass over the indexes); otherwise only the rows used.
  const char* prepare_used(const TableView& tv, const int32_t* idx, int64_t n) {
    T = tv.T;
    row_error.assign(static_cast<size_t>(T), "cdfs: a row these indexes do not use was not prepared");
    all_usable = false;
    std::vector<uint8_t> use(static_cast<size_t>(T), 0);
    if (n > 0) {
      int32_t lo = idx[0], hi = idx[0];
      for (int64_t i = 0; i < n; ++i) {  // vectorised min/max
        lo = lo < idx[i] ? lo : idx[i];
        hi = hi > idx[i] ? hi : idx[i];
      }
      if (lo < 0 || hi >= T) return "indexes: value out of range [0, number of CDF tables)";
      bool range = n >= (int64_t{hi} - lo + 1) * tv.W;
      for (int64_t t = lo; range && t <= hi; ++t) range = row_problem(tv, t) == nullptr;
      if (range) {
        std::fill(use.begin() + lo, use.begin() + hi + 1, uint8_t{1});
      } else {
        for (int64_t i = 0; i < n; ++i) use[idx[i]] = 1;
        for (int64_t t = lo; t <= hi; ++t)
          if (use[t])
            if (const char* e = row_problem(tv, t)) return e;
      }
    }
    for (int64_t t = 0; t < T; ++t)
      if (use[t]) row_error[t] = nullptr;
    build(tv, use.data());
    return nullptr;
  }

  // Every index in [0, T) and naming a row that can decode (nullptr or a message). Out-of-range
  // indexes are also caught by the decoder itself (kBadIndex).
  const char* check_indexes(const int32_t* idx, int64_t n) const {
    if (all_usable) return nullptr;
    for (int64_t i = 0; i < n; ++i) {
      if (idx[i] < 0 || idx[i] >= T) return "indexes: value out of range [0, number of CDF tables)";
      if (row_error[idx[i]] != nullptr) return row_error[idx[i]];
    }
    return nullptr;
  }

 private:
  static const char* row_problem(const TableView& tv, int64_t t) {
    int p = 0;
    if (const char* e = check_table(tv, t, &p)) return e;
    if (p != kCompatPrecision) return "cdfs: CompressAI's format needs 16-bit tables (rows ending at 65536)";
    return nullptr;
  }

  void build(const TableView& tv, const uint8_t* use) {
    int64_t total = 2;
    for (int64_t t = 0; t < T; ++t)
      if (use[t]) total += tv.lengths[t];
    cdf.resize(static_cast<size_t>(total));
    cdf[0] = 0;
    cdf[1] = 1 << kCompatPrecision;
    rows.assign(static_cast<size_t>(T), Row{});
    int64_t at = 2;
    for (int64_t t = 0; t < T; ++t) {
      Row& r = rows[t];
      r.offset = tv.offsets[t];
      if (!use[t]) continue;
      const int32_t* c = tv.cdfs + t * tv.W;
      const int32_t len = tv.lengths[t];
      r.max_value = len - 2;
      r.cdf = at;
      std::copy(c, c + len, cdf.begin() + at);
      at += len;
      bucket_first_symbols(c, len, kCompatBucketBits, kCompatPrecision - kCompatBucketBits, r.sym);
      for (int k = 0; k <= kBuckets; ++k) r.sf[k] = packed_start_freq(c, r.sym[k]);
    }
  }
};

// Where the compat decoder puts each decoded value v at position i: the symbols themselves, or
// dequantised as CompressAI's decompress does it, T(v) + means[i] (or T(v) without means), in the
// same pass (the decode loop waits on its serial chain; the stores cost next to nothing there).
struct CompatSymbols {
  int32_t* out;
  DUALRES_RANS_INLINE void operator()(int64_t i, int32_t v) const { out[i] = v; }
};
template <class T, bool kMeans>
struct CompatDequantized {
  T* out;
  const T* means;
  DUALRES_RANS_INLINE void operator()(int64_t i, int32_t v) const {
    if constexpr (kMeans)
      out[i] = static_cast<T>(v) + means[i];
    else
      out[i] = static_cast<T>(v);
  }
};

// Decoder state for CompressAI streams; also the state of a RansDecoder between decode_stream calls.
struct CompatDecoder {
  const uint8_t* data = nullptr;
  size_t size = 0;
  size_t pos = 0;  // next byte to read
  uint64_t x = 0;
  bool overrun = false;

  DUALRES_RANS_INLINE uint32_t word() {
    if (pos + 4 <= size) {
      const uint8_t* q = data + pos;
      pos += 4;
      return uint32_t{q[0]} | uint32_t{q[1]} << 8 | uint32_t{q[2]} << 16 | uint32_t{q[3]} << 24;
    }
    overrun = true;
    return 0;
  }
  // Reads the initial 64-bit state (the first two words).
  Status init(const uint8_t* d, size_t s) {
    data = d;
    size = s;
    pos = 0;
    overrun = false;
    const uint64_t lo = word(), hi = word();
    if (overrun) return Status::kTruncated;
    x = lo | hi << 32;
    if (x < kLow64 || x >= (uint64_t{1} << 63)) return Status::kCorrupt;
    return Status::kOk;
  }
  // Branch-free when a whole word is left (whether a word is needed is unpredictable).
  DUALRES_RANS_INLINE void renorm() {
    if (pos + 4 <= size) {
      const uint64_t need = x < kLow64;
      uint32_t w;
      std::memcpy(&w, data + pos, 4);  // little-endian host assumed (x86/ARM), as in CompressAI
      x = (x << (32 * need)) | (uint64_t{w} & (0 - need));
      pos += 4 * need;
    } else if (x < kLow64) {
      x = (x << 32) | word();
    }
  }
  DUALRES_RANS_INLINE uint32_t get_bits() {
    const uint32_t val = static_cast<uint32_t>(x) & kBypassMax;
    x >>= kBypassBits;
    renorm();
    return val;
  }
  static DUALRES_RANS_INLINE uint64_t load_u16(const uint32_t* p, int half) {
    uint16_t v;  // the host's byte order: the packed entries are written on this machine
    std::memcpy(&v, reinterpret_cast<const uint8_t*>(p) + 2 * half, 2);
    return v;
  }

  // The bypass value after an escape symbol (rare). Out of line, with the state by value: inline,
  // its registers crowded the hot loop's chain values out to the stack.
  struct Escape {
    uint64_t x;
    size_t pos;
    bool overrun;
    Status status;
    int64_t v;
  };
  [[gnu::noinline]] static Escape escape(CompatDecoder d, int64_t max_value) {
    uint32_t val = d.get_bits();
    int nb = static_cast<int>(val);
    while (val == kBypassMax) {
      if (nb > 8 || d.overrun) return {d.x, d.pos, d.overrun, Status::kCorrupt, 0};  // int32 raw: <= 8 chunks
      val = d.get_bits();
      nb += static_cast<int>(val);
    }
    if (nb > 8) return {d.x, d.pos, d.overrun, Status::kCorrupt, 0};
    uint64_t raw = 0;
    for (int j = 0; j < nb; ++j) raw |= uint64_t{d.get_bits()} << (j * kBypassBits);
    if (raw >= (uint64_t{1} << 31)) return {d.x, d.pos, d.overrun, Status::kCorrupt, 0};
    return {d.x, d.pos, d.overrun, Status::kOk, value_from_raw(raw, max_value)};
  }

  // Decodes n symbols, continuing from the current state, into sink (CompatSymbols or
  // CompatDequantized). Works on a local copy of the decoder (kept in registers; a member-based
  // loop was 3x slower in the big op translation unit) and stores it back at the end.
  // Every index must name a row of ct that can decode (prepare_used guarantees it, check_indexes
  // after prepare_all); an index outside [0, T) stops the decode with kBadIndex.
  template <class Sink>
  Status decode(const int32_t* idx, int64_t n, const CompatTables& ct, Sink sink) {
    CompatDecoder d = *this;
    const Status st = d.decode_local(idx, n, ct, sink);
    *this = d;
    return st;
  }
  Status decode(const int32_t* idx, int64_t n, const CompatTables& ct, int32_t* out) {
    return decode(idx, n, ct, CompatSymbols{out});
  }

  // The symbol of slot among lo .. hi of CDF c (c[lo] <= slot < c[hi + 1]), by a bisection
  // whose steps are selects (its branches would be as unpredictable as the slots).
  static DUALRES_RANS_INLINE uint32_t bisect(const int32_t* c, uint32_t lo, uint32_t hi, uint32_t slot) {
    for (uint32_t len = hi - lo + 1; len > 1;) {
      const uint32_t half = len >> 1;
      lo = static_cast<uint32_t>(c[lo + half]) <= slot ? lo + half : lo;
      len -= half;
    }
    return lo;
  }
  // The symbol of the state's slot in row r by bisection between the bucket's entries k and k + 1,
  // then the step with the checked renormalisation: the path of the buckets' middle symbols and
  // of the stream's last bytes.
  DUALRES_RANS_INLINE uint32_t slow_step(const CompatTables::Row& r, const int32_t* cdf, uint64_t k) {
    constexpr uint32_t mask = (1u << kCompatPrecision) - 1;
    const uint32_t slot = static_cast<uint32_t>(x) & mask;
    const int32_t* c = cdf + r.cdf;
    const uint32_t s = bisect(c, r.sym[k], r.sym[k + 1], slot);
    x = uint64_t{static_cast<uint32_t>(c[s + 1] - c[s])} * (x >> kCompatPrecision) + slot - static_cast<uint32_t>(c[s]);
    renorm();
    return s;
  }

  // The lookup (FORMAT.md, "Compat stream"): bucket k = slot >> 10 of row t starts in symbol
  // s0 = sym[k], and its last slot is in s1 = sym[k + 1]. A slot in s0 (slot - start0 < freq0)
  // or in s1 (slot >= start1) is resolved with the two packed entries and selects, no branch;
  // only a slot in a symbol strictly between them bisects the row's CDF. The step then forms the
  // plain and the renormalised next state from the same product and selects one, and the next
  // bucket index with it (from the state kept, or from the word read).
  //
  // Bounds: the fast path reads a stream word unchecked, so symbols are decoded in runs no longer
  // than the whole words left (each step takes at most one); the slow and escape paths read
  // through the checked word() and shorten the run. With fewer than 4 bytes left, one symbol at
  // a time goes through the slow path.
  template <class Sink>
  DUALRES_RANS_INLINE Status decode_local(const int32_t* __restrict idx, int64_t n, const CompatTables& ct, Sink sink) {
    using Row = CompatTables::Row;
    const Row* __restrict rows = ct.rows.data();
    const int32_t* __restrict cdf = ct.cdf.data();
    const uint64_t T = static_cast<uint64_t>(ct.T);
    constexpr uint32_t shift = kCompatPrecision - kCompatBucketBits;
    constexpr uint64_t kmask = (uint64_t{1} << kCompatBucketBits) - 1;
    constexpr uint64_t mask = (uint64_t{1} << kCompatPrecision) - 1;
    const uint8_t* const bytes = data;
    uint64_t k = (x >> shift) & kmask;
    int64_t i = 0;
    while (i < n) {
      int64_t end = std::min<int64_t>(n, i + static_cast<int64_t>((size - pos) / 4));
      for (; i < end; ++i) {
        const uint32_t t = static_cast<uint32_t>(idx[i]);
        if (__builtin_expect(t >= T, 0)) return Status::kBadIndex;
        const Row& r = rows[t];
        // The four 16-bit halves loaded separately: each feeds the chain without a shift or mask.
        const uint64_t st0 = load_u16(r.sf + k, 0), fm0 = load_u16(r.sf + k, 1);
        const uint64_t st1 = load_u16(r.sf + k + 1, 0), fm1_1 = load_u16(r.sf + k + 1, 1);
        const uint32_t s0 = r.sym[k], s1 = r.sym[k + 1];
        const uint64_t slot = x & mask;
        // Negative both: slot is past s0 (slot - st0 > fm0) and before s1 (slot < st1).
        const int64_t past0 = static_cast<int64_t>(st0 + fm0 - slot), from1 = static_cast<int64_t>(slot - st1);
        uint32_t s;
        if (__builtin_expect((past0 & from1) >= 0, 1)) {
          uint32_t w;
          std::memcpy(&w, bytes + pos, 4);  // little-endian host assumed (x86/ARM), as in CompressAI
          uint64_t st = st0, fm1 = fm0;
          s = s0;
#if defined(__x86_64__) && defined(__GNUC__)
          // Spelled out: GCC turned these selects into unpredictable branches.
          asm("cmp %[b], %[slot]\n\tcmovae %[st1], %[st]\n\tcmovae %[f1], %[f]\n\tcmovae %[s1], %[s]"
              : [st] "+r"(st), [f] "+r"(fm1), [s] "+r"(s)
              : [b] "r"(st1), [slot] "r"(slot), [st1] "r"(st1), [f1] "r"(fm1_1), [s1] "r"(s1)
              : "cc");
#else
          const bool up = slot >= st1;
          st = up ? st1 : st;
          fm1 = up ? fm1_1 : fm1;
          s = up ? s1 : s;
#endif
          // x = freq * q + slot - start = (freq - 1) * q + r; with the word, (x << 32) | w comes
          // from the same product ((freq - 1) * (q << 32)), in parallel with x.
          const uint64_t q = x >> kCompatPrecision;
          const uint64_t rest = q + slot - st;
          const uint64_t keep = fm1 * q + rest;
          const uint64_t renormed = fm1 * (q << 32) + ((rest << 32) | w);
          const uint64_t next = pos + 4;
          const uint64_t k_keep = (keep >> shift) & kmask, k_renormed = (w >> shift) & kmask;
#if defined(__x86_64__) && defined(__GNUC__)
          uint64_t nx = keep, np = pos, nk = k_keep;
          asm("cmp %[low], %[keep]\n\tcmovb %[ren], %[nx]\n\tcmovb %[next], %[np]\n\tcmovb %[kr], %[nk]"
              : [nx] "+r"(nx), [np] "+r"(np), [nk] "+r"(nk)
              : [keep] "r"(keep), [low] "r"(kLow64), [ren] "r"(renormed), [next] "r"(next), [kr] "r"(k_renormed)
              : "cc");
          x = nx;
          pos = np;
          k = nk;
#else
          const bool need = keep < kLow64;
          x = need ? renormed : keep;
          pos = need ? next : pos;
          k = need ? k_renormed : k_keep;
#endif
        } else {
          s = slow_step(r, cdf, k);
          k = (x >> shift) & kmask;
          end = std::min<int64_t>(end, i + 1 + static_cast<int64_t>((size - pos) / 4));
        }
        int64_t v = s;
        if (__builtin_expect(v == r.max_value, 0)) {
          const Escape e = escape(*this, r.max_value);
          x = e.x;
          pos = e.pos;
          overrun = e.overrun;
          if (e.status != Status::kOk) return e.status;
          v = e.v;
          k = (x >> shift) & kmask;
          end = std::min<int64_t>(end, i + 1 + static_cast<int64_t>((size - pos) / 4));
        }
        const int64_t o = v + r.offset;
        if (__builtin_expect(o < INT32_MIN || o > INT32_MAX, 0)) return Status::kCorrupt;
        sink(i, static_cast<int32_t>(o));
      }
      if (i == n || pos + 4 <= size) continue;
      // Fewer than 4 bytes left: one symbol through the checked path.
      const uint32_t t = static_cast<uint32_t>(idx[i]);
      if (t >= T) return Status::kBadIndex;
      const Row& r = rows[t];
      int64_t v = slow_step(r, cdf, k);
      if (v == r.max_value) {
        const Escape e = escape(*this, r.max_value);
        x = e.x;
        pos = e.pos;
        overrun = e.overrun;
        if (e.status != Status::kOk) return e.status;
        v = e.v;
      }
      k = (x >> shift) & kmask;
      const int64_t o = v + r.offset;
      if (o < INT32_MIN || o > INT32_MAX) return Status::kCorrupt;
      sink(i, static_cast<int32_t>(o));
      ++i;
    }
    return overrun ? Status::kTruncated : Status::kOk;
  }
  // After a whole-stream decode: the encoder's initial state is back and every byte is used.
  bool finished_cleanly() const { return !overrun && x == kLow64 && pos == size; }
};

}  // namespace dualres::rans
