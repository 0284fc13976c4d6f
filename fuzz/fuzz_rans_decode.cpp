// libFuzzer target for the torch-free rANS decoders (csrc/rans/rans_core.h, rans_stream.h,
// rans_interleaved.h).
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
// with the same rule. mode % 7: 0 native decode, 1 compat whole-stream decode, 2 compat chunked
// decode (chunk sizes from flags; flags & 0x80 forges the start state from the first 8 stream
// bytes), 3 round trip: the stream bytes are read as int32 symbols, encoded natively (lanes from
// flags) and with the compat coder, decoded, and must come back unchanged; 4 large round trip:
// 8*N (at most 2^17) symbols drawn from the stream bytes, mostly the table's first value, coded
// natively with the encoder's lane choice -- long, low-entropy streams whose lane count gets
// reduced, which inputs of a few KB cannot otherwise reach (a heap overflow hid there); 5
// interleaved-stream decode (version 2, the default native stream), by the scalar coder and by
// the CUDA warp body run on the host, which must agree, also of the bytes restored as an embedded
// stream (the sections of DualRes bitstream version 5); 6 interleaved round trip: symbols from
// the stream bytes, width, groups and chaining from flags, the scalar and warp encoders must
// write the same bytes, which decode back and survive embed + restore.
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

#include "../csrc/rans/rans_interleaved.h"
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

// Decodes a whole interleaved stream as rans_iv_decode does, group by group, with the scalar
// coder or with the warp body in host lock-step (the CUDA kernels' source).
Status iv_decode_all(const uint8_t* s, size_t size, const int32_t* idx, int64_t n, const IvPrepared& pp, int32_t* out,
                     bool warp) {
  IvHeader h;
  Status st = iv_parse_header(s, size, n, h);
  if (st != Status::kOk) return st;
  if (n > 0 && h.precision != pp.precision) return Status::kMismatch;
  if (pp.check_indexes(idx, n) != nullptr) return Status::kBadIndex;
  const IvTablesView tb = pp.view();
  const int W = h.width;
  const int64_t steps = iv_steps(n, W);
  const uint8_t* words = s + h.words_pos;
  for (int64_t g = 0; g < h.groups; ++g) {
    uint32_t x[kIvMaxWidth];
    for (int k = 0; k < W; ++k) x[k] = iv_load_u32(s + h.states_pos + 4 * (g * W + k));
    const int64_t s0 = iv_group_begin(steps, h.groups, g), s1 = iv_group_begin(steps, h.groups, g + 1);
    if (warp) {
      IvHostLanes L{W};
      IvHostLanes::Var<uint32_t> xv;
      for (int k = 0; k < W; ++k) xv[k] = x[k];
      st = iv_warp_decode(L, idx, n, s0, s1, tb, xv, words, h.word_offset[g], h.word_offset[g + 1], out);
      for (int k = 0; k < W; ++k) x[k] = xv[k];
    } else {
      IvWordReader r{words, h.word_offset[g], h.word_offset[g + 1]};
      st = iv_decode_steps_scalar(idx, n, W, s0, s1, tb, x, r, out);
      if (st == Status::kOk && r.overrun) st = Status::kTruncated;
      if (st == Status::kOk && r.pos != r.end) st = Status::kCorrupt;
    }
    if (st == Status::kOk) st = iv_check_group_end(h, s, g, x);
    if (st != Status::kOk) return st;
  }
  return Status::kOk;
}

// Encodes as rans_iv_encode does (groups from the initial state, or one chain with split
// points), with the scalar coder or the warp body on the host.
std::vector<uint8_t> iv_encode_all(const int32_t* sym, const int32_t* idx, int64_t n, int W, int64_t groups,
                                   bool chained, const IvPrepared& pp, bool warp) {
  const IvTablesView tb = pp.view();
  const int64_t steps = iv_steps(n, W), G = std::min(groups, steps);
  std::vector<IvGroupOut> outs(static_cast<size_t>(G));
  uint32_t x[kIvMaxWidth];
  std::fill(x, x + W, kIvLow);
  for (int64_t g = G - 1; g >= 0; --g) {
    if (!chained) std::fill(x, x + W, kIvLow);
    const int64_t s0 = iv_group_begin(steps, G, g), s1 = iv_group_begin(steps, G, g + 1);
    IvGroupOut& o = outs[static_cast<size_t>(g)];
    if (warp) {
      IvHostLanes L{W};
      IvHostLanes::Var<uint32_t> xv;
      for (int k = 0; k < W; ++k) xv[k] = x[k];
      const int64_t cap = (s1 - s0) * W * (kIvMaxChunks + 1);
      std::vector<uint16_t> scratch(static_cast<size_t>(cap));
      const int64_t cnt = iv_warp_encode(L, sym, idx, n, s0, s1, tb, xv, scratch.data(), cap);
      o.words.assign(scratch.end() - cnt, scratch.end());
      for (int k = 0; k < W; ++k) x[k] = xv[k];
    } else {
      iv_encode_steps_scalar(sym, idx, n, W, s0, s1, tb, x, o.words);
      std::reverse(o.words.begin(), o.words.end());
    }
    std::copy(x, x + W, o.states);
  }
  std::vector<uint8_t> out;
  iv_assemble(out, n > 0 ? pp.precision : 16, W, chained && G > 1, n, outs);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kHead) return 0;
  const int mode = data[0] % 7;
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
    // The tables of a call (rows used) or of a handle (all rows, indexes checked against them).
    CompatTables pt;
    if (flags & 0x40) {
      pt.prepare_all(tv);
      if (pt.check_indexes(idx.data(), n)) return 0;
    } else if (pt.prepare_used(tv, idx.data(), n)) {
      return 0;
    }
    std::vector<uint8_t> s(stream, stream + stream_size);
    CompatDecoder dec;
    if (mode == 1) {
      if (dec.init(s.data(), s.size()) != Status::kOk) return 0;
      if (flags & 0x20) {
        std::vector<float> values(static_cast<size_t>(n) + 1);
        if (dec.decode(idx.data(), n, pt, CompatDequantized<float, false>{values.data(), nullptr}) == Status::kOk)
          (void)dec.finished_cleanly();
      } else if (dec.decode(idx.data(), n, pt, out.data()) == Status::kOk) {
        (void)dec.finished_cleanly();
      }
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
  } else if (mode == 5) {
    IvPrepared pp;
    if (pp.prepare(tv) != nullptr) return 0;
    std::vector<uint8_t> s(stream, stream + stream_size);
    std::vector<int32_t> other(out.size(), 0);
    const Status a = iv_decode_all(s.data(), s.size(), idx.data(), n, pp, out.data(), false);
    const Status b = iv_decode_all(s.data(), s.size(), idx.data(), n, pp, other.data(), true);
    must(a == b);
    if (a == Status::kOk) must(out == other);
    std::vector<uint8_t> restored;
    if (iv_restore_stream(s.data(), s.size(), n, pp.precision, restored) == Status::kOk)
      (void)iv_decode_all(restored.data(), restored.size(), idx.data(), n, pp, out.data(), false);
  } else if (mode == 6) {
    const int64_t m = std::min<int64_t>(n, static_cast<int64_t>(stream_size / 4));
    if (m == 0) return 0;
    std::vector<int32_t> sym(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) sym[i] = static_cast<int32_t>(rd32(stream + 4 * i));
    IvPrepared pp;
    if (pp.prepare(tv) != nullptr || pp.check_indexes(idx.data(), m) != nullptr) return 0;
    const int W = 1 << (flags % 6);
    const int64_t groups = ((flags >> 3) & 7) + 1;
    const bool chained = (flags & 0x40) != 0;
    const std::vector<uint8_t> enc = iv_encode_all(sym.data(), idx.data(), m, W, groups, chained, pp, false);
    must(enc == iv_encode_all(sym.data(), idx.data(), m, W, groups, chained, pp, true));
    must(iv_decode_all(enc.data(), enc.size(), idx.data(), m, pp, out.data(), false) == Status::kOk);
    must(std::memcmp(out.data(), sym.data(), 4 * static_cast<size_t>(m)) == 0);
    std::vector<uint8_t> embedded, restored;
    must(iv_embed_stream(enc.data(), enc.size(), m, pp.precision, embedded) == Status::kOk);
    must(iv_restore_stream(embedded.data(), embedded.size(), m, pp.precision, restored) == Status::kOk);
    must(restored == enc);
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
      CompatTables pc;  // the compat decoder's own lookup
      must(pc.prepare_used(tv, idx.data(), m) == nullptr);
      CompatDecoder dec;
      must(dec.init(cenc.data(), cenc.size()) == Status::kOk);
      must(dec.decode(idx.data(), m, pc, out.data()) == Status::kOk);
      must(dec.finished_cleanly());
      must(std::memcmp(out.data(), sym.data(), 4 * static_cast<size_t>(m)) == 0);
    }
  }
  return 0;
}
