// rans_lanes.h -- torch-free lane scheduling of the CUDA coder (csrc/rans/cuda/rans_cuda.cu).
//
// Everything the GPU path does besides moving bytes lives here, so that it can be run and
// checked on a machine without a GPU: csrc/rans/tests/test_rans_lanes.cpp executes the very
// per-thread bodies below in plain loops (one iteration = one CUDA thread) and compares the
// streams with the CPU encoder's byte for byte.
//   plan_encode        -> one LaneJob per lane, each with a worst-case scratch region
//   encode_lane_job    -> body of the encode kernel (one thread per lane)
//   copy_lane_bytes    -> body of the compaction kernel (threads of one block stride over a lane)
//   assemble_stream    -> header + packed payload + CRC, on the host
//   plan_decode_stream -> one LaneJob per lane of a parsed stream
//   decode_lane_job    -> body of the decode kernel
#pragma once

#include <cstdint>
#include <vector>

#include "rans_stream.h"

namespace dualres::rans {

// Scratch per lane beyond kMaxBytesPerSymbol per symbol: the 4 * K state bytes plus the two bytes
// enc_put_div may store in front of the write position.
constexpr int64_t kLaneSlack = 32;
static_assert(4 * 4 + 2 <= kLaneSlack, "scratch slack too small for 4 interleaved states");

// One lane of one stream, in the flat (concatenated) buffers of a call.
struct LaneJob {
  int64_t sym_begin, sym_end;    // symbols [sym_begin, sym_end) of the flat symbol/index buffers
  int64_t byte_begin, byte_end;  // encode: the lane's scratch region; decode: its bytes in the payload
  int32_t states;                // interleaved states (1, 2 or 4)
  int32_t unused;
};

// A stream within the flat buffers of a call.
struct LaneSlice {
  int64_t sym_offset = 0, n = 0;
  int64_t lanes = 0;
  int states = kDefaultStates;
};

// Jobs for every lane of every slice, scratch regions back to back; returns the scratch size.
inline int64_t plan_encode(const std::vector<LaneSlice>& slices, std::vector<LaneJob>& jobs) {
  jobs.clear();
  int64_t scratch = 0;
  for (const LaneSlice& s : slices)
    for (int64_t i = 0; i < s.lanes; ++i) {
      const int64_t b = s.sym_offset + lane_begin(s.n, s.lanes, i), e = s.sym_offset + lane_begin(s.n, s.lanes, i + 1);
      const int64_t cap = (e - b) * static_cast<int64_t>(kMaxBytesPerSymbol) + kLaneSlack;
      jobs.push_back(LaneJob{b, e, scratch, scratch + cap, s.states, 0});
      scratch += cap;
    }
  return scratch;
}

// Encodes the lane into the end of its scratch region; returns its byte count.
template <int K>
DUALRES_HD inline int64_t encode_lane_job(const LaneJob& j, const int32_t* sym, const int32_t* idx, const TableView& tv,
                                          uint32_t precision, uint8_t* scratch) {
  uint8_t* end = scratch + j.byte_end;
  const uint8_t* begin =
      native_encode_lane_raw<K>(sym + j.sym_begin, idx + j.sym_begin, j.sym_end - j.sym_begin, tv, precision, end);
  return end - begin;
}

// encode_lane_job with the job's own number of states (1, 2 or 4).
DUALRES_HD inline int64_t encode_lane_job_any(const LaneJob& j, const int32_t* sym, const int32_t* idx,
                                              const TableView& tv, uint32_t precision, uint8_t* scratch) {
  if (j.states == 1) return encode_lane_job<1>(j, sym, idx, tv, precision, scratch);
  if (j.states == 2) return encode_lane_job<2>(j, sym, idx, tv, precision, scratch);
  return encode_lane_job<4>(j, sym, idx, tv, precision, scratch);
}

// Moves bytes first, first + step, ... of a lane (at the end of its scratch region) to their place
// in the packed payload; lane_end is the inclusive prefix sum of the lane sizes at this lane.
DUALRES_HD inline void copy_lane_bytes(const LaneJob& j, int64_t size, int64_t lane_end, const uint8_t* scratch,
                                       uint8_t* payload, int64_t first, int64_t step) {
  const uint8_t* src = scratch + j.byte_end - size;
  uint8_t* dst = payload + lane_end - size;
  for (int64_t i = first; i < size; i += step) dst[i] = src[i];
}

// The finished stream from the lane sizes and the packed lane bytes (what encode_stream writes).
inline void assemble_stream(std::vector<uint8_t>& out, int precision, int states, int64_t n, int64_t lanes,
                            const int64_t* lane_size, const uint8_t* payload) {
  std::vector<uint64_t> sizes(lane_size, lane_size + lanes);
  uint64_t body = 0;
  for (uint64_t s : sizes) body += s;
  write_stream_header(out, precision, states, n, lanes, sizes.data());
  const size_t hdr = out.size();
  out.resize(hdr + body);
  if (body) std::memcpy(out.data() + hdr, payload, body);
  seal_stream(out.data(), out.size());
}

// Jobs for the lanes of a parsed stream whose payload starts at payload_base in the flat payload.
inline void plan_decode_stream(const StreamHeader& h, int64_t sym_offset, int64_t n, int64_t payload_base,
                               std::vector<LaneJob>& jobs) {
  for (int64_t i = 0; i < h.lanes; ++i)
    jobs.push_back(LaneJob{sym_offset + lane_begin(n, h.lanes, i), sym_offset + lane_begin(n, h.lanes, i + 1),
                           payload_base + static_cast<int64_t>(h.lane_offset[i]),
                           payload_base + static_cast<int64_t>(h.lane_offset[i + 1]), h.states, 0});
}

// Decodes one lane; every read stays inside [byte_begin, byte_end) of the payload.
DUALRES_HD inline Status decode_lane_job(const LaneJob& j, const uint8_t* payload, const int32_t* idx,
                                         const DecodeCtx& ctx, int32_t* out) {
  const uint8_t* data = payload + j.byte_begin;
  const size_t size = static_cast<size_t>(j.byte_end - j.byte_begin);
  const int64_t n = j.sym_end - j.sym_begin;
  if (j.states == 1) return native_decode_lane<1>(data, size, idx + j.sym_begin, n, ctx, out + j.sym_begin);
  if (j.states == 2) return native_decode_lane<2>(data, size, idx + j.sym_begin, n, ctx, out + j.sym_begin);
  return native_decode_lane<4>(data, size, idx + j.sym_begin, n, ctx, out + j.sym_begin);
}

// DecodeCtx over tables at other addresses (device copies) with pt's precision and buckets.
inline DecodeCtx decode_ctx_for(const Prepared& pt, const TableView& tables, const uint16_t* bucket) {
  DecodeCtx ctx;
  ctx.cdfs = tables.cdfs;
  ctx.lengths = tables.lengths;
  ctx.offsets = tables.offsets;
  ctx.bucket = bucket;
  ctx.W = tables.W;
  ctx.bstride = pt.bucket_stride();
  ctx.precision = static_cast<uint32_t>(pt.precision);
  ctx.mask = (1u << pt.precision) - 1;
  ctx.bshift = static_cast<uint32_t>(pt.bucket_shift);
  return ctx;
}

}  // namespace dualres::rans
