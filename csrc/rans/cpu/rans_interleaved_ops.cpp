// CPU torch ops of the interleaved rANS stream, version 2 (csrc/rans/FORMAT.md, "Interleaved
// stream, version 2"): rans_iv_prepare, rans_iv_encode, rans_iv_decode, rans_iv_decode_deferred,
// rans_iv_stream_info, rans_iv_embed, rans_iv_restore, rans_iv_isa; and rans_stream_kind, which
// tells the native streams apart. Schemas in csrc/register.cpp under "--- rans ---".
//
// The coders are csrc/rans/rans_interleaved.h (scalar reference, warp body) and
// rans_interleaved_simd.cpp (AVX2 / AVX-512); `isa` picks one: -1 the best this CPU runs
// (DUALRES_RANS_ISA may lower it), 0 scalar, 1 AVX2, 2 AVX-512, 3 the CUDA warp body emulated on
// the host (IvHostLanes; for tests). All write the same bytes. Threads (ATen's pool) run groups.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/gil_release.h"
#include "rans/cpu/op_helpers.h"
#include "rans/cpu/rans_interleaved_simd.h"
#include "rans/rans_iv_tables.h"

namespace dualres::rans {
namespace {

using ops::check_int32_cpu;
using ops::convert_embedding;
using ops::stream_bytes;
using ops::throw_status;
using ops::to_tensor;

constexpr int kIsaWarpEmulator = 3;

// pp.check_indexes with the index range found by the widest ISA this CPU runs.
const char* checked_indexes(const IvPrepared& pp, const int32_t* idx, int64_t n) {
  int32_t lo = 0, hi = 0;
  if (n > 0) iv_index_range(idx, n, lo, hi);
  return pp.check_indexes(idx, n, lo, hi);
}

// The coder to use: -1 the best (run-time detected), else the one asked for, if this CPU runs it.
int resolve_isa(int64_t isa) {
  TORCH_CHECK_VALUE(isa >= -1 && isa <= kIsaWarpEmulator,
                    "isa must be -1 (auto), 0 (scalar), 1 (avx2), 2 (avx512) "
                    "or 3 (warp emulator), got ",
                    isa);
  if (isa < 0) return static_cast<int>(iv_best_isa());
  if (isa <= 2)
    TORCH_CHECK_VALUE(iv_isa_supported(static_cast<IvIsa>(isa)), "isa ", iv_isa_name(static_cast<IvIsa>(isa)),
                      " is not supported by this CPU");
  return static_cast<int>(isa);
}

// Groups handed out one at a time from a shared counter (a descheduled worker's groups are taken
// over by the others).
template <class F>
void parallel_groups(int64_t count, F&& f) {
  if (count <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t g = 0; g < count; ++g) f(g);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t g = next.fetch_add(1); g < count; g = next.fetch_add(1)) f(g);
  });
}

c10::intrusive_ptr<RansIvTables> rans_iv_prepare(const at::Tensor& cdfs, const at::Tensor& cdf_lengths,
                                                 const at::Tensor& offsets) {
  check_int32_cpu(cdfs, "cdfs");
  check_int32_cpu(cdf_lengths, "cdf_lengths");
  check_int32_cpu(offsets, "offsets");
  TORCH_CHECK_VALUE(cdfs.dim() == 2, "cdfs must be 2-D [tables, max_length], got shape ", cdfs.sizes());
  TORCH_CHECK_VALUE(cdf_lengths.dim() == 1 && cdf_lengths.size(0) == cdfs.size(0),
                    "cdf_lengths must be 1-D with one entry per cdfs row (", cdfs.size(0), "), got shape ",
                    cdf_lengths.sizes());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == cdfs.size(0),
                    "offsets must be 1-D with one entry per cdfs row (", cdfs.size(0), "), got shape ",
                    offsets.sizes());
  // Gather indexes are int32: T * stride and T << 8 must stay below 2^31.
  TORCH_CHECK_VALUE(cdfs.size(0) < (1 << 22) && cdfs.size(0) * std::max<int64_t>(cdfs.size(1), 1) < (int64_t{1} << 30),
                    "cdfs is too large for the interleaved coder (tables x width must stay below 2^30)");
  const at::Tensor c = cdfs.contiguous(), l = cdf_lengths.contiguous(), o = offsets.contiguous();
  TableView tv{c.data_ptr<int32_t>(), l.data_ptr<int32_t>(), o.data_ptr<int32_t>(), c.size(0), c.size(1)};
  auto h = c10::make_intrusive<RansIvTables>();
  const char* err = h->prep.prepare(tv);
  TORCH_CHECK_VALUE(err == nullptr, err ? err : "");
  return h;
}

// One group encoded with the chosen coder into `g` (states and words in decoder order).
void encode_group(int isa, const int32_t* sym, const int32_t* idx, int64_t n, int width, int64_t s0, int64_t s1,
                  const IvTablesView& tb, uint32_t* x, IvGroupOut& g) {
  if (isa == kIsaWarpEmulator) {
    IvHostLanes L{width};
    IvHostLanes::Var<uint32_t> xv;
    for (int k = 0; k < width; ++k) xv[k] = x[k];
    const int64_t cap = (s1 - s0) * width * (kIvMaxChunks + 1);
    std::vector<uint16_t> scratch(static_cast<size_t>(cap));
    const int64_t cnt = iv_warp_encode(L, sym, idx, n, s0, s1, tb, xv, scratch.data(), cap);
    g.words.assign(scratch.end() - cnt, scratch.end());
    for (int k = 0; k < width; ++k) x[k] = xv[k];
  } else {
    g.words.clear();
    iv_encode_steps(static_cast<IvIsa>(isa), sym, idx, n, width, s0, s1, tb, x, g.words);
    std::reverse(g.words.begin(), g.words.end());
  }
  std::copy(x, x + width, g.states);
}

at::Tensor rans_iv_encode(const at::Tensor& symbols, const at::Tensor& indexes,
                          const c10::intrusive_ptr<RansIvTables>& tables, int64_t width, int64_t groups, bool chained,
                          int64_t isa_arg) {
  check_int32_cpu(symbols, "symbols");
  check_int32_cpu(indexes, "indexes");
  TORCH_CHECK_VALUE(symbols.sizes() == indexes.sizes(), "symbols and indexes must have the same shape, got ",
                    symbols.sizes(), " and ", indexes.sizes());
  TORCH_CHECK_VALUE(iv_width_ok(static_cast<int>(width)), "width must be 1, 2, 4, 8, 16 or 32, got ", width);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= kIvMaxGroups, "groups must be in [1, 65536], got ", groups);
  const int isa = resolve_isa(isa_arg);
  const at::Tensor sym = symbols.contiguous(), idx = indexes.contiguous();
  const int64_t n = idx.numel();
  const IvPrepared& pp = tables->prep;
  if (const char* err = checked_indexes(pp, idx.data_ptr<int32_t>(), n)) TORCH_CHECK_VALUE(false, err);
  const int W = static_cast<int>(width);
  const int64_t steps = iv_steps(n, W);
  const int64_t G = std::min<int64_t>(groups, steps);
  const IvTablesView tb = pp.view();
  std::vector<IvGroupOut> outs(static_cast<size_t>(G));
  std::vector<uint8_t> out;
  {
    GilRelease nogil(n > 4096);
    const int32_t* s = sym.data_ptr<int32_t>();
    const int32_t* ix = idx.data_ptr<int32_t>();
    if (chained) {
      uint32_t x[kIvMaxWidth];
      std::fill(x, x + W, kIvLow);
      for (int64_t g = G - 1; g >= 0; --g)
        encode_group(isa, s, ix, n, W, iv_group_begin(steps, G, g), iv_group_begin(steps, G, g + 1), tb, x, outs[g]);
    } else {
      parallel_groups(G, [&](int64_t g) {
        uint32_t x[kIvMaxWidth];
        std::fill(x, x + W, kIvLow);
        encode_group(isa, s, ix, n, W, iv_group_begin(steps, G, g), iv_group_begin(steps, G, g + 1), tb, x, outs[g]);
      });
    }
    iv_assemble(out, n > 0 ? pp.precision : 16, W, chained && G > 1, n, outs);
  }
  return to_tensor(out);
}

// rans_iv_decode, also giving the stream's parsed header `h` (for its group count).
at::Tensor decode_stream_groups(const at::Tensor& data, const at::Tensor& indexes,
                                const c10::intrusive_ptr<RansIvTables>& tables, int64_t isa_arg, IvHeader& h) {
  size_t size = 0;
  const uint8_t* bytes = stream_bytes(data, size);
  check_int32_cpu(indexes, "indexes");
  const int isa = resolve_isa(isa_arg);
  const at::Tensor idx = indexes.contiguous();
  const int64_t n = idx.numel();
  throw_status(iv_parse_header(bytes, size, n, h), "rans_iv_decode");
  const IvPrepared& pp = tables->prep;
  if (n > 0 && h.precision != pp.precision) throw_status(Status::kMismatch, "rans_iv_decode");
  if (const char* err = checked_indexes(pp, idx.data_ptr<int32_t>(), n)) TORCH_CHECK_VALUE(false, err);
  at::Tensor out = at::empty(indexes.sizes(), at::TensorOptions().dtype(at::kInt));
  const IvTablesView tb = pp.view();
  const int W = h.width;
  const int64_t steps = iv_steps(n, W);
  std::vector<Status> status(static_cast<size_t>(h.groups), Status::kOk);
  {
    GilRelease nogil(n > 4096);
    const int32_t* ix = idx.data_ptr<int32_t>();
    int32_t* o = out.data_ptr<int32_t>();
    const uint8_t* words = bytes + h.words_pos;
    parallel_groups(h.groups, [&](int64_t g) {
      uint32_t x[kIvMaxWidth];
      for (int k = 0; k < W; ++k) x[k] = iv_load_u32(bytes + h.states_pos + 4 * (g * W + k));
      const int64_t s0 = iv_group_begin(steps, h.groups, g), s1 = iv_group_begin(steps, h.groups, g + 1);
      Status st;
      if (isa == kIsaWarpEmulator) {
        IvHostLanes L{W};
        IvHostLanes::Var<uint32_t> xv;
        for (int k = 0; k < W; ++k) xv[k] = x[k];
        st = iv_warp_decode(L, ix, n, s0, s1, tb, xv, words, h.word_offset[g], h.word_offset[g + 1], o);
        for (int k = 0; k < W; ++k) x[k] = xv[k];
      } else {
        IvWordReader r{words, h.word_offset[g], h.word_offset[g + 1]};
        st = iv_decode_steps(static_cast<IvIsa>(isa), ix, n, W, s0, s1, tb, x, r, o);
        if (st == Status::kOk && r.overrun) st = Status::kTruncated;
        if (st == Status::kOk && r.pos != r.end) st = Status::kCorrupt;
      }
      if (st == Status::kOk) st = iv_check_group_end(h, bytes, g, x);
      status[g] = st;
    });
  }
  for (Status st : status) throw_status(st, "rans_iv_decode");
  return out;
}

// The CPU side of rans_iv_decode_deferred: the CPU decoder raises at once, so the status it
// gives back (one int32 per group, 0 = ok, as the CUDA one) is always zeros.
std::tuple<at::Tensor, at::Tensor> rans_iv_decode_deferred(const at::Tensor& data, const at::Tensor& indexes,
                                                           const c10::intrusive_ptr<RansIvTables>& tables) {
  IvHeader h;
  at::Tensor out = decode_stream_groups(data, indexes, tables, -1, h);
  return {out, at::zeros({std::max<int64_t>(h.groups, 1)}, at::TensorOptions().dtype(at::kInt))};
}

at::Tensor rans_iv_decode(const at::Tensor& data, const at::Tensor& indexes,
                          const c10::intrusive_ptr<RansIvTables>& tables, int64_t isa_arg) {
  IvHeader h;
  return decode_stream_groups(data, indexes, tables, isa_arg, h);
}

// Which native stream `data` is, as the decoders' header and CRC checks find it: 1 multi-lane
// (version 1), 2 interleaved (version 2), 0 neither (e.g. a CompressAI stream). No exception:
// a decoder asks this of every string it gets.
int64_t rans_stream_kind(const at::Tensor& data) {
  size_t size = 0;
  const uint8_t* bytes = stream_bytes(data, size);
  StreamHeader lanes;
  if (parse_header(bytes, size, -1, lanes) == Status::kOk) return 1;
  IvHeader iv;
  if (iv_parse_header(bytes, size, -1, iv) == Status::kOk) return 2;
  return 0;
}

// [precision, width, chained, symbols, groups, words of each group...], validated like a decoder.
std::vector<int64_t> rans_iv_stream_info(const at::Tensor& data) {
  size_t size = 0;
  const uint8_t* bytes = stream_bytes(data, size);
  IvHeader h;
  throw_status(iv_parse_header(bytes, size, -1, h), "rans_iv_stream_info");
  std::vector<int64_t> info{h.precision, h.width, h.chained ? 1 : 0, h.symbols, h.groups};
  for (int64_t g = 0; g < h.groups; ++g) info.push_back(static_cast<int64_t>(h.word_offset[g + 1] - h.word_offset[g]));
  return info;
}

// The embedded form of an interleaved stream and back (rans_interleaved.h, FORMAT.md "Embedded
// interleaved streams").
at::Tensor rans_iv_embed(const at::Tensor& data, int64_t symbols, int64_t precision) {
  return convert_embedding(data, symbols, precision, &iv_embed_stream, "rans_iv_embed");
}

at::Tensor rans_iv_restore(const at::Tensor& data, int64_t symbols, int64_t precision) {
  return convert_embedding(data, symbols, precision, &iv_restore_stream, "rans_iv_restore");
}

}  // namespace

// [the coder -1 resolves to, the best this CPU supports] as isa numbers.
std::vector<int64_t> rans_iv_isa() {
  int64_t hw = 0;
  for (int i = 2; i >= 0; --i)
    if (iv_isa_supported(static_cast<IvIsa>(i))) {
      hw = i;
      break;
    }
  return {static_cast<int64_t>(iv_best_isa()), hw};
}

}  // namespace dualres::rans

TORCH_LIBRARY_IMPL(dualres_ext, CPU, m) {
  dualres::rans::register_iv_tables_class();
  m.impl("rans_iv_prepare", &dualres::rans::rans_iv_prepare);
  m.impl("rans_iv_encode", &dualres::rans::rans_iv_encode);
  m.impl("rans_iv_decode", &dualres::rans::rans_iv_decode);
  m.impl("rans_iv_decode_deferred", &dualres::rans::rans_iv_decode_deferred);
  m.impl("rans_iv_stream_info", &dualres::rans::rans_iv_stream_info);
  m.impl("rans_stream_kind", &dualres::rans::rans_stream_kind);
  m.impl("rans_iv_embed", &dualres::rans::rans_iv_embed);
  m.impl("rans_iv_restore", &dualres::rans::rans_iv_restore);
}
