// CUDA kernels of the Gaussian conditional: scale -> table index, quantisation and the training
// likelihood (forward and backward). The element-wise math is gaussian_math.h, shared with the
// CPU kernels, so both devices evaluate the same expressions. The CDF table builders stay on the
// CPU (they run once per scale table).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "gaussian/gaussian_checks.h"
#include "gaussian/gaussian_math.h"

namespace dualres {
namespace gaussian {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

constexpr auto kCUDA = at::DeviceType::CUDA;

// Host synchronisation. The kernels OR what they saw (NaN, Inf, negative scales, int32 overflow)
// into a device status word, and the op raises ValueError at the call when a checked bit is set.
// Raising at the call needs the word on the host, so a checked call waits for its kernel
// (status.item()); there is no later point at which the op could still raise. build_indexes
// synchronises only when `check` is non-zero (the Python wrappers always check NaN, which has no
// index); quantize and quantize_indexes always check their symbols (a NaN or an overflowing
// rounding has no int32 symbol), once per call (one status copy). Their results go to the coder,
// which reads them on the host anyway. dequantize and the likelihoods never synchronise.

// Index of a lower-bounded scale; `sorted` was established once per block.
template <typename T>
__device__ __forceinline__ int32_t table_index(const T* table, int32_t n, bool sorted, T x) {
  return sorted ? count_not_above(table, n, x) : count_not_above_linear(table, n, x);
}

// Whether table[0..n) is non-decreasing (a NaN makes it unsorted). Every thread of the block
// checks a strided share of the neighbouring pairs and __syncthreads_and combines them, so all
// threads must call it (the kernels call it first, before any thread can leave).
template <typename T>
__device__ bool block_table_sorted(const T* table, int32_t n) {
  int ok = 1;
  for (int32_t i = static_cast<int32_t>(threadIdx.x) + 1; i < n; i += static_cast<int32_t>(blockDim.x)) {
    ok &= table[i - 1] <= table[i];
  }
  return __syncthreads_and(ok) != 0;
}

template <typename T>
__global__ void build_indexes_kernel(const T* __restrict__ scales, const T* __restrict__ table, int32_t n, T bound,
                                     int32_t* __restrict__ out, int64_t numel, int* __restrict__ status) {
  const bool sorted = block_table_sorted(table, n);
  int local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    const T s = scales[i];
    local |= classify_scale(s);
    out[i] = table_index(table, n, sorted, max_nan(s, bound));
  }
  if (local) atomicOr(status, local);
}

template <typename T>
__global__ void quantize_kernel(const T* __restrict__ y, const T* __restrict__ means, int32_t* __restrict__ out,
                                int64_t numel, int* __restrict__ status) {
  int local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = quantize_symbol(y[i], means ? means[i] : T(0), local);
  }
  if (local) atomicOr(status, local);
}

template <typename Y, typename S>
__global__ void quantize_indexes_kernel(const Y* __restrict__ y, const Y* __restrict__ means,
                                        const S* __restrict__ scales, const S* __restrict__ table, int32_t n, S bound,
                                        int32_t* __restrict__ symbols, int32_t* __restrict__ indexes, int64_t numel,
                                        int* __restrict__ status) {
  const bool sorted = block_table_sorted(table, n);
  int sym_local = 0, scale_local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    symbols[i] = quantize_symbol(y[i], means ? means[i] : Y(0), sym_local);
    const S s = scales[i];
    scale_local |= classify_scale(s);
    indexes[i] = table_index(table, n, sorted, max_nan(s, bound));
  }
  // Two status words: [0] for y - means, [1] for the scales.
  if (sym_local) atomicOr(status, sym_local);
  if (scale_local) atomicOr(status + 1, scale_local);
}

template <typename T>
__global__ void dequantize_kernel(const int32_t* __restrict__ symbols, const T* __restrict__ means, T* __restrict__ out,
                                  int64_t numel) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<T>(symbols[i]) + (means ? means[i] : T(0));
  }
}

template <typename T>
__global__ void likelihood_kernel(const T* __restrict__ x, const T* __restrict__ means, const T* __restrict__ scales,
                                  T scale_bound, T likelihood_bound, T* __restrict__ out, int64_t numel) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = gaussian_likelihood(x[i], means ? means[i] : T(0), scales[i], scale_bound, likelihood_bound);
  }
}

template <typename T>
__global__ void likelihood_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                           const T* __restrict__ means, const T* __restrict__ scales, T scale_bound,
                                           T likelihood_bound, T* __restrict__ grad_x, T* __restrict__ grad_scales,
                                           int64_t numel) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    gaussian_likelihood_backward(grad[i], x[i], means ? means[i] : T(0), scales[i], scale_bound, likelihood_bound,
                                 grad_x[i], grad_scales[i]);
  }
}

at::Tensor build_indexes_cuda(const at::Tensor& scales, const at::Tensor& scale_table, double scale_bound,
                              int64_t check) {
  check_input(scales, "build_indexes", "scales", kCUDA);
  check_scale_table(scales, scale_table, "build_indexes");
  const c10::cuda::CUDAGuard guard(scales.device());
  auto out = at::empty(scales.sizes(), scales.options().dtype(at::kInt));
  auto status = at::zeros({1}, scales.options().dtype(at::kInt));
  const int64_t numel = scales.numel();
  if (numel > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(scales.scalar_type(), "build_indexes_cuda", [&] {
      build_indexes_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          scales.data_ptr<scalar_t>(), scale_table.data_ptr<scalar_t>(), static_cast<int32_t>(scale_table.numel() - 1),
          static_cast<scalar_t>(scale_bound), out.data_ptr<int32_t>(), numel, status.data_ptr<int>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (check) {
    const int bad = status.item<int>() & static_cast<int>(check);
    TORCH_CHECK_VALUE(bad == 0, describe_status(bad, "scales"));
  }
  return out;
}

at::Tensor quantize_cuda(const at::Tensor& y, const std::optional<at::Tensor>& means) {
  check_input(y, "quantize", "y", kCUDA);
  if (means) check_same_dtype(y, *means, "quantize", "y", "means");
  const c10::cuda::CUDAGuard guard(y.device());
  auto out = at::empty(y.sizes(), y.options().dtype(at::kInt));
  auto status = at::zeros({1}, y.options().dtype(at::kInt));
  const int64_t numel = y.numel();
  if (numel > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "quantize_cuda", [&] {
      quantize_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), means ? means->data_ptr<scalar_t>() : nullptr, out.data_ptr<int32_t>(), numel,
          status.data_ptr<int>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int st = status.item<int>();
  TORCH_CHECK_VALUE(st == 0, describe_status(st, "y - means"));
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_indexes_cuda(const at::Tensor& y, const std::optional<at::Tensor>& means,
                                                         const at::Tensor& scales, const at::Tensor& scale_table,
                                                         double scale_bound, int64_t check) {
  check_input(y, "quantize_indexes", "y", kCUDA);
  check_same(y, scales, "quantize_indexes", "y", "scales");  // scales may have another float dtype
  if (means) check_same_dtype(y, *means, "quantize_indexes", "y", "means");
  check_scale_table(scales, scale_table, "quantize_indexes");
  const c10::cuda::CUDAGuard guard(y.device());
  auto symbols = at::empty(y.sizes(), y.options().dtype(at::kInt));
  auto indexes = at::empty(y.sizes(), y.options().dtype(at::kInt));
  auto status = at::zeros({2}, y.options().dtype(at::kInt));
  const int64_t numel = y.numel();
  if (numel > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "quantize_indexes_cuda", [&] {
      using y_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(scales.scalar_type(), "quantize_indexes_cuda_scales", [&] {
        quantize_indexes_kernel<y_t, scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
            y.data_ptr<y_t>(), means ? means->data_ptr<y_t>() : nullptr, scales.data_ptr<scalar_t>(),
            scale_table.data_ptr<scalar_t>(), static_cast<int32_t>(scale_table.numel() - 1),
            static_cast<scalar_t>(scale_bound), symbols.data_ptr<int32_t>(), indexes.data_ptr<int32_t>(), numel,
            status.data_ptr<int>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto st = status.cpu();
  const int sym_status = st[0].item<int>(), scale_status = st[1].item<int>() & static_cast<int>(check);
  TORCH_CHECK_VALUE(sym_status == 0, describe_status(sym_status, "y - means"));
  TORCH_CHECK_VALUE(scale_status == 0, describe_status(scale_status, "scales"));
  return {symbols, indexes};
}

at::Tensor dequantize_cuda(const at::Tensor& symbols, const std::optional<at::Tensor>& means, at::ScalarType dtype) {
  check_input(symbols, "dequantize", "symbols", kCUDA);
  TORCH_CHECK(symbols.scalar_type() == at::kInt, "dequantize: symbols must be int32");
  if (means) {
    check_same(symbols, *means, "dequantize", "symbols", "means");
    dtype = means->scalar_type();
  }
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dequantize: dtype must be float32 or float64");
  const c10::cuda::CUDAGuard guard(symbols.device());
  auto out = at::empty(symbols.sizes(), symbols.options().dtype(dtype));
  const int64_t numel = symbols.numel();
  if (numel > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(dtype, "dequantize_cuda", [&] {
      dequantize_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          symbols.data_ptr<int32_t>(), means ? means->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), numel);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

void check_likelihood_args(const at::Tensor& x, const std::optional<at::Tensor>& means, const at::Tensor& scales) {
  check_input(x, "gaussian_likelihood", "inputs", kCUDA);
  check_same_dtype(x, scales, "gaussian_likelihood", "inputs", "scales");
  if (means) check_same_dtype(x, *means, "gaussian_likelihood", "inputs", "means");
}

at::Tensor likelihood_cuda(const at::Tensor& x, const std::optional<at::Tensor>& means, const at::Tensor& scales,
                           double scale_bound, double likelihood_bound) {
  check_likelihood_args(x, means, scales);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_likelihood_cuda", [&] {
      likelihood_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), means ? means->data_ptr<scalar_t>() : nullptr, scales.data_ptr<scalar_t>(),
          static_cast<scalar_t>(scale_bound), static_cast<scalar_t>(likelihood_bound), out.data_ptr<scalar_t>(), numel);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> likelihood_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                            const std::optional<at::Tensor>& means,
                                                            const at::Tensor& scales, double scale_bound,
                                                            double likelihood_bound) {
  check_likelihood_args(x, means, scales);
  check_same_dtype(x, grad, "gaussian_likelihood_backward", "inputs", "grad");
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = at::empty_like(x);
  auto grad_scales = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_likelihood_backward_cuda", [&] {
      likelihood_backward_kernel<scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), means ? means->data_ptr<scalar_t>() : nullptr,
          scales.data_ptr<scalar_t>(), static_cast<scalar_t>(scale_bound), static_cast<scalar_t>(likelihood_bound),
          grad_x.data_ptr<scalar_t>(), grad_scales.data_ptr<scalar_t>(), numel);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_x, grad_scales};
}

}  // namespace
}  // namespace gaussian
}  // namespace dualres

TORCH_LIBRARY_IMPL(dualres_ext, CUDA, m) {
  using namespace dualres::gaussian;
  m.impl("gaussian_build_indexes", &build_indexes_cuda);
  m.impl("gaussian_quantize", &quantize_cuda);
  m.impl("gaussian_quantize_indexes", &quantize_indexes_cuda);
  m.impl("gaussian_dequantize", &dequantize_cuda);
  m.impl("gaussian_likelihood", &likelihood_cuda);
  m.impl("gaussian_likelihood_backward", &likelihood_backward_cuda);
}
