// libFuzzer target for the torch-free rANS decoders (csrc/rans/rans_core.h, rans_stream.h).
//
// Build and run: fuzz/run.sh SECONDS (clang -fsanitize=fuzzer,address,undefined).
//
// The input carries everything a caller of the ops controls: the tables, the indexes and the
// bytes to decode, so the table checks (Prepared::prepare), the native container parser and lane
// decoder, and the CompressAI-compatible decoder (whole stream and chunked, with a caller-forged
// state as rans_decode_compat_stream allows) are all fuzzed. Layout (little-endian):
//
//   mode u8 | T u8 | W u8 | flags u8 | N u16 | seed u32 |
//   cdfs int32[T*W] | cdf_lengths int32[T] | offsets int32[T] | stream bytes (the rest)
//
// indexes[i] = (LCG(seed) >> 16) % T, so valid seeds stay small; fuzz/make_corpus.py writes them
// with the same rule. mode % 5: 0 native decode, 1 compat whole-stream decode, 2 compat chunked
// decode (chunk sizes from flags; flags & 0x80 forges the start state from the first 8 stream
// bytes), 3 round trip: the stream bytes are read as int32 symbols, encoded natively (lanes from
// flags) and with the compat coder, decoded, and must come back unchanged; 4 large round trip:
// 8*N (at most 2^17) symbols drawn from the stream bytes, mostly the table's first value, coded
// natively with the encoder's lane choice -- long, low-entropy streams whose lane count gets
// reduced, which inputs of a few KB cannot otherwise reach (a heap overflow hid there).
//
// Mode 0 also restores the bytes as an embedded stream (rans_stream.h restore_stream, what the
// codec does with a .drx section) and decodes the result; mode 3 checks embed + restore give the
// encoded stream back.
//
// Only the sanitizers or a failed round trip end a run: a decoder rejecting input is expected.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../csrc/rans/rans_stream.h"

using namespace dualres::rans;

namespace {

constexpr size_t kHead = 10;

uint32_t rd32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

// Visits lanes one at a time in reverse order: lane results must not depend on the order.
struct ReverseFor {
  template <class F>
  void operator()(int64_t b, int64_t e, F&& f) const {
    for (int64_t i = e - 1; i >= b; --i) f(i, i + 1);
  }
};

void must(bool cond) {
  if (!cond) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kHead) return 0;
  const int mode = data[0] % 5;
  const int64_t T = data[1] % 16 + 1;
  const int64_t W = data[2] % 64 + 1;
  const uint8_t flags = data[3];
  const int64_t n = int64_t{data[4]} | int64_t{data[5]} << 8;
  uint32_t seed = rd32(data + 6);
  size_t pos = kHead;
  const size_t table_bytes = 4 * static_cast<size_t>(T * W + 2 * T);
  if (size - pos < table_bytes) return 0;
  std::vector<int32_t> cdfs(T * W), lengths(T), offsets(T);
  std::memcpy(cdfs.data(), data + pos, 4 * cdfs.size());
  pos += 4 * cdfs.size();
  std::memcpy(lengths.data(), data + pos, 4 * T);
  pos += 4 * T;
  std::memcpy(offsets.data(), data + pos, 4 * T);
  pos += 4 * T;
  const uint8_t* stream = data + pos;
  const size_t stream_size = size - pos;

  std::vector<int32_t> idx(static_cast<size_t>(n));
  for (auto& v : idx) {
    seed = seed * 1664525u + 1013904223u;
    v = static_cast<int32_t>((seed >> 16) % static_cast<uint32_t>(T));
  }
  const TableView tv{cdfs.data(), lengths.data(), offsets.data(), T, W};
  std::vector<int32_t> out(static_cast<size_t>(n) + 1, 0);

  if (mode == 0) {
    Prepared pt;
    if (pt.prepare(tv, idx.data(), n, false, 0)) return 0;
    // Copy into an exactly sized heap buffer so ASan sees any read past the stream's end.
    std::vector<uint8_t> s(stream, stream + stream_size);
    decode_stream(s.data(), s.size(), idx.data(), n, pt, out.data(), SerialFor{});
    decode_stream(s.data(), s.size(), idx.data(), n, pt, out.data(), ReverseFor{});
    // The same bytes as an embedded stream (the .drx container's sections): restored, then decoded.
    std::vector<uint8_t> restored;
    if (restore_stream(s.data(), s.size(), n, pt.precision, restored) == Status::kOk)
      decode_stream(restored.data(), restored.size(), idx.data(), n, pt, out.data(), SerialFor{});
  } else if (mode == 1 || mode == 2) {
    Prepared pt;
    if (pt.prepare_compat(tv, idx.data(), n, false)) return 0;
    std::vector<uint8_t> s(stream, stream + stream_size);
    CompatDecoder dec;
    if (mode == 1) {
      if (dec.init(s.data(), s.size()) != Status::kOk) return 0;
      if (dec.decode(idx.data(), n, pt, out.data()) == Status::kOk) (void)dec.finished_cleanly();
      return 0;
    }
    if (flags & 0x80) {
      // rans_decode_compat_stream lets the caller set (position, state): any values in range.
      if (s.size() < 8) return 0;
      dec.data = s.data();
      dec.size = s.size();
      dec.pos = 1 + (flags & 0x0F) % s.size();
      uint64_t x = 0;
      std::memcpy(&x, s.data(), 8);
      dec.x = x;
    } else if (dec.init(s.data(), s.size()) != Status::kOk) {
      return 0;
    }
    const int64_t chunk = (flags & 0x3F) + 1;
    for (int64_t b = 0; b < n; b += chunk) {
      const int64_t len = std::min(chunk, n - b);
      if (dec.decode(idx.data() + b, len, pt, out.data() + b) != Status::kOk) break;
    }
  } else if (mode == 4) {
    // Large low-entropy round trip: symbol i is offsets[t] (table entry 0) unless a stream byte
    // picked by the LCG says otherwise, so the payload is small next to the symbol count.
    const int64_t m = std::min<int64_t>(8 * n, int64_t{1} << 17);  // up to 5 default lanes, ~ms per run
    if (m == 0 || stream_size == 0) return 0;
    std::vector<int32_t> big_idx(static_cast<size_t>(m)), sym(static_cast<size_t>(m)), back(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) {
      seed = seed * 1664525u + 1013904223u;
      const int32_t t = static_cast<int32_t>((seed >> 16) % static_cast<uint32_t>(T));
      const uint8_t b = stream[(seed >> 8) % stream_size];
      big_idx[i] = t;
      const int64_t v = int64_t{offsets[t]} + ((b & 0x0F) < (flags & 0x0F) ? (b >> 4) : 0);
      sym[i] = v > INT32_MAX ? offsets[t] : static_cast<int32_t>(v);
    }
    Prepared pt;
    if (pt.prepare(tv, big_idx.data(), m, false, 0)) return 0;
    std::vector<uint8_t> enc;
    if (encode_stream(sym.data(), big_idx.data(), m, 0, pt, enc, SerialFor{}) != Status::kOk) return 0;
    must(decode_stream(enc.data(), enc.size(), big_idx.data(), m, pt, back.data(), ReverseFor{}) == Status::kOk);
    must(back == sym);
  } else {
    // Round trip: symbols from the stream bytes (full int32 range, so escapes of every length).
    const int64_t m = std::min<int64_t>(n, static_cast<int64_t>(stream_size / 4));
    if (m == 0) return 0;  // (empty vectors have null data(); memcmp must not see them)
    std::vector<int32_t> sym(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) sym[i] = static_cast<int32_t>(rd32(stream + 4 * i));
    Prepared pt;  // prepared for decoding: the round trip uses it both ways
    if (pt.prepare(tv, idx.data(), m, false, 0)) return 0;
    std::vector<uint8_t> enc;
    const int64_t lanes = flags & 0x7F;  // 0: encoder's choice
    const int states = (flags & 0x80) ? 1 << (flags & 1 ? 1 : 0) : kDefaultStates;
    must(encode_stream(sym.data(), idx.data(), m, lanes, pt, enc, SerialFor{}, states) == Status::kOk);
    must(decode_stream(enc.data(), enc.size(), idx.data(), m, pt, out.data(), ReverseFor{}) == Status::kOk);
    must(std::memcmp(out.data(), sym.data(), 4 * static_cast<size_t>(m)) == 0);
    std::vector<uint8_t> embedded, restored;
    must(embed_stream(enc.data(), enc.size(), m, pt.precision, embedded) == Status::kOk);
    must(restore_stream(embedded.data(), embedded.size(), m, pt.precision, restored) == Status::kOk);
    must(restored == enc);
    if (pt.precision == kCompatPrecision) {
      std::vector<uint8_t> cenc;
      if (compat_encode(sym.data(), idx.data(), m, pt, cenc) != Status::kOk) return 0;  // |v| >= 2^30
      Prepared pc;  // the compat decoder's own lookup
      must(pc.prepare_compat(tv, idx.data(), m, false) == nullptr);
      CompatDecoder dec;
      must(dec.init(cenc.data(), cenc.size()) == Status::kOk);
      must(dec.decode(idx.data(), m, pc, out.data()) == Status::kOk);
      must(dec.finished_cleanly());
      must(std::memcmp(out.data(), sym.data(), 4 * static_cast<size_t>(m)) == 0);
    }
  }
  return 0;
}
