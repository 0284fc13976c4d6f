// rans_iv_tables.h -- the prepared-table handle of the interleaved rANS ops
// (torch.classes.dualres_ext.RansIvTables, made by rans_iv_prepare; registered in csrc/register.cpp).
//
// Holds the torch-free IvPrepared (rans_interleaved.h) built once from CompressAI-layout tables,
// so that repeated encode/decode calls with the same tables skip validation and preparation.
// The object is opaque to Python: its arrays cannot be altered after preparation, which is what
// lets the decoders trust them. CUDA ops keep device copies of the arrays here (made once per
// device, under the mutex).
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <array>
#include <map>
#include <mutex>

#include "rans/rans_interleaved.h"

namespace dualres::rans {

struct RansIvTables : torch::CustomClassHolder {
  IvPrepared prep;
  std::mutex mu;
  // device index -> (sf, bucket, esc, off) as int32 tensors on that device
  std::map<int, std::array<at::Tensor, 4>> device_copies;

  int64_t precision() const { return prep.precision; }
  int64_t num_tables() const { return prep.T; }
};

// Registers torch.classes.dualres_ext.RansIvTables once. Called by every registration block that
// names the class (schemas in csrc/register.cpp, kernels in csrc/rans/cpu and cuda), because
// static initialisers of different files run in an unspecified order and both need the type.
inline void register_iv_tables_class() {
  static const auto cls = torch::class_<RansIvTables>("dualres_ext", "RansIvTables")
                              .def("precision", &RansIvTables::precision)
                              .def("num_tables", &RansIvTables::num_tables);
  (void)cls;
}

}  // namespace dualres::rans
