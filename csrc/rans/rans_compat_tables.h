// rans_compat_tables.h -- the prepared-table handle of the CompressAI-format decoder
// (torch.classes.dualres_ext.RansCompatTables, made by rans_compat_prepare; registered in
// csrc/register.cpp).
//
// Holds the torch-free CompatTables (rans_core.h) built once from CompressAI-layout tables, so
// that repeated rans_decode_compat_prepared calls with the same tables skip validating and
// building the lookup. Opaque to Python and self-contained (copies of what it needs, no pointer
// into the tensors it came from), which is what lets the decoder trust it.
#pragma once

#include <torch/custom_class.h>

#include "rans/rans_core.h"

namespace dualres::rans {

struct RansCompatTables : torch::CustomClassHolder {
  CompatTables tables;

  int64_t num_tables() const { return tables.T; }
};

// Registers torch.classes.dualres_ext.RansCompatTables once. Called by every registration block
// that names the class (the schemas in csrc/register.cpp, the kernels in csrc/rans/cpu), because
// static initialisers of different files run in an unspecified order and both need the type.
inline void register_compat_tables_class() {
  static const auto cls = torch::class_<RansCompatTables>("dualres_ext", "RansCompatTables")
                              .def("num_tables", &RansCompatTables::num_tables);
  (void)cls;
}

}  // namespace dualres::rans
