// CUDA kernels of the interleaved rANS stream, version 2 (csrc/rans/FORMAT.md, "Interleaved
// stream, version 2"). Schemas: csrc/register.cpp under "--- rans ---".
//
// One warp codes one group. The warp body is NOT written here: iv_warp_encode / iv_warp_decode
// (csrc/rans/rans_interleaved.h) run with IvDeviceLanes below, i.e. each thread is one lane, per-lane
// variables are registers and the shared word cursor advances through __ballot_sync / __popc. The
// host runs the same source with IvHostLanes (isa=3 of the CPU ops), and the tests check that its
// bytes equal the CPU coders' bytes.
//
// Tables: the bucket lookup, escape and offset rows are staged in shared memory when they fit
// (CompressAI's 64 rows: 65 KB); the per-symbol start/frequency rows stay in global memory (L1/L2).
// Everything runs on the current stream. Encode: one launch, then the group sizes and words come
// back to the host, where the header and CRC are written (the result is a host byte string).
// Decode: the header and CRC are checked on the host (the stream is there), the payload goes to
// the device in one copy, each warp checks its own indexes, and the per-group status comes back
// (any failure is a ValueError; a device fault is impossible: every read is bounded), or, in
// rans_iv_decode_deferred, stays on the device for the caller to read once for many streams.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common/gil_release.h"
#include "rans/rans_iv_tables.h"

namespace dualres::rans {
namespace {

// One thread = one lane of the warp body (lanes >= width idle but take part in the ballots).
struct IvDeviceLanes {
  int w, lane;
  template <class T>
  struct Var {
    T v;
    __host__ __device__ T& operator[](int) { return v; }
    __host__ __device__ const T& operator[](int) const { return v; }
  };
  __host__ __device__ int width() const { return w; }
  __host__ __device__ int first() const { return lane; }
  __host__ __device__ int last() const { return lane < w ? lane + 1 : lane; }
  __host__ __device__ uint32_t ballot(const Var<bool>& p) const {
#if defined(__CUDA_ARCH__)
    return __ballot_sync(0xFFFFFFFFu, lane < w && p.v);
#else
    return 0;
#endif
  }
  __host__ __device__ int32_t max(const Var<int32_t>& a) const {
#if defined(__CUDA_ARCH__)
    int32_t r = lane < w ? a.v : 0;
    for (int o = 16; o > 0; o >>= 1) r = ::max(r, __shfl_xor_sync(0xFFFFFFFFu, r, o));
    return r;
#else
    return a.v;
#endif
  }
};

constexpr int kWarpsPerBlock = 4;

// Copies the small per-row tables into shared memory (when smem is non-null) and returns the
// view the warps use.
__device__ IvTablesView stage_tables(IvTablesView tb, uint32_t* smem) {
  if (smem == nullptr) return tb;
  const int64_t nb = tb.T << tb.bbits;
  uint32_t* b = smem;
  int32_t* e = reinterpret_cast<int32_t*>(smem + nb);
  int32_t* o = e + tb.T;
  for (int64_t i = threadIdx.x; i < nb; i += blockDim.x) b[i] = tb.bucket[i];
  for (int64_t i = threadIdx.x; i < tb.T; i += blockDim.x) {
    e[i] = tb.esc[i];
    o[i] = tb.off[i];
  }
  __syncthreads();
  tb.bucket = b;
  tb.esc = e;
  tb.off = o;
  return tb;
}

// Group g's scratch: words [g * cap_per_step * (steps of groups before g) ...): simply the
// worst case of its steps, at offset step_begin * W * (kIvMaxChunks + 1).
__global__ void iv_encode_kernel(const int32_t* sym, const int32_t* idx, int64_t n, int width, int64_t steps,
                                 int64_t groups, bool chained, IvTablesView tb, bool use_smem, uint16_t* scratch,
                                 uint32_t* states, int64_t* counts) {
  extern __shared__ uint32_t smem[];
  const IvTablesView t = stage_tables(tb, use_smem ? smem : nullptr);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t g0 = int64_t{blockIdx.x} * kWarpsPerBlock + warp;
  IvDeviceLanes L{width, lane};
  IvDeviceLanes::Var<uint32_t> x;
  x[lane] = kIvLow;
  const int64_t per_step = int64_t{width} * (kIvMaxChunks + 1);
  auto one = [&](int64_t g) {
    const int64_t s0 = iv_group_begin(steps, groups, g), s1 = iv_group_begin(steps, groups, g + 1);
    const int64_t cap = (s1 - s0) * per_step;
    const int64_t cnt = iv_warp_encode(L, sym, idx, n, s0, s1, t, x, scratch + s0 * per_step, cap);
    if (lane < width) states[g * width + lane] = x[lane];
    if (lane == 0) counts[g] = cnt;
  };
  if (chained) {
    if (g0 == 0)
      for (int64_t g = groups - 1; g >= 0; --g) one(g);
  } else if (g0 < groups) {
    one(g0);
  }
}

__global__ void iv_decode_kernel(const uint8_t* data, const uint64_t* word_offset, int64_t states_pos,
                                 int64_t words_pos, const int32_t* idx, int64_t n, int width, int64_t steps,
                                 int64_t groups, bool chained, IvTablesView tb, bool use_smem, int32_t* out,
                                 int32_t* status) {
  extern __shared__ uint32_t smem[];
  const IvTablesView t = stage_tables(tb, use_smem ? smem : nullptr);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t g = int64_t{blockIdx.x} * kWarpsPerBlock + warp;
  if (g >= groups) return;  // whole warps leave together
  IvDeviceLanes L{width, lane};
  const int64_t s0 = iv_group_begin(steps, groups, g), s1 = iv_group_begin(steps, groups, g + 1);
  // Indexes first: the coder then touches only valid rows.
  bool bad = false;
  for (int64_t i = s0 * width + lane; i < min(s1 * width, n); i += 32) bad |= idx[i] < 0 || idx[i] >= t.T;
  if (__any_sync(0xFFFFFFFFu, bad)) {
    if (lane == 0) status[g] = static_cast<int32_t>(Status::kBadIndex);
    return;
  }
  IvDeviceLanes::Var<uint32_t> x;
  if (lane < width) x[lane] = iv_load_u32(data + states_pos + 4 * (g * width + lane));
  Status st = iv_warp_decode(L, idx, n, s0, s1, t, x, data + words_pos, word_offset[g], word_offset[g + 1], out);
  if (st == Status::kOk) {
    uint32_t want = kIvLow;
    if (chained && g + 1 < groups && lane < width) want = iv_load_u32(data + states_pos + 4 * ((g + 1) * width + lane));
    if (__any_sync(0xFFFFFFFFu, lane < width && x[lane] != want)) st = Status::kCorrupt;
  }
  if (lane == 0) status[g] = static_cast<int32_t>(st);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

void throw_status(Status st, const char* what) {
  TORCH_CHECK_VALUE(st == Status::kOk, what, ": ", status_message(st));
}

// The prepared arrays on `dev` (made once per device) and the view of them.
IvTablesView device_view(RansIvTables& h, const at::Device& dev) {
  TORCH_CHECK_VALUE(h.prep.uniform,
                    "the CUDA interleaved coder needs tables whose rows are all valid CDFs of one "
                    "precision (use the CPU coder for tables with invalid rows)");
  std::lock_guard<std::mutex> lock(h.mu);
  auto it = h.device_copies.find(dev.index());
  if (it == h.device_copies.end()) {
    auto up = [&](const void* p, size_t count) {
      at::Tensor c = at::empty({static_cast<int64_t>(count)}, at::TensorOptions().dtype(at::kInt));
      if (count) std::memcpy(c.data_ptr<int32_t>(), p, count * 4);
      return c.to(dev);
    };
    std::array<at::Tensor, 4> arr{up(h.prep.sf.data(), h.prep.sf.size()),
                                  up(h.prep.bucket.data(), h.prep.bucket.size()),
                                  up(h.prep.esc.data(), h.prep.esc.size()), up(h.prep.off.data(), h.prep.off.size())};
    it = h.device_copies.emplace(dev.index(), arr).first;
  }
  IvTablesView v = h.prep.view();
  v.sf = reinterpret_cast<const uint32_t*>(it->second[0].data_ptr<int32_t>());
  v.bucket = reinterpret_cast<const uint32_t*>(it->second[1].data_ptr<int32_t>());
  v.esc = it->second[2].data_ptr<int32_t>();
  v.off = it->second[3].data_ptr<int32_t>();
  return v;
}

// Shared memory for the staged rows, or 0 when they do not fit (then they are read from global).
size_t staged_bytes(const IvTablesView& v, const void* kernel) {
  const size_t bytes = static_cast<size_t>((v.T << v.bbits) + 2 * v.T) * 4;
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes > static_cast<size_t>(optin)) return 0;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return bytes;
}

at::Tensor rans_iv_encode_cuda(const at::Tensor& symbols, const at::Tensor& indexes,
                               const c10::intrusive_ptr<RansIvTables>& tables, int64_t width, int64_t groups,
                               bool chained, int64_t isa) {
  TORCH_CHECK_TYPE(symbols.scalar_type() == at::kInt && indexes.scalar_type() == at::kInt,
                   "symbols and indexes must be int32 tensors");
  TORCH_CHECK_VALUE(symbols.device() == indexes.device(), "symbols and indexes must be on one device");
  TORCH_CHECK_VALUE(symbols.sizes() == indexes.sizes(), "symbols and indexes must have the same shape");
  TORCH_CHECK_VALUE(iv_width_ok(static_cast<int>(width)), "width must be 1, 2, 4, 8, 16 or 32, got ", width);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= kIvMaxGroups, "groups must be in [1, 65536], got ", groups);
  (void)isa;  // the device has one coder
  const c10::cuda::CUDAGuard guard(symbols.device());
  const at::Tensor sym = symbols.contiguous(), idx = indexes.contiguous();
  const int64_t n = idx.numel();
  const int W = static_cast<int>(width);
  const int64_t steps = iv_steps(n, W), G = std::min<int64_t>(groups, steps);
  IvTablesView tv = device_view(*tables, symbols.device());
  // Index range: checked on the device, read back with the group sizes (no extra synchronisation).
  std::vector<IvGroupOut> outs(static_cast<size_t>(G));
  if (G > 0) {
    auto mm = at::aminmax(idx);
    const at::Tensor range = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kCPU);
    TORCH_CHECK_VALUE(range[0].item<int32_t>() >= 0 && range[1].item<int32_t>() < tv.T,
                      "indexes: value out of range [0, number of CDF tables)");
    const int64_t per_step = int64_t{W} * (kIvMaxChunks + 1);
    auto opts = at::TensorOptions().device(symbols.device());
    at::Tensor scratch = at::empty({steps * per_step}, opts.dtype(at::kShort));
    at::Tensor states = at::empty({G * W}, opts.dtype(at::kInt));
    at::Tensor counts = at::empty({G}, opts.dtype(at::kLong));
    const size_t smem = staged_bytes(tv, reinterpret_cast<const void*>(&iv_encode_kernel));
    const unsigned blocks = chained ? 1u : static_cast<unsigned>((G + kWarpsPerBlock - 1) / kWarpsPerBlock);
    iv_encode_kernel<<<blocks, 32 * kWarpsPerBlock, smem, at::cuda::getCurrentCUDAStream()>>>(
        sym.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), n, W, steps, G, chained, tv, smem > 0,
        reinterpret_cast<uint16_t*>(scratch.data_ptr<int16_t>()),
        reinterpret_cast<uint32_t*>(states.data_ptr<int32_t>()), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor counts_h = counts.to(at::kCPU), states_h = states.to(at::kCPU);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t s1 = iv_group_begin(steps, G, g + 1), cnt = counts_h[g].item<int64_t>();
      const at::Tensor w = scratch.narrow(0, s1 * per_step - cnt, cnt).to(at::kCPU);
      outs[g].words.resize(static_cast<size_t>(cnt));
      if (cnt) std::memcpy(outs[g].words.data(), w.data_ptr<int16_t>(), static_cast<size_t>(cnt) * 2);
      std::memcpy(outs[g].states, states_h.data_ptr<int32_t>() + g * W, static_cast<size_t>(W) * 4);
    }
  }
  std::vector<uint8_t> out;
  iv_assemble(out, n > 0 ? tables->prep.precision : 16, W, chained && G > 1, n, outs);
  at::Tensor t = at::empty({static_cast<int64_t>(out.size())}, at::TensorOptions().dtype(at::kByte));
  if (!out.empty()) std::memcpy(t.data_ptr<uint8_t>(), out.data(), out.size());
  return t;
}

at::Tensor rans_iv_decode_cuda(const at::Tensor& data, const at::Tensor& indexes,
                               const c10::intrusive_ptr<RansIvTables>& tables, int64_t isa) {
  TORCH_CHECK_TYPE(data.scalar_type() == at::kByte, "data must be a uint8 tensor, got ", data.scalar_type());
  TORCH_CHECK_VALUE(data.dim() == 1, "data must be 1-D, got shape ", data.sizes());
  TORCH_CHECK_TYPE(indexes.scalar_type() == at::kInt, "indexes must be an int32 tensor, got ", indexes.scalar_type());
  TORCH_CHECK_VALUE(indexes.is_cuda(), "indexes must be on a CUDA device for the CUDA decoder");
  (void)isa;
  const c10::cuda::CUDAGuard guard(indexes.device());
  const at::Tensor host = data.to(at::kCPU).contiguous();
  const at::Tensor idx = indexes.contiguous();
  const int64_t n = idx.numel();
  IvHeader h;
  throw_status(iv_parse_header(host.data_ptr<uint8_t>(), static_cast<size_t>(host.numel()), n, h), "rans_iv_decode");
  if (n > 0 && h.precision != tables->prep.precision) throw_status(Status::kMismatch, "rans_iv_decode");
  at::Tensor out = at::empty(indexes.sizes(), idx.options());
  if (h.groups == 0) return out;
  IvTablesView tv = device_view(*tables, indexes.device());
  auto opts = at::TensorOptions().device(indexes.device());
  const at::Tensor data_d = host.to(indexes.device(), /*non_blocking=*/false);
  at::Tensor offs = at::empty({h.groups + 1}, at::TensorOptions().dtype(at::kLong));
  std::memcpy(offs.data_ptr<int64_t>(), h.word_offset.data(), h.word_offset.size() * 8);
  const at::Tensor offs_d = offs.to(indexes.device());
  at::Tensor status = at::zeros({h.groups}, opts.dtype(at::kInt));
  const size_t smem = staged_bytes(tv, reinterpret_cast<const void*>(&iv_decode_kernel));
  const unsigned blocks = static_cast<unsigned>((h.groups + kWarpsPerBlock - 1) / kWarpsPerBlock);
  iv_decode_kernel<<<blocks, 32 * kWarpsPerBlock, smem, at::cuda::getCurrentCUDAStream()>>>(
      data_d.data_ptr<uint8_t>(), reinterpret_cast<const uint64_t*>(offs_d.data_ptr<int64_t>()),
      static_cast<int64_t>(h.states_pos), static_cast<int64_t>(h.words_pos), idx.data_ptr<int32_t>(), n, h.width,
      iv_steps(n, h.width), h.groups, h.chained, tv, smem > 0, out.data_ptr<int32_t>(), status.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor status_h = status.to(at::kCPU);
  for (int64_t g = 0; g < h.groups; ++g) {
    const Status st = static_cast<Status>(status_h[g].item<int32_t>());
    TORCH_CHECK_VALUE(st == Status::kOk, "rans_iv_decode: ",
                      st == Status::kBadIndex ? "index out of range of the CDF tables" : status_message(st));
  }
  return out;
}

// As rans_iv_decode_cuda, without waiting for the device: the stream (a CPU tensor: the header
// is checked on the host, where it is) and its group offsets go up in one non-blocking copy from
// pinned memory, and the per-group status comes back as a device tensor for the caller to check
// once for many streams (csrc/rans/FORMAT.md "Decoder obligations": every read stays bounded, so
// a bad stream can only give wrong symbols until its status is read).
std::tuple<at::Tensor, at::Tensor> rans_iv_decode_deferred_cuda(const at::Tensor& data, const at::Tensor& indexes,
                                                                const c10::intrusive_ptr<RansIvTables>& tables) {
  TORCH_CHECK_TYPE(data.scalar_type() == at::kByte, "data must be a uint8 tensor, got ", data.scalar_type());
  TORCH_CHECK_VALUE(data.dim() == 1 && data.device().is_cpu(), "data must be a 1-D CPU tensor");
  TORCH_CHECK_TYPE(indexes.scalar_type() == at::kInt, "indexes must be an int32 tensor, got ", indexes.scalar_type());
  TORCH_CHECK_VALUE(indexes.is_cuda(), "indexes must be on a CUDA device for the CUDA decoder");
  const c10::cuda::CUDAGuard guard(indexes.device());
  const at::Tensor host = data.contiguous();
  const at::Tensor idx = indexes.contiguous();
  const int64_t n = idx.numel();
  IvHeader h;
  throw_status(iv_parse_header(host.data_ptr<uint8_t>(), static_cast<size_t>(host.numel()), n, h), "rans_iv_decode");
  if (n > 0 && h.precision != tables->prep.precision) throw_status(Status::kMismatch, "rans_iv_decode");
  auto opts = at::TensorOptions().device(indexes.device());
  at::Tensor out = at::empty(indexes.sizes(), idx.options());
  at::Tensor status = at::zeros({std::max<int64_t>(h.groups, 1)}, opts.dtype(at::kInt));
  if (h.groups == 0) return {out, status};
  IvTablesView tv = device_view(*tables, indexes.device());
  const int64_t offs_bytes = (h.groups + 1) * 8, size = host.numel();
  at::Tensor staging = at::empty({offs_bytes + size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(staging.data_ptr<uint8_t>(), h.word_offset.data(), static_cast<size_t>(offs_bytes));
  std::memcpy(staging.data_ptr<uint8_t>() + offs_bytes, host.data_ptr<uint8_t>(), static_cast<size_t>(size));
  // The caching host allocator keeps `staging` until the copy on the current stream has run.
  const at::Tensor staged = staging.to(indexes.device(), /*non_blocking=*/true);
  const size_t smem = staged_bytes(tv, reinterpret_cast<const void*>(&iv_decode_kernel));
  const unsigned blocks = static_cast<unsigned>((h.groups + kWarpsPerBlock - 1) / kWarpsPerBlock);
  iv_decode_kernel<<<blocks, 32 * kWarpsPerBlock, smem, at::cuda::getCurrentCUDAStream()>>>(
      staged.data_ptr<uint8_t>() + offs_bytes, reinterpret_cast<const uint64_t*>(staged.data_ptr<uint8_t>()),
      static_cast<int64_t>(h.states_pos), static_cast<int64_t>(h.words_pos), idx.data_ptr<int32_t>(), n, h.width,
      iv_steps(n, h.width), h.groups, h.chained, tv, smem > 0, out.data_ptr<int32_t>(), status.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, status};
}

}  // namespace
}  // namespace dualres::rans

TORCH_LIBRARY_IMPL(dualres_ext, CUDA, m) {
  dualres::rans::register_iv_tables_class();
  m.impl("rans_iv_encode", &dualres::rans::rans_iv_encode_cuda);
  m.impl("rans_iv_decode", &dualres::rans::rans_iv_decode_cuda);
  m.impl("rans_iv_decode_deferred", &dualres::rans::rans_iv_decode_deferred_cuda);
}
