// Fused GDN / IGDN / simplified GDN on CPU, forward and backward (float32).
//
// CompressAI computes GDN as pow -> 1x1 conv -> sqrt -> multiply: four passes over the tensor.
// Here the pixels are cut into tiles small enough to stay in L2. For each tile: u = x^2 (or |x|)
// into a tile buffer, the C x C channel mixing as one BLAS GEMM on that buffer, then the epilogue
// (beta, sqrt/rsqrt/reciprocal, multiply by x) writes the output: one read of x, one write of y.
// Tiles run in parallel (at::parallel_for); each GEMM runs single-threaded inside its tile.
//
// Layouts: NCHW-contiguous tiles are C x T blocks (rows strided by H*W in x, contiguous in the
// buffers); channels-last tiles are T x C blocks, contiguous in x. Any other stride pattern is made
// NCHW-contiguous first. The optional per-channel bias is added to x on the fly (folding the
// preceding convolution's bias into this pass).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "common/cpu_kernels.h"
#include "gdn/gdn_common.h"

namespace dualres::gdn {
namespace {

// Pixels per tile: the tile buffers (u, n, and in the backward t, s) should stay in L2 (>= 512 KiB
// on the machines we target) next to gamma. On the 2-core EPYC at C=192, widths 64..512 were
// within noise of each other (1 thread: 120-133 ms at (1,192,256,384)); 32 was ~10% slower.
// Small C gets wide tiles so the per-tile GEMM call overhead stays small (C=3: 2x faster at 1024
// than at 256 pixels).
int64_t tile_pixels(int64_t C) {
  int64_t t = (48 * 1024) / std::max<int64_t>(C, 1);  // ~48K floats per buffer
  t = std::max<int64_t>(16, std::min<int64_t>(t, 1024));
  return (t / 16) * 16;
}

// A new tensor like x whose pages the kernel will fault in as 2 MiB transparent huge pages where
// the system allows it (THP "madvise" mode). A freshly allocated 75 MB output otherwise costs
// ~18K page faults - 40 ms of a 130 ms single-thread forward at (1,192,256,384). PyTorch does the
// same for every CPU tensor under THP_MEM_ALLOC_ENABLE=1; this only covers our own outputs.
at::Tensor empty_output(const at::Tensor& x, at::MemoryFormat fmt) {
  at::Tensor out = at::empty_like(x, fmt);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first)
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint: errors are harmless
#endif
  return out;
}

// Row-major matrix view of raw memory, for at::mm_out (BLAS underneath).
at::Tensor mat(const float* p, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride = 1) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(at::kFloat));
}

struct Problem {
  bool channels_last;
  int64_t N, C, P;  // batch, channels, pixels per image
  int64_t T;        // tile width in pixels
  int64_t tiles_per_image, num_tiles;
};

Problem make_problem(const at::Tensor& x, bool channels_last) {
  Problem pb;
  pb.channels_last = channels_last;
  pb.N = x.size(0);
  pb.C = x.size(1);
  pb.P = x.size(2) * x.size(3);
  pb.T = tile_pixels(pb.C);
  if (channels_last) {
    // Pixels of all images are one contiguous (N*P) x C matrix: tile it as a whole.
    pb.tiles_per_image = 0;
    pb.num_tiles = (pb.N * pb.P + pb.T - 1) / pb.T;
  } else {
    pb.tiles_per_image = (pb.P + pb.T - 1) / pb.T;
    pb.num_tiles = pb.N * pb.tiles_per_image;
  }
  return pb;
}

// Where a tile lives: for NCHW, element (c, t) is at base + c * P + t; for NHWC at base + t * C + c.
struct Tile {
  int64_t offset;  // element offset of (c=0, t=0) in x / y / grad tensors
  int64_t width;   // pixels in this tile
};

Tile tile_at(const Problem& pb, int64_t id) {
  if (pb.channels_last) {
    int64_t p0 = id * pb.T;
    return {p0 * pb.C, std::min(pb.T, pb.N * pb.P - p0)};
  }
  int64_t n = id / pb.tiles_per_image, p0 = (id % pb.tiles_per_image) * pb.T;
  return {n * pb.C * pb.P + p0, std::min(pb.T, pb.P - p0)};
}

// Loads a tile of x (+ bias) into xb and u(x) into ub, both laid out like the tile
// (NCHW: C rows of w pixels; NHWC: w rows of C channels), contiguous. Forced inline: it runs
// inside cpu::run, compiled for the kernel set in use.
template <int M>
DUALRES_CPU_INLINE inline void load_tile(const Problem& pb, const Tile& tl, const float* x, const float* bias,
                                         float* xb, float* ub) {
  const int64_t C = pb.C, w = tl.width;
  if (pb.channels_last) {
    const float* src = x + tl.offset;
    for (int64_t t = 0; t < w; ++t) {
      const float* xr = src + t * C;
      float* xo = xb + t * C;
      float* uo = ub + t * C;
      if (bias) {
        for (int64_t c = 0; c < C; ++c) {
          float v = xr[c] + bias[c];
          xo[c] = v;
          uo[c] = u_of<M>(v);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          float v = xr[c];
          xo[c] = v;
          uo[c] = u_of<M>(v);
        }
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const float* xr = x + tl.offset + c * pb.P;
      float* xo = xb + c * w;
      float* uo = ub + c * w;
      const float b = bias ? bias[c] : 0.0f;
      for (int64_t t = 0; t < w; ++t) {
        float v = xr[t] + b;
        xo[t] = v;
        uo[t] = u_of<M>(v);
      }
    }
  }
}

// nb = gamma-mix of ub (without beta): NCHW N = G U (C x w); NHWC N = U G^T (w x C).
void mix_forward(const Problem& pb, int64_t w, const at::Tensor& G, const float* ub, float* nb) {
  const int64_t C = pb.C;
  if (pb.channels_last) {
    at::Tensor out = mat(nb, w, C, C);
    at::mm_out(out, mat(ub, w, C, C), G.t());
  } else {
    at::Tensor out = mat(nb, C, w, w);
    at::mm_out(out, G, mat(ub, C, w, w));
  }
}

// ---- Epilogues over one contiguous span of a tile ------------------------------------------------
// GCC does not vectorise sqrtf without -fno-math-errno (it keeps a scalar errno path), so the
// spans that need sqrt are written with AVX-512 intrinsics for the avx512 kernels (masked tails),
// with a scalar loop otherwise. `beta` is either one value for the whole span (NCHW rows:
// beta_stride 0) or one per element (NHWC rows: beta_stride 1). Both compute the same correctly
// rounded operations in the same order: the results are identical.

#if DUALRES_CPU_X86
// The zero-masked form: _mm512_sqrt_ps draws a false -Wmaybe-uninitialized from GCC 12.
DUALRES_TARGET_AVX512 inline __m512 sqrt_vec(__m512 n) {
  return _mm512_maskz_sqrt_ps(__mmask16(0xFFFF), n);
}

template <int M>
DUALRES_TARGET_AVX512 inline __m512 scale_vec(__m512 n) {
  if constexpr (M == kGDN)
    return _mm512_div_ps(_mm512_set1_ps(1.0f), sqrt_vec(n));
  else if constexpr (M == kIGDN)
    return sqrt_vec(n);
  else if constexpr (M == kGDN1)
    return _mm512_div_ps(_mm512_set1_ps(1.0f), n);
  else
    return n;
}
template <int M>
DUALRES_TARGET_AVX512 inline __m512 dscale_vec(__m512 s) {
  if constexpr (M == kGDN)
    return _mm512_mul_ps(_mm512_set1_ps(-0.5f), _mm512_mul_ps(s, _mm512_mul_ps(s, s)));
  else if constexpr (M == kIGDN)
    return _mm512_div_ps(_mm512_set1_ps(0.5f), s);
  else if constexpr (M == kGDN1)
    return _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(s, s));
  else
    return _mm512_set1_ps(1.0f);
}
DUALRES_TARGET_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// y = x * s with s = f(n + beta); s is also stored when s_out is given (training: the backward
// then skips recomputing n, one GEMM of its three).
template <int M>
DUALRES_TARGET_AVX512 inline void forward_span_avx512(const float* x, const float* n, const float* beta,
                                                      int64_t beta_stride, float* y, float* s_out, int64_t len) {
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    const __m512 b = beta_stride ? _mm512_maskz_loadu_ps(m, beta + i) : _mm512_set1_ps(beta[0]);
    // Masked-off lanes hold n = beta (or 0 + beta) and are never stored.
    const __m512 sv = scale_vec<M>(_mm512_add_ps(_mm512_maskz_loadu_ps(m, n + i), b));
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), sv));
    if (s_out) _mm512_mask_storeu_ps(s_out + i, m, sv);
  }
}
#endif

template <int M>
DUALRES_CPU_INLINE inline void forward_span_scalar(const float* x, const float* n, const float* beta,
                                                   int64_t beta_stride, float* y, float* s_out, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const float sv = scale_of<M>(n[i] + beta[i * beta_stride]);
    y[i] = x[i] * sv;
    if (s_out) s_out[i] = sv;
  }
}

#if DUALRES_CPU_X86
// First half of the backward: gx = g * s, and t = g * x * f'(n) goes to n_to_t. s = f(n + beta)
// from n_to_t, or the forward's saved s when s_in is given (then n_to_t is only written).
template <int M>
DUALRES_TARGET_AVX512 inline void backward_span_avx512(const float* g, const float* x, float* n_to_t, const float* beta,
                                                       int64_t beta_stride, const float* s_in, float* gx, int64_t len) {
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = tail_mask(len - i);
    __m512 s;
    if (s_in) {
      s = _mm512_maskz_loadu_ps(m, s_in + i);
    } else {
      const __m512 b = beta_stride ? _mm512_maskz_loadu_ps(m, beta + i) : _mm512_set1_ps(beta[0]);
      s = scale_vec<M>(_mm512_add_ps(_mm512_maskz_loadu_ps(m, n_to_t + i), b));
    }
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    _mm512_mask_storeu_ps(gx + i, m, _mm512_mul_ps(gv, s));
    const __m512 t = _mm512_mul_ps(_mm512_mul_ps(gv, _mm512_maskz_loadu_ps(m, x + i)), dscale_vec<M>(s));
    _mm512_mask_storeu_ps(n_to_t + i, m, t);
  }
}
#endif

template <int M>
DUALRES_CPU_INLINE inline void backward_span_scalar(const float* g, const float* x, float* n_to_t, const float* beta,
                                                    int64_t beta_stride, const float* s_in, float* gx, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const float s = s_in ? s_in[i] : scale_of<M>(n_to_t[i] + beta[i * beta_stride]);
    gx[i] = g[i] * s;
    n_to_t[i] = g[i] * x[i] * dscale_of<M>(s);
  }
}

// Second half: gx += u'(x) * (gamma^T t)   (no sqrt: plain loops vectorise).
template <int M>
DUALRES_CPU_INLINE inline void backward_span_finish(const float* x, const float* s, float* gx, int64_t len) {
  for (int64_t i = 0; i < len; ++i) gx[i] += du_of<M>(x[i]) * s[i];
}

// The spans of a whole tile (one call per tile, not per row). NCHW: C rows of w pixels, row c of
// y / s_out / g / gx at c * P, of the buffers at c * w; NHWC: w rows of C, all at t * C.
#if DUALRES_CPU_X86
template <int M>
DUALRES_TARGET_AVX512 void forward_tile_spans(cpu::Avx512, const Problem& pb, int64_t w, const float* xb,
                                              const float* nb, const float* beta, float* y, float* s_out) {
  const int64_t C = pb.C;
  if (pb.channels_last) {
    for (int64_t t = 0; t < w; ++t)
      forward_span_avx512<M>(xb + t * C, nb + t * C, beta, 1, y + t * C, s_out ? s_out + t * C : nullptr, C);
  } else {
    for (int64_t c = 0; c < C; ++c)
      forward_span_avx512<M>(xb + c * w, nb + c * w, beta + c, 0, y + c * pb.P, s_out ? s_out + c * pb.P : nullptr, w);
  }
}

template <int M>
DUALRES_TARGET_AVX512 void backward_tile_spans(cpu::Avx512, const Problem& pb, int64_t w, const float* g,
                                               const float* xb, float* nb, const float* beta, const float* s_in,
                                               float* gx) {
  const int64_t C = pb.C;
  if (pb.channels_last) {
    for (int64_t t = 0; t < w; ++t)
      backward_span_avx512<M>(g + t * C, xb + t * C, nb + t * C, beta, 1, s_in ? s_in + t * C : nullptr, gx + t * C, C);
  } else {
    for (int64_t c = 0; c < C; ++c)
      backward_span_avx512<M>(g + c * pb.P, xb + c * w, nb + c * w, beta + c, 0, s_in ? s_in + c * pb.P : nullptr,
                              gx + c * pb.P, w);
  }
}
#endif

template <int M, class Isa>
void forward_tile_spans(Isa isa, const Problem& pb, int64_t w, const float* xb, const float* nb, const float* beta,
                        float* y, float* s_out) {
  const int64_t C = pb.C;
  cpu::run(isa, [&]() DUALRES_CPU_INLINE {
    if (pb.channels_last) {
      for (int64_t t = 0; t < w; ++t)
        forward_span_scalar<M>(xb + t * C, nb + t * C, beta, 1, y + t * C, s_out ? s_out + t * C : nullptr, C);
    } else {
      for (int64_t c = 0; c < C; ++c)
        forward_span_scalar<M>(xb + c * w, nb + c * w, beta + c, 0, y + c * pb.P, s_out ? s_out + c * pb.P : nullptr,
                               w);
    }
  });
}

template <int M, class Isa>
void backward_tile_spans(Isa isa, const Problem& pb, int64_t w, const float* g, const float* xb, float* nb,
                         const float* beta, const float* s_in, float* gx) {
  const int64_t C = pb.C;
  cpu::run(isa, [&]() DUALRES_CPU_INLINE {
    if (pb.channels_last) {
      for (int64_t t = 0; t < w; ++t)
        backward_span_scalar<M>(g + t * C, xb + t * C, nb + t * C, beta, 1, s_in ? s_in + t * C : nullptr, gx + t * C,
                                C);
    } else {
      for (int64_t c = 0; c < C; ++c)
        backward_span_scalar<M>(g + c * pb.P, xb + c * w, nb + c * w, beta + c, 0, s_in ? s_in + c * pb.P : nullptr,
                                gx + c * pb.P, w);
    }
  });
}

template <int M, class Isa>
void forward_impl(Isa isa, const Problem& pb, const float* x, const float* beta, const at::Tensor& G, const float* bias,
                  float* y, float* s_out) {
  const int64_t C = pb.C, T = pb.T;
  at::parallel_for(0, pb.num_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    std::vector<float> buf(3 * C * T);
    float *xb = buf.data(), *ub = xb + C * T, *nb = ub + C * T;
    for (int64_t id = begin; id < end; ++id) {
      const Tile tl = tile_at(pb, id);
      const int64_t w = tl.width;
      cpu::run(isa, [&]() DUALRES_CPU_INLINE { load_tile<M>(pb, tl, x, bias, xb, ub); });
      mix_forward(pb, w, G, ub, nb);
      forward_tile_spans<M>(isa, pb, w, xb, nb, beta, y + tl.offset, s_out ? s_out + tl.offset : nullptr);
    }
  });
}

template <int M, class Isa>
void backward_impl(Isa isa, const Problem& pb, const float* g, const float* x, const float* beta, const at::Tensor& G,
                   const float* bias, const float* s_in, float* gx, float* gbeta, float* ggamma) {
  const int64_t C = pb.C, T = pb.T;
  std::mutex reduce_mutex;
  at::parallel_for(0, pb.num_tiles, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    // Per-call partial sums for d beta and d gamma, added to the totals once at the end.
    std::vector<float> acc(C * C + C, 0.0f);
    at::Tensor dG = mat(acc.data(), C, C, C);
    float* dbeta = acc.data() + C * C;
    std::vector<float> buf(4 * C * T);
    float *xb = buf.data(), *ub = xb + C * T, *nb = ub + C * T, *sb = nb + C * T;
    float* tb = nb;  // t overwrites n in place
    for (int64_t id = begin; id < end; ++id) {
      const Tile tl = tile_at(pb, id);
      const int64_t w = tl.width;
      cpu::run(isa, [&]() DUALRES_CPU_INLINE { load_tile<M>(pb, tl, x, bias, xb, ub); });
      if (!s_in) mix_forward(pb, w, G, ub, nb);
      // t = g * x * f'(n), and the direct part of dx (g * f(n)) goes to gx for now.
      backward_tile_spans<M>(isa, pb, w, g + tl.offset, xb, nb, beta, s_in ? s_in + tl.offset : nullptr,
                             gx + tl.offset);
      // s = gamma^T-mix of t;  dgamma += t u^T;  dbeta += sum t.
      if (pb.channels_last) {
        at::Tensor tm = mat(tb, w, C, C), um = mat(ub, w, C, C);
        at::Tensor sm = mat(sb, w, C, C);
        at::mm_out(sm, tm, G);
        dG.addmm_(tm.t(), um);
        cpu::run(isa, [&]() DUALRES_CPU_INLINE {
          for (int64_t t = 0; t < w; ++t)
            for (int64_t c = 0; c < C; ++c) dbeta[c] += tb[t * C + c];
          backward_span_finish<M>(xb, sb, gx + tl.offset, w * C);
        });
      } else {
        at::Tensor tm = mat(tb, C, w, w), um = mat(ub, C, w, w);
        at::Tensor sm = mat(sb, C, w, w);
        at::mm_out(sm, G.t(), tm);
        dG.addmm_(tm, um.t());
        // The sums stay in order (no reassociation): the same in every kernel set.
        cpu::run(isa, [&]() DUALRES_CPU_INLINE {
          for (int64_t c = 0; c < C; ++c) {
            const float* tr = tb + c * w;
            float sum = 0.0f;
            for (int64_t t = 0; t < w; ++t) sum += tr[t];
            dbeta[c] += sum;
            backward_span_finish<M>(xb + c * w, sb + c * w, gx + tl.offset + c * pb.P, w);
          }
        });
      }
    }
    std::lock_guard<std::mutex> lock(reduce_mutex);
    for (int64_t i = 0; i < C * C; ++i) ggamma[i] += acc[i];
    for (int64_t c = 0; c < C; ++c) gbeta[c] += dbeta[c];
  });
}

// Validates the arguments and returns x in a layout the kernels handle (NCHW or channels-last
// contiguous); `channels_last` says which.
at::Tensor prepare_input(const at::Tensor& x, const at::Tensor& beta, const at::Tensor& gamma,
                         const std::optional<at::Tensor>& bias, bool& channels_last) {
  TORCH_CHECK(x.dim() == 4, "gdn: x must be 4-D (N, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gdn (CPU): x must be float32, got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(beta.dim() == 1 && beta.size(0) == C && beta.scalar_type() == at::kFloat,
              "gdn: beta must be float32 of shape (", C, ")");
  TORCH_CHECK(gamma.dim() == 2 && gamma.size(0) == C && gamma.size(1) == C && gamma.scalar_type() == at::kFloat,
              "gdn: gamma must be float32 of shape (", C, ", ", C, ")");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->scalar_type() == at::kFloat,
                "gdn: bias must be float32 of shape (", C, ")");
  TORCH_CHECK(x.device().is_cpu() && beta.device().is_cpu() && gamma.device().is_cpu(),
              "gdn (CPU): tensors must be on CPU");
  // A channels-last tensor with C > 1 (for C == 1 both layouts coincide: use NCHW).
  channels_last = C > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  return channels_last ? x : x.contiguous();
}

// The forwards refuse non-finite parameters (ValueError in Python): a NaN or Inf in beta, gamma
// or bias would silently turn whole output channels into NaN. Scanning C + C^2 floats costs
// nothing next to the O(N H W C^2) channel mixing, and on the CPU it needs no device
// synchronisation, so it is always on (the CUDA kernels do not check: see ops/gdn.py).
void check_finite_params(const at::Tensor& beta, const at::Tensor& gamma, const at::Tensor& bias) {
  const auto finite = [](const at::Tensor& t) {
    const float* p = t.data_ptr<float>();
    bool ok = true;
    for (int64_t i = 0, n = t.numel(); i < n; ++i) ok &= std::isfinite(p[i]);
    return ok;
  };
  TORCH_CHECK_VALUE(finite(beta), "gdn: beta contains NaN or Inf");
  TORCH_CHECK_VALUE(finite(gamma), "gdn: gamma contains NaN or Inf");
  if (bias.defined()) TORCH_CHECK_VALUE(finite(bias), "gdn: bias contains NaN or Inf");
}

// Calls f(mode, isa) with the GDN variant as an integral_constant and the CPU kernel set's tag.
template <typename F>
void dispatch_mode(bool inverse, bool simplified, F&& f) {
  cpu::dispatch([&](auto isa) {
    switch (mode_of(inverse, simplified)) {
      case kGDN:
        f(std::integral_constant<int, kGDN>{}, isa);
        break;
      case kIGDN:
        f(std::integral_constant<int, kIGDN>{}, isa);
        break;
      case kGDN1:
        f(std::integral_constant<int, kGDN1>{}, isa);
        break;
      default:
        f(std::integral_constant<int, kIGDN1>{}, isa);
        break;
    }
  });
}

at::Tensor gdn_forward_cpu(const at::Tensor& x_in, const at::Tensor& beta_in, const at::Tensor& gamma_in,
                           const std::optional<at::Tensor>& bias_in, bool inverse, bool simplified) {
  bool channels_last = false;
  at::Tensor x = prepare_input(x_in, beta_in, gamma_in, bias_in, channels_last);
  at::Tensor beta = beta_in.contiguous(), gamma = gamma_in.contiguous();
  at::Tensor bias = (bias_in.has_value() && bias_in->defined()) ? bias_in->contiguous() : at::Tensor();
  check_finite_params(beta, gamma, bias);
  at::Tensor y = empty_output(x, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const Problem pb = make_problem(x, channels_last);
  dispatch_mode(inverse, simplified, [&](auto mode, auto isa) {
    forward_impl<decltype(mode)::value>(isa, pb, x.data_ptr<float>(), beta.data_ptr<float>(), gamma,
                                        bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                                        nullptr);
  });
  return y;
}

// Training forward: also returns s = f(n) (float32, x's layout) for gdn_backward's `scale`.
std::tuple<at::Tensor, at::Tensor> gdn_forward_save_cpu(const at::Tensor& x_in, const at::Tensor& beta_in,
                                                        const at::Tensor& gamma_in,
                                                        const std::optional<at::Tensor>& bias_in, bool inverse,
                                                        bool simplified) {
  bool channels_last = false;
  at::Tensor x = prepare_input(x_in, beta_in, gamma_in, bias_in, channels_last);
  at::Tensor beta = beta_in.contiguous(), gamma = gamma_in.contiguous();
  at::Tensor bias = (bias_in.has_value() && bias_in->defined()) ? bias_in->contiguous() : at::Tensor();
  check_finite_params(beta, gamma, bias);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = empty_output(x, fmt), scale = empty_output(x, fmt);
  if (x.numel() == 0) return {y, scale};
  const Problem pb = make_problem(x, channels_last);
  dispatch_mode(inverse, simplified, [&](auto mode, auto isa) {
    forward_impl<decltype(mode)::value>(isa, pb, x.data_ptr<float>(), beta.data_ptr<float>(), gamma,
                                        bias.defined() ? bias.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                                        scale.data_ptr<float>());
  });
  return {y, scale};
}

// In place: x is overwritten with the result (each tile is copied into a buffer before its output
// is written, and tiles are disjoint). Saves the output allocation, whose page faults cost as much
// as a third of the out-of-place forward on large inputs. x must be NCHW- or channels-last-contiguous.
void gdn_forward_inplace_cpu(at::Tensor& x, const at::Tensor& beta_in, const at::Tensor& gamma_in,
                             const std::optional<at::Tensor>& bias_in, bool inverse, bool simplified) {
  bool channels_last = false;
  at::Tensor xc = prepare_input(x, beta_in, gamma_in, bias_in, channels_last);
  TORCH_CHECK(xc.is_same(x), "gdn_forward_ (in place): x must be contiguous (NCHW or channels-last)");
  at::Tensor beta = beta_in.contiguous(), gamma = gamma_in.contiguous();
  at::Tensor bias = (bias_in.has_value() && bias_in->defined()) ? bias_in->contiguous() : at::Tensor();
  check_finite_params(beta, gamma, bias);
  if (x.numel() == 0) return;
  const Problem pb = make_problem(x, channels_last);
  dispatch_mode(inverse, simplified, [&](auto mode, auto isa) {
    forward_impl<decltype(mode)::value>(isa, pb, x.data_ptr<float>(), beta.data_ptr<float>(), gamma,
                                        bias.defined() ? bias.data_ptr<float>() : nullptr, x.data_ptr<float>(),
                                        nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gdn_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                                const at::Tensor& beta_in, const at::Tensor& gamma_in,
                                                                const std::optional<at::Tensor>& bias_in,
                                                                const std::optional<at::Tensor>& scale_in, bool inverse,
                                                                bool simplified) {
  bool channels_last = false;
  at::Tensor x = prepare_input(x_in, beta_in, gamma_in, bias_in, channels_last);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "gdn backward: grad_y shape ", grad_y.sizes(), " != x shape ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == at::kFloat && grad_y.device().is_cpu(),
              "gdn backward (CPU): grad_y must be float32 on CPU");
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor g = grad_y.contiguous(fmt);
  at::Tensor beta = beta_in.contiguous(), gamma = gamma_in.contiguous();
  at::Tensor bias = (bias_in.has_value() && bias_in->defined()) ? bias_in->contiguous() : at::Tensor();
  at::Tensor scale;
  if (scale_in.has_value() && scale_in->defined()) {
    TORCH_CHECK(scale_in->sizes() == x.sizes() && scale_in->scalar_type() == at::kFloat && scale_in->device().is_cpu(),
                "gdn backward (CPU): scale must be float32 on CPU with x's shape");
    scale = scale_in->contiguous(fmt);
  }
  at::Tensor gx = empty_output(x, fmt);
  at::Tensor gbeta = at::zeros_like(beta), ggamma = at::zeros_like(gamma);
  if (x.numel() == 0) return {gx, gbeta, ggamma};
  const Problem pb = make_problem(x, channels_last);
  dispatch_mode(inverse, simplified, [&](auto mode, auto isa) {
    backward_impl<decltype(mode)::value>(isa, pb, g.data_ptr<float>(), x.data_ptr<float>(), beta.data_ptr<float>(),
                                         gamma, bias.defined() ? bias.data_ptr<float>() : nullptr,
                                         scale.defined() ? scale.data_ptr<float>() : nullptr, gx.data_ptr<float>(),
                                         gbeta.data_ptr<float>(), ggamma.data_ptr<float>());
  });
  return {gx, gbeta, ggamma};
}

}  // namespace
}  // namespace dualres::gdn

TORCH_LIBRARY_IMPL(dualres_ext, CPU, m) {
  m.impl("gdn_forward", &dualres::gdn::gdn_forward_cpu);
  m.impl("gdn_forward_", &dualres::gdn::gdn_forward_inplace_cpu);
  m.impl("gdn_forward_save", &dualres::gdn::gdn_forward_save_cpu);
  m.impl("gdn_backward", &dualres::gdn::gdn_backward_cpu);
}
