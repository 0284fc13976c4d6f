// Fused GDN / IGDN / simplified GDN on CUDA, forward and backward.
// x: float32, float16 or bfloat16 (NCHW- or channels-last-contiguous); beta, gamma (and the optional
// bias) float32; all arithmetic in float32.
//
// Kept deliberately simple: one block per tile of TP pixels (pixel index q = n * H*W + p across
// the batch). The block stages x (+ bias) and u(x) for its tile in shared memory, then each
// thread computes outputs (channel i, pixel t) as a plain dot product over the C channels of the
// tile; consecutive threads take consecutive pixels of the same channel, so gamma[i][j] is one
// broadcast read per warp and the shared reads are conflict-free.
//
// Backward: one kernel computes dL/dx and writes t = dL/dn and u(x) channel-major
// (C x pixels) to scratch buffers; the gamma and beta gradients are then cuBLAS products/sums
// over those buffers (dgamma = T U^T, dbeta = T 1).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "gdn/gdn_common.h"

namespace dualres::gdn {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxTile = 32;                             // pixels per block
constexpr int kSharedFloats = 48 * 1024 / 4;             // static shared-memory budget per block
constexpr int64_t kMaxChannelsCuda = kSharedFloats / 3;  // backward keeps 3 C x TP tiles

// Pixels per tile for C > 0 channels (the launchers return before this when C == 0).
int tile_pixels(int64_t C, int buffers) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxTile, kSharedFloats / (buffers * C))));
}

// Element offset of (channel c, global pixel q).
template <bool CL>
__device__ __forceinline__ int64_t offset_of(int64_t c, int64_t q, int64_t C, int64_t P) {
  if constexpr (CL)
    return q * C + c;
  else
    return (q / P) * C * P + c * P + (q % P);
}

// Stages x + bias and u(x + bias) of pixels [q0, q0 + tp) into xs / us, laid out [c][t].
template <typename scalar_t, int M, bool CL>
__device__ void load_tile(const scalar_t* __restrict__ x, const float* __restrict__ bias, int64_t q0, int tp, int64_t C,
                          int64_t P, float* xs, float* us) {
  const int64_t count = C * tp;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    // channels-last: channel fastest (coalesced reads); NCHW: pixel fastest.
    const int64_t c = CL ? k % C : k / tp;
    const int t = CL ? static_cast<int>(k / C) : static_cast<int>(k % tp);
    float v = static_cast<float>(x[offset_of<CL>(c, q0 + t, C, P)]);
    if (bias != nullptr) v += bias[c];
    xs[c * tp + t] = v;
    us[c * tp + t] = u_of<M>(v);
  }
}

// Stages a channels-last tensor's values of pixels [q0, q0 + tp) into dst, laid out [c][t]:
// channel fastest across threads, so a warp reads consecutive addresses.
template <typename scalar_t>
__device__ void load_tile_cl(const scalar_t* __restrict__ src, int64_t q0, int tp, int64_t C, float* dst) {
  const int64_t count = C * tp;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t c = k % C;
    const int t = static_cast<int>(k / C);
    dst[c * tp + t] = static_cast<float>(src[(q0 + t) * C + c]);
  }
}

// Writes a [c][t] shared tile of pixels [q0, q0 + tp) to a channels-last tensor, channel fastest
// across threads (consecutive addresses). The caller synchronises the block before.
template <typename scalar_t>
__device__ void store_tile_cl(const float* src, int64_t q0, int tp, int64_t C, scalar_t* __restrict__ dst) {
  const int64_t count = C * tp;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t c = k % C;
    const int t = static_cast<int>(k / C);
    dst[(q0 + t) * C + c] = static_cast<scalar_t>(src[c * tp + t]);
  }
}

template <typename scalar_t, int M, bool CL>
__global__ void __launch_bounds__(kThreads)
    gdn_forward_kernel(const scalar_t* x, const float* __restrict__ beta, const float* __restrict__ gamma,
                       const float* __restrict__ bias, scalar_t* y, int64_t Q, int64_t C, int64_t P, int TP) {
  extern __shared__ float smem[];
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * TP;
  const int tp = static_cast<int>(Q - q0 < TP ? Q - q0 : TP);
  float* xs = smem;
  float* us = smem + C * tp;
  load_tile<scalar_t, M, CL>(x, bias, q0, tp, C, P, xs, us);
  __syncthreads();  // also makes in-place (y == x) safe: the whole tile is read before any write
  const int64_t count = C * tp;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t i = k / tp;
    const int t = static_cast<int>(k % tp);
    const float* g_row = gamma + i * C;
    float n = beta[i];
    for (int64_t j = 0; j < C; ++j) n = fmaf(g_row[j], us[j * tp + t], n);
    const float out = xs[i * tp + t] * scale_of<M>(n);
    // Channels-last: neighbouring threads hold neighbouring pixels, C elements apart in y, so the
    // result goes back to xs[i][t] (read only by this thread) and leaves in a coalesced pass.
    if constexpr (CL)
      xs[i * tp + t] = out;
    else
      y[offset_of<CL>(i, q0 + t, C, P)] = static_cast<scalar_t>(out);
  }
  if constexpr (CL) {
    __syncthreads();
    store_tile_cl(xs, q0, tp, C, y);
  }
}

template <typename scalar_t, int M, bool CL>
__global__ void __launch_bounds__(kThreads)
    gdn_backward_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                        const float* __restrict__ beta, const float* __restrict__ gamma, const float* __restrict__ bias,
                        scalar_t* __restrict__ grad_x, float* __restrict__ t_out, float* __restrict__ u_out, int64_t Q,
                        int64_t C, int64_t P, int TP) {
  extern __shared__ float smem[];
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * TP;
  const int tp = static_cast<int>(Q - q0 < TP ? Q - q0 : TP);
  float* xs = smem;
  float* us = smem + C * tp;
  float* ts = smem + 2 * C * tp;
  load_tile<scalar_t, M, CL>(x, bias, q0, tp, C, P, xs, us);
  // Channels-last: grad_y is staged in ts (coalesced); pass 1 reads g from ts[i][t] before it
  // overwrites that element with t, and no other thread touches it in between.
  if constexpr (CL) load_tile_cl(grad_y, q0, tp, C, ts);
  __syncthreads();

  const int64_t count = C * tp;
  // Pass 1: n, s = f(n); t = g x f'(n) into shared (and to the scratch buffer for dgamma/dbeta).
  // The direct term g * s of dx is kept in registers (each thread owns the same outputs below).
  // tile_pixels(C, 3) keeps C * tp <= kSharedFloats / 3, so a thread owns at most this many outputs.
  constexpr int kMaxOwned = (kSharedFloats / 3 + kThreads - 1) / kThreads;
  float direct[kMaxOwned];
  int owned = 0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x, ++owned) {
    const int64_t i = k / tp;
    const int t = static_cast<int>(k % tp);
    const float* g_row = gamma + i * C;
    float n = beta[i];
    for (int64_t j = 0; j < C; ++j) n = fmaf(g_row[j], us[j * tp + t], n);
    const float s = scale_of<M>(n);
    float g;
    if constexpr (CL)
      g = ts[i * tp + t];
    else
      g = static_cast<float>(grad_y[offset_of<CL>(i, q0 + t, C, P)]);
    direct[owned] = g * s;
    const float tv = g * xs[i * tp + t] * dscale_of<M>(s);
    ts[i * tp + t] = tv;
    t_out[i * Q + q0 + t] = tv;
    u_out[i * Q + q0 + t] = us[i * tp + t];
  }
  __syncthreads();
  // Pass 2: dx_i = g_i s_i + u'(x_i) * sum_k gamma[k][i] t_k.
  owned = 0;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x, ++owned) {
    const int64_t i = k / tp;
    const int t = static_cast<int>(k % tp);
    float acc = 0.0f;
    for (int64_t j = 0; j < C; ++j) acc = fmaf(gamma[j * C + i], ts[j * tp + t], acc);
    const float out = direct[owned] + du_of<M>(xs[i * tp + t]) * acc;
    // Channels-last: xs[i][t] is read only by this thread, so it holds the result until the
    // coalesced store below (as in the forward).
    if constexpr (CL)
      xs[i * tp + t] = out;
    else
      grad_x[offset_of<CL>(i, q0 + t, C, P)] = static_cast<scalar_t>(out);
  }
  if constexpr (CL) {
    __syncthreads();
    store_tile_cl(xs, q0, tp, C, grad_x);
  }
}

struct Checked {
  at::Tensor x, beta, gamma, bias;
  bool channels_last;
};

Checked check_and_prepare(const at::Tensor& x_in, const at::Tensor& beta, const at::Tensor& gamma,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 4, "gdn: x must be 4-D (N, C, H, W), got ", x_in.dim(), " dims");
  TORCH_CHECK(x_in.is_cuda(), "gdn (CUDA): x must be a CUDA tensor");
  const auto st = x_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "gdn (CUDA): x must be float32, float16 or bfloat16, got ", st);
  const int64_t C = x_in.size(1);
  TORCH_CHECK(C <= kMaxChannelsCuda, "gdn (CUDA): at most ", kMaxChannelsCuda, " channels, got ", C);
  TORCH_CHECK(
      beta.dim() == 1 && beta.size(0) == C && beta.scalar_type() == at::kFloat && beta.device() == x_in.device(),
      "gdn: beta must be float32 of shape (", C, ") on x's device");
  TORCH_CHECK(gamma.dim() == 2 && gamma.size(0) == C && gamma.size(1) == C && gamma.scalar_type() == at::kFloat &&
                  gamma.device() == x_in.device(),
              "gdn: gamma must be float32 of shape (", C, ", ", C, ") on x's device");
  Checked r;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == C && bias->scalar_type() == at::kFloat && bias->device() == x_in.device(),
        "gdn: bias must be float32 of shape (", C, ") on x's device");
    r.bias = bias->contiguous();
  }
  r.channels_last = C > 1 && x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  r.x = r.channels_last ? x_in : x_in.contiguous();
  r.beta = beta.contiguous();
  r.gamma = gamma.contiguous();
  return r;
}

template <typename F>
void dispatch_mode_layout(bool inverse, bool simplified, bool channels_last, F&& f) {
  auto with_layout = [&](auto mode) {
    if (channels_last)
      f(mode, std::true_type{});
    else
      f(mode, std::false_type{});
  };
  switch (mode_of(inverse, simplified)) {
    case kGDN:
      with_layout(std::integral_constant<int, kGDN>{});
      break;
    case kIGDN:
      with_layout(std::integral_constant<int, kIGDN>{});
      break;
    case kGDN1:
      with_layout(std::integral_constant<int, kGDN1>{});
      break;
    default:
      with_layout(std::integral_constant<int, kIGDN1>{});
      break;
  }
}

void launch_forward(const Checked& a, at::Tensor& y, bool inverse, bool simplified) {
  const int64_t N = a.x.size(0), C = a.x.size(1), P = a.x.size(2) * a.x.size(3), Q = N * P;
  // An empty tensor (no pixels or no channels) has nothing to compute; tile_pixels divides by C.
  if (Q == 0 || C == 0) return;
  const int TP = tile_pixels(C, 2);
  const int64_t blocks = (Q + TP - 1) / TP;
  const size_t shared = static_cast<size_t>(2 * C * TP) * sizeof(float);
  const float* bias = a.bias.defined() ? a.bias.data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gdn_forward_cuda", [&] {
    dispatch_mode_layout(inverse, simplified, a.channels_last, [&](auto mode, auto cl) {
      gdn_forward_kernel<scalar_t, decltype(mode)::value, decltype(cl)::value>
          <<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(
              a.x.data_ptr<scalar_t>(), a.beta.data_ptr<float>(), a.gamma.data_ptr<float>(), bias,
              y.data_ptr<scalar_t>(), Q, C, P, TP);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gdn_forward_cuda(const at::Tensor& x, const at::Tensor& beta, const at::Tensor& gamma,
                            const std::optional<at::Tensor>& bias, bool inverse, bool simplified) {
  const c10::cuda::CUDAGuard guard(x.device());
  Checked a = check_and_prepare(x, beta, gamma, bias);
  at::Tensor y = at::empty_like(a.x, a.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  launch_forward(a, y, inverse, simplified);
  return y;
}

void gdn_forward_inplace_cuda(at::Tensor& x, const at::Tensor& beta, const at::Tensor& gamma,
                              const std::optional<at::Tensor>& bias, bool inverse, bool simplified) {
  const c10::cuda::CUDAGuard guard(x.device());
  Checked a = check_and_prepare(x, beta, gamma, bias);
  TORCH_CHECK(a.x.is_same(x), "gdn_forward_ (in place): x must be contiguous (NCHW or channels-last)");
  launch_forward(a, x, inverse, simplified);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdn_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                 const at::Tensor& beta, const at::Tensor& gamma,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 const std::optional<at::Tensor>& /*scale*/,
                                                                 bool inverse, bool simplified) {
  // `scale` (the CPU forward's saved f(n)) is not used here: recomputing n is cheap on the GPU.
  const c10::cuda::CUDAGuard guard(x.device());
  Checked a = check_and_prepare(x, beta, gamma, bias);
  TORCH_CHECK(
      grad_y.sizes() == a.x.sizes() && grad_y.scalar_type() == a.x.scalar_type() && grad_y.device() == a.x.device(),
      "gdn backward: grad_y must match x in shape, dtype and device");
  const auto fmt = a.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor g = grad_y.contiguous(fmt);
  at::Tensor gx = at::empty_like(a.x, fmt);
  const int64_t N = a.x.size(0), C = a.x.size(1), P = a.x.size(2) * a.x.size(3), Q = N * P;
  const auto f32 = a.x.options().dtype(at::kFloat);
  // Empty x (no pixels or no channels): dx is empty and the parameter gradients are zero.
  if (Q == 0 || C == 0) return {gx, at::zeros({C}, f32), at::zeros({C, C}, f32)};
  // Channel-major scratch: t = dL/dn and u(x), C x Q each.
  at::Tensor t_buf = at::empty({C, Q}, f32), u_buf = at::empty({C, Q}, f32);
  const int TP = tile_pixels(C, 3);
  const int64_t blocks = (Q + TP - 1) / TP;
  const size_t shared = static_cast<size_t>(3 * C * TP) * sizeof(float);
  const float* bias_p = a.bias.defined() ? a.bias.data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "gdn_backward_cuda", [&] {
    dispatch_mode_layout(inverse, simplified, a.channels_last, [&](auto mode, auto cl) {
      gdn_backward_kernel<scalar_t, decltype(mode)::value, decltype(cl)::value>
          <<<static_cast<unsigned>(blocks), kThreads, shared, stream>>>(
              g.data_ptr<scalar_t>(), a.x.data_ptr<scalar_t>(), a.beta.data_ptr<float>(), a.gamma.data_ptr<float>(),
              bias_p, gx.data_ptr<scalar_t>(), t_buf.data_ptr<float>(), u_buf.data_ptr<float>(), Q, C, P, TP);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor ggamma = at::mm(t_buf, u_buf.t());  // dgamma[k][i] = sum_q t_k(q) u_i(q)
  at::Tensor gbeta = t_buf.sum(1);
  return {gx, gbeta, ggamma};
}

}  // namespace
}  // namespace dualres::gdn

TORCH_LIBRARY_IMPL(dualres_ext, CUDA, m) {
  m.impl("gdn_forward", &dualres::gdn::gdn_forward_cuda);
  m.impl("gdn_forward_", &dualres::gdn::gdn_forward_inplace_cuda);
  m.impl("gdn_backward", &dualres::gdn::gdn_backward_cuda);
}
