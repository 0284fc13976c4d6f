// Argument checks and error messages shared by the CPU and CUDA Gaussian kernels, so that both
// devices refuse the same inputs with the same words. The Python wrappers (dualres_ext/ops.py)
// check first and name the user's argument; these guard the kernels' own assumptions (a bad
// pointer walk is worse than an exception).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "gaussian/gaussian_math.h"

namespace dualres {
namespace gaussian {

// The problems a kernel saw in `name` (status: kSaw* bits from gaussian_math.h).
inline std::string describe_status(int status, const char* name) {
  std::string what;
  if (status & kSawNaN) what += " NaN";
  if (status & kSawInf) what += " Inf";
  if (status & kSawNegative) what += " negative values";
  if (status & kSawOverflow) what += " values whose rounding does not fit in int32";
  return std::string(name) + " contains" + what;
}

// `t` is contiguous and on the kernel's device type.
inline void check_input(const at::Tensor& t, const char* op, const char* name, at::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, op, ": ", name, " must be a ", c10::DeviceTypeName(device, true),
              " tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// `b` goes element by element with `a`: same shape, same device, contiguous.
inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", an, " and ", bn, " must have the same shape, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.device() == b.device(), op, ": ", an, " and ", bn, " are on different devices");
  TORCH_CHECK(b.is_contiguous(), op, ": ", bn, " must be contiguous");
}

// check_same, and the same floating dtype.
inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an, const char* bn) {
  check_same(a, b, op, an, bn);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn, " dtypes differ");
}

// The scale table: 1-D, non-empty, contiguous, with the scales' dtype and device.
inline void check_scale_table(const at::Tensor& scales, const at::Tensor& table, const char* op) {
  TORCH_CHECK(table.dim() == 1 && table.numel() >= 1, op, ": scale_table must be 1-D, non-empty");
  TORCH_CHECK(table.device() == scales.device(), op, ": scale_table and scales are on different devices");
  TORCH_CHECK(table.scalar_type() == scales.scalar_type(), op, ": scales and scale_table dtypes differ");
  TORCH_CHECK(table.is_contiguous(), op, ": scale_table must be contiguous");
}

}  // namespace gaussian
}  // namespace dualres
