// Shared by the CPU and CUDA GDN kernels: the four variants and their scalar math.
//
//   n_i = beta_i + sum_j gamma[i][j] * u(x_j),   y_i = x_i * f(n_i)
//   GDN   : u = x^2, f = n^-1/2        IGDN  : u = x^2, f = n^1/2
//   GDN1  : u = |x|, f = 1/n           IGDN1 : u = |x|, f = n
//
// Backward, with g = dL/dy and s = f(n):
//   t_i   = dL/dn_i = g_i * x_i * f'(n_i)      (f' written through s below)
//   dL/dx_i = g_i * s_i + u'(x_i) * sum_k gamma[k][i] * t_k
//   dL/dbeta_k = sum_pixels t_k,   dL/dgamma[k][i] = sum_pixels t_k * u(x_i)
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define GDN_HD __host__ __device__ __forceinline__
#else
// Forced inline: the CPU loops calling these are compiled per instruction set (cpu::run), and
// only inlined code is compiled for the caller's set.
#define GDN_HD inline __attribute__((always_inline))
#endif

namespace dualres::gdn {

enum Mode : int { kGDN = 0, kIGDN = 1, kGDN1 = 2, kIGDN1 = 3 };

inline int mode_of(bool inverse, bool simplified) {
  return (simplified ? 2 : 0) + (inverse ? 1 : 0);
}

template <int M>
GDN_HD float u_of(float x) {
  if constexpr (M == kGDN || M == kIGDN)
    return x * x;
  else
    return fabsf(x);
}

// d u / d x (sign(0) = 0, as autograd's abs backward).
template <int M>
GDN_HD float du_of(float x) {
  if constexpr (M == kGDN || M == kIGDN)
    return 2.0f * x;
  else
    return (x > 0.0f) ? 1.0f : ((x < 0.0f) ? -1.0f : 0.0f);
}

template <int M>
GDN_HD float scale_of(float n) {
  if constexpr (M == kGDN)
    return 1.0f / sqrtf(n);
  else if constexpr (M == kIGDN)
    return sqrtf(n);
  else if constexpr (M == kGDN1)
    return 1.0f / n;
  else
    return n;
}

// f'(n) expressed through s = f(n), so the backward needs no second transcendental.
template <int M>
GDN_HD float dscale_of(float s) {
  if constexpr (M == kGDN)
    return -0.5f * s * s * s;  // d n^-1/2 = -1/2 n^-3/2
  else if constexpr (M == kIGDN)
    return 0.5f / s;  // d n^1/2  = 1/2 n^-1/2
  else if constexpr (M == kGDN1)
    return -s * s;  // d 1/n    = -1/n^2
  else
    return 1.0f;
}

}  // namespace dualres::gdn
