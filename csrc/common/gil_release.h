// gil_release.h -- releases the Python GIL for the duration of a heavy C++ op.
//
// Calls through torch.ops keep the GIL (measured: two Python threads calling the coder did not
// overlap), so ops whose loops touch no Python object release it themselves. A no-op when the
// calling thread does not hold the GIL (autograd's worker threads, C++ callers).
#pragma once

#include <Python.h>

namespace dualres {

class GilRelease {
 public:
  // enable=false keeps the GIL: for small inputs the release/re-acquire costs more than it frees.
  explicit GilRelease(bool enable = true) {
    if (enable && Py_IsInitialized() && PyGILState_Check()) state_ = PyEval_SaveThread();
  }
  ~GilRelease() {
    if (state_) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_ = nullptr;
};

}  // namespace dualres
