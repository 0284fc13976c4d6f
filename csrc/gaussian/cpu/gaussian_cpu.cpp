// CPU kernels of the Gaussian conditional: scale -> table index, quantisation, the training-time
// likelihood (forward and backward) and the CDF tables the entropy coder needs.
//
// The Python wrappers (dualres_ext/ops.py) hand these kernels contiguous tensors of matching
// shapes and dtypes; the kernels still check what they rely on, because a bad pointer walk is
// worse than an exception.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_kernels.h"
#include "common/gil_release.h"
#include "gaussian/gaussian_checks.h"
#include "gaussian/gaussian_math.h"

#if DUALRES_CPU_X86
// GCC 12's AVX-512 headers start masked intrinsics from _mm512_undefined_*(), which trips
// -Wmaybe-uninitialized in every caller; the values are fully overwritten.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace dualres {
namespace gaussian {
namespace {

// Grain sizes: the search kernels cost ~1 ns per element, so chunks of 64k elements; the
// streaming ones (quantise, dequantise) are memory bound and not worth splitting below 1M.
constexpr int64_t kGrain = 65536;
constexpr int64_t kStreamGrain = 1 << 20;
constexpr int64_t kMathGrain = 4096;

constexpr auto kCPU = at::DeviceType::CPU;

// A sorted copy of table[0..n) padded with +inf up to a power of two, so that the search below
// runs a fixed number of branch-free steps (which the compiler can vectorise with gathers: the
// loops calling it run through cpu::run, and index() is forced inline into them).
template <typename T>
struct PaddedTable {
  std::vector<T> values;
  int32_t n = 0;
  int32_t log2_size = 0;
  bool sorted = true;
  const T* raw = nullptr;

  PaddedTable(const T* table, int32_t count) : n(count), raw(table) {
    for (int32_t i = 1; i < n; ++i) sorted = sorted && table[i - 1] <= table[i];
    int32_t size = 1;
    while (size < n + 1) {
      size <<= 1;
      ++log2_size;
    }
    values.assign(size, std::numeric_limits<T>::infinity());
    std::copy(table, table + n, values.begin());
  }

  // Number of entries t with !(x <= t): CompressAI's index for a lower-bounded scale x.
  // The +inf padding never counts for a non-NaN x; a NaN x counts every entry (the padding
  // too, hence the min), which is what CompressAI's `scales <= s` loop gives.
  inline DUALRES_CPU_INLINE int32_t index(T x) const {
    if (!sorted) return count_not_above_linear(raw, n, x);
    const T* v = values.data();
    int32_t pos = 0;
    for (int32_t step = (1 << log2_size) >> 1; step > 0; step >>= 1) {
      pos += !(x <= v[pos + step - 1]) ? step : 0;
    }
    return std::min(pos, n);
  }
};

#if DUALRES_CPU_X86
// The same search, 16 float scales at a time, for tables of at most 63 entries (CompressAI's
// default has 64 entries, the last never compared). The padded 64-entry table lives in four
// registers and each step fetches its pivots with two two-register permutes: no gathers.
struct Avx512FloatTable {
  __m512 t0, t1, t2, t3;
  __m512i n;

  static bool usable(const PaddedTable<float>& table) { return table.sorted && table.values.size() <= 64; }

  DUALRES_TARGET_AVX512 explicit Avx512FloatTable(const PaddedTable<float>& table) {
    float padded[64];
    std::fill(padded, padded + 64, std::numeric_limits<float>::infinity());
    std::copy(table.values.begin(), table.values.end(), padded);
    t0 = _mm512_loadu_ps(padded);
    t1 = _mm512_loadu_ps(padded + 16);
    t2 = _mm512_loadu_ps(padded + 32);
    t3 = _mm512_loadu_ps(padded + 48);
    n = _mm512_set1_epi32(table.n);
  }

  DUALRES_TARGET_AVX512 inline __m512 pivot(__m512i idx) const {
    const __m512 lo = _mm512_permutex2var_ps(t0, idx, t1);
    const __m512 hi = _mm512_permutex2var_ps(t2, idx, t3);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
  }

  DUALRES_TARGET_AVX512 inline __m512i index(__m512 x) const {
    __m512i pos = _mm512_setzero_si512();
    for (int step = 32; step > 0; step >>= 1) {
      const __m512 p = pivot(_mm512_add_epi32(pos, _mm512_set1_epi32(step - 1)));
      const __mmask16 m = _mm512_cmp_ps_mask(x, p, _CMP_NLE_UQ);
      pos = _mm512_mask_add_epi32(pos, m, pos, _mm512_set1_epi32(step));
    }
    return _mm512_min_epi32(pos, n);
  }
};

// Bits of classify_scale for 16 lanes at once.
DUALRES_TARGET_AVX512 inline int classify_scales16(__m512 s) {
  int status = 0;
  if (_mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q)) status |= kSawNaN;
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  if (_mm512_cmp_ps_mask(_mm512_abs_ps(s), inf, _CMP_EQ_OQ)) status |= kSawInf;
  if (_mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_LT_OQ)) status |= kSawNegative;
  return status;
}

// round(y - mean) -> int32 for 16 lanes; lanes outside int32 (or NaN) set status bits.
DUALRES_TARGET_AVX512 inline __m512i quantize16(__m512 d, int& status) {
  const __m512 r = _mm512_roundscale_ps(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 ok = _mm512_cmp_ps_mask(r, _mm512_set1_ps(-2147483648.0f), _CMP_GE_OQ) &
                       _mm512_cmp_ps_mask(r, _mm512_set1_ps(2147483648.0f), _CMP_LT_OQ);
  if (ok != 0xFFFF) {
    float lanes[16];
    _mm512_storeu_ps(lanes, r);
    for (int k = 0; k < 16; ++k) {
      if (!((ok >> k) & 1)) status |= std::isnan(lanes[k]) ? kSawNaN : (std::isinf(lanes[k]) ? kSawInf : kSawOverflow);
    }
  }
  return _mm512_cvtps_epi32(r);
}
#endif

// Inputs at least this large release the GIL while the kernel runs (other Python threads go on);
// below it the release/re-acquire costs more than the kernel (per-position calls of serial models).
constexpr int64_t kReleaseGilNumel = int64_t{1} << 15;

#if DUALRES_CPU_X86
// The AVX-512 loops below take the kernel-set tag first so that calls to them from generic code
// stay dependent (and are only compiled where the tag is cpu::Avx512).

// build_indexes over [begin, end) of float scales with a table Avx512FloatTable can hold;
// returns the status bits seen.
DUALRES_TARGET_AVX512 int build_indexes_avx512(cpu::Avx512, const float* scales, int32_t* out, int64_t begin,
                                               int64_t end, const PaddedTable<float>& table, float bound) {
  const Avx512FloatTable vtable(table);
  int local = 0;
  const __m512 vbound = _mm512_set1_ps(bound);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512 s = _mm512_loadu_ps(scales + i);
    local |= classify_scales16(s);
    // max_nan: keep NaN lanes NaN (torch.max propagates them).
    const __m512 b = _mm512_mask_max_ps(s, _mm512_cmp_ps_mask(s, s, _CMP_ORD_Q), s, vbound);
    _mm512_storeu_si512(out + i, vtable.index(b));
  }
  for (; i < end; ++i) {
    local |= classify_scale(scales[i]);
    out[i] = table.index(max_nan(scales[i], bound));
  }
  return local;
}
#endif

template <typename T>
void build_indexes_kernel(const T* scales, int32_t* out, int64_t numel, const PaddedTable<T>& table, T bound,
                          std::atomic<int>& status) {
  cpu::dispatch([&](auto isa) {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      int local = 0;
#if DUALRES_CPU_X86
      if constexpr (std::is_same_v<T, float> && std::is_same_v<decltype(isa), cpu::Avx512>) {
        if (Avx512FloatTable::usable(table)) {
          local = build_indexes_avx512(isa, scales, out, begin, end, table, bound);
          if (local) status.fetch_or(local);
          return;
        }
      }
#endif
      cpu::run(isa, [&]() DUALRES_CPU_INLINE {
        for (int64_t i = begin; i < end; ++i) {
          const T s = scales[i];
          local |= classify_scale(s);
          out[i] = table.index(max_nan(s, bound));
        }
      });
      if (local) status.fetch_or(local);
    });
  });
}

void raise_on_scale_status(int status, int64_t check) {
  const int bad = status & static_cast<int>(check);
  TORCH_CHECK_VALUE(bad == 0, describe_status(bad, "scales"));
}

at::Tensor build_indexes_cpu(const at::Tensor& scales, const at::Tensor& scale_table, double scale_bound,
                             int64_t check) {
  check_input(scales, "build_indexes", "scales", kCPU);
  check_scale_table(scales, scale_table, "build_indexes");
  auto out = at::empty(scales.sizes(), scales.options().dtype(at::kInt));
  std::atomic<int> status{0};
  {
    GilRelease nogil(scales.numel() >= kReleaseGilNumel);
    AT_DISPATCH_FLOATING_TYPES(scales.scalar_type(), "build_indexes_cpu", [&] {
      // The last table entry is never compared against (CompressAI loops over table[:-1]).
      PaddedTable<scalar_t> table(scale_table.data_ptr<scalar_t>(), static_cast<int32_t>(scale_table.numel() - 1));
      build_indexes_kernel(scales.data_ptr<scalar_t>(), out.data_ptr<int32_t>(), scales.numel(), table,
                           static_cast<scalar_t>(scale_bound), status);
    });
  }
  raise_on_scale_status(status.load(), check);
  return out;
}

#if DUALRES_CPU_X86
// quantize over [begin, end) of float inputs; returns the status bits seen.
DUALRES_TARGET_AVX512 int quantize_avx512(cpu::Avx512, const float* yp, const float* mp, int32_t* op, int64_t begin,
                                          int64_t end) {
  int local = 0;
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 d = _mm512_loadu_ps(yp + i);
    if (mp) d = _mm512_sub_ps(d, _mm512_loadu_ps(mp + i));
    _mm512_storeu_si512(op + i, quantize16(d, local));
  }
  for (; i < end; ++i) op[i] = quantize_symbol(yp[i], mp ? mp[i] : 0.f, local);
  return local;
}
#endif

at::Tensor quantize_cpu(const at::Tensor& y, const std::optional<at::Tensor>& means) {
  check_input(y, "quantize", "y", kCPU);
  if (means) check_same_dtype(y, *means, "quantize", "y", "means");
  auto out = at::empty(y.sizes(), y.options().dtype(at::kInt));
  std::atomic<int> status{0};
  {
    GilRelease nogil(y.numel() >= kReleaseGilNumel);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "quantize_cpu", [&] {
      const scalar_t* yp = y.data_ptr<scalar_t>();
      const scalar_t* mp = means ? means->data_ptr<scalar_t>() : nullptr;
      int32_t* op = out.data_ptr<int32_t>();
      cpu::dispatch([&](auto isa) {
        at::parallel_for(0, y.numel(), kStreamGrain, [&](int64_t begin, int64_t end) {
          int local = 0;
#if DUALRES_CPU_X86
          if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<decltype(isa), cpu::Avx512>) {
            local = quantize_avx512(isa, yp, mp, op, begin, end);
            if (local) status.fetch_or(local);
            return;
          }
#endif
          cpu::run(isa, [&]() DUALRES_CPU_INLINE {
            for (int64_t i = begin; i < end; ++i) op[i] = quantize_symbol(yp[i], mp ? mp[i] : scalar_t(0), local);
          });
          if (local) status.fetch_or(local);
        });
      });
    });
  }
  TORCH_CHECK_VALUE(status.load() == 0, describe_status(status.load(), "y - means"));
  return out;
}

#if DUALRES_CPU_X86
// Fused quantise + index over [begin, end) of float inputs, the status bits seen going to
// sym_local and scale_local; false (and nothing done) for a table Avx512FloatTable cannot hold.
DUALRES_TARGET_AVX512 bool quantize_indexes_avx512(cpu::Avx512, const float* yp, const float* mp, const float* sp,
                                                   const PaddedTable<float>& table, float bound, int32_t* symp,
                                                   int32_t* idxp, int64_t begin, int64_t end, int& sym_local,
                                                   int& scale_local) {
  if (!Avx512FloatTable::usable(table)) return false;
  const Avx512FloatTable vtable(table);
  const __m512 vbound = _mm512_set1_ps(bound);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __m512 d = _mm512_loadu_ps(yp + i);
    if (mp) d = _mm512_sub_ps(d, _mm512_loadu_ps(mp + i));
    _mm512_storeu_si512(symp + i, quantize16(d, sym_local));
    const __m512 s = _mm512_loadu_ps(sp + i);
    scale_local |= classify_scales16(s);
    const __m512 b = _mm512_mask_max_ps(s, _mm512_cmp_ps_mask(s, s, _CMP_ORD_Q), s, vbound);
    _mm512_storeu_si512(idxp + i, vtable.index(b));
  }
  for (; i < end; ++i) {
    symp[i] = quantize_symbol(yp[i], mp ? mp[i] : 0.f, sym_local);
    scale_local |= classify_scale(sp[i]);
    idxp[i] = table.index(max_nan(sp[i], bound));
  }
  return true;
}
#endif

std::tuple<at::Tensor, at::Tensor> quantize_indexes_cpu(const at::Tensor& y, const std::optional<at::Tensor>& means,
                                                        const at::Tensor& scales, const at::Tensor& scale_table,
                                                        double scale_bound, int64_t check) {
  check_input(y, "quantize_indexes", "y", kCPU);
  check_same(y, scales, "quantize_indexes", "y", "scales");  // scales may have another float dtype
  if (means) check_same_dtype(y, *means, "quantize_indexes", "y", "means");
  check_scale_table(scales, scale_table, "quantize_indexes");
  auto symbols = at::empty(y.sizes(), y.options().dtype(at::kInt));
  auto indexes = at::empty(y.sizes(), y.options().dtype(at::kInt));
  std::atomic<int> sym_status{0}, scale_status{0};
  {
    GilRelease nogil(y.numel() >= kReleaseGilNumel);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "quantize_indexes_cpu", [&] {
      using y_t = scalar_t;
      const y_t* yp = y.data_ptr<y_t>();
      const y_t* mp = means ? means->data_ptr<y_t>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES(scales.scalar_type(), "quantize_indexes_cpu_scales", [&] {
        PaddedTable<scalar_t> table(scale_table.data_ptr<scalar_t>(), static_cast<int32_t>(scale_table.numel() - 1));
        const scalar_t* sp = scales.data_ptr<scalar_t>();
        const scalar_t bound = static_cast<scalar_t>(scale_bound);
        int32_t* symp = symbols.data_ptr<int32_t>();
        int32_t* idxp = indexes.data_ptr<int32_t>();
        cpu::dispatch([&](auto isa) {
          at::parallel_for(0, y.numel(), kGrain, [&](int64_t begin, int64_t end) {
            int sym_local = 0, scale_local = 0;
            bool done = false;
#if DUALRES_CPU_X86
            // Vectorised for float inputs and scales; other dtypes take the loop below.
            if constexpr (std::is_same_v<y_t, float> && std::is_same_v<scalar_t, float> &&
                          std::is_same_v<decltype(isa), cpu::Avx512>) {
              done = quantize_indexes_avx512(isa, yp, mp, sp, table, bound, symp, idxp, begin, end, sym_local,
                                             scale_local);
            }
#endif
            if (!done) {
              cpu::run(isa, [&]() DUALRES_CPU_INLINE {
                for (int64_t i = begin; i < end; ++i) {
                  symp[i] = quantize_symbol(yp[i], mp ? mp[i] : y_t(0), sym_local);
                  const scalar_t s = sp[i];
                  scale_local |= classify_scale(s);
                  idxp[i] = table.index(max_nan(s, bound));
                }
              });
            }
            if (sym_local) sym_status.fetch_or(sym_local);
            if (scale_local) scale_status.fetch_or(scale_local);
          });
        });
      });
    });
  }
  TORCH_CHECK_VALUE(sym_status.load() == 0, describe_status(sym_status.load(), "y - means"));
  raise_on_scale_status(scale_status.load(), check);
  return {symbols, indexes};
}

at::Tensor dequantize_cpu(const at::Tensor& symbols, const std::optional<at::Tensor>& means, at::ScalarType dtype) {
  check_input(symbols, "dequantize", "symbols", kCPU);
  TORCH_CHECK(symbols.scalar_type() == at::kInt, "dequantize: symbols must be int32");
  if (means) {
    check_same(symbols, *means, "dequantize", "symbols", "means");
    dtype = means->scalar_type();
  }
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dequantize: dtype must be float32 or float64");
  auto out = at::empty(symbols.sizes(), symbols.options().dtype(dtype));
  GilRelease nogil(symbols.numel() >= kReleaseGilNumel);
  AT_DISPATCH_FLOATING_TYPES(dtype, "dequantize_cpu", [&] {
    const int32_t* sp = symbols.data_ptr<int32_t>();
    const scalar_t* mp = means ? means->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    cpu::dispatch([&](auto isa) {
      at::parallel_for(0, symbols.numel(), kStreamGrain, [&](int64_t begin, int64_t end) {
        cpu::run(isa, [&]() DUALRES_CPU_INLINE {
          if (mp) {
            for (int64_t i = begin; i < end; ++i) op[i] = static_cast<scalar_t>(sp[i]) + mp[i];
          } else {
            for (int64_t i = begin; i < end; ++i) op[i] = static_cast<scalar_t>(sp[i]);
          }
        });
      });
    });
  });
  return out;
}

void check_likelihood_args(const at::Tensor& x, const std::optional<at::Tensor>& means, const at::Tensor& scales) {
  check_input(x, "gaussian_likelihood", "inputs", kCPU);
  check_same_dtype(x, scales, "gaussian_likelihood", "inputs", "scales");
  if (means) check_same_dtype(x, *means, "gaussian_likelihood", "inputs", "means");
}

// float runs the vectorisable FastFloatNormal math under `omp simd`; double keeps libm.
template <typename T>
void likelihood_loop(const T* xp, const T* mp, const T* sp, T sb, T lb, T* op, int64_t numel) {
  cpu::dispatch([&](auto isa) {
    at::parallel_for(0, numel, kMathGrain, [&](int64_t begin, int64_t end) {
      cpu::run(isa, [&]() DUALRES_CPU_INLINE {
        if constexpr (std::is_same_v<T, float>) {
          if (mp) {
#pragma omp simd
            for (int64_t i = begin; i < end; ++i)
              op[i] = gaussian_likelihood<float, FastFloatNormal>(xp[i], mp[i], sp[i], sb, lb);
          } else {
#pragma omp simd
            for (int64_t i = begin; i < end; ++i)
              op[i] = gaussian_likelihood<float, FastFloatNormal>(xp[i], 0.f, sp[i], sb, lb);
          }
        } else {
          for (int64_t i = begin; i < end; ++i) op[i] = gaussian_likelihood(xp[i], mp ? mp[i] : T(0), sp[i], sb, lb);
        }
      });
    });
  });
}

template <typename T>
void likelihood_backward_loop(const T* gp, const T* xp, const T* mp, const T* sp, T sb, T lb, T* gxp, T* gsp,
                              int64_t numel) {
  cpu::dispatch([&](auto isa) {
    at::parallel_for(0, numel, kMathGrain, [&](int64_t begin, int64_t end) {
      cpu::run(isa, [&]() DUALRES_CPU_INLINE {
        if constexpr (std::is_same_v<T, float>) {
          if (mp) {
#pragma omp simd
            for (int64_t i = begin; i < end; ++i) {
              gaussian_likelihood_backward<float, FastFloatNormal>(gp[i], xp[i], mp[i], sp[i], sb, lb, gxp[i], gsp[i]);
            }
          } else {
#pragma omp simd
            for (int64_t i = begin; i < end; ++i) {
              gaussian_likelihood_backward<float, FastFloatNormal>(gp[i], xp[i], 0.f, sp[i], sb, lb, gxp[i], gsp[i]);
            }
          }
        } else {
          for (int64_t i = begin; i < end; ++i) {
            gaussian_likelihood_backward(gp[i], xp[i], mp ? mp[i] : T(0), sp[i], sb, lb, gxp[i], gsp[i]);
          }
        }
      });
    });
  });
}

at::Tensor likelihood_cpu(const at::Tensor& x, const std::optional<at::Tensor>& means, const at::Tensor& scales,
                          double scale_bound, double likelihood_bound) {
  check_likelihood_args(x, means, scales);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_likelihood_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = means ? means->data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = scales.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t sb = static_cast<scalar_t>(scale_bound), lb = static_cast<scalar_t>(likelihood_bound);
    likelihood_loop(xp, mp, sp, sb, lb, op, x.numel());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> likelihood_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                           const std::optional<at::Tensor>& means,
                                                           const at::Tensor& scales, double scale_bound,
                                                           double likelihood_bound) {
  check_likelihood_args(x, means, scales);
  check_same_dtype(x, grad, "gaussian_likelihood_backward", "inputs", "grad");
  auto grad_x = at::empty_like(x);
  auto grad_scales = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_likelihood_backward_cpu", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* mp = means ? means->data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = scales.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* gsp = grad_scales.data_ptr<scalar_t>();
    const scalar_t sb = static_cast<scalar_t>(scale_bound), lb = static_cast<scalar_t>(likelihood_bound);
    likelihood_backward_loop(gp, xp, mp, sp, sb, lb, gxp, gsp, x.numel());
  });
  return {grad_x, grad_scales};
}

// CompressAI's pmf_to_quantized_cdf (ported from ryg_rans), step for step: scale and round the
// pmf in float, renormalise with integer division, accumulate, then give every zero-frequency
// symbol one count taken from the smallest frequency above one.
void quantize_cdf_row(const float* pmf, int64_t length, int precision, int32_t* cdf_out) {
  std::vector<uint32_t> cdf(length + 1);
  cdf[0] = 0;
  const float scale = static_cast<float>(1 << precision);
  for (int64_t i = 0; i < length; ++i) {
    const float p = pmf[i];
    TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0.f, "pmf_to_quantized_cdf: pmf values must be finite and >= 0, got ",
                      p);
    cdf[i + 1] = static_cast<uint32_t>(std::round(p * scale));
  }
  uint32_t total = 0;
  for (uint32_t c : cdf) total += c;
  TORCH_CHECK_VALUE(total != 0, "pmf_to_quantized_cdf: the pmf rounds to zero everywhere");
  for (auto& c : cdf) c = static_cast<uint32_t>((static_cast<uint64_t>(1u << precision) * c) / total);
  std::partial_sum(cdf.begin(), cdf.end(), cdf.begin());
  cdf.back() = 1u << precision;
  const int64_t n = static_cast<int64_t>(cdf.size());
  for (int64_t i = 0; i < n - 1; ++i) {
    if (cdf[i] != cdf[i + 1]) continue;
    uint32_t best_freq = ~0u;
    int64_t best_steal = -1;
    for (int64_t j = 0; j < n - 1; ++j) {
      const uint32_t freq = cdf[j + 1] - cdf[j];
      if (freq > 1 && freq < best_freq) {
        best_freq = freq;
        best_steal = j;
      }
    }
    TORCH_CHECK_VALUE(best_steal != -1, "pmf_to_quantized_cdf: ", length,
                      " symbols do not fit in 2^precision with a nonzero frequency each");
    if (best_steal < i) {
      for (int64_t j = best_steal + 1; j <= i; ++j) cdf[j]--;
    } else {
      for (int64_t j = i + 1; j <= best_steal; ++j) cdf[j]++;
    }
  }
  for (int64_t i = 0; i < n; ++i) cdf_out[i] = static_cast<int32_t>(cdf[i]);
}

// pmf: float32 [T, L]; lengths: int32 [T], row i uses pmf[i, :lengths[i]].
// Returns int32 [T, L + 1]: row i holds its lengths[i] + 1 CDF values, then zeros.
at::Tensor pmf_to_quantized_cdf_cpu(const at::Tensor& pmf_in, const at::Tensor& lengths_in, int64_t precision) {
  TORCH_CHECK_VALUE(precision >= 1 && precision <= 30, "pmf_to_quantized_cdf: precision must be in [1, 30]");
  TORCH_CHECK(pmf_in.dim() == 2, "pmf_to_quantized_cdf: pmf must be 2-D [T, L]");
  TORCH_CHECK(lengths_in.dim() == 1 && lengths_in.size(0) == pmf_in.size(0),
              "pmf_to_quantized_cdf: lengths must be 1-D with one entry per pmf row");
  auto pmf = pmf_in.to(at::kFloat).contiguous();
  auto lengths = lengths_in.to(at::kLong).contiguous();
  const int64_t rows = pmf.size(0), cols = pmf.size(1);
  auto out = at::zeros({rows, cols + 1}, pmf.options().dtype(at::kInt));
  const int64_t* lp = lengths.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(lp[r] >= 1 && lp[r] <= cols, "pmf_to_quantized_cdf: lengths[", r, "] = ", lp[r],
                      " is outside [1, ", cols, "]");
  }
  const float* pp = pmf.data_ptr<float>();
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) quantize_cdf_row(pp + r * cols, lp[r], precision, op + r * (cols + 1));
  });
  return out;
}

// The CDF tables of a Gaussian scale table, as CompressAI's GaussianConditional.update() builds
// them. The pmf is computed with the same ATen operations in the same order and dtypes as
// CompressAI's Python code, so it is bit-identical (erfc included) to what CompressAI feeds its
// pmf_to_quantized_cdf; the integer part then runs in quantize_cdf_row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_cdf_tables_cpu(const at::Tensor& scale_table_in,
                                                                       double tail_mass, int64_t precision) {
  TORCH_CHECK(scale_table_in.dim() == 1 && scale_table_in.numel() >= 1, "scale_table must be a non-empty 1-D tensor");
  TORCH_CHECK(at::isFloatingType(scale_table_in.scalar_type()), "scale_table must be floating point");
  TORCH_CHECK_VALUE(tail_mass > 0 && tail_mass < 1, "tail_mass must be in (0, 1)");
  auto scale_table = scale_table_in.to(at::kCPU).contiguous();
  TORCH_CHECK_VALUE(at::isfinite(scale_table).all().item<bool>() && (scale_table > 0).all().item<bool>(),
                    "scale_table values must be finite and > 0");
  // scipy.stats.norm.ppf and torch.special.ndtri are both Cephes' ndtri in float64.
  const double multiplier =
      -at::special_ndtri(at::scalar_tensor(tail_mass / 2, at::TensorOptions().dtype(at::kDouble))).item<double>();
  auto pmf_center = at::ceil(scale_table * multiplier).to(at::kInt);
  auto pmf_length = 2 * pmf_center + 1;
  const int64_t max_length = pmf_length.max().item<int32_t>();
  TORCH_CHECK_VALUE(max_length <= (int64_t(1) << precision) - 1, "scale_table entry too large for ", precision,
                    "-bit precision: the pmf needs ", max_length, " symbols");
  auto samples = at::abs(at::arange(max_length, scale_table.options().dtype(at::kInt)) - pmf_center.unsqueeze(1));
  auto samples_f = samples.to(at::kFloat);
  auto scales_f = scale_table.unsqueeze(1).to(at::kFloat);
  const double half = 0.5, c = -std::pow(2.0, -0.5);
  auto upper = half * at::erfc(c * ((half - samples_f) / scales_f));
  auto lower = half * at::erfc(c * ((-half - samples_f) / scales_f));
  auto pmf = (upper - lower).contiguous();
  auto tail = (2 * lower.select(1, 0)).contiguous();

  const int64_t rows = pmf.size(0);
  // Each row is pmf[:length] followed by its tail mass, as in CompressAI's _pmf_to_cdf.
  auto prob = at::zeros({rows, max_length + 1}, pmf.options());
  const int32_t* lens = pmf_length.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    prob[r].narrow(0, 0, lens[r]).copy_(pmf[r].narrow(0, 0, lens[r]));
    prob[r][lens[r]] = tail[r];
  }
  auto cdf = pmf_to_quantized_cdf_cpu(prob, pmf_length + 1, precision);  // [T, max_length + 2]
  return {cdf, (pmf_length + 2).to(at::kInt), (-pmf_center).to(at::kInt)};
}

}  // namespace
}  // namespace gaussian
}  // namespace dualres

TORCH_LIBRARY_IMPL(dualres_ext, CPU, m) {
  using namespace dualres::gaussian;
  m.impl("gaussian_build_indexes", &build_indexes_cpu);
  m.impl("gaussian_quantize", &quantize_cpu);
  m.impl("gaussian_quantize_indexes", &quantize_indexes_cpu);
  m.impl("gaussian_dequantize", &dequantize_cpu);
  m.impl("gaussian_likelihood", &likelihood_cpu);
  m.impl("gaussian_likelihood_backward", &likelihood_backward_cpu);
  m.impl("pmf_to_quantized_cdf", &pmf_to_quantized_cdf_cpu);
  m.impl("gaussian_cdf_tables", &gaussian_cdf_tables_cpu);
}
