// rans_stream.h -- the native multi-lane container around rans_core.h (format: FORMAT.md).
//
// The symbol sequence is cut into `lanes` contiguous pieces, each coded independently with K
// interleaved 32-bit states, so that lanes can be coded by different threads (and, later, CUDA
// threads). The lane layout is chosen by the encoder and written in the header; the decoder
// never depends on its own thread count. Parallelism is injected by the caller through a
// `parallel_for(begin, end, fn)` functor so this file stays torch-free.
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#include "rans_core.h"

namespace dualres::rans {

constexpr uint8_t kMagic0 = 0xD7, kMagic1 = 0x52;  // "\xD7R"
constexpr uint8_t kVersion = 1;
constexpr int kDefaultStates = 4;           // interleaved states per lane (measured: FORMAT.md)
constexpr int64_t kMinLaneSymbols = 24576;  // default lane size floor (~20 lanes for a 491,520-symbol latent)
constexpr int64_t kMaxLanes = 64;           // default lane count cap
constexpr int64_t kMaxLanesHard = 1 << 16;  // what an encoder may be asked for / a decoder accepts

// Lane i covers symbols [lane_begin(n, L, i), lane_begin(n, L, i + 1)).
DUALRES_HD inline int64_t lane_begin(int64_t n, int64_t lanes, int64_t i) {
  return static_cast<int64_t>((static_cast<__int128>(n) * i) / lanes);
}

inline int64_t default_lanes(int64_t n) {
  if (n <= 0) return 0;
  return std::clamp<int64_t>(n / kMinLaneSymbols, 1, kMaxLanes);
}

// The lane count an encoder starts with: lanes <= 0 means "choose" (default_lanes).
inline int64_t initial_lanes(int64_t n, int64_t lanes) {
  if (n <= 0) return 0;
  return lanes <= 0 ? default_lanes(n) : std::min<int64_t>({lanes, n, kMaxLanesHard});
}

// With a chosen count: the most lanes whose cost (states + length varint) stays under 0.25% of
// `payload` bytes; low-entropy data gets fewer, longer lanes (re-encoded once).
inline int64_t affordable_lanes(uint64_t payload, int states) {
  const int64_t per_lane = 4 * states + 3;
  return std::max<int64_t>(1, static_cast<int64_t>(payload / 400) / per_lane);
}

// The layout an encoder choosing it writes, after a first encode with `lanes` lanes of
// kDefaultStates states came to `payload` lane bytes. Lanes: affordable_lanes. States: 4 (the
// fastest, FORMAT.md) while their 4 bytes each stay under the same 0.25% of the payload, else 2,
// else 1: a small stream (a latent slice of a few KB at a low rate) saves 12 bytes a lane, 0.4% of
// a 3 KB stream, and decodes in a millisecond either way. Shared by the CPU and CUDA encoders,
// which must write the same bytes.
struct Layout {
  int64_t lanes;
  int states;
};
inline Layout affordable_layout(uint64_t payload, int64_t lanes) {
  if (lanes > 1) lanes = std::min(lanes, affordable_lanes(payload, kDefaultStates));
  int states = 1;
  for (int k : {4, 2}) {
    if (static_cast<uint64_t>(4 * k) * static_cast<uint64_t>(lanes) * 400 <= payload) {
      states = k;
      break;
    }
  }
  return {lanes, states};
}

// CRC-32C (Castagnoli) of the stream body. rANS alone cannot notice every corruption: bypass
// chunks are stored verbatim in the state, so a flipped bit there decodes to another valid value.
// crc32c_update(~0u, ...) then ~ gives the CRC; both versions below compute the same function.
inline uint32_t crc32c_update_table(uint32_t crc, const uint8_t* p, size_t n) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
      t[i] = c;
    }
    return t;
  }();
  for (; n > 0; --n, ++p) crc = (crc >> 8) ^ table[(crc ^ *p) & 0xFF];
  return crc;
}

#if defined(__x86_64__)
// SSE4.2's crc32 instruction computes CRC-32C; compiled for it whatever the build's baseline, and
// only called where the CPU has it (crc32c below checks at run time).
__attribute__((target("sse4.2"))) inline uint32_t crc32c_update_sse42(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c64 = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c64 = _mm_crc32_u64(c64, v);
  }
  crc = static_cast<uint32_t>(c64);
  for (; n > 0; --n, ++p) crc = _mm_crc32_u8(crc, *p);
  return crc;
}
#endif

inline uint32_t crc32c(const uint8_t* p, size_t n) {
#if defined(__x86_64__)
  static const bool sse42 = __builtin_cpu_supports("sse4.2");
  if (sse42) return ~crc32c_update_sse42(~0u, p, n);
#endif
  return ~crc32c_update_table(~0u, p, n);
}

constexpr size_t kFixedHeader = 9;  // magic(2) version precision states crc32c(4)

inline void put_varint(std::vector<uint8_t>& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<uint8_t>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<uint8_t>(v));
}

// Bounds-checked LEB128 read; false on truncation or a value wider than 63 bits.
inline bool get_varint(const uint8_t* data, size_t size, size_t& pos, uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 63; shift += 7) {
    if (pos >= size) return false;
    const uint8_t b = data[pos++];
    v |= uint64_t{static_cast<uint8_t>(b & 0x7F)} << shift;
    if (!(b & 0x80)) return shift < 56 || (b >> (63 - shift)) == 0;
  }
  return false;
}

struct StreamHeader {
  int precision = 0;
  int states = 0;
  int64_t symbols = 0;
  int64_t lanes = 0;
  std::vector<uint64_t> lane_offset;  // lanes + 1 byte offsets into the payload
  size_t payload_pos = 0;             // where lane 0 starts in the stream
};

// Validates the whole header against the stream size and the caller's symbol count before
// anything is allocated from stream-provided numbers. expected_symbols < 0 accepts any count
// (stream inspection, ops.rans_stream_info); decoders always pass their own count.
inline Status parse_header(const uint8_t* data, size_t size, int64_t expected_symbols, StreamHeader& h) {
  if (size < kFixedHeader) return size == 0 ? Status::kTruncated : Status::kBadHeader;
  if (data[0] != kMagic0 || data[1] != kMagic1 || data[2] != kVersion) return Status::kBadHeader;
  h.precision = data[3];
  h.states = data[4];
  if (h.precision < 1 || h.precision > 16) return Status::kBadHeader;
  if (h.states != 1 && h.states != 2 && h.states != 4) return Status::kBadHeader;
  const uint32_t crc = uint32_t{data[5]} | uint32_t{data[6]} << 8 | uint32_t{data[7]} << 16 | uint32_t{data[8]} << 24;
  size_t pos = kFixedHeader;
  uint64_t n = 0, lanes = 0;
  if (!get_varint(data, size, pos, n) || !get_varint(data, size, pos, lanes)) return Status::kBadHeader;
  if (expected_symbols >= 0 && n != static_cast<uint64_t>(expected_symbols)) return Status::kMismatch;
  if ((n == 0) != (lanes == 0) || lanes > n || lanes > static_cast<uint64_t>(kMaxLanesHard)) return Status::kBadHeader;
  // Every lane needs at least 4 * states bytes plus a length byte: bound lanes by the size first.
  if (lanes > (size - pos) / (4 * static_cast<uint64_t>(h.states) + 1)) return Status::kBadHeader;
  h.symbols = static_cast<int64_t>(n);
  h.lanes = static_cast<int64_t>(lanes);
  h.lane_offset.assign(static_cast<size_t>(lanes) + 1, 0);
  uint64_t total = 0;
  for (uint64_t i = 0; i < lanes; ++i) {
    uint64_t len = 0;
    if (!get_varint(data, size, pos, len)) return Status::kBadHeader;
    if (len < 4 * static_cast<uint64_t>(h.states) || len > size) return Status::kBadHeader;
    total += len;
    if (total > size) return Status::kBadHeader;
    h.lane_offset[i + 1] = total;
  }
  if (total != size - pos) return total > size - pos ? Status::kTruncated : Status::kBadHeader;
  h.payload_pos = pos;
  if (crc32c(data + kFixedHeader, size - kFixedHeader) != crc) return Status::kCorrupt;
  return Status::kOk;
}

// Writes the header (CRC left as zeros) for a stream whose lanes have the given byte sizes.
// Shared by the CPU encoder below and the CUDA encoder, which assembles streams on the host.
inline void write_stream_header(std::vector<uint8_t>& out, int precision, int states, int64_t n, int64_t lanes,
                                const uint64_t* lane_size) {
  out.clear();
  out.push_back(kMagic0);
  out.push_back(kMagic1);
  out.push_back(kVersion);
  out.push_back(static_cast<uint8_t>(precision));
  out.push_back(static_cast<uint8_t>(states));
  out.resize(kFixedHeader);  // crc32c, filled in by seal_stream
  put_varint(out, static_cast<uint64_t>(n));
  put_varint(out, static_cast<uint64_t>(lanes));
  for (int64_t i = 0; i < lanes; ++i) put_varint(out, lane_size[i]);
}

// Writes the CRC-32C of everything after a fixed header of kFixed bytes into its last 4 bytes
// (every native format ends its fixed header with it).
template <size_t kFixed>
inline void seal_native(uint8_t* data, size_t size) {
  const uint32_t crc = crc32c(data + kFixed, size - kFixed);
  for (int b = 0; b < 4; ++b) data[kFixed - 4 + b] = static_cast<uint8_t>(crc >> (8 * b));
}

// Fills in the CRC-32C once header and payload are in place.
inline void seal_stream(uint8_t* data, size_t size) {
  seal_native<kFixedHeader>(data, size);
}

// Embedded forms (FORMAT.md, "Embedded streams"), shared by the native formats, whose fixed
// headers are magic(2) version precision, the format's own bytes, then the CRC-32C (last 4) and
// the symbol count (varint). A container that checksums its contents and knows each stream's
// symbol count and precision (the .drx file, docs/BITSTREAM.md) need not store what the stream
// repeats of it: magic, version, precision, CRC-32C and symbol count, 8 to 17 bytes per stream
// (a 768x512 photo has six, and at 0.2 bpp every 100 bytes are 1% of it). Kept: the format's own
// bytes (multi-lane: K; interleaved: W and flags), then everything after the count, unchanged.
//
// embed_native validates `data` like a decoder (`parse`, with the given symbol count; the
// precision must be the given one, so that restore_native can rebuild the stream from them).
template <size_t kFixed, class Header, class Parse>
inline Status embed_native(const uint8_t* data, size_t size, int64_t symbols, int precision, std::vector<uint8_t>& out,
                           Parse parse) {
  Header h;
  const Status st = parse(data, size, symbols, h);
  if (st != Status::kOk) return st;
  // An empty stream uses no table: encoders write precision 16 there, and so does the restore.
  if (h.precision != (symbols == 0 ? 16 : precision)) return Status::kMismatch;
  size_t pos = kFixed;
  uint64_t n = 0;
  get_varint(data, size, pos, n);  // read fine in parse
  out.clear();
  out.reserve(kFixed - 8 + size - pos);
  out.insert(out.end(), data + 4, data + kFixed - 4);
  out.insert(out.end(), data + pos, data + size);
  return Status::kOk;
}

// The stream an embedded one came from, byte for byte (our encoders write minimal varints),
// sealed with its CRC-32C and validated like a decoder would (`parse`): untrusted bytes come
// back as a Status, and a kOk result is a stream whose header the decoder accepts.
template <size_t kFixed, uint8_t kVersionByte, class Header, class Parse>
inline Status restore_native(const uint8_t* data, size_t size, int64_t symbols, int precision,
                             std::vector<uint8_t>& out, Parse parse) {
  constexpr size_t kOwn = kFixed - 8;  // the format's own header bytes
  out.clear();
  if (size < kOwn) return Status::kTruncated;
  if (symbols < 0 || precision < 1 || precision > 16) return Status::kMismatch;
  out.reserve(kFixed + 10 + size);
  out.push_back(kMagic0);
  out.push_back(kMagic1);
  out.push_back(kVersionByte);
  out.push_back(static_cast<uint8_t>(symbols == 0 ? 16 : precision));
  out.insert(out.end(), data, data + kOwn);
  out.resize(kFixed);
  put_varint(out, static_cast<uint64_t>(symbols));
  out.insert(out.end(), data + kOwn, data + size);
  seal_native<kFixed>(out.data(), out.size());
  Header h;
  return parse(out.data(), out.size(), symbols, h);
}

// The multi-lane stream's embedded form and back.
inline Status embed_stream(const uint8_t* data, size_t size, int64_t symbols, int precision,
                           std::vector<uint8_t>& out) {
  return embed_native<kFixedHeader, StreamHeader>(data, size, symbols, precision, out, parse_header);
}
inline Status restore_stream(const uint8_t* data, size_t size, int64_t symbols, int precision,
                             std::vector<uint8_t>& out) {
  return restore_native<kFixedHeader, kVersion, StreamHeader>(data, size, symbols, precision, out, parse_header);
}

template <int K>
void encode_lanes(const int32_t* sym, const int32_t* idx, int64_t n, int64_t lanes, const Prepared& pt,
                  std::vector<BackBuffer>& bufs, int64_t lane_lo, int64_t lane_hi) {
  for (int64_t i = lane_lo; i < lane_hi; ++i) {
    const int64_t b = lane_begin(n, lanes, i), e = lane_begin(n, lanes, i + 1);
    native_encode_lane<K>(sym + b, idx + b, e - b, pt, bufs[i]);
  }
}

// Encodes with `lanes` lanes and `states` states per lane; lanes <= 0: the encoder chooses both,
// starting from `states` (affordable_layout). `pt` must be prepared for encoding.
// ParFor: void(int64_t begin, int64_t end, std::function-like fn(int64_t lo, int64_t hi)).
template <class ParFor>
Status encode_stream(const int32_t* sym, const int32_t* idx, int64_t n, int64_t lanes, const Prepared& pt,
                     std::vector<uint8_t>& out, ParFor&& parallel_for, int states = kDefaultStates) {
  const bool auto_lanes = lanes <= 0;
  lanes = initial_lanes(n, lanes);
  std::vector<BackBuffer> bufs;
  for (int attempt = 0;; ++attempt) {
    bufs.clear();
    bufs.reserve(static_cast<size_t>(lanes));
    for (int64_t i = 0; i < lanes; ++i)
      bufs.emplace_back(static_cast<size_t>((lane_begin(n, lanes, i + 1) - lane_begin(n, lanes, i)) / 2 + 64));
    parallel_for(int64_t{0}, lanes, [&](int64_t lo, int64_t hi) {
      if (states == 1)
        encode_lanes<1>(sym, idx, n, lanes, pt, bufs, lo, hi);
      else if (states == 4)
        encode_lanes<4>(sym, idx, n, lanes, pt, bufs, lo, hi);
      else
        encode_lanes<2>(sym, idx, n, lanes, pt, bufs, lo, hi);
    });
    // Re-encode at most once (as the CUDA encoder does, so both write the same stream). The
    // layout must not change after the last encode: `lanes` and `states` describe the buffers
    // written below (a second reduction here once sized the stream for fewer lanes than were
    // copied into it).
    if (!auto_lanes || n == 0 || attempt == 1) break;
    size_t payload = 0;
    for (auto& b : bufs) payload += b.size();
    const Layout next = affordable_layout(payload, lanes);
    if (next.lanes == lanes && next.states == states) break;
    lanes = next.lanes;
    states = next.states;
  }
  std::vector<uint64_t> sizes(static_cast<size_t>(lanes));
  size_t payload = 0;
  for (int64_t i = 0; i < lanes; ++i) {
    sizes[i] = bufs[i].size();
    payload += bufs[i].size();
  }
  write_stream_header(out, pt.precision, states, n, lanes, sizes.data());
  const size_t hdr = out.size();
  out.resize(hdr + payload);
  size_t pos = hdr;
  for (auto& b : bufs) {
    std::memcpy(out.data() + pos, b.data(), b.size());
    pos += b.size();
  }
  seal_stream(out.data(), out.size());
  return Status::kOk;
}

template <class ParFor>
Status decode_stream(const uint8_t* data, size_t size, const int32_t* idx, int64_t n, const Prepared& pt, int32_t* out,
                     ParFor&& parallel_for) {
  StreamHeader h;
  Status st = parse_header(data, size, n, h);
  if (st != Status::kOk) return st;
  if (n > 0 && h.precision != pt.precision) return Status::kMismatch;
  std::vector<Status> lane_status(static_cast<size_t>(h.lanes), Status::kOk);
  const uint8_t* payload = data + h.payload_pos;
  parallel_for(int64_t{0}, h.lanes, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = lane_begin(n, h.lanes, i), e = lane_begin(n, h.lanes, i + 1);
      const uint8_t* d = payload + h.lane_offset[i];
      const size_t len = h.lane_offset[i + 1] - h.lane_offset[i];
      Status s;
      if (h.states == 1)
        s = native_decode_lane<1>(d, len, idx + b, e - b, pt, out + b);
      else if (h.states == 4)
        s = native_decode_lane<4>(d, len, idx + b, e - b, pt, out + b);
      else
        s = native_decode_lane<2>(d, len, idx + b, e - b, pt, out + b);
      lane_status[i] = s;
    }
  });
  for (Status s : lane_status)
    if (s != Status::kOk) return s;
  return Status::kOk;
}

// Serial parallel_for for callers without a thread pool (tests, fuzzers).
struct SerialFor {
  template <class F>
  void operator()(int64_t b, int64_t e, F&& f) const {
    if (b < e) f(b, e);
  }
};

}  // namespace dualres::rans
