// Standalone test of the torch-free rANS core (built with g++ by tests/test_rans.py, with
// AddressSanitizer/UBSan when available): round trips over random tables, lane counts and
// interleavings, escapes, empty/single inputs; corrupted streams must fail cleanly.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../rans_stream.h"

using namespace dualres::rans;

static int failures = 0;
#define CHECK(cond, ...)                                                    \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                    \
      std::fprintf(stderr, "\n");                                           \
      ++failures;                                                           \
    }                                                                       \
  } while (0)

struct Tables {
  int64_t T, W;
  std::vector<int32_t> cdfs, lengths, offsets;
  TableView view() const { return TableView{cdfs.data(), lengths.data(), offsets.data(), T, W}; }
};

// Random tables: random frequencies (at least 1 each) summing to 1 << precision.
static Tables random_tables(std::mt19937_64& rng, int64_t T, int precision) {
  Tables tb;
  tb.T = T;
  tb.W = 2 + static_cast<int64_t>(rng() % 40);
  tb.cdfs.assign(T * tb.W, 0);
  tb.lengths.resize(T);
  tb.offsets.resize(T);
  const uint32_t M = 1u << precision;
  for (int64_t t = 0; t < T; ++t) {
    int64_t len = 2 + static_cast<int64_t>(rng() % (tb.W - 1));
    if (len - 1 > M) len = M + 1;
    tb.lengths[t] = static_cast<int32_t>(len);
    tb.offsets[t] = static_cast<int32_t>(rng() % 41) - 20;
    const int64_t nsym = len - 1;
    std::vector<double> w(nsym);
    double sum = 0;
    for (auto& x : w) {
      x = std::exp(-3.0 * std::uniform_real_distribution<double>(0, 1)(rng) * 3);
      sum += x;
    }
    std::vector<uint32_t> f(nsym);
    uint32_t tot = 0;
    for (int64_t s = 0; s < nsym; ++s) {
      f[s] = 1 + static_cast<uint32_t>((M - nsym) * (w[s] / sum));
      tot += f[s];
    }
    // fix the total on the largest entry
    int64_t big = 0;
    for (int64_t s = 1; s < nsym; ++s)
      if (f[s] > f[big]) big = s;
    f[big] = f[big] + M - tot;
    int32_t* c = &tb.cdfs[t * tb.W];
    c[0] = 0;
    for (int64_t s = 0; s < nsym; ++s) c[s + 1] = c[s] + static_cast<int32_t>(f[s]);
    for (int64_t j = len; j < tb.W; ++j) c[j] = 0;  // padding, as CompressAI leaves it
  }
  return tb;
}

static void random_symbols(std::mt19937_64& rng, const Tables& tb, int64_t n, std::vector<int32_t>& sym,
                           std::vector<int32_t>& idx) {
  sym.resize(n);
  idx.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = static_cast<int32_t>(rng() % tb.T);
    idx[i] = t;
    const uint64_t r = rng() % 100;
    if (r < 90)
      sym[i] = tb.offsets[t] + static_cast<int32_t>(rng() % (tb.lengths[t] - 1));
    else if (r < 95)
      sym[i] = tb.offsets[t] + static_cast<int32_t>(rng() % 200) - 100;  // escapes
    else if (r < 97)
      sym[i] = static_cast<int32_t>(rng());  // huge, any sign
    else if (r < 98)
      sym[i] = (rng() & 1) ? INT32_MAX : INT32_MIN;
    else
      sym[i] = -static_cast<int32_t>(rng() % 100000);
  }
}

static void test_native_round_trips() {
  std::mt19937_64 rng(std::random_device{}());
  const int64_t sizes[] = {0, 1, 2, 3, 7, 100, 5000, 70000};
  for (int64_t n : sizes) {
    for (int prec : {16, 12, 8, 3}) {
      Tables tb = random_tables(rng, 1 + rng() % 9, prec);
      std::vector<int32_t> sym, idx;
      random_symbols(rng, tb, n, sym, idx);
      Prepared pe;
      CHECK(pe.prepare(tb.view(), idx.data(), n, true, 0) == nullptr, "prepare");
      for (int states : {1, 2, 4}) {
        for (int64_t lanes : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{64}, int64_t{100000}}) {
          std::vector<uint8_t> stream;
          Status st = encode_stream(sym.data(), idx.data(), n, lanes, pe, stream, SerialFor{}, states);
          CHECK(st == Status::kOk, "encode");
          Prepared pd;
          CHECK(pd.prepare(tb.view(), idx.data(), n, false, 0) == nullptr, "prepare dec");
          std::vector<int32_t> out(n, 0x7777);
          st = decode_stream(stream.data(), stream.size(), idx.data(), n, pd, out.data(), SerialFor{});
          CHECK(st == Status::kOk, "decode n=%lld prec=%d states=%d lanes=%lld: %s", (long long)n, prec, states,
                (long long)lanes, status_message(st));
          CHECK(out == sym, "round trip n=%lld prec=%d states=%d lanes=%lld", (long long)n, prec, states,
                (long long)lanes);
          // The embedded form (what the .drx container stores) gives back the very same stream.
          std::vector<uint8_t> embedded, restored;
          CHECK(embed_stream(stream.data(), stream.size(), n, prec, embedded) == Status::kOk, "embed");
          CHECK(embedded.size() < stream.size() - 8 && embedded[0] == stream[4], "embedded size / K byte");
          // Explicit lane counts keep the states asked for (a chosen layout picks its own).
          CHECK(lanes == 0 || stream[4] == states, "states %d for lanes %lld", stream[4], (long long)lanes);
          CHECK(restore_stream(embedded.data(), embedded.size(), n, prec, restored) == Status::kOk, "restore");
          CHECK(restored == stream, "restored stream differs n=%lld prec=%d states=%d lanes=%lld", (long long)n, prec,
                states, (long long)lanes);
        }
      }
    }
  }
}

// Every corruption must give a non-ok status or (rarely, for a bit flip) a different-but-valid
// decode; never a crash, hang or out-of-bounds read (the sanitizers watch the latter).
// The encoder's layout rule (affordable_layout): 4 states per lane while their bytes stay under
// 0.25% of the payload, fewer for small streams; lanes likewise.
static void test_chosen_layout() {
  std::mt19937_64 rng(std::random_device{}());
  Tables tb = random_tables(rng, 4, 16);
  int small_states = 0, large_states = 0;
  for (int64_t n : {int64_t{300}, int64_t{400000}}) {
    std::vector<int32_t> sym, idx;
    random_symbols(rng, tb, n, sym, idx);
    Prepared pe;
    pe.prepare(tb.view(), idx.data(), n, true, 0);
    std::vector<uint8_t> stream;
    CHECK(encode_stream(sym.data(), idx.data(), n, 0, pe, stream, SerialFor{}) == Status::kOk, "encode");
    StreamHeader h;
    CHECK(parse_header(stream.data(), stream.size(), n, h) == Status::kOk, "header");
    const uint64_t payload = stream.size() - h.payload_pos;
    CHECK(uint64_t(4 * h.states) * h.lanes * 400 <= payload || h.states == 1, "states over budget");
    (n == 300 ? small_states : large_states) = h.states;
  }
  CHECK(small_states == 1 && large_states == 4, "states: small stream %d, large %d", small_states, large_states);
  CHECK(affordable_layout(3000, 1).states == 1 && affordable_layout(6400, 1).states == 4 &&
            affordable_layout(3200, 1).states == 2 && affordable_layout(6399, 1).states == 2,
        "thresholds");
  CHECK(affordable_layout(1000000, 64).lanes == 64 && affordable_layout(10000, 64).lanes == 1, "lanes");
}

static void test_native_corruption() {
  std::mt19937_64 rng(std::random_device{}());
  Tables tb = random_tables(rng, 5, 16);
  const int64_t n = 40000;
  std::vector<int32_t> sym, idx;
  random_symbols(rng, tb, n, sym, idx);
  Prepared pe, pd;
  pe.prepare(tb.view(), idx.data(), n, true, 0);
  pd.prepare(tb.view(), idx.data(), n, false, 0);
  std::vector<uint8_t> stream;
  encode_stream(sym.data(), idx.data(), n, 4, pe, stream, SerialFor{});
  std::vector<int32_t> out(n);
  int undetected = 0;
  for (int it = 0; it < 300; ++it) {
    std::vector<uint8_t> bad = stream;
    const int kind = it % 3;
    if (kind == 0)
      bad.resize(rng() % bad.size());  // truncation
    else if (kind == 1)
      bad[rng() % bad.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));  // bit flip
    else
      for (size_t k = 5 + rng() % 20; k < bad.size(); ++k) bad[k] = static_cast<uint8_t>(rng());  // garbage
    // Exactly-sized copy so ASan sees reads past the end.
    std::vector<uint8_t> exact(bad.begin(), bad.end());
    const Status st = decode_stream(exact.data(), exact.size(), idx.data(), n, pd, out.data(), SerialFor{});
    if (st == Status::kOk) ++undetected;
  }
  CHECK(undetected == 0, "%d corruptions decoded without error", undetected);
  // Damaged embedded streams: restore_stream reads only what it is given (ASan) and either refuses
  // them or hands on a stream the decoder then checks.
  std::vector<uint8_t> embedded, restored;
  CHECK(embed_stream(stream.data(), stream.size(), n, 16, embedded) == Status::kOk, "embed");
  for (int it = 0; it < 300; ++it) {
    std::vector<uint8_t> bad = embedded;
    if (it % 2 == 0)
      bad.resize(rng() % bad.size());
    else
      bad[rng() % bad.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
    std::vector<uint8_t> exact(bad.begin(), bad.end());
    if (restore_stream(exact.data(), exact.size(), n, 16, restored) == Status::kOk)
      (void)decode_stream(restored.data(), restored.size(), idx.data(), n, pd, out.data(), SerialFor{});
  }
  CHECK(restore_stream(embedded.data(), 0, n, 16, restored) == Status::kTruncated, "empty embedded");
  // Wrong magic, and a stream for a different symbol count.
  std::vector<uint8_t> bad = stream;
  bad[0] ^= 0xFF;
  CHECK(decode_stream(bad.data(), bad.size(), idx.data(), n, pd, out.data(), SerialFor{}) == Status::kBadHeader,
        "magic");
  CHECK(
      decode_stream(stream.data(), stream.size(), idx.data(), n - 1, pd, out.data(), SerialFor{}) == Status::kMismatch,
      "count");
}

static void test_compat() {
  std::mt19937_64 rng(std::random_device{}());
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{1000}, int64_t{30000}}) {
    Tables tb = random_tables(rng, 4, 16);
    std::vector<int32_t> sym, idx;
    random_symbols(rng, tb, n, sym, idx);
    for (auto& s : sym) s = std::max(std::min(s, (1 << 29)), -(1 << 29));  // CompressAI's range
    Prepared pe;
    pe.prepare_compat(tb.view(), idx.data(), n);
    // The tables of one call (rows used) and of a handle (all rows): the same decoder either way.
    CompatTables pd, all;
    CHECK(pd.prepare_used(tb.view(), idx.data(), n) == nullptr, "compat prepare");
    all.prepare_all(tb.view());
    CHECK(all.check_indexes(idx.data(), n) == nullptr, "compat indexes");
    std::vector<uint8_t> stream;
    CHECK(compat_encode(sym.data(), idx.data(), n, pe, stream) == Status::kOk, "compat encode");
    CompatDecoder dec;
    std::vector<int32_t> out(n);
    CHECK(dec.init(stream.data(), stream.size()) == Status::kOk, "init");
    // Decode in two pieces as set_stream/decode_stream would.
    const int64_t half = n / 2;
    CHECK(dec.decode(idx.data(), half, pd, out.data()) == Status::kOk, "piece 1");
    CHECK(dec.decode(idx.data() + half, n - half, pd, out.data() + half) == Status::kOk, "piece 2");
    CHECK(dec.finished_cleanly(), "compat clean end");
    CHECK(out == sym, "compat round trip n=%lld", (long long)n);
    // Dequantised in the decode pass: double(symbol) + mean.
    std::vector<double> means(n), values(n);
    for (int64_t k = 0; k < n; ++k) means[k] = 0.25 * static_cast<double>(k % 7) - 0.5;
    CompatDecoder dq;
    CHECK(dq.init(stream.data(), stream.size()) == Status::kOk, "init 2");
    CHECK(dq.decode(idx.data(), n, all, CompatDequantized<double, true>{values.data(), means.data()}) == Status::kOk,
          "dequantised");
    CHECK(dq.finished_cleanly(), "dequantised clean end");
    for (int64_t k = 0; k < n; ++k)
      CHECK(values[k] == static_cast<double>(sym[k]) + means[k], "dequantised value n=%lld", (long long)n);
    if (n > 100) {
      // Bypass chunks are stored verbatim, so only escape-free streams have every bit flip
      // detectable from the final state; re-encode without escapes.
      for (int64_t k = 0; k < n; ++k)
        sym[k] = tb.offsets[idx[k]] +
                 static_cast<int32_t>(rng() % (tb.lengths[idx[k]] - 2 > 0 ? tb.lengths[idx[k]] - 2 : 1));
      for (int64_t k = 0; k < n; ++k)
        if (tb.lengths[idx[k]] == 2) idx[k] = -1;
      std::vector<int32_t> sym2, idx2;
      for (int64_t k = 0; k < n; ++k)
        if (idx[k] >= 0) {
          sym2.push_back(sym[k]);
          idx2.push_back(idx[k]);
        }
      sym = sym2;
      idx = idx2;
      n = static_cast<int64_t>(sym.size());
      out.resize(n);
      CHECK(compat_encode(sym.data(), idx.data(), n, pe, stream) == Status::kOk, "compat encode 2");
      for (int it = 0; it < 100; ++it) {
        std::vector<uint8_t> bad(stream.begin(), stream.begin() + (it % 2 ? stream.size() : rng() % stream.size()));
        if (it % 2) bad[rng() % bad.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
        CompatDecoder d2;
        Status st = d2.init(bad.data(), bad.size());
        if (st == Status::kOk) st = d2.decode(idx.data(), n, pd, out.data());
        CHECK(st != Status::kOk || !d2.finished_cleanly(), "compat corruption undetected");
      }
    }
  }
  {
    // A handle's rows that cannot decode are an error only for indexes naming them; an index out
    // of range stops the decoder itself.
    Tables tb = random_tables(rng, 3, 16);
    tb.cdfs[1 * tb.W] = 1;  // row 1 no longer starts at 0
    std::vector<int32_t> sym, idx;
    random_symbols(rng, tb, 500, sym, idx);
    for (auto& t : idx) t = t == 1 ? 2 : t;
    for (int64_t k = 0; k < 500; ++k) sym[k] = tb.offsets[idx[k]];
    CompatTables all;
    all.prepare_all(tb.view());
    CHECK(!all.all_usable && all.check_indexes(idx.data(), 500) == nullptr, "unused bad row");
    CompatTables used;
    CHECK(used.prepare_used(tb.view(), idx.data(), 500) == nullptr, "unused bad row (call)");
    Prepared pe;
    CHECK(pe.prepare_compat(tb.view(), idx.data(), 500) == nullptr, "compat prepare (bad row unused)");
    std::vector<uint8_t> stream;
    CHECK(compat_encode(sym.data(), idx.data(), 500, pe, stream) == Status::kOk, "compat encode 3");
    std::vector<int32_t> out(500);
    CompatDecoder dec;
    CHECK(dec.init(stream.data(), stream.size()) == Status::kOk, "init 3");
    CHECK(dec.decode(idx.data(), 500, all, out.data()) == Status::kOk && dec.finished_cleanly() && out == sym,
          "decode beside a bad row");
    idx[250] = 1;
    CHECK(all.check_indexes(idx.data(), 500) != nullptr, "bad row used");
    CHECK(used.prepare_used(tb.view(), idx.data(), 500) != nullptr, "bad row used (call)");
    idx[250] = 3;
    CHECK(all.check_indexes(idx.data(), 500) != nullptr, "index out of range");
    CompatDecoder d2;
    CHECK(d2.init(stream.data(), stream.size()) == Status::kOk, "init 4");
    CHECK(d2.decode(idx.data(), 500, all, out.data()) == Status::kBadIndex, "decoder range check");
  }
  // A value CompressAI cannot represent is refused.
  Tables tb = random_tables(rng, 1, 16);
  int32_t s = INT32_MAX, i = 0;
  Prepared pe;
  pe.prepare_compat(tb.view(), &i, 1);
  std::vector<uint8_t> stream;
  CHECK(compat_encode(&s, &i, 1, pe, stream) == Status::kUnencodable, "unencodable");
}

// The CRC-32C versions crc32c chooses between at run time give the same values: the check value
// of the standard, and random buffers of every length up to 64 at every alignment.
static void test_crc32c() {
  const char* check = "123456789";
  CHECK(crc32c(reinterpret_cast<const uint8_t*>(check), 9) == 0xE3069283u, "CRC-32C check value");
  CHECK(~crc32c_update_table(~0u, reinterpret_cast<const uint8_t*>(check), 9) == 0xE3069283u, "table check value");
#if defined(__x86_64__)
  if (!__builtin_cpu_supports("sse4.2")) return;
  std::mt19937 rng(7);
  std::vector<uint8_t> buf(4096 + 16);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t off = 0; off < 8; ++off)
    for (size_t n = 0; n <= 64; ++n)
      CHECK(crc32c_update_sse42(~0u, buf.data() + off, n) == crc32c_update_table(~0u, buf.data() + off, n),
            "sse4.2 and table CRC differ: offset %zu length %zu", off, n);
  CHECK(crc32c_update_sse42(~0u, buf.data(), 4096) == crc32c_update_table(~0u, buf.data(), 4096), "4096 bytes");
#endif
}

int main() {
  test_crc32c();
  test_native_round_trips();
  test_chosen_layout();
  test_native_corruption();
  test_compat();
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("rans core: all tests passed\n");
  return 0;
}
