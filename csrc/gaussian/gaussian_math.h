// Element-wise math shared by the CPU and CUDA Gaussian kernels (no torch types here), so that
// both devices compute the very same expressions in the very same order.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DR_HD __host__ __device__ __forceinline__
#else
#define DR_HD inline
#endif

namespace dualres {
namespace gaussian {

// Bits of the status word a kernel reports when it sees an input it cannot honour.
constexpr int kSawNaN = 1;       // a NaN value
constexpr int kSawInf = 2;       // +-Inf
constexpr int kSawNegative = 4;  // a negative scale
constexpr int kSawOverflow = 8;  // a rounded value outside int32

DR_HD float dr_erfc(float x) { return ::erfcf(x); }
DR_HD double dr_erfc(double x) { return ::erfc(x); }
DR_HD float dr_exp(float x) { return ::expf(x); }
DR_HD double dr_exp(double x) { return ::exp(x); }
DR_HD float dr_rint(float x) { return ::rintf(x); }  // half to even, like torch.round
DR_HD double dr_rint(double x) { return ::rint(x); }
DR_HD float dr_fabs(float x) { return ::fabsf(x); }
DR_HD double dr_fabs(double x) { return ::fabs(x); }

// torch.max(x, bound): NaN propagates.
template <typename T>
DR_HD T max_nan(T x, T bound) {
  return (x != x) ? x : (x < bound ? bound : x);
}

// CompressAI's GaussianConditional.build_indexes after the lower bound: the number of entries t
// of table[0..n) for which `scale <= t` is false. For a sorted table and a non-NaN scale that is
// the number of entries strictly below the scale (a lower_bound search); a NaN scale gives n,
// like CompressAI's loop does.
template <typename T>
DR_HD int32_t count_not_above(const T* table, int32_t n, T scale) {
  int32_t lo = 0, hi = n;
  while (lo < hi) {
    const int32_t mid = (lo + hi) >> 1;
    if (!(scale <= table[mid])) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Same count for a table that is not sorted (update_scale_table does not check the order).
template <typename T>
DR_HD int32_t count_not_above_linear(const T* table, int32_t n, T scale) {
  int32_t count = 0;
  for (int32_t i = 0; i < n; ++i) count += !(scale <= table[i]);
  return count;
}

template <typename T>
DR_HD int classify_scale(T scale) {
  if (scale != scale) return kSawNaN;
  if (scale - scale != scale - scale) return kSawInf;
  return scale < T(0) ? kSawNegative : 0;
}

// round(y - mean) as int32; `status` gets a bit when the value cannot be represented.
template <typename T>
DR_HD int32_t quantize_symbol(T y, T mean, int& status) {
  const T r = dr_rint(y - mean);
  if (!(r >= T(-2147483648.0) && r < T(2147483648.0))) {
    status |= (r != r) ? kSawNaN : ((r - r != r - r) ? kSawInf : kSawOverflow);
    return 0;
  }
  return static_cast<int32_t>(r);
}

// Standard normal CDF written as CompressAI writes it: 0.5 * erfc(-(2^-0.5) * x).
template <typename T>
DR_HD T std_cumulative(T x) {
  return T(0.5) * dr_erfc(T(-0.70710678118654752440) * x);
}

template <typename T>
DR_HD T std_density(T x) {
  return T(0.39894228040143267794) * dr_exp(T(-0.5) * x * x);
}

// Likelihood of the unit bin around `x` under N(mean, max(scale, scale_bound)), bounded below by
// likelihood_bound (CompressAI's GaussianConditional._likelihood + LowerBound).
template <typename T>
DR_HD T gaussian_likelihood(T x, T mean, T scale, T scale_bound, T likelihood_bound) {
  const T s = max_nan(scale, scale_bound);
  const T v = dr_fabs(x - mean);
  const T upper = std_cumulative((T(0.5) - v) / s);
  const T lower = std_cumulative((T(-0.5) - v) / s);
  return max_nan(upper - lower, likelihood_bound);
}

// Gradients of gaussian_likelihood with respect to x and scale (d/dmean = -d/dx), following
// PyTorch autograd of the reference, including LowerBound's rule: the gradient passes where the
// input is at or above the bound, or where the gradient would push the input up.
template <typename T>
DR_HD void gaussian_likelihood_backward(T grad, T x, T mean, T scale, T scale_bound, T likelihood_bound,
                                        T& grad_x, T& grad_scale) {
  const T s = max_nan(scale, scale_bound);
  const T d = x - mean;
  const T v = dr_fabs(d);
  const T a = (T(0.5) - v) / s;
  const T b = (T(-0.5) - v) / s;
  const T likelihood = std_cumulative(a) - std_cumulative(b);
  const T g = (likelihood >= likelihood_bound || grad < T(0)) ? grad : T(0);
  const T pa = std_density(a);
  const T pb = std_density(b);
  const T grad_v = g * (pb - pa) / s;
  const T grad_s = g * (b * pb - a * pa) / s;
  const T sign = d > T(0) ? T(1) : (d < T(0) ? T(-1) : T(0));
  grad_x = grad_v * sign;
  grad_scale = (scale >= scale_bound || grad_s < T(0)) ? grad_s : T(0);
}

}  // namespace gaussian
}  // namespace dualres
