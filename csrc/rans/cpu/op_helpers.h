// Argument checks and conversions shared by the CPU rANS ops (rans_ops.cpp: the multi-lane and
// CompressAI streams; rans_interleaved_ops.cpp: the interleaved stream). Messages name the
// argument: TORCH_CHECK_TYPE becomes a TypeError, TORCH_CHECK_VALUE a ValueError.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <vector>

#include "rans/rans_stream.h"  // Status, status_message

namespace dualres::rans::ops {

inline void check_int32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be an int32 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

// A core Status other than kOk as a ValueError "what: message".
inline void throw_status(Status st, const char* what) {
  TORCH_CHECK_VALUE(st == Status::kOk, what, ": ", status_message(st));
}

// The bytes of a stream argument: a contiguous 1-D uint8 CPU tensor.
inline const uint8_t* stream_bytes(const at::Tensor& data, size_t& size) {
  TORCH_CHECK_TYPE(data.scalar_type() == at::kByte, "data must be a uint8 tensor, got ", data.scalar_type());
  TORCH_CHECK_VALUE(data.device().is_cpu(), "data must be on the CPU, got ", data.device());
  TORCH_CHECK_VALUE(data.dim() == 1, "data must be 1-D, got shape ", data.sizes());
  TORCH_CHECK_VALUE(data.is_contiguous(), "data must be contiguous");
  size = static_cast<size_t>(data.numel());
  return data.data_ptr<uint8_t>();
}

inline at::Tensor to_tensor(const std::vector<uint8_t>& bytes) {
  at::Tensor out = at::empty({static_cast<int64_t>(bytes.size())}, at::TensorOptions().dtype(at::kByte));
  if (!bytes.empty()) std::memcpy(out.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  return out;
}

// A stream to or from its embedded form (FORMAT.md, "Embedded streams" and "Embedded interleaved
// streams"): the same arguments, checks and output for every format and direction.
using EmbeddingFn = Status (*)(const uint8_t*, size_t, int64_t, int, std::vector<uint8_t>&);

inline at::Tensor convert_embedding(const at::Tensor& data, int64_t symbols, int64_t precision, EmbeddingFn fn,
                                    const char* what) {
  size_t size = 0;
  const uint8_t* bytes = stream_bytes(data, size);
  TORCH_CHECK_VALUE(symbols >= 0, "symbols must be >= 0, got ", symbols);
  TORCH_CHECK_VALUE(precision >= 1 && precision <= 16, "precision must be in [1, 16], got ", precision);
  std::vector<uint8_t> out;
  throw_status(fn(bytes, size, symbols, static_cast<int>(precision), out), what);
  return to_tensor(out);
}

}  // namespace dualres::rans::ops
