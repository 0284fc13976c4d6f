// CUDA kernels for the native multi-lane rANS stream (csrc/rans/FORMAT.md, section "GPU path").
// Schemas: csrc/register.cpp under "--- rans ---".
//
// The per-symbol coding is NOT reimplemented here: native_encode_lane_raw / native_decode_lane
// from rans_core.h are compiled for the device (DUALRES_HD), so GPU lanes run the very code the
// CPU lanes run and the streams are byte-identical for the same lane count. This file only
// schedules lanes (one thread per lane), moves bytes and assembles/parses the small header on
// the host. The lane plans and per-thread bodies are in rans_lanes.h, which a host-only test
// (csrc/rans/tests/test_rans_lanes.cpp) runs without a GPU against the CPU encoder.
//
// Encode:  check indexes (device flag) -> one thread per lane encodes into a worst-case-sized
//          scratch region -> lane sizes -> inclusive prefix sum (at::cumsum, device) -> compaction
//          into one contiguous payload (device) -> lane sizes to the host (the one synchronisation)
//          -> one device->host copy of all payload bytes -> headers + CRC-32C on the host.
// Decode:  headers parsed and CRC-checked on the host (the stream is there anyway) -> all payloads
//          in one host->device copy -> one thread per lane, every read bounds-checked against the
//          lane's byte range -> per-lane status to the host -> ValueError on any failure.
// Batched entry points code several slices/images (sharing one set of tables) per launch.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <numeric>
#include <vector>

#include "common/gil_release.h"
#include "rans/rans_lanes.h"

namespace dualres::rans {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Sets *bad when an index lies outside [0, T): the coding kernels then touch no table at all.
__global__ void check_indexes_kernel(const int32_t* idx, int64_t n, int64_t T, int32_t* bad) {
  const int64_t stride = int64_t{blockDim.x} * gridDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t t = idx[i];
    if (t < 0 || t >= T) *bad = 1;  // every writer stores the same value
  }
}

__global__ void encode_lanes_kernel(const int32_t* sym, const int32_t* idx, const LaneJob* jobs, int64_t lanes,
                                    TableView tv, uint32_t precision, const int32_t* bad, uint8_t* scratch,
                                    int64_t* lane_size) {
  const int64_t g = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (g >= lanes) return;
  if (*bad) {
    lane_size[g] = 0;
    return;
  }
  lane_size[g] = encode_lane_job_any(jobs[g], sym, idx, tv, precision, scratch);
}

// One block per lane: moves the lane's bytes (at the end of its scratch region) to their place
// in the contiguous payload; lane_end is the inclusive prefix sum of the lane sizes.
__global__ void compact_lanes_kernel(const uint8_t* scratch, const LaneJob* jobs, const int64_t* lane_size,
                                     const int64_t* lane_end, uint8_t* payload) {
  const int64_t g = blockIdx.x;
  copy_lane_bytes(jobs[g], lane_size[g], lane_end[g], scratch, payload, threadIdx.x, blockDim.x);
}

__global__ void decode_lanes_kernel(const uint8_t* payload, const int32_t* idx, const LaneJob* jobs, int64_t lanes,
                                    DecodeCtx ctx, const int32_t* bad, int32_t* out, int32_t* lane_status) {
  const int64_t g = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (g >= lanes) return;
  if (*bad) {
    lane_status[g] = static_cast<int32_t>(Status::kBadIndex);
    return;
  }
  lane_status[g] = static_cast<int32_t>(decode_lane_job(jobs[g], payload, idx, ctx, out));
}

constexpr int kLaneThreads = 32;  // few lanes per block: spread the (few) lanes over all SMs

unsigned lane_blocks(int64_t lanes) {
  return static_cast<unsigned>((lanes + kLaneThreads - 1) / kLaneThreads);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

void throw_status(Status st, const char* what) {
  TORCH_CHECK_VALUE(st == Status::kOk, what, ": ", status_message(st));
}

constexpr const char* kBadIndexMessage = "indexes: value out of range [0, number of CDF tables)";

void check_int32(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be an int32 tensor, got ", t.scalar_type());
}

// Pinned staging + asynchronous copy to the device on the current stream.
at::Tensor upload_bytes(const void* src, size_t nbytes, const at::Device& dev) {
  at::Tensor h = at::empty({static_cast<int64_t>(nbytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (nbytes) std::memcpy(h.data_ptr<uint8_t>(), src, nbytes);
  return h.to(dev, /*non_blocking=*/true);
}

// The tables, validated on the host (they are small) and mirrored on the device.
struct GpuTables {
  at::Tensor cdfs_h, lengths_h, offsets_h, cdfs_d, lengths_d, offsets_d;
  TableView host, device;
  GpuTables(const at::Tensor& c, const at::Tensor& l, const at::Tensor& o, const at::Device& dev) {
    check_int32(c, "cdfs");
    check_int32(l, "cdf_lengths");
    check_int32(o, "offsets");
    TORCH_CHECK_VALUE(c.dim() == 2, "cdfs must be 2-D [tables, max_length], got shape ", c.sizes());
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == c.size(0), "cdf_lengths must be 1-D with one entry per cdfs row (",
                      c.size(0), "), got shape ", l.sizes());
    TORCH_CHECK_VALUE(o.dim() == 1 && o.size(0) == c.size(0), "offsets must be 1-D with one entry per cdfs row (",
                      c.size(0), "), got shape ", o.sizes());
    for (const at::Tensor* t : {&c, &l, &o})
      TORCH_CHECK_VALUE(t->device().is_cpu() || t->device() == dev,
                        "cdfs, cdf_lengths and offsets must be on the CPU "
                        "or on ",
                        dev, ", got ", t->device());
    cdfs_h = c.to(at::kCPU).contiguous();
    lengths_h = l.to(at::kCPU).contiguous();
    offsets_h = o.to(at::kCPU).contiguous();
    cdfs_d = c.to(dev).contiguous();
    lengths_d = l.to(dev).contiguous();
    offsets_d = o.to(dev).contiguous();
    host = TableView{cdfs_h.data_ptr<int32_t>(), lengths_h.data_ptr<int32_t>(), offsets_h.data_ptr<int32_t>(),
                     c.size(0), c.size(1)};
    device = TableView{cdfs_d.data_ptr<int32_t>(), lengths_d.data_ptr<int32_t>(), offsets_d.data_ptr<int32_t>(),
                       c.size(0), c.size(1)};
  }
};

// The usual case (e.g. CompressAI's Gaussian tables): every row valid with one precision. Then
// one Prepared serves every stream of the call without looking at the indexes (the device checks
// their range), exactly what the CPU would derive from the rows the indexes use.
bool prepare_all_rows(Prepared& pt, const TableView& tv) {
  std::vector<int32_t> rows(static_cast<size_t>(tv.T));
  std::iota(rows.begin(), rows.end(), 0);
  return pt.prepare(tv, rows.data(), tv.T, /*for_encode=*/false, 0) == nullptr;
}

// Otherwise the CPU's rule, per stream: only the rows its indexes use must be valid and agree.
void prepare_used_rows(Prepared& pt, const TableView& tv, const at::Tensor& idx_dev) {
  const char* err = nullptr;
  if (idx_dev.numel() == 0) {
    err = pt.prepare(tv, nullptr, 0, false, 0);
  } else {
    const auto [mn, mx] = at::aminmax(idx_dev);
    TORCH_CHECK_VALUE(mn.item<int32_t>() >= 0 && mx.item<int64_t>() < tv.T, kBadIndexMessage);
    at::Tensor rows = at::bincount(idx_dev.to(at::kLong), {}, tv.T).nonzero().flatten().to(at::kInt).cpu().contiguous();
    err = pt.prepare(tv, rows.data_ptr<int32_t>(), rows.numel(), false, 0);
  }
  TORCH_CHECK_VALUE(err == nullptr, err ? err : "");
}

using Slice = LaneSlice;

at::Tensor index_check_flag(const at::Tensor& idx_flat, int64_t T, bool run) {
  at::Tensor bad = at::zeros({1}, idx_flat.options().dtype(at::kInt));
  const int64_t n = idx_flat.numel();
  if (run && n > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096));
    check_indexes_kernel<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(idx_flat.data_ptr<int32_t>(), n, T,
                                                                               bad.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return bad;
}

// Encodes every lane of `slices` (with their current lane counts). Returns the lane sizes
// (host, lane order) and the compacted payload (device, lanes back to back).
std::pair<std::vector<int64_t>, at::Tensor> encode_round(const at::Tensor& sym, const at::Tensor& idx,
                                                         const std::vector<Slice>& slices, const GpuTables& tb,
                                                         uint32_t precision, const at::Tensor& bad) {
  std::vector<LaneJob> jobs;
  const int64_t scratch_bytes = plan_encode(slices, jobs);
  const int64_t L = static_cast<int64_t>(jobs.size());
  if (L == 0) return {{}, at::Tensor()};
  const at::Device dev = sym.device();
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor jobs_d = upload_bytes(jobs.data(), jobs.size() * sizeof(LaneJob), dev);
  const auto* jobs_p = reinterpret_cast<const LaneJob*>(jobs_d.data_ptr<uint8_t>());
  at::Tensor scratch = at::empty({scratch_bytes}, sym.options().dtype(at::kByte));
  at::Tensor size_d = at::empty({L}, sym.options().dtype(at::kLong));
  encode_lanes_kernel<<<lane_blocks(L), kLaneThreads, 0, stream>>>(
      sym.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), jobs_p, L, tb.device, precision, bad.data_ptr<int32_t>(),
      scratch.data_ptr<uint8_t>(), size_d.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor lane_end = at::cumsum(size_d, 0);
  at::Tensor payload = at::empty({scratch_bytes}, sym.options().dtype(at::kByte));
  compact_lanes_kernel<<<static_cast<unsigned>(L), 256, 0, stream>>>(
      scratch.data_ptr<uint8_t>(), jobs_p, size_d.data_ptr<int64_t>(), lane_end.data_ptr<int64_t>(),
      payload.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor size_h = size_d.cpu();  // synchronises: the only wait before the payload copy
  const int64_t* sp = size_h.data_ptr<int64_t>();
  return {std::vector<int64_t>(sp, sp + L), payload};
}

// Encodes the slices sharing `pt` into finished streams (CPU uint8 tensors) at out[stream_ids].
void encode_group(const at::Tensor& sym, const at::Tensor& idx, std::vector<Slice> slices,
                  const std::vector<size_t>& stream_ids, const Prepared& pt, const GpuTables& tb, int64_t lanes,
                  bool check_indexes, std::vector<at::Tensor>& out) {
  const at::Tensor bad = index_check_flag(idx, tb.host.T, check_indexes);
  const bool auto_lanes = lanes <= 0;
  for (Slice& s : slices) {
    s.lanes = initial_lanes(s.n, lanes);
    s.states = kDefaultStates;
  }
  const uint32_t precision = static_cast<uint32_t>(pt.precision);
  auto [sizes, payload] = encode_round(sym, idx, slices, tb, precision, bad);
  TORCH_CHECK_VALUE(bad.item<int32_t>() == 0, kBadIndexMessage);
  // The CPU encoder's rule for a chosen layout (rans_stream.h encode_stream): when the lanes or
  // their states would cost more than 0.25% of the payload, re-encode once with the affordable
  // layout (affordable_layout).
  bool again = false;
  int64_t lane0 = 0;
  for (Slice& s : slices) {
    int64_t payload_bytes = 0;
    for (int64_t i = 0; i < s.lanes; ++i) payload_bytes += sizes[lane0 + i];
    lane0 += s.lanes;
    if (!auto_lanes || s.n == 0) continue;
    const Layout next = affordable_layout(static_cast<uint64_t>(payload_bytes), s.lanes);
    if (next.lanes != s.lanes || next.states != s.states) {
      s.lanes = next.lanes;
      s.states = next.states;
      again = true;
    }
  }
  if (again) std::tie(sizes, payload) = encode_round(sym, idx, slices, tb, precision, bad);
  const int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  at::Tensor payload_h = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (total > 0) payload_h.copy_(payload.narrow(0, 0, total));  // the one copy of the result
  const uint8_t* src = payload_h.data_ptr<uint8_t>();
  lane0 = 0;
  std::vector<uint8_t> bytes;
  for (size_t k = 0; k < slices.size(); ++k) {
    const Slice& s = slices[k];
    // No symbols: no row is used and the CPU encoder writes its default precision, 16.
    assemble_stream(bytes, s.n == 0 ? 16 : pt.precision, s.states, s.n, s.lanes, sizes.data() + lane0, src);
    for (int64_t i = 0; i < s.lanes; ++i) src += sizes[lane0 + i];
    lane0 += s.lanes;
    at::Tensor stream = at::empty({static_cast<int64_t>(bytes.size())}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(stream.data_ptr<uint8_t>(), bytes.data(), bytes.size());
    out[stream_ids[k]] = stream;
  }
}

at::Device common_cuda_device(at::TensorList tensors, const char* name) {
  TORCH_CHECK_VALUE(!tensors.empty(), name, " must not be empty");
  const at::Device dev = tensors[0].device();
  TORCH_CHECK_VALUE(dev.is_cuda(), name, " must be on a CUDA device, got ", dev);
  for (const at::Tensor& t : tensors) {
    check_int32(t, name);
    TORCH_CHECK_VALUE(t.device() == dev, "all of ", name, " must be on one device, got ", dev, " and ", t.device());
  }
  return dev;
}

at::Tensor flat_cat(at::TensorList ts) {
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const at::Tensor& t : ts) flat.push_back(t.reshape(-1));
  return flat.size() == 1 ? flat[0].contiguous() : at::cat(flat);
}

std::vector<at::Tensor> rans_encode_batch_cuda(at::TensorList symbols, at::TensorList indexes, const at::Tensor& cdfs,
                                               const at::Tensor& cdf_lengths, const at::Tensor& offsets,
                                               int64_t lanes) {
  TORCH_CHECK_VALUE(symbols.size() == indexes.size(), "symbols and indexes must be lists of the same length, got ",
                    symbols.size(), " and ", indexes.size());
  if (symbols.empty()) return {};
  const at::Device dev = common_cuda_device(symbols, "symbols");
  TORCH_CHECK_VALUE(common_cuda_device(indexes, "indexes") == dev, "symbols and indexes must be on one device");
  for (size_t k = 0; k < symbols.size(); ++k)
    TORCH_CHECK_VALUE(symbols[k].sizes() == indexes[k].sizes(), "symbols and indexes must have the same shape, got ",
                      symbols[k].sizes(), " and ", indexes[k].sizes());
  const c10::cuda::CUDAGuard guard(dev);
  GilRelease nogil;
  const GpuTables tb(cdfs, cdf_lengths, offsets, dev);
  const at::Tensor sym = flat_cat(symbols), idx = flat_cat(indexes);
  std::vector<Slice> slices(symbols.size());
  int64_t off = 0;
  for (size_t k = 0; k < symbols.size(); ++k) {
    slices[k].sym_offset = off;
    slices[k].n = symbols[k].numel();
    off += slices[k].n;
  }
  std::vector<at::Tensor> out(symbols.size());
  Prepared pt;
  if (prepare_all_rows(pt, tb.host)) {
    std::vector<size_t> ids(symbols.size());
    std::iota(ids.begin(), ids.end(), size_t{0});
    encode_group(sym, idx, slices, ids, pt, tb, lanes, /*check_indexes=*/true, out);
  } else {
    for (size_t k = 0; k < symbols.size(); ++k) {
      const at::Tensor s = sym.narrow(0, slices[k].sym_offset, slices[k].n);
      const at::Tensor i = idx.narrow(0, slices[k].sym_offset, slices[k].n);
      Prepared pk;
      prepare_used_rows(pk, tb.host, i);
      encode_group(s, i, {Slice{0, slices[k].n, 0, kDefaultStates}}, {k}, pk, tb, lanes, /*check_indexes=*/false, out);
    }
  }
  return out;
}

// Decodes the streams sharing `pt` into out_all (flat, device) at their slices.
void decode_group(const std::vector<at::Tensor>& data_h, const at::Tensor& idx, const std::vector<Slice>& slices,
                  const Prepared& pt, const GpuTables& tb, bool check_indexes, at::Tensor& out_flat) {
  std::vector<LaneJob> jobs;
  std::vector<uint8_t> payload;
  for (size_t k = 0; k < slices.size(); ++k) {
    const Slice& s = slices[k];
    const uint8_t* bytes = data_h[k].data_ptr<uint8_t>();
    const size_t size = static_cast<size_t>(data_h[k].numel());
    StreamHeader h;
    throw_status(parse_header(bytes, size, s.n, h), "rans_decode");
    if (s.n > 0 && h.precision != pt.precision) throw_status(Status::kMismatch, "rans_decode");
    plan_decode_stream(h, s.sym_offset, s.n, static_cast<int64_t>(payload.size()), jobs);
    payload.insert(payload.end(), bytes + h.payload_pos, bytes + size);
  }
  const at::Tensor bad = index_check_flag(idx, tb.host.T, check_indexes);
  const int64_t L = static_cast<int64_t>(jobs.size());
  if (L == 0) {
    TORCH_CHECK_VALUE(bad.item<int32_t>() == 0, kBadIndexMessage);
    return;
  }
  const at::Device dev = idx.device();
  at::Tensor jobs_d = upload_bytes(jobs.data(), jobs.size() * sizeof(LaneJob), dev);
  at::Tensor payload_d = upload_bytes(payload.data(), payload.size(), dev);
  at::Tensor bucket_d = upload_bytes(pt.bucket.data(), pt.bucket.size() * sizeof(uint16_t), dev);
  const DecodeCtx ctx = decode_ctx_for(pt, tb.device, reinterpret_cast<const uint16_t*>(bucket_d.data_ptr<uint8_t>()));
  at::Tensor status_d = at::empty({L}, idx.options().dtype(at::kInt));
  decode_lanes_kernel<<<lane_blocks(L), kLaneThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      payload_d.data_ptr<uint8_t>(), idx.data_ptr<int32_t>(),
      reinterpret_cast<const LaneJob*>(jobs_d.data_ptr<uint8_t>()), L, ctx, bad.data_ptr<int32_t>(),
      out_flat.data_ptr<int32_t>(), status_d.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor status_h = status_d.cpu();  // synchronises: errors must surface as exceptions here
  TORCH_CHECK_VALUE(bad.item<int32_t>() == 0, kBadIndexMessage);
  const int32_t* st = status_h.data_ptr<int32_t>();
  for (int64_t g = 0; g < L; ++g) throw_status(static_cast<Status>(st[g]), "rans_decode");  // first failing lane
}

std::vector<at::Tensor> rans_decode_batch_cuda(at::TensorList data, at::TensorList indexes, const at::Tensor& cdfs,
                                               const at::Tensor& cdf_lengths, const at::Tensor& offsets) {
  TORCH_CHECK_VALUE(data.size() == indexes.size(), "data and indexes must be lists of the same length, got ",
                    data.size(), " and ", indexes.size());
  if (data.empty()) return {};
  const at::Device dev = common_cuda_device(indexes, "indexes");
  std::vector<at::Tensor> data_h;
  for (const at::Tensor& d : data) {
    TORCH_CHECK_TYPE(d.scalar_type() == at::kByte, "data must be a uint8 tensor, got ", d.scalar_type());
    TORCH_CHECK_VALUE(d.dim() == 1, "data must be 1-D, got shape ", d.sizes());
    TORCH_CHECK_VALUE(d.device().is_cpu() || d.device() == dev, "data must be on the CPU or on ", dev, ", got ",
                      d.device());
  }
  const c10::cuda::CUDAGuard guard(dev);
  GilRelease nogil;
  // The header is parsed and the CRC checked on the host: a stream on the device comes back once.
  for (const at::Tensor& d : data) data_h.push_back(d.to(at::kCPU).contiguous());
  const GpuTables tb(cdfs, cdf_lengths, offsets, dev);
  const at::Tensor idx = flat_cat(indexes);
  at::Tensor out_flat = at::empty({idx.numel()}, idx.options());
  std::vector<Slice> slices(indexes.size());
  int64_t off = 0;
  for (size_t k = 0; k < indexes.size(); ++k) {
    slices[k].sym_offset = off;
    slices[k].n = indexes[k].numel();
    off += slices[k].n;
  }
  Prepared pt;
  if (prepare_all_rows(pt, tb.host)) {
    decode_group(data_h, idx, slices, pt, tb, /*check_indexes=*/true, out_flat);
  } else {
    for (size_t k = 0; k < indexes.size(); ++k) {
      const at::Tensor i = idx.narrow(0, slices[k].sym_offset, slices[k].n);
      at::Tensor o = out_flat.narrow(0, slices[k].sym_offset, slices[k].n);
      Prepared pk;
      prepare_used_rows(pk, tb.host, i);
      decode_group({data_h[k]}, i, {Slice{0, slices[k].n, 0, kDefaultStates}}, pk, tb, /*check_indexes=*/false, o);
    }
  }
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < indexes.size(); ++k)
    out.push_back(out_flat.narrow(0, slices[k].sym_offset, slices[k].n).view(indexes[k].sizes()));
  return out;
}

at::Tensor rans_encode_cuda(const at::Tensor& symbols, const at::Tensor& indexes, const at::Tensor& cdfs,
                            const at::Tensor& cdf_lengths, const at::Tensor& offsets, int64_t lanes) {
  return rans_encode_batch_cuda({symbols}, {indexes}, cdfs, cdf_lengths, offsets, lanes)[0];
}

at::Tensor rans_decode_cuda(const at::Tensor& data, const at::Tensor& indexes, const at::Tensor& cdfs,
                            const at::Tensor& cdf_lengths, const at::Tensor& offsets) {
  return rans_decode_batch_cuda({data}, {indexes}, cdfs, cdf_lengths, offsets)[0];
}

}  // namespace
}  // namespace dualres::rans

TORCH_LIBRARY_IMPL(dualres_ext, CUDA, m) {
  m.impl("rans_encode", &dualres::rans::rans_encode_cuda);
  m.impl("rans_decode", &dualres::rans::rans_decode_cuda);
  m.impl("rans_encode_batch", &dualres::rans::rans_encode_batch_cuda);
  m.impl("rans_decode_batch", &dualres::rans::rans_decode_batch_cuda);
}
