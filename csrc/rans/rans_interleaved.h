// rans_interleaved.h -- header-only, torch-free core of the interleaved rANS stream, version 2
// (csrc/rans/FORMAT.md, "Interleaved stream, version 2").
//
// W (1, 2, 4, 8, 16 or 32) rANS states share ONE stream of 16-bit words. Symbol i of state ("lane") k is
// symbol i*W + k of the flattened sequence, so W consecutive symbols form one "step" that a warp
// (one lane per state) or a W-lane SIMD register codes at once. States are 32-bit in
// [2^16, 2^32); renormalisation moves exactly one 16-bit word, so a lane emits/consumes 0 or 1
// word per coding operation.
//
// Word order (the rule every coder here shares): the decoder runs the steps in order; within a
// step it first decodes every active lane's table symbol, then runs the bypass sub-steps of the
// lanes that decoded the escape symbol (sub-step j: every lane with more than j bypass chunks
// reads its chunk j). After each of these operations the lanes that need a word read them IN
// LANE ORDER from a shared cursor: lane k reads word cursor + popc(need & ((1 << k) - 1)), then
// the cursor advances by popc(need). A warp does this with __ballot_sync / __popc; a SIMD decoder
// with an expand (vpexpandd, or a shuffle table on AVX2). The encoder runs everything backwards.
//
// Groups: the step range [0, S) is cut into G groups (group j: steps [S*j/G, S*(j+1)/G)), each
// with its own W start states and word range, so G decoders (threads, warps) can run at once.
// "Chained" streams are one encoder chain with split points (Recoil-style: the saved states and
// word offsets at the group boundaries); otherwise every group is encoded from the initial state
// and can be encoded in parallel too. Either way a group's decoder must end on the next group's
// start states (chained) or the initial state, with exactly its words consumed.
//
// Three users share the pieces marked DUALRES_HD: the scalar CPU coder (below), the CPU SIMD
// coders (csrc/rans/cpu/rans_interleaved_simd.cpp, which must write the same bytes) and the warp
// body (IvWarpCoder, below), which the CUDA kernel runs with one warp per group and the host
// runs in lock-step for W lanes with ballot emulated (IvHostLanes) -- the same source.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "rans_stream.h"  // Status, crc32c, varints, DUALRES_HD, bypass constants

namespace dualres::rans {

constexpr uint8_t kIvVersion = 2;
constexpr uint32_t kIvLow = 1u << 16;          // state interval [2^16, 2^32)
constexpr uint32_t kIvBypassLimit = 1u << 28;  // a bypass chunk emits a word when x >= 2^28
constexpr int kIvMaxWidth = 32;
// Widths a stream may use: powers of two up to a warp. 16 and 32 fill an AVX-512 register or a
// warp; the smaller ones exist for short streams, where every state costs 4 bytes of flush.
DUALRES_HD inline bool iv_width_ok(int w) {
  return w >= 1 && w <= kIvMaxWidth && (w & (w - 1)) == 0;
}
constexpr size_t kIvFixedHeader = 10;  // magic(2) version precision width flags crc32c(4)
constexpr uint8_t kIvFlagChained = 1;
constexpr int64_t kIvMaxGroups = 1 << 16;
// Bypass chunks of one escaped symbol: the count chunks (15 means "15 more, continue") and at
// most 9 raw chunks (every int32 symbol with any int32 offset); decoders reject more.
constexpr int kIvMaxRawChunks = 9;
constexpr int kIvMaxChunks = kIvMaxRawChunks + 1;

DUALRES_HD inline int iv_popc(uint32_t m) {
#if defined(__CUDA_ARCH__)
  return __popc(m);
#else
  return __builtin_popcount(m);
#endif
}

// The rank of lane k among the lanes of `mask` (the word-order rule above).
DUALRES_HD inline int iv_rank(uint32_t mask, int k) {
  return iv_popc(mask & ((1u << k) - 1u));
}

// ---------------------------------------------------------------------------------------------
// Prepared tables (built once per table set, reused across calls)
// ---------------------------------------------------------------------------------------------

// A view of the prepared tables, with host or device pointers.
//   sf[t * stride + s]      start | (freq - 1) << 16 of symbol s of row t (s <= len - 2, escape last)
//   bucket[t << bbits | b]  s_lo | s_hi << 16: the symbols holding slots b << bshift and
//                           ((b + 1) << bshift) - 1; the decoder searches only [s_lo, s_hi]
//   esc[t] = len - 2 (the escape symbol), off[t] = offsets[t]
struct IvTablesView {
  const uint32_t* sf = nullptr;
  const uint32_t* bucket = nullptr;
  const int32_t* esc = nullptr;
  const int32_t* off = nullptr;
  int64_t T = 0, stride = 0;
  uint32_t precision = 16, bbits = 8, bshift = 8;
};

// Owns the prepared arrays. Rows that are not valid CDFs are marked (row_ok = 0); using one is
// an error found by check_indexes. Every valid row must share one precision for a row to be
// usable together with the others; `uniform` says all rows are valid with one precision (then
// an index range check is all a call needs).
struct IvPrepared {
  std::vector<uint32_t> sf, bucket;
  std::vector<int32_t> esc, off;
  std::vector<uint8_t> row_ok;
  std::vector<uint8_t> row_precision;
  int64_t T = 0, stride = 0;
  int precision = 16;  // the most common valid precision; rows with another one are not usable
  bool uniform = true;

  // Returns nullptr or an error message (only for malformed tensors: invalid rows are recorded).
  const char* prepare(const TableView& tv) {
    T = tv.T;
    stride = std::max<int64_t>(tv.W - 1, 1);
    row_ok.assign(static_cast<size_t>(T), 0);
    row_precision.assign(static_cast<size_t>(T), 0);
    int count[17] = {0};
    for (int64_t t = 0; t < T; ++t) {
      int p = 0;
      if (check_table(tv, t, &p) == nullptr) {
        row_ok[t] = 1;
        row_precision[t] = static_cast<uint8_t>(p);
        ++count[p];
      }
    }
    precision = 16;
    for (int p = 1; p <= 16; ++p)
      if (count[p] > count[precision]) precision = p;
    uniform = count[precision] == T;
    for (int64_t t = 0; t < T; ++t)
      if (row_ok[t] && row_precision[t] != precision) row_ok[t] = 0;
    const uint32_t bb = bucket_bits(), bs = static_cast<uint32_t>(precision) - bb;
    sf.assign(static_cast<size_t>(T * stride), 0);
    bucket.assign(static_cast<size_t>(T) << bb, 0);
    esc.assign(static_cast<size_t>(T), 0);
    off.assign(static_cast<size_t>(T), 0);
    std::vector<int32_t> first;
    for (int64_t t = 0; t < T; ++t) {
      off[t] = tv.offsets[t];
      if (!row_ok[t]) continue;
      const int32_t* c = tv.cdfs + t * tv.W;
      const int32_t len = tv.lengths[t];
      esc[t] = len - 2;
      for (int32_t s = 0; s + 1 < len; ++s) sf[t * stride + s] = packed_start_freq(c, s);
      // The last symbol of bucket k is the first of bucket k + 1, or the one before when that
      // one starts exactly at the bucket edge.
      first.resize((size_t{1} << bb) + 1);
      bucket_first_symbols(c, len, static_cast<int>(bb), static_cast<int>(bs), first.data());
      uint32_t* b = bucket.data() + (t << bb);
      for (uint32_t k = 0; k < (1u << bb); ++k) {
        const int32_t next = first[k + 1];
        const int32_t e = next - (c[next] == static_cast<int32_t>((k + 1) << bs));
        b[k] = static_cast<uint32_t>(first[k]) | static_cast<uint32_t>(e) << 16;
      }
    }
    return nullptr;
  }
  uint32_t bucket_bits() const { return precision < 8 ? static_cast<uint32_t>(precision) : 8u; }
  IvTablesView view() const {
    IvTablesView v;
    v.sf = sf.data();
    v.bucket = bucket.data();
    v.esc = esc.data();
    v.off = off.data();
    v.T = T;
    v.stride = stride;
    v.precision = static_cast<uint32_t>(precision);
    v.bbits = bucket_bits();
    v.bshift = v.precision - v.bbits;
    return v;
  }
  // Every index in [0, T) and naming a usable row; nullptr or a message.
  const char* check_indexes(const int32_t* idx, int64_t n) const {
    int32_t lo = 0, hi = 0;
    if (n > 0) {
      lo = hi = idx[0];
      for (int64_t i = 0; i < n; ++i) {  // vectorised min/max
        lo = std::min(lo, idx[i]);
        hi = std::max(hi, idx[i]);
      }
    }
    return check_indexes(idx, n, lo, hi);
  }
  // The same with lo and hi, the minimum and maximum of idx[0..n), already known (n > 0).
  const char* check_indexes(const int32_t* idx, int64_t n, int32_t lo, int32_t hi) const {
    if (n > 0 && (lo < 0 || hi >= T)) return "indexes: value out of range [0, number of CDF tables)";
    if (uniform) return nullptr;
    for (int64_t i = 0; i < n; ++i)
      if (!row_ok[idx[i]])
        return "cdfs: a row used is not a valid CDF of the tables' common precision (rows must start at 0, "
               "increase strictly and end at 1 << precision, 1 <= precision <= 16)";
    return nullptr;
  }
};

// ---------------------------------------------------------------------------------------------
// Per-lane coding steps (shared by every coder)
// ---------------------------------------------------------------------------------------------

// Encoder renormalisation before a table symbol: emits (returns true, word = low 16 bits) iff
// x >= freq << (32 - P) (written as freq-1 to stay in 32 bits when freq = 2^P).
DUALRES_HD DUALRES_RANS_INLINE bool iv_enc_needs_word(uint32_t x, uint32_t sfe, uint32_t precision) {
  const uint32_t fm1 = sfe >> 16;
  const uint32_t lim = (fm1 << (32 - precision)) | ((1u << (32 - precision)) - 1u);  // x_max - 1
  return x > lim;
}
// x = C(s, x) after renormalisation. A hardware (or double) division: exact for all x < 2^32.
DUALRES_HD DUALRES_RANS_INLINE uint32_t iv_enc_code(uint32_t x, uint32_t sfe, uint32_t precision) {
  const uint32_t freq = (sfe >> 16) + 1, start = sfe & 0xFFFFu;
  const uint32_t q = x / freq;
  return x + start + q * ((1u << precision) - freq);
}
DUALRES_HD DUALRES_RANS_INLINE bool iv_enc_bypass_needs_word(uint32_t x) {
  return x >= kIvBypassLimit;
}
DUALRES_HD DUALRES_RANS_INLINE uint32_t iv_enc_bypass_code(uint32_t x, uint32_t chunk) {
  return (x << 4) | chunk;
}

// Decoder: the table symbol of `slot` in row t. The bucket narrows it to [s_lo, s_hi] (one
// symbol for nearly every slot); a binary search of at most bbits steps settles the rest.
DUALRES_HD DUALRES_RANS_INLINE uint32_t iv_lookup(const IvTablesView& tb, int32_t t, uint32_t slot) {
  const uint32_t e = tb.bucket[(static_cast<int64_t>(t) << tb.bbits) | (slot >> tb.bshift)];
  uint32_t lo = e & 0xFFFFu, hi = e >> 16;
  const uint32_t* row = tb.sf + t * tb.stride;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) >> 1;
    if ((row[mid] & 0xFFFFu) <= slot)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}
DUALRES_HD DUALRES_RANS_INLINE uint32_t iv_dec_code(uint32_t x, uint32_t sfe, uint32_t precision) {
  const uint32_t freq = (sfe >> 16) + 1, start = sfe & 0xFFFFu;
  const uint32_t slot = x & ((1u << precision) - 1u);
  return freq * (x >> precision) + slot - start;
}

// The bypass chunks of an escaped value, in decoder order: count chunks then raw chunks, low
// first (FORMAT.md "Tables and escapes"). Returns the chunk count (<= kIvMaxChunks).
DUALRES_HD inline int iv_escape_chunks(int64_t v, int64_t max_value, uint8_t* chunks) {
  const uint64_t raw = raw_from_value(v, max_value);
  const int nb = n_chunks(raw);
  int n = 0;
  int rest = nb;
  while (rest >= static_cast<int>(kBypassMax)) {
    chunks[n++] = kBypassMax;
    rest -= kBypassMax;
  }
  chunks[n++] = static_cast<uint8_t>(rest);
  for (int j = 0; j < nb; ++j) chunks[n++] = static_cast<uint8_t>((raw >> (j * kBypassBits)) & kBypassMax);
  return n;
}

// The decoder side of one lane's bypass chunks: fed one chunk per sub-step until done().
struct IvBypassReader {
  int32_t phase = 0;  // 0: count chunks, 1: raw chunks, 2: done
  int32_t nb = 0, got = 0;
  uint64_t raw = 0;
  // Returns false on a count beyond the int32 range (corrupt stream).
  DUALRES_HD DUALRES_RANS_INLINE bool feed(uint32_t val) {
    if (phase == 0) {
      nb += static_cast<int32_t>(val);
      if (nb > kIvMaxRawChunks) return false;
      if (val != kBypassMax) phase = nb == 0 ? 2 : 1;
    } else {
      raw |= uint64_t{val} << (got * kBypassBits);
      if (++got == nb) phase = 2;
    }
    return true;
  }
  DUALRES_HD bool done() const { return phase == 2; }
};

// Group g of G covers steps [iv_group_begin(S, G, g), iv_group_begin(S, G, g + 1)).
DUALRES_HD inline int64_t iv_group_begin(int64_t steps, int64_t groups, int64_t g) {
  return static_cast<int64_t>((static_cast<__int128>(steps) * g) / groups);
}
DUALRES_HD inline int64_t iv_steps(int64_t n, int width) {
  return (n + width - 1) / width;
}

// ---------------------------------------------------------------------------------------------
// Stream header
// ---------------------------------------------------------------------------------------------

struct IvHeader {
  int precision = 16, width = 32;
  bool chained = false;
  int64_t symbols = 0, groups = 0;
  std::vector<uint64_t> word_offset;  // groups + 1 offsets into the word array
  size_t states_pos = 0;              // groups * width u32 start states
  size_t words_pos = 0;               // the u16 words
  uint64_t words = 0;
};

// Validates everything against the size and the caller's symbol count (expected < 0: any) before
// allocating from stream numbers; the CRC last.
inline Status iv_parse_header(const uint8_t* data, size_t size, int64_t expected_symbols, IvHeader& h) {
  if (size < kIvFixedHeader) return size == 0 ? Status::kTruncated : Status::kBadHeader;
  if (data[0] != kMagic0 || data[1] != kMagic1 || data[2] != kIvVersion) return Status::kBadHeader;
  h.precision = data[3];
  h.width = data[4];
  if (h.precision < 1 || h.precision > 16 || !iv_width_ok(h.width)) return Status::kBadHeader;
  if (data[5] & ~kIvFlagChained) return Status::kBadHeader;
  h.chained = (data[5] & kIvFlagChained) != 0;
  const uint32_t crc = uint32_t{data[6]} | uint32_t{data[7]} << 8 | uint32_t{data[8]} << 16 | uint32_t{data[9]} << 24;
  size_t pos = kIvFixedHeader;
  uint64_t n = 0, g = 0;
  if (!get_varint(data, size, pos, n) || !get_varint(data, size, pos, g)) return Status::kBadHeader;
  if (expected_symbols >= 0 && n != static_cast<uint64_t>(expected_symbols)) return Status::kMismatch;
  if (n > (uint64_t{1} << 62)) return Status::kBadHeader;
  const uint64_t steps = (n + h.width - 1) / h.width;
  if ((n == 0) != (g == 0) || g > steps || g > static_cast<uint64_t>(kIvMaxGroups)) return Status::kBadHeader;
  if (g > (size - pos) / (4 * static_cast<uint64_t>(h.width))) return Status::kBadHeader;
  h.symbols = static_cast<int64_t>(n);
  h.groups = static_cast<int64_t>(g);
  h.word_offset.assign(static_cast<size_t>(g) + 1, 0);
  for (uint64_t j = 1; j < g; ++j) {
    uint64_t len = 0;
    if (!get_varint(data, size, pos, len) || len > size) return Status::kBadHeader;
    h.word_offset[j] = h.word_offset[j - 1] + len;
    if (h.word_offset[j] > size) return Status::kBadHeader;
  }
  const uint64_t state_bytes = g * 4 * static_cast<uint64_t>(h.width);
  if (state_bytes > size - pos) return Status::kTruncated;
  h.states_pos = pos;
  h.words_pos = pos + static_cast<size_t>(state_bytes);
  const size_t rest = size - h.words_pos;
  if (rest & 1) return Status::kBadHeader;
  h.words = rest / 2;
  if (g > 0) {
    if (h.word_offset[g - 1] > h.words) return Status::kTruncated;
    h.word_offset[g] = h.words;
  } else if (h.words != 0) {
    return Status::kBadHeader;
  }
  for (uint64_t j = 0; j < g * h.width; ++j) {
    const uint8_t* q = data + h.states_pos + 4 * j;
    const uint32_t x = uint32_t{q[0]} | uint32_t{q[1]} << 8 | uint32_t{q[2]} << 16 | uint32_t{q[3]} << 24;
    if (x < kIvLow) return Status::kCorrupt;
  }
  if (crc32c(data + kIvFixedHeader, size - kIvFixedHeader) != crc) return Status::kCorrupt;
  return Status::kOk;
}

DUALRES_HD inline uint32_t iv_load_u32(const uint8_t* q) {
  return uint32_t{q[0]} | uint32_t{q[1]} << 8 | uint32_t{q[2]} << 16 | uint32_t{q[3]} << 24;
}
DUALRES_HD inline uint32_t iv_load_u16(const uint8_t* q) {
  return uint32_t{q[0]} | uint32_t{q[1]} << 8;
}

// Encoder output of one group: its W start states and its words in decoder order.
struct IvGroupOut {
  uint32_t states[kIvMaxWidth];
  std::vector<uint16_t> words;
};

// The stream from the encoded groups (words already in decoder order), sealed with its CRC.
inline void iv_assemble(std::vector<uint8_t>& out, int precision, int width, bool chained, int64_t n,
                        const std::vector<IvGroupOut>& groups) {
  out.assign(kIvFixedHeader, 0);  // bytes 6..9: the CRC, written last
  out[0] = kMagic0;
  out[1] = kMagic1;
  out[2] = kIvVersion;
  out[3] = static_cast<uint8_t>(precision);
  out[4] = static_cast<uint8_t>(width);
  out[5] = chained ? kIvFlagChained : 0;
  put_varint(out, static_cast<uint64_t>(n));
  put_varint(out, groups.size());
  size_t words = 0;
  for (size_t j = 0; j < groups.size(); ++j) {
    if (j + 1 < groups.size()) put_varint(out, groups[j].words.size());
    words += groups[j].words.size();
  }
  const size_t spos = out.size();
  out.resize(spos + groups.size() * 4 * width + 2 * words);
  uint8_t* p = out.data() + spos;
  for (const IvGroupOut& g : groups)
    for (int k = 0; k < width; ++k)
      for (int b = 0; b < 4; ++b) *p++ = static_cast<uint8_t>(g.states[k] >> (8 * b));
  for (const IvGroupOut& g : groups) {
    for (uint16_t w : g.words) {
      *p++ = static_cast<uint8_t>(w);
      *p++ = static_cast<uint8_t>(w >> 8);
    }
  }
  seal_native<kIvFixedHeader>(out.data(), out.size());
}

// Embedded form (FORMAT.md, "Embedded interleaved streams"; rans_stream.h embed_native): the
// stream without magic, version, precision, CRC-32C and symbol count; kept: W, flags, then
// everything after the count. Validated like a decoder, both ways.
inline Status iv_embed_stream(const uint8_t* data, size_t size, int64_t symbols, int precision,
                              std::vector<uint8_t>& out) {
  return embed_native<kIvFixedHeader, IvHeader>(data, size, symbols, precision, out, iv_parse_header);
}
inline Status iv_restore_stream(const uint8_t* data, size_t size, int64_t symbols, int precision,
                                std::vector<uint8_t>& out) {
  return restore_native<kIvFixedHeader, kIvVersion, IvHeader>(data, size, symbols, precision, out, iv_parse_header);
}

// ---------------------------------------------------------------------------------------------
// Scalar coder (the reference: the SIMD coders and the warp body must match it byte for byte)
// ---------------------------------------------------------------------------------------------

// Words are appended in encoder order (the reverse of decoder order; within an operation the
// lanes emit in descending lane order) and the group's words are reversed at the end.
struct IvWordSink {
  std::vector<uint16_t>& w;
  DUALRES_RANS_INLINE void put(uint32_t x) { w.push_back(static_cast<uint16_t>(x)); }
};

// Encodes steps [s0, s1) of a group backwards, starting from states x (updated in place).
// Symbols must be validated (indexes usable) by the caller. Appends words in encoder order.
inline void iv_encode_steps_scalar(const int32_t* sym, const int32_t* idx, int64_t n, int width, int64_t s0, int64_t s1,
                                   const IvTablesView& tb, uint32_t* x, std::vector<uint16_t>& out) {
  const uint32_t P = tb.precision;
  uint8_t chunks[kIvMaxWidth][kIvMaxChunks];
  int nch[kIvMaxWidth];
  uint32_t sfe[kIvMaxWidth];
  for (int64_t s = s1 - 1; s >= s0; --s) {
    const int64_t base = s * width;
    const int active = static_cast<int>(std::min<int64_t>(width, n - base));
    int maxch = 0;
    for (int k = 0; k < active; ++k) {
      const int32_t t = idx[base + k];
      const int64_t max_value = tb.esc[t];
      int64_t v = int64_t{sym[base + k]} - tb.off[t];
      nch[k] = 0;
      if (v < 0 || v >= max_value) {
        nch[k] = iv_escape_chunks(v, max_value, chunks[k]);
        maxch = std::max(maxch, nch[k]);
        v = max_value;
      }
      sfe[k] = tb.sf[t * tb.stride + v];
    }
    for (int j = maxch - 1; j >= 0; --j)
      for (int k = active - 1; k >= 0; --k) {
        if (nch[k] <= j) continue;
        if (iv_enc_bypass_needs_word(x[k])) {
          out.push_back(static_cast<uint16_t>(x[k]));
          x[k] >>= 16;
        }
        x[k] = iv_enc_bypass_code(x[k], chunks[k][j]);
      }
    for (int k = active - 1; k >= 0; --k) {
      if (iv_enc_needs_word(x[k], sfe[k], P)) {
        out.push_back(static_cast<uint16_t>(x[k]));
        x[k] >>= 16;
      }
      x[k] = iv_enc_code(x[k], sfe[k], P);
    }
  }
}

// A bounds-checked shared word cursor over [begin, end) of the word array.
struct IvWordReader {
  const uint8_t* words;  // the stream's word array
  uint64_t pos, end;
  bool overrun = false;
  DUALRES_RANS_INLINE uint32_t next() {
    if (pos < end) return iv_load_u16(words + 2 * pos++);
    overrun = true;
    return 0;
  }
};

// Bypass sub-steps of one step (the lanes in `esc_mask` decoded the escape symbol); writes the
// decoded values. Shared by the scalar and SIMD decoders (escapes are rare).
inline Status iv_decode_bypass_scalar(uint32_t* x, uint32_t esc_mask, int width, const int32_t* idx,
                                      const IvTablesView& tb, IvWordReader& r, int32_t* out) {
  IvBypassReader br[kIvMaxWidth];
  uint32_t active = esc_mask;
  while (active) {
    for (int k = 0; k < width; ++k) {
      if (!(active >> k & 1)) continue;
      const uint32_t val = x[k] & kBypassMax;
      x[k] >>= kBypassBits;
      if (x[k] < kIvLow) x[k] = (x[k] << 16) | r.next();
      if (!br[k].feed(val)) return Status::kCorrupt;
      if (br[k].done()) active &= ~(1u << k);
    }
    if (r.overrun) return Status::kTruncated;
  }
  for (int k = 0; k < width; ++k) {
    if (!(esc_mask >> k & 1)) continue;
    const int32_t t = idx[k];
    const int64_t o = value_from_raw(br[k].raw, tb.esc[t]) + tb.off[t];
    if (o < INT32_MIN || o > INT32_MAX) return Status::kCorrupt;
    out[k] = static_cast<int32_t>(o);
  }
  return Status::kOk;
}

// Decodes steps [s0, s1) from states x and the reader; the caller checks the end states.
inline Status iv_decode_steps_scalar(const int32_t* idx, int64_t n, int width, int64_t s0, int64_t s1,
                                     const IvTablesView& tb, uint32_t* x, IvWordReader& r, int32_t* out) {
  const uint32_t P = tb.precision, mask = (1u << P) - 1u;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t base = s * width;
    const int active = static_cast<int>(std::min<int64_t>(width, n - base));
    uint32_t esc_mask = 0;
    for (int k = 0; k < active; ++k) {
      const int32_t t = idx[base + k];
      const uint32_t sym = iv_lookup(tb, t, x[k] & mask);
      x[k] = iv_dec_code(x[k], tb.sf[t * tb.stride + sym], P);
      if (x[k] < kIvLow) x[k] = (x[k] << 16) | r.next();
      if (static_cast<int32_t>(sym) == tb.esc[t]) {
        esc_mask |= 1u << k;
      } else {
        // The encoder codes table entry v only for symbol v + offset, which fits int32.
        const int64_t o = int64_t{sym} + tb.off[t];
        if (o > INT32_MAX) return Status::kCorrupt;
        out[base + k] = static_cast<int32_t>(o);
      }
    }
    if (r.overrun) return Status::kTruncated;
    if (esc_mask) {
      Status st = iv_decode_bypass_scalar(x, esc_mask, width, idx + base, tb, r, out + base);
      if (st != Status::kOk) return st;
    }
  }
  return Status::kOk;
}

// ---------------------------------------------------------------------------------------------
// Warp body: one warp (W lanes) codes one group. `Lanes` supplies the lane loop and ballot:
// on the device (rans_interleaved_cuda.cu) each thread runs the loop body once for its lane and
// ballot is __ballot_sync; on the host IvHostLanes runs all W lanes in lock-step. Per-lane
// variables are `typename Lanes::template Var<T>` (one value per thread / an array on the host).
// ---------------------------------------------------------------------------------------------

#define DUALRES_IV_LANES(L, k) for (int k = (L).first(); k < (L).last(); ++k)

// Encodes a group backwards into the END of its scratch region [scratch, scratch + cap) (words in
// decoder order end at scratch + cap); returns the number of words. x: the lanes' states in/out.
template <class Lanes>
DUALRES_HD inline int64_t iv_warp_encode(Lanes& L, const int32_t* sym, const int32_t* idx, int64_t n, int64_t s0,
                                         int64_t s1, const IvTablesView& tb, typename Lanes::template Var<uint32_t>& x,
                                         uint16_t* scratch, int64_t cap) {
  const int W = L.width();
  int64_t cursor = cap;  // words are written at decreasing positions
  typename Lanes::template Var<uint32_t> sfe;
  typename Lanes::template Var<int32_t> nch;
  typename Lanes::template Var<uint8_t[kIvMaxChunks]> ch;
  typename Lanes::template Var<bool> pred;
  for (int64_t s = s1 - 1; s >= s0; --s) {
    const int64_t base = s * W;
    int maxch = 0;
    DUALRES_IV_LANES(L, k) {
      nch[k] = 0;
      if (base + k < n) {
        const int32_t t = idx[base + k];
        const int64_t max_value = tb.esc[t];
        int64_t v = int64_t{sym[base + k]} - tb.off[t];
        if (v < 0 || v >= max_value) {
          nch[k] = iv_escape_chunks(v, max_value, ch[k]);
          v = max_value;
        }
        sfe[k] = tb.sf[t * tb.stride + v];
      }
    }
    maxch = L.max(nch);
    for (int j = maxch - 1; j >= 0; --j) {
      DUALRES_IV_LANES(L, k) {
        pred[k] = nch[k] > j && iv_enc_bypass_needs_word(x[k]);
      }
      const uint32_t m = L.ballot(pred);
      cursor -= iv_popc(m);
      DUALRES_IV_LANES(L, k) {
        if (nch[k] > j) {
          if (pred[k]) {
            scratch[cursor + iv_rank(m, k)] = static_cast<uint16_t>(x[k]);
            x[k] >>= 16;
          }
          x[k] = iv_enc_bypass_code(x[k], ch[k][j]);
        }
      }
    }
    DUALRES_IV_LANES(L, k) {
      pred[k] = base + k < n && iv_enc_needs_word(x[k], sfe[k], tb.precision);
    }
    const uint32_t m = L.ballot(pred);
    cursor -= iv_popc(m);
    DUALRES_IV_LANES(L, k) {
      if (base + k < n) {
        if (pred[k]) {
          scratch[cursor + iv_rank(m, k)] = static_cast<uint16_t>(x[k]);
          x[k] >>= 16;
        }
        x[k] = iv_enc_code(x[k], sfe[k], tb.precision);
      }
    }
  }
  return cap - cursor;
}

// Decodes steps [s0, s1) of a group whose words are words[w0, w1) (byte array, u16 LE); x holds
// the start states; on success the end states are in x and every word was consumed.
template <class Lanes>
DUALRES_HD inline Status iv_warp_decode(Lanes& L, const int32_t* idx, int64_t n, int64_t s0, int64_t s1,
                                        const IvTablesView& tb, typename Lanes::template Var<uint32_t>& x,
                                        const uint8_t* words, uint64_t w0, uint64_t w1, int32_t* out) {
  const int W = L.width();
  const uint32_t P = tb.precision, mask = (1u << P) - 1u;
  uint64_t cursor = w0;
  typename Lanes::template Var<bool> pred, bad;
  typename Lanes::template Var<int32_t> symv;
  typename Lanes::template Var<IvBypassReader> br;
  DUALRES_IV_LANES(L, k) {
    bad[k] = false;
  }
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t base = s * W;
    DUALRES_IV_LANES(L, k) {
      pred[k] = false;
      symv[k] = -1;
      if (base + k < n) {
        const int32_t t = idx[base + k];
        const uint32_t sym = iv_lookup(tb, t, x[k] & mask);
        x[k] = iv_dec_code(x[k], tb.sf[t * tb.stride + sym], P);
        pred[k] = x[k] < kIvLow;
        symv[k] = static_cast<int32_t>(sym);
      }
    }
    uint32_t m = L.ballot(pred);
    if (cursor + iv_popc(m) > w1) return Status::kTruncated;
    DUALRES_IV_LANES(L, k) {
      if (pred[k]) x[k] = (x[k] << 16) | iv_load_u16(words + 2 * (cursor + iv_rank(m, k)));
      pred[k] = false;
      if (base + k < n) {
        const int32_t t = idx[base + k];
        if (symv[k] == tb.esc[t]) {
          pred[k] = true;
          br[k] = IvBypassReader{};
        } else {
          const int64_t o = int64_t{symv[k]} + tb.off[t];
          if (o > INT32_MAX)
            bad[k] = true;
          else
            out[base + k] = static_cast<int32_t>(o);
        }
      }
    }
    cursor += iv_popc(m);
    // Bypass sub-steps: `pred` marks the lanes still reading chunks.
    while (L.ballot(pred)) {
      typename Lanes::template Var<bool> need;
      DUALRES_IV_LANES(L, k) {
        need[k] = false;
        if (pred[k]) {
          const uint32_t val = x[k] & kBypassMax;
          x[k] >>= kBypassBits;
          need[k] = x[k] < kIvLow;
          if (!br[k].feed(val)) {
            bad[k] = true;
            pred[k] = false;
          }
        }
      }
      m = L.ballot(need);
      if (cursor + iv_popc(m) > w1) return Status::kTruncated;
      DUALRES_IV_LANES(L, k) {
        if (need[k]) x[k] = (x[k] << 16) | iv_load_u16(words + 2 * (cursor + iv_rank(m, k)));
        if (pred[k] && br[k].done()) {
          pred[k] = false;
          const int32_t t = idx[base + k];
          const int64_t o = value_from_raw(br[k].raw, tb.esc[t]) + tb.off[t];
          if (o < INT32_MIN || o > INT32_MAX)
            bad[k] = true;
          else
            out[base + k] = static_cast<int32_t>(o);
        }
      }
      cursor += iv_popc(m);
      if (L.ballot(bad)) return Status::kCorrupt;
    }
    if (L.ballot(bad)) return Status::kCorrupt;
  }
  if (cursor != w1) return Status::kCorrupt;
  return Status::kOk;
}

// The host side of the warp body: W lanes in lock-step, ballot over the lane array.
struct IvHostLanes {
  int w;
  template <class T>
  struct Var {
    T v[kIvMaxWidth];
    T& operator[](int k) { return v[k]; }
    const T& operator[](int k) const { return v[k]; }
  };
  int width() const { return w; }
  int first() const { return 0; }
  int last() const { return w; }
  uint32_t ballot(const Var<bool>& p) const {
    uint32_t m = 0;
    for (int k = 0; k < w; ++k) m |= uint32_t{p[k]} << k;
    return m;
  }
  int32_t max(const Var<int32_t>& a) const {
    int32_t r = a[0];
    for (int k = 1; k < w; ++k) r = a[k] > r ? a[k] : r;
    return r;
  }
};

// ---------------------------------------------------------------------------------------------
// Whole-stream drivers (host). `Coder` supplies the group encoder/decoder of one ISA.
// ---------------------------------------------------------------------------------------------

// Decoder of a parsed stream: group g starts from its stored states and must end on the next
// group's states (chained) or the initial state, with exactly its words consumed.
inline Status iv_check_group_end(const IvHeader& h, const uint8_t* data, int64_t g, const uint32_t* x) {
  for (int k = 0; k < h.width; ++k) {
    uint32_t want = kIvLow;
    if (h.chained && g + 1 < h.groups) want = iv_load_u32(data + h.states_pos + 4 * ((g + 1) * h.width + k));
    if (x[k] != want) return Status::kCorrupt;
  }
  return Status::kOk;
}

}  // namespace dualres::rans
