// CPU torch ops around the torch-free rANS core (csrc/rans/rans_core.h, rans_stream.h).
// Schemas are declared in csrc/register.cpp under "--- rans ---".
//
// Tensors in, tensors out: no Python lists anywhere. Arguments are validated here with messages
// naming the argument (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError); the core
// validates the bitstream itself and reports failures as Status codes, turned into ValueError.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "common/gil_release.h"
#include "rans/cpu/op_helpers.h"
#include "rans/rans_compat_tables.h"
#include "rans/rans_stream.h"

namespace dualres::rans {
namespace {

using ops::check_int32_cpu;
using ops::convert_embedding;
using ops::stream_bytes;
using ops::throw_status;
using ops::to_tensor;

// Owns contiguous copies (when needed) of the table tensors and exposes them as a TableView.
struct Tables {
  at::Tensor cdfs, lengths, offsets;
  TableView view;
  Tables(const at::Tensor& c, const at::Tensor& l, const at::Tensor& o) {
    check_int32_cpu(c, "cdfs");
    check_int32_cpu(l, "cdf_lengths");
    check_int32_cpu(o, "offsets");
    TORCH_CHECK_VALUE(c.dim() == 2, "cdfs must be 2-D [tables, max_length], got shape ", c.sizes());
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == c.size(0), "cdf_lengths must be 1-D with one entry per cdfs row (",
                      c.size(0), "), got shape ", l.sizes());
    TORCH_CHECK_VALUE(o.dim() == 1 && o.size(0) == c.size(0), "offsets must be 1-D with one entry per cdfs row (",
                      c.size(0), "), got shape ", o.sizes());
    cdfs = c.contiguous();
    lengths = l.contiguous();
    offsets = o.contiguous();
    view = TableView{cdfs.data_ptr<int32_t>(), lengths.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), c.size(0),
                     c.size(1)};
  }
};

void prepare_or_throw(Prepared& pt, const Tables& tb, const at::Tensor& idx, bool for_encode, bool compat) {
  const char* err = compat ? pt.prepare_compat(tb.view, idx.data_ptr<int32_t>(), idx.numel())
                           : pt.prepare(tb.view, idx.data_ptr<int32_t>(), idx.numel(), for_encode, 0);
  TORCH_CHECK_VALUE(err == nullptr, err ? err : "");
}

constexpr const char* kBadIndexMessage = "indexes: value out of range [0, number of CDF tables)";

// ATen's thread pool behind the core's parallel_for interface. Lanes are handed out one at a
// time from a shared counter rather than in fixed halves: when a worker is descheduled (a busy
// machine) or a lane is slower, the other workers take over its lanes instead of waiting.
struct AtenFor {
  template <class F>
  void operator()(int64_t b, int64_t e, F&& f) const {
    if (e <= b) return;
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), e - b);
    if (workers <= 1 || at::in_parallel_region()) {
      f(b, e);
      return;
    }
    std::atomic<int64_t> next{b};
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      for (int64_t i = next.fetch_add(1); i < e; i = next.fetch_add(1)) f(i, i + 1);
    });
  }
};

std::pair<at::Tensor, at::Tensor> symbols_and_indexes(const at::Tensor& symbols, const at::Tensor& indexes) {
  check_int32_cpu(symbols, "symbols");
  check_int32_cpu(indexes, "indexes");
  TORCH_CHECK_VALUE(symbols.sizes() == indexes.sizes(), "symbols and indexes must have the same shape, got ",
                    symbols.sizes(), " and ", indexes.sizes());
  return {symbols.contiguous(), indexes.contiguous()};
}

at::Tensor rans_encode(const at::Tensor& symbols, const at::Tensor& indexes, const at::Tensor& cdfs,
                       const at::Tensor& cdf_lengths, const at::Tensor& offsets, int64_t lanes) {
  auto [sym, idx] = symbols_and_indexes(symbols, indexes);
  Tables tb(cdfs, cdf_lengths, offsets);
  Prepared pt;
  prepare_or_throw(pt, tb, idx, /*for_encode=*/true, /*compat=*/false);
  std::vector<uint8_t> out;
  Status st;
  {
    GilRelease nogil;
    st = encode_stream(sym.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), idx.numel(), lanes, pt, out, AtenFor{});
  }
  throw_status(st, "rans_encode");
  return to_tensor(out);
}

at::Tensor rans_decode(const at::Tensor& data, const at::Tensor& indexes, const at::Tensor& cdfs,
                       const at::Tensor& cdf_lengths, const at::Tensor& offsets) {
  size_t size = 0;
  const uint8_t* bytes = stream_bytes(data, size);
  check_int32_cpu(indexes, "indexes");
  at::Tensor idx = indexes.contiguous();
  Tables tb(cdfs, cdf_lengths, offsets);
  Prepared pt;
  prepare_or_throw(pt, tb, idx, /*for_encode=*/false, /*compat=*/false);
  at::Tensor out = at::empty(indexes.sizes(), at::TensorOptions().dtype(at::kInt));
  Status st;
  {
    GilRelease nogil;
    st = decode_stream(bytes, size, idx.data_ptr<int32_t>(), idx.numel(), pt, out.data_ptr<int32_t>(), AtenFor{});
  }
  throw_status(st, "rans_decode");
  return out;
}

at::Tensor rans_encode_compat(const at::Tensor& symbols, const at::Tensor& indexes, const at::Tensor& cdfs,
                              const at::Tensor& cdf_lengths, const at::Tensor& offsets) {
  auto [sym, idx] = symbols_and_indexes(symbols, indexes);
  Tables tb(cdfs, cdf_lengths, offsets);
  Prepared pt;
  prepare_or_throw(pt, tb, idx, /*for_encode=*/true, /*compat=*/true);
  std::vector<uint8_t> out;
  Status st;
  {
    GilRelease nogil;
    st = compat_encode(sym.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), idx.numel(), pt, out);
  }
  throw_status(st, "rans_encode_compat");
  return to_tensor(out);
}

// Decodes indexes.numel() symbols of a CompressAI stream. state: int64 [2] = (next byte position,
// 64-bit rANS state), updated in place; position 0 means "start of the stream" (reads the
// initial state). With check_end the stream must end exactly here (whole-stream decode).
at::Tensor decode_compat_impl(const at::Tensor& data, int64_t* state, const at::Tensor& indexes, const at::Tensor& cdfs,
                              const at::Tensor& cdf_lengths, const at::Tensor& offsets, bool check_end) {
  size_t size = 0;
  const uint8_t* bytes = stream_bytes(data, size);
  check_int32_cpu(indexes, "indexes");
  at::Tensor idx = indexes.contiguous();
  Tables tb(cdfs, cdf_lengths, offsets);
  CompatTables ct;
  const char* err = ct.prepare_used(tb.view, idx.data_ptr<int32_t>(), idx.numel());
  TORCH_CHECK_VALUE(err == nullptr, err ? err : "");
  at::Tensor out = at::empty(indexes.sizes(), at::TensorOptions().dtype(at::kInt));
  if (idx.numel() == 0 && check_end) return out;
  CompatDecoder dec;
  if (state[0] == 0) {
    throw_status(dec.init(bytes, size), "rans_decode_compat");
  } else {
    TORCH_CHECK_VALUE(state[0] > 0 && static_cast<uint64_t>(state[0]) <= size,
                      "state: byte position outside the stream (was set_stream called with this data?)");
    dec.data = bytes;
    dec.size = size;
    dec.pos = static_cast<size_t>(state[0]);
    dec.x = static_cast<uint64_t>(state[1]);
  }
  Status st;
  {
    GilRelease nogil;
    st = dec.decode(idx.data_ptr<int32_t>(), idx.numel(), ct, out.data_ptr<int32_t>());
  }
  if (st == Status::kOk && check_end && !dec.finished_cleanly()) st = Status::kCorrupt;
  throw_status(st, "rans_decode_compat");
  state[0] = static_cast<int64_t>(dec.pos);
  state[1] = static_cast<int64_t>(dec.x);
  return out;
}

at::Tensor rans_decode_compat(const at::Tensor& data, const at::Tensor& indexes, const at::Tensor& cdfs,
                              const at::Tensor& cdf_lengths, const at::Tensor& offsets) {
  int64_t state[2] = {0, 0};
  return decode_compat_impl(data, state, indexes, cdfs, cdf_lengths, offsets, /*check_end=*/true);
}

at::Tensor rans_decode_compat_stream(const at::Tensor& data, const at::Tensor& state, const at::Tensor& indexes,
                                     const at::Tensor& cdfs, const at::Tensor& cdf_lengths, const at::Tensor& offsets) {
  TORCH_CHECK_TYPE(state.scalar_type() == at::kLong, "state must be an int64 tensor, got ", state.scalar_type());
  TORCH_CHECK_VALUE(state.device().is_cpu() && state.numel() == 2 && state.is_contiguous(),
                    "state must be a contiguous CPU tensor with 2 elements");
  return decode_compat_impl(data, state.data_ptr<int64_t>(), indexes, cdfs, cdf_lengths, offsets, /*check_end=*/false);
}

c10::intrusive_ptr<RansCompatTables> rans_compat_prepare(const at::Tensor& cdfs, const at::Tensor& cdf_lengths,
                                                         const at::Tensor& offsets) {
  Tables tb(cdfs, cdf_lengths, offsets);
  auto h = c10::make_intrusive<RansCompatTables>();
  h->tables.prepare_all(tb.view);
  return h;
}

// A whole CompressAI stream with prepared tables, into the symbols or, with means or dtype, their
// dequantised values (CompressAI's decompress: dtype(symbol) + mean) written by the decode loop.
at::Tensor rans_decode_compat_prepared(const at::Tensor& data, const at::Tensor& indexes,
                                       const c10::intrusive_ptr<RansCompatTables>& tables,
                                       const std::optional<at::Tensor>& means, std::optional<at::ScalarType> dtype) {
  size_t size = 0;
  const uint8_t* bytes = stream_bytes(data, size);
  check_int32_cpu(indexes, "indexes");
  TORCH_CHECK_VALUE(tables, "tables: expected a RansCompatTables handle from rans_compat_prepare");
  const CompatTables& ct = tables->tables;
  const at::Tensor idx = indexes.contiguous();
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int64_t n = idx.numel();
  const char* err = ct.check_indexes(ip, n);
  TORCH_CHECK_VALUE(err == nullptr, err ? err : "");
  at::ScalarType out_type = at::kInt;
  at::Tensor m;
  if (means) {
    TORCH_CHECK_TYPE(means->scalar_type() == at::kFloat || means->scalar_type() == at::kDouble,
                     "means must be a float32 or float64 tensor, got ", means->scalar_type());
    TORCH_CHECK_VALUE(means->device().is_cpu(), "means must be on the CPU, got ", means->device());
    TORCH_CHECK_VALUE(means->numel() == n, "means must have one element per index (", n, "), got shape ",
                      means->sizes());
    m = means->contiguous();
    out_type = m.scalar_type();
  } else if (dtype) {
    TORCH_CHECK_TYPE(*dtype == at::kFloat || *dtype == at::kDouble, "dtype must be float32 or float64, got ", *dtype);
    out_type = *dtype;
  }
  at::Tensor out = at::empty(indexes.sizes(), at::TensorOptions().dtype(out_type));
  if (n == 0) return out;
  CompatDecoder dec;
  throw_status(dec.init(bytes, size), "rans_decode_compat");
  Status st;
  {
    GilRelease nogil;
    if (out_type == at::kInt) {
      st = dec.decode(ip, n, ct, CompatSymbols{out.data_ptr<int32_t>()});
    } else if (out_type == at::kFloat) {
      st = m.defined()
               ? dec.decode(ip, n, ct, CompatDequantized<float, true>{out.data_ptr<float>(), m.data_ptr<float>()})
               : dec.decode(ip, n, ct, CompatDequantized<float, false>{out.data_ptr<float>(), nullptr});
    } else {
      st = m.defined()
               ? dec.decode(ip, n, ct, CompatDequantized<double, true>{out.data_ptr<double>(), m.data_ptr<double>()})
               : dec.decode(ip, n, ct, CompatDequantized<double, false>{out.data_ptr<double>(), nullptr});
    }
  }
  TORCH_CHECK_VALUE(st != Status::kBadIndex, kBadIndexMessage);
  if (st == Status::kOk && !dec.finished_cleanly()) st = Status::kCorrupt;
  throw_status(st, "rans_decode_compat");
  return out;
}

// The validated header of a native stream (CRC included): [precision, states per lane, symbols,
// lanes, lane byte length...]. Lets tools and tests inspect a stream without a second parser.
std::vector<int64_t> rans_stream_info(const at::Tensor& data) {
  size_t size = 0;
  const uint8_t* bytes = stream_bytes(data, size);
  StreamHeader h;
  throw_status(parse_header(bytes, size, /*expected_symbols=*/-1, h), "rans_stream_info");
  std::vector<int64_t> info{h.precision, h.states, h.symbols, h.lanes};
  for (int64_t i = 0; i < h.lanes; ++i) info.push_back(static_cast<int64_t>(h.lane_offset[i + 1] - h.lane_offset[i]));
  return info;
}

// The embedded form of a multi-lane stream and back (rans_stream.h, FORMAT.md "Embedded streams").
at::Tensor rans_embed(const at::Tensor& data, int64_t symbols, int64_t precision) {
  return convert_embedding(data, symbols, precision, &embed_stream, "rans_embed");
}

at::Tensor rans_restore(const at::Tensor& data, int64_t symbols, int64_t precision) {
  return convert_embedding(data, symbols, precision, &restore_stream, "rans_restore");
}

}  // namespace
}  // namespace dualres::rans

TORCH_LIBRARY_IMPL(dualres_ext, CPU, m) {
  m.impl("rans_stream_info", &dualres::rans::rans_stream_info);
  m.impl("rans_embed", &dualres::rans::rans_embed);
  m.impl("rans_restore", &dualres::rans::rans_restore);
  m.impl("rans_encode", &dualres::rans::rans_encode);
  m.impl("rans_decode", &dualres::rans::rans_decode);
  m.impl("rans_encode_compat", &dualres::rans::rans_encode_compat);
  m.impl("rans_decode_compat", &dualres::rans::rans_decode_compat);
  m.impl("rans_decode_compat_stream", &dualres::rans::rans_decode_compat_stream);
  dualres::rans::register_compat_tables_class();
  m.impl("rans_compat_prepare", &dualres::rans::rans_compat_prepare);
  m.impl("rans_decode_compat_prepared", &dualres::rans::rans_decode_compat_prepared);
}
