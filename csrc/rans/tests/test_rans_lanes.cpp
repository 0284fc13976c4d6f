// Host emulation of the CUDA coder's schedule (csrc/rans/cuda/rans_cuda.cu), for machines
// without a GPU: the per-thread bodies of rans_lanes.h run in plain loops (one iteration = one
// CUDA thread, the compaction with 7 "threads" striding over each lane), on flat buffers holding
// several streams like a batched call. The streams must equal the CPU encoder's byte for byte,
// decode back, and corrupt lanes behind a valid CRC must fail cleanly (built with
// AddressSanitizer by tests/test_rans_cuda.py when available: out-of-range reads abort).
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../rans_lanes.h"

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
  int64_t T = 0, W = 0;
  std::vector<int32_t> cdfs, lengths, offsets;
  TableView view() const { return TableView{cdfs.data(), lengths.data(), offsets.data(), T, W}; }
};

// Random valid tables of one precision: frequencies >= 1 summing to 1 << precision.
static Tables random_tables(std::mt19937_64& rng, int64_t T, int precision) {
  Tables tb;
  tb.T = T;
  tb.W = 3 + static_cast<int64_t>(rng() % 30);
  tb.cdfs.assign(static_cast<size_t>(T * tb.W), 0);
  tb.lengths.resize(T);
  tb.offsets.resize(T);
  const int64_t M = int64_t{1} << precision;
  for (int64_t t = 0; t < T; ++t) {
    int64_t len = 2 + static_cast<int64_t>(rng() % (tb.W - 1));
    if (len - 1 > M) len = M + 1;
    tb.lengths[t] = static_cast<int32_t>(len);
    tb.offsets[t] = static_cast<int32_t>(rng() % 41) - 20;
    const int64_t nsym = len - 1;
    std::vector<int64_t> f(nsym, 1);
    for (int64_t extra = M - nsym; extra > 0;) {  // skewed random split of the remaining mass
      const int64_t s = static_cast<int64_t>(rng() % nsym) * (rng() % 3 == 0 ? 1 : 0);
      const int64_t add = std::max<int64_t>(1, extra / (2 + static_cast<int64_t>(rng() % 4)));
      f[s] += add;
      extra -= add;
    }
    int32_t* c = &tb.cdfs[t * tb.W];
    for (int64_t s = 0; s < nsym; ++s) c[s + 1] = c[s] + static_cast<int32_t>(f[s]);
  }
  return tb;
}

// Symbols mostly inside the tables, ~5% escapes, some int32 extremes.
static void random_symbols(std::mt19937_64& rng, const Tables& tb, int64_t n, std::vector<int32_t>& sym,
                           std::vector<int32_t>& idx) {
  sym.resize(n);
  idx.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = static_cast<int32_t>(rng() % tb.T);
    idx[i] = t;
    const int64_t r = static_cast<int64_t>(rng() % 1000);
    int64_t v = tb.offsets[t] + static_cast<int64_t>(rng() % (tb.lengths[t] - 1));
    if (r < 50) v += static_cast<int64_t>(rng() % 601) - 300;
    if (r >= 990) v = static_cast<int32_t>(rng());
    if (r == 999) v = INT32_MAX;
    if (r == 998) v = INT32_MIN;
    sym[i] = static_cast<int32_t>(v);
  }
}

struct Stream {
  std::vector<int32_t> sym, idx;
};

// What rans_encode_batch_cuda does, with loops for kernels. lanes <= 0: encoder's choice.
static std::vector<std::vector<uint8_t>> emulate_encode(const std::vector<Stream>& streams, const Prepared& pt,
                                                        const TableView& tv, int64_t lanes) {
  std::vector<int32_t> sym, idx;
  std::vector<LaneSlice> slices;
  for (const Stream& s : streams) {
    slices.push_back(LaneSlice{static_cast<int64_t>(sym.size()), static_cast<int64_t>(s.sym.size()),
                               initial_lanes(static_cast<int64_t>(s.sym.size()), lanes), kDefaultStates});
    sym.insert(sym.end(), s.sym.begin(), s.sym.end());
    idx.insert(idx.end(), s.idx.begin(), s.idx.end());
  }
  std::vector<int64_t> sizes;
  std::vector<uint8_t> payload;
  auto round = [&]() {
    std::vector<LaneJob> jobs;
    const int64_t scratch_bytes = plan_encode(slices, jobs);
    constexpr int64_t guard = 64;
    std::vector<uint8_t> scratch(static_cast<size_t>(scratch_bytes + 2 * guard), 0xA5);
    sizes.assign(jobs.size(), 0);
    for (size_t g = 0; g < jobs.size(); ++g)  // encode kernel
      sizes[g] = encode_lane_job_any(jobs[g], sym.data(), idx.data(), tv, static_cast<uint32_t>(pt.precision),
                                     scratch.data() + guard);
    for (int64_t i = 0; i < guard; ++i) {
      CHECK(scratch[i] == 0xA5, "encoder wrote before the scratch buffer");
      CHECK(scratch[scratch.size() - 1 - i] == 0xA5, "encoder wrote past the scratch buffer");
    }
    for (size_t g = 0; g < jobs.size(); ++g)
      CHECK(sizes[g] <= jobs[g].byte_end - jobs[g].byte_begin - 2, "lane %zu outgrew its scratch region", g);
    std::vector<int64_t> lane_end(jobs.size());  // inclusive prefix sum (at::cumsum)
    int64_t total = 0;
    for (size_t g = 0; g < jobs.size(); ++g) lane_end[g] = total += sizes[g];
    payload.assign(static_cast<size_t>(scratch_bytes), 0);
    for (size_t g = 0; g < jobs.size(); ++g)  // compaction kernel: a block of 7 threads per lane
      for (int64_t th = 0; th < 7; ++th)
        copy_lane_bytes(jobs[g], sizes[g], lane_end[g], scratch.data() + guard, payload.data(), th, 7);
  };
  round();
  bool again = false;
  size_t lane0 = 0;
  for (LaneSlice& s : slices) {
    uint64_t bytes = 0;
    for (int64_t i = 0; i < s.lanes; ++i) bytes += static_cast<uint64_t>(sizes[lane0 + i]);
    lane0 += s.lanes;
    if (lanes > 0 || s.n == 0) continue;
    const Layout next = affordable_layout(bytes, s.lanes);
    if (next.lanes != s.lanes || next.states != s.states) {
      s.lanes = next.lanes;
      s.states = next.states;
      again = true;
    }
  }
  if (again) round();
  std::vector<std::vector<uint8_t>> out(streams.size());
  const uint8_t* src = payload.data();
  lane0 = 0;
  for (size_t k = 0; k < slices.size(); ++k) {
    const LaneSlice& s = slices[k];
    assemble_stream(out[k], s.n == 0 ? 16 : pt.precision, s.states, s.n, s.lanes, sizes.data() + lane0, src);
    for (int64_t i = 0; i < s.lanes; ++i) src += sizes[lane0 + i];
    lane0 += s.lanes;
  }
  return out;
}

// What rans_decode_batch_cuda does after its argument checks; returns the first failure.
static Status emulate_decode(const std::vector<std::vector<uint8_t>>& data, const std::vector<Stream>& streams,
                             const Prepared& pt, std::vector<int32_t>& out) {
  std::vector<LaneJob> jobs;
  std::vector<uint8_t> payload;
  std::vector<int32_t> idx;
  for (size_t k = 0; k < data.size(); ++k) {
    const int64_t n = static_cast<int64_t>(streams[k].idx.size());
    StreamHeader h;
    const Status st = parse_header(data[k].data(), data[k].size(), n, h);
    if (st != Status::kOk) return st;
    if (n > 0 && h.precision != pt.precision) return Status::kMismatch;
    plan_decode_stream(h, static_cast<int64_t>(idx.size()), n, static_cast<int64_t>(payload.size()), jobs);
    payload.insert(payload.end(), data[k].begin() + static_cast<int64_t>(h.payload_pos), data[k].end());
    idx.insert(idx.end(), streams[k].idx.begin(), streams[k].idx.end());
  }
  // Exactly sized copies, so that AddressSanitizer sees any read past the end.
  std::vector<uint8_t> exact(payload);
  out.assign(idx.size(), 0);
  const DecodeCtx ctx = decode_ctx_for(pt, pt.tv, pt.bucket.data());
  Status first = Status::kOk;
  for (const LaneJob& j : jobs) {  // decode kernel, then the host's scan of the lane statuses
    const Status s = decode_lane_job(j, exact.data(), idx.data(), ctx, out.data());
    if (first == Status::kOk) first = s;
  }
  return first;
}

static void reseal(std::vector<uint8_t>& s) {
  seal_stream(s.data(), s.size());
}

static void test_identity_and_round_trip(std::mt19937_64& rng) {
  const int64_t sizes[] = {0, 1, 2, 3, 17, 1000, 70001, 130000};
  const int64_t lane_args[] = {0, 1, 3, 64, 4096, 100000};
  for (int trial = 0; trial < 12; ++trial) {
    const int precision = trial % 3 == 0 ? 16 : trial % 3 == 1 ? 11 : 1 + static_cast<int>(rng() % 16);
    const Tables tb = random_tables(rng, 1 + static_cast<int64_t>(rng() % 10), precision);
    std::vector<int32_t> rows(static_cast<size_t>(tb.T));
    for (int64_t t = 0; t < tb.T; ++t) rows[t] = static_cast<int32_t>(t);
    Prepared pt;
    CHECK(pt.prepare(tb.view(), rows.data(), tb.T, false, 0) == nullptr, "tables");
    std::vector<Stream> streams(1 + rng() % 4);
    for (Stream& s : streams) random_symbols(rng, tb, sizes[rng() % 8], s.sym, s.idx);
    for (int64_t lanes : lane_args) {
      const auto gpu = emulate_encode(streams, pt, tb.view(), lanes);
      for (size_t k = 0; k < streams.size(); ++k) {
        std::vector<uint8_t> cpu;
        const int64_t n = static_cast<int64_t>(streams[k].sym.size());
        Prepared pk;  // the CPU op prepares only the rows this stream uses
        CHECK(pk.prepare(tb.view(), streams[k].idx.data(), n, true, 0) == nullptr, "prepare");
        encode_stream(streams[k].sym.data(), streams[k].idx.data(), n, lanes, pk, cpu, SerialFor{});
        CHECK(cpu == gpu[k], "trial %d lanes %lld stream %zu (n=%lld): GPU schedule %zu bytes, CPU %zu bytes", trial,
              static_cast<long long>(lanes), k, static_cast<long long>(n), gpu[k].size(), cpu.size());
      }
      std::vector<int32_t> out;
      CHECK(emulate_decode(gpu, streams, pt, out) == Status::kOk, "decode failed (trial %d)", trial);
      size_t pos = 0;
      for (const Stream& s : streams) {
        CHECK(std::equal(s.sym.begin(), s.sym.end(), out.begin() + static_cast<int64_t>(pos)), "symbols differ");
        pos += s.sym.size();
      }
    }
  }
}

// Every symbol escaped with a maximal bypass value: the worst case the scratch bound must hold.
static void test_worst_case_scratch(std::mt19937_64& rng) {
  const Tables tb = random_tables(rng, 3, 16);
  std::vector<int32_t> rows = {0, 1, 2};
  Prepared pt;
  CHECK(pt.prepare(tb.view(), rows.data(), tb.T, false, 0) == nullptr, "tables");
  std::vector<Stream> streams(3);
  for (Stream& s : streams) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 5000);
    for (int64_t i = 0; i < n; ++i) {
      s.idx.push_back(static_cast<int32_t>(rng() % 3));
      s.sym.push_back(rng() % 2 ? INT32_MIN : INT32_MAX);
    }
  }
  for (int64_t lanes : {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{100000}}) {
    const auto gpu = emulate_encode(streams, pt, tb.view(), lanes);
    for (size_t k = 0; k < streams.size(); ++k) {
      std::vector<uint8_t> cpu;
      encode_stream(streams[k].sym.data(), streams[k].idx.data(), static_cast<int64_t>(streams[k].sym.size()), lanes,
                    pt, cpu, SerialFor{});
      CHECK(cpu == gpu[k], "worst case, lanes %lld: streams differ", static_cast<long long>(lanes));
    }
    std::vector<int32_t> out;
    CHECK(emulate_decode(gpu, streams, pt, out) == Status::kOk, "worst case decode failed");
  }
}

static void test_corrupt_lanes(std::mt19937_64& rng) {
  const Tables tb = random_tables(rng, 6, 16);
  std::vector<int32_t> rows = {0, 1, 2, 3, 4, 5};
  Prepared pt;
  CHECK(pt.prepare(tb.view(), rows.data(), tb.T, false, 0) == nullptr, "tables");
  std::vector<Stream> streams(2);
  for (Stream& s : streams) random_symbols(rng, tb, 20000, s.sym, s.idx);
  const auto good = emulate_encode(streams, pt, tb.view(), 5);
  int detected = 0, trials = 0;
  for (int t = 0; t < 400; ++t) {
    auto bad = good;
    std::vector<uint8_t>& s = bad[rng() % 2];
    const size_t from = 20 + rng() % (s.size() - 20);
    const int mode = t % 3;
    if (mode == 0)
      s[from] ^= static_cast<uint8_t>(1u << (rng() % 8));
    else if (mode == 1)
      for (size_t i = from; i < s.size(); ++i) s[i] = static_cast<uint8_t>(rng());
    else
      for (size_t i = from; i < std::min(s.size(), from + 8); ++i) s[i] = 0xFF;
    reseal(s);  // past the CRC: only the lane decoder's checks remain
    std::vector<int32_t> out;
    const Status st = emulate_decode(bad, streams, pt, out);
    ++trials;
    detected += st != Status::kOk;
  }
  // Bypass chunks are stored verbatim, so a few flips decode to other valid values; most fail.
  CHECK(detected * 10 >= trials * 7, "only %d of %d corrupt streams detected", detected, trials);
}

int main() {
  std::mt19937_64 rng(std::random_device{}());
  test_identity_and_round_trip(rng);
  test_worst_case_scratch(rng);
  test_corrupt_lanes(rng);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("rans lanes: all tests passed\n");
  return 0;
}
