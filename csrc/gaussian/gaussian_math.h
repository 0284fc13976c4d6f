// Element-wise math shared by the CPU and CUDA Gaussian kernels (no torch types here), so that
// both devices compute the very same expressions in the very same order.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DR_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU loops only vectorise when every call in them is inlined, and GCC stops
// inlining in large functions (the serial path of at::parallel_for inlines the loop body there).
#define DR_HD inline __attribute__((always_inline))
#endif

namespace dualres {
namespace gaussian {

// Bits of the status word a kernel reports when it sees an input it cannot honour.
constexpr int kSawNaN = 1;       // a NaN value
constexpr int kSawInf = 2;       // +-Inf
constexpr int kSawNegative = 4;  // a negative scale
constexpr int kSawOverflow = 8;  // a rounded value outside int32

DR_HD float dr_erfc(float x) {
  return ::erfcf(x);
}
DR_HD double dr_erfc(double x) {
  return ::erfc(x);
}
DR_HD float dr_exp(float x) {
  return ::expf(x);
}
DR_HD double dr_exp(double x) {
  return ::exp(x);
}
DR_HD float dr_rint(float x) {
  return ::rintf(x);
}  // half to even, like torch.round
DR_HD double dr_rint(double x) {
  return ::rint(x);
}
DR_HD float dr_fabs(float x) {
  return ::fabsf(x);
}
DR_HD double dr_fabs(double x) {
  return ::fabs(x);
}

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

// The normal CDF/density through the C math library (CUDA's erfc/exp on the GPU).
struct LibmNormal {
  template <typename T>
  static DR_HD T cdf(T x) {
    return std_cumulative(x);
  }
  template <typename T>
  static DR_HD T pdf(T x) {
    return std_density(x);
  }
};

#if !defined(__CUDACC__)
// Branch-free float versions for the CPU, written so that the compiler vectorises a loop over
// them (libm's erfcf/expf are scalar calls): a Cephes-style expf and the Numerical Recipes erfc
// (relative error < 1.2e-7 in the approximation itself, a few 1e-7 in float arithmetic for
// arguments where the likelihood is above its 1e-9 bound).
DR_HD float fast_expf(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = dr_rint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

DR_HD float fast_erfcf(float x) {
  const float z = dr_fabs(x);
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  const float r = t * fast_expf(-z * z - 1.26551223f + t * p);
  return x >= 0.0f ? r : 2.0f - r;
}

struct FastFloatNormal {
  static DR_HD float cdf(float x) { return 0.5f * fast_erfcf(-0.70710678118654752440f * x); }
  static DR_HD float pdf(float x) { return 0.39894228040143267794f * fast_expf(-0.5f * x * x); }
};
#endif  // !__CUDACC__

// Likelihood of the unit bin around `x` under N(mean, max(scale, scale_bound)), bounded below by
// likelihood_bound (CompressAI's GaussianConditional._likelihood + LowerBound).
template <typename T, typename Normal = LibmNormal>
DR_HD T gaussian_likelihood(T x, T mean, T scale, T scale_bound, T likelihood_bound) {
  const T s = max_nan(scale, scale_bound);
  const T v = dr_fabs(x - mean);
  const T upper = Normal::cdf((T(0.5) - v) / s);
  const T lower = Normal::cdf((T(-0.5) - v) / s);
  return max_nan(upper - lower, likelihood_bound);
}

// Gradients of gaussian_likelihood with respect to x and scale (d/dmean = -d/dx), following
// PyTorch autograd of the reference, including LowerBound's rule: the gradient passes where the
// input is at or above the bound, or where the gradient would push the input up.
template <typename T, typename Normal = LibmNormal>
DR_HD void gaussian_likelihood_backward(T grad, T x, T mean, T scale, T scale_bound, T likelihood_bound, T& grad_x,
                                        T& grad_scale) {
  const T s = max_nan(scale, scale_bound);
  const T d = x - mean;
  const T v = dr_fabs(d);
  const T a = (T(0.5) - v) / s;
  const T b = (T(-0.5) - v) / s;
  const T likelihood = Normal::cdf(a) - Normal::cdf(b);
  const T g = (likelihood >= likelihood_bound || grad < T(0)) ? grad : T(0);
  const T pa = Normal::pdf(a);
  const T pb = Normal::pdf(b);
  const T grad_v = g * (pb - pa) / s;
  const T grad_s = g * (b * pb - a * pa) / s;
  const T sign = d > T(0) ? T(1) : (d < T(0) ? T(-1) : T(0));
  grad_x = grad_v * sign;
  grad_scale = (scale >= scale_bound || grad_s < T(0)) ? grad_s : T(0);
}

}  // namespace gaussian
}  // namespace dualres
