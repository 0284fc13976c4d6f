// Integer convolutions on CPU (int_conv_pack, int_conv; schemas in csrc/register.cpp), the layers
// of dualres_ext.integer.IntConv: int16 activations times int16 weights, summed in int32.
//
// Exactness. Every product and sum is an integer operation; the only thing that could go wrong is
// an int32 overflow, and int_conv refuses any layer where one is possible: for each output channel
// m, |bias_m| + max over output phases of sum_k |w[m, k]| * A_k must be below 2^31, where A_k is
// the bound its input channel is clamped to (in_bound, at most 32767, so clamped inputs are int16).
// Every partial sum of any subset of the terms is then below 2^31 too, so the result does not
// depend on the order of the additions, the vector width, the kernel set or the thread count.
// The check runs on every call (about one pass over the weights): the packed weights are an
// ordinary tensor the caller may have changed.
//
// Requantisation (float outputs): q = round_half_even(double(acc) * double(multiplier_m)), then
// q = min(max(q, low_m), high_m), the operations and order of torch.clamp's vector kernel (the sign
// of a zero included); with a table, the output is table[q + bound] (1-D float32 table of 2 bound + 1
// entries, every low_m and high_m within [-bound, bound]); without, float(q). Without a multiplier
// the output is the int32 accumulator bias + conv(x).
//
// Formulation. Inputs (any number of float32 NCHW tensors of any strides, concatenated along the
// channels; their values must be integers, clamped here to +-A) are converted into int16
// channels-last rows, zero-padded so every tap reads inside them (each thread converts the rows
// its output rows read, then computes those: one parallel region per call). A transposed
// convolution is cut into its stride^2 output phases (the kernel taps congruent to the phase;
// each phase is an ordinary stride-1 convolution of the same rows). The weights are packed by
// int_conv_pack as int16 pairs of consecutive input channels, [tap][channel pair][output
// channel][2], output channels padded to a multiple of 16, so one 32-bit broadcast of an input
// pixel's channel pair times one vector of weights gives 16 (AVX-512) or 8 (AVX2) output
// channels' pair sums (vpdpwssd / vpmaddwd). A register tile is NP consecutive output pixels of a row times up to
// 64 output channels; the requantisation runs on the tile and writes float32 or int32, NCHW or
// channels-last.
//
// Kernel sets: scalar (plain C++), avx2 (vpmaddwd + vpaddd on 8 lanes) and avx512 (AVX-512 VNNI's
// vpdpwssd on 16 lanes; a CPU with AVX-512 but without VNNI runs the avx2 kernel). The isa
// argument picks one (-1: the set cpu::kernels() names, 0 scalar, 1 avx2, 2 avx512); the results
// are identical bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "common/cpu_kernels.h"

#if DUALRES_CPU_X86
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_*(), which trips
// -Wmaybe-uninitialized in every caller; the values are fully overwritten.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The avx512 kernel set plus VNNI (vpdpwssd).
#define DUALRES_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx512vnni,avx2,fma,bmi,bmi2,popcnt")))
#endif

namespace dualres::integer {
namespace {

constexpr int64_t kChannelBlock = 16;            // output channels are padded to a multiple of this
constexpr int64_t kMaxTilePixels = 12;           // the widest register tile (input buffer slack)
constexpr int64_t kOperandLimit = 32767;         // |clamped input| <= in_bound <= this: int16
constexpr int64_t kAccLimit = int64_t(1) << 31;  // every accumulator bound strictly below

enum class Kernel { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum class Mode { kAccumulator, kValue, kTable };

bool vnni_supported() {
#if DUALRES_CPU_X86
  static const bool ok = __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

Kernel choose_kernel(int64_t isa) {
  TORCH_CHECK_VALUE(isa >= -1 && isa <= 2, "int_conv: isa must be -1 (auto), 0 (scalar), 1 (avx2) or 2 (avx512)");
  if (isa == -1) {
    switch (cpu::kernels()) {
      case cpu::Isa::kAvx512:
        return vnni_supported() ? Kernel::kAvx512 : Kernel::kAvx2;
      case cpu::Isa::kAvx2:
        return Kernel::kAvx2;
      default:
        return Kernel::kScalar;
    }
  }
  const std::string have = cpu::supported_kernels();
  if (isa == 1) TORCH_CHECK_VALUE(have.find("avx2") != std::string::npos, "int_conv: this CPU has no AVX2");
  if (isa == 2)
    TORCH_CHECK_VALUE(have.find("avx512") != std::string::npos && vnni_supported(),
                      "int_conv: this CPU has no AVX-512 VNNI");
  return static_cast<Kernel>(isa);
}

// ------------------------------------------------------------------------------------- geometry
struct Tap {
  int64_t ty, tx;  // kernel position
  int64_t dy, dx;  // input offset from the phase grid point's base pixel
};

struct Phase {
  int64_t ry, rx;              // output pixels (q * out_step + ry, ...); (0, 0) for a convolution
  int64_t first, count;        // its taps, in packed order
  int64_t rows = 0, cols = 0;  // phase grid size (set per input size)
};

struct Taps {
  std::vector<Tap> taps;  // packed order: phase by phase, kernel positions row-major within one
  std::vector<Phase> phases;
  int64_t in_step, out_step;  // input / output pixels per phase grid step
};

// The taps of each output phase, a function of the layer's settings only (int_conv_pack and
// int_conv must agree on it).
Taps make_taps(int64_t k, int64_t stride, int64_t padding, bool transposed) {
  Taps t;
  if (!transposed) {
    t.in_step = stride;
    t.out_step = 1;
    t.phases.push_back({0, 0, 0, k * k});
    for (int64_t ty = 0; ty < k; ++ty)
      for (int64_t tx = 0; tx < k; ++tx) t.taps.push_back({ty, tx, ty - padding, tx - padding});
    return t;
  }
  // out[o] += in[i] w[t] where o = i * s - p + t: for o = q * s + r, i = q + (r + p - t) / s
  // whenever s divides r + p - t.
  t.in_step = 1;
  t.out_step = stride;
  for (int64_t ry = 0; ry < stride; ++ry)
    for (int64_t rx = 0; rx < stride; ++rx) {
      Phase ph{ry, rx, static_cast<int64_t>(t.taps.size()), 0};
      for (int64_t ty = 0; ty < k; ++ty)
        for (int64_t tx = 0; tx < k; ++tx) {
          const int64_t vy = ry + padding - ty, vx = rx + padding - tx;
          if (((vy % stride) + stride) % stride || ((vx % stride) + stride) % stride) continue;
          t.taps.push_back({ty, tx, vy / stride, vx / stride});
        }
      ph.count = static_cast<int64_t>(t.taps.size()) - ph.first;
      t.phases.push_back(ph);
    }
  return t;
}

void check_settings(int64_t k, int64_t stride, int64_t padding, int64_t output_padding, bool transposed) {
  TORCH_CHECK_VALUE(k >= 1 && k <= 64, "int_conv: kernel size must be in [1, 64], got ", k);
  TORCH_CHECK_VALUE(stride >= 1 && stride <= 64, "int_conv: stride must be in [1, 64], got ", stride);
  TORCH_CHECK_VALUE(padding >= 0 && padding <= 64, "int_conv: padding must be in [0, 64], got ", padding);
  TORCH_CHECK_VALUE(transposed || output_padding == 0, "int_conv: output_padding is for transposed convolutions");
  TORCH_CHECK_VALUE(output_padding >= 0 && output_padding < stride,
                    "int_conv: output_padding must be in [0, stride), got ", output_padding);
}

int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

// ---------------------------------------------------------------------------------- the layer
struct Layer {
  const int32_t* w;                     // packed int16 pairs [tap][CP][Mp]
  int64_t CP, Mp, M;                    // channel pairs, padded and real output channels
  std::vector<int32_t> bias;            // Mp
  std::vector<double> mult, low, high;  // Mp (value and table modes)
  const float* table = nullptr;
  int32_t table_bound = 0;
  Mode mode;
};

// One register tile: NP output pixels (input pixels x + p * xstep, plus each tap's offset) times
// the output channels of w's columns [0, MV * lanes); acc gets bias + the sums, [NP][MV * lanes].
struct TileArgs {
  const int32_t* x;
  const int64_t* tap_off;  // int32 offset of each tap in the input buffer
  int64_t ntaps;
  int64_t xstep;
  const int32_t* w;  // packed pairs at (the phase's first tap, pair 0, the tile's first channel)
  int64_t CP, Mp;
  const int32_t* bias;
};

template <int NP>
void tile_scalar(const TileArgs& a, int32_t* acc) {
  constexpr int MB = kChannelBlock;
  for (int p = 0; p < NP; ++p)
    for (int m = 0; m < MB; ++m) acc[p * MB + m] = a.bias[m];
  for (int64_t t = 0; t < a.ntaps; ++t) {
    const int32_t* xt = a.x + a.tap_off[t];
    const int32_t* wt = a.w + t * a.CP * a.Mp;
    for (int64_t cp = 0; cp < a.CP; ++cp, ++xt, wt += a.Mp) {
      const int16_t* w16 = reinterpret_cast<const int16_t*>(wt);
      for (int p = 0; p < NP; ++p) {
        const int16_t* x16 = reinterpret_cast<const int16_t*>(xt + p * a.xstep);
        const int32_t x0 = x16[0], x1 = x16[1];
        int32_t* row = acc + p * MB;
        for (int m = 0; m < MB; ++m) row[m] += w16[2 * m] * x0 + w16[2 * m + 1] * x1;
      }
    }
  }
}

#if DUALRES_CPU_X86
template <int MV, int NP>
DUALRES_TARGET_AVX2 void tile_avx2(const TileArgs& a, int32_t* acc) {
  __m256i c[NP][MV];
#pragma GCC unroll 16
  for (int j = 0; j < MV; ++j) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bias + 8 * j));
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) c[p][j] = b;
  }
  for (int64_t t = 0; t < a.ntaps; ++t) {
    const int32_t* xt = a.x + a.tap_off[t];
    const int32_t* wt = a.w + t * a.CP * a.Mp;
    for (int64_t cp = 0; cp < a.CP; ++cp, ++xt, wt += a.Mp) {
      __m256i w[MV];
#pragma GCC unroll 16
      for (int j = 0; j < MV; ++j) w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + 8 * j));
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) {
        const __m256i xv = _mm256_set1_epi32(xt[p * a.xstep]);
#pragma GCC unroll 16
        for (int j = 0; j < MV; ++j) c[p][j] = _mm256_add_epi32(c[p][j], _mm256_madd_epi16(xv, w[j]));
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 16
    for (int j = 0; j < MV; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + (p * MV + j) * 8), c[p][j]);
}

template <int MV, int NP>
DUALRES_TARGET_AVX512_VNNI void tile_avx512(const TileArgs& a, int32_t* acc) {
  __m512i c[NP][MV];
#pragma GCC unroll 16
  for (int j = 0; j < MV; ++j) {
    const __m512i b = _mm512_loadu_si512(a.bias + 16 * j);
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) c[p][j] = b;
  }
  for (int64_t t = 0; t < a.ntaps; ++t) {
    const int32_t* xt = a.x + a.tap_off[t];
    const int32_t* wt = a.w + t * a.CP * a.Mp;
    for (int64_t cp = 0; cp < a.CP; ++cp, ++xt, wt += a.Mp) {
      __m512i w[MV];
#pragma GCC unroll 16
      for (int j = 0; j < MV; ++j) w[j] = _mm512_loadu_si512(wt + 16 * j);
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p) {
        const __m512i xv = _mm512_set1_epi32(xt[p * a.xstep]);
#pragma GCC unroll 16
        for (int j = 0; j < MV; ++j) c[p][j] = _mm512_dpwssd_epi32(c[p][j], xv, w[j]);
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 16
    for (int j = 0; j < MV; ++j) _mm512_storeu_si512(acc + (p * MV + j) * 16, c[p][j]);
}
#endif

// ----------------------------------------------------------------------------- requantisation
// finish_*: channels [m, m + count) of one pixel's accumulators `acc` to `dst` (32-bit values,
// contiguous): the accumulators themselves, or requantised (through the table) as float32.

void finish_scalar(const Layer& L, const int32_t* acc, int64_t m, int64_t count, int32_t* dst) {
  if (L.mode == Mode::kAccumulator) return (void)std::memcpy(dst, acc, count * sizeof(int32_t));
  float* out = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < count; ++i) {
    double q = std::nearbyint(static_cast<double>(acc[i]) * L.mult[m + i]);
    q = q > L.low[m + i] ? q : L.low[m + i];  // max_pd / min_pd: the second operand on ties
    q = q < L.high[m + i] ? q : L.high[m + i];
    out[i] = L.mode == Mode::kTable ? L.table[static_cast<int32_t>(q) + L.table_bound] : static_cast<float>(q);
  }
}

#if DUALRES_CPU_X86
DUALRES_TARGET_AVX2 __m256d requant4(__m128i a, const double* mult, const double* low, const double* high) {
  __m256d q = _mm256_mul_pd(_mm256_cvtepi32_pd(a), _mm256_loadu_pd(mult));
  q = _mm256_round_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_max_pd(q, _mm256_loadu_pd(low));
  return _mm256_min_pd(q, _mm256_loadu_pd(high));
}

// count <= 8
DUALRES_TARGET_AVX2 void finish_avx2(const Layer& L, const int32_t* acc, int64_t m, int64_t count, int32_t* dst) {
  if (L.mode == Mode::kAccumulator) return (void)std::memcpy(dst, acc, count * sizeof(int32_t));
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc));
  const __m256d q0 = requant4(_mm256_castsi256_si128(a), &L.mult[m], &L.low[m], &L.high[m]);
  const __m256d q1 = requant4(_mm256_extracti128_si256(a, 1), &L.mult[m + 4], &L.low[m + 4], &L.high[m + 4]);
  __m256 v;
  if (L.mode == Mode::kTable) {
    __m256i idx = _mm256_set_m128i(_mm256_cvtpd_epi32(q1), _mm256_cvtpd_epi32(q0));  // integers: exact
    idx = _mm256_add_epi32(idx, _mm256_set1_epi32(L.table_bound));
    v = _mm256_i32gather_ps(L.table, idx, 4);
  } else {
    v = _mm256_set_m128(_mm256_cvtpd_ps(q1), _mm256_cvtpd_ps(q0));
  }
  float* out = reinterpret_cast<float*>(dst);
  if (count == 8) return _mm256_storeu_ps(out, v);
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  std::memcpy(out, tmp, count * sizeof(float));
}

DUALRES_TARGET_AVX512_VNNI __m512d requant8(__m256i a, const double* mult, const double* low, const double* high) {
  __m512d q = _mm512_mul_pd(_mm512_cvtepi32_pd(a), _mm512_loadu_pd(mult));
  q = _mm512_roundscale_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_max_pd(q, _mm512_loadu_pd(low));
  return _mm512_min_pd(q, _mm512_loadu_pd(high));
}

// count <= 16
DUALRES_TARGET_AVX512_VNNI void finish_avx512(const Layer& L, const int32_t* acc, int64_t m, int64_t count,
                                              int32_t* dst) {
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  const __m512i a = _mm512_loadu_si512(acc);
  if (L.mode == Mode::kAccumulator) return _mm512_mask_storeu_epi32(dst, mask, a);
  const __m512d q0 = requant8(_mm512_castsi512_si256(a), &L.mult[m], &L.low[m], &L.high[m]);
  const __m512d q1 = requant8(_mm512_extracti64x4_epi64(a, 1), &L.mult[m + 8], &L.low[m + 8], &L.high[m + 8]);
  __m512 v;
  if (L.mode == Mode::kTable) {
    __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtpd_epi32(q0)), _mm512_cvtpd_epi32(q1), 1);
    idx = _mm512_add_epi32(idx, _mm512_set1_epi32(L.table_bound));
    v = _mm512_i32gather_ps(idx, L.table, 4);
  } else {
    v = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(q0)), _mm512_cvtpd_ps(q1), 1);
  }
  _mm512_mask_storeu_ps(dst, mask, v);
}
#endif

// ------------------------------------------------------------------------------- the driver
struct Run {
  const Layer* L;
  const Taps* taps;
  Kernel kernel;
  int64_t N, H, W, Ho, Wo;
  int64_t pad_top, pad_left, Hp, Wp;  // the zero-padded input: row y of the input is padded row y + pad_top
  void* out;
  bool channels_last, int_out;
};

// A tile function and its shape: NP pixels times MV vectors of `lanes` channels.
using TileFn = void (*)(const TileArgs&, int32_t*);
struct TileShape {
  TileFn fn;
  int np, channels;
};

TileShape tile_shape(Kernel kernel, int64_t vectors) {
  switch (kernel) {
#if DUALRES_CPU_X86
    case Kernel::kAvx512:  // 16 lanes; 32 zmm registers: at most 24 accumulators
      switch (vectors) {
        case 1:
          return {tile_avx512<1, 12>, 12, 16};
        case 2:
          return {tile_avx512<2, 12>, 12, 32};
        case 3:
          return {tile_avx512<3, 8>, 8, 48};
        default:
          return {tile_avx512<4, 6>, 6, 64};
      }
    case Kernel::kAvx2:  // 8 lanes, 16 ymm registers: two vectors (16 channels), 6 pixels
      return {tile_avx2<2, 6>, 6, 16};
#endif
    default:
      return {tile_scalar<4>, 4, 16};
  }
}

// Output channel blocks of one tile each: 16-channel vectors grouped as evenly as the widest
// tile allows.
std::vector<std::pair<int64_t, TileShape>> channel_blocks(Kernel kernel, int64_t Mp) {
  std::vector<std::pair<int64_t, TileShape>> out;
  const int64_t vectors = Mp / kChannelBlock;
  if (kernel == Kernel::kAvx512) {
    const int64_t groups = (vectors + 3) / 4;
    int64_t m = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t v = (vectors - m / kChannelBlock + (groups - g) - 1) / (groups - g);
      out.push_back({m, tile_shape(kernel, v)});
      m += v * kChannelBlock;
    }
    return out;
  }
  for (int64_t m = 0; m < Mp; m += kChannelBlock) out.push_back({m, tile_shape(kernel, 1)});
  return out;
}

void finish(Kernel kernel, const Layer& L, const int32_t* acc, int64_t m, int64_t count, int32_t* dst) {
#if DUALRES_CPU_X86
  if (kernel == Kernel::kAvx512) return finish_avx512(L, acc, m, count, dst);
  if (kernel == Kernel::kAvx2) {
    finish_avx2(L, acc, m, std::min<int64_t>(count, 8), dst);
    if (count > 8) finish_avx2(L, acc + 8, m + 8, count - 8, dst + 8);
    return;
  }
#endif
  finish_scalar(L, acc, m, count, dst);
}

// One row of one phase grid of one image: every channel block, every tile. `xbuf` holds the
// image's padded rows from `first_row` on (int16 pairs, Wp * CP per row). Channels-last outputs
// are written in place; NCHW ones go through `rowbuf` (the row's pixels x channels, 32-bit
// values, at least cols * M), then one transposing copy.
void run_row(const Run& r, int64_t n, const Phase& ph, int64_t qy, const int32_t* xbuf, int64_t first_row,
             const std::vector<int64_t>& tap_off, const std::vector<std::pair<int64_t, TileShape>>& blocks,
             int32_t* rowbuf) {
  static_assert(sizeof(float) == sizeof(int32_t), "outputs are 32-bit values");
  const Layer& L = *r.L;
  const int64_t in_step = r.taps->in_step, out_step = r.taps->out_step;
  const int64_t oy = qy * out_step + ph.ry;
  int32_t* out = static_cast<int32_t*>(r.out);
  // Where the channels of grid column q go: base + q * pixel_stride (+ channel).
  int32_t* base = r.channels_last ? out + ((n * r.Ho + oy) * r.Wo + ph.rx) * L.M : rowbuf;
  const int64_t pixel_stride = r.channels_last ? out_step * L.M : L.M;
  alignas(64) int32_t acc[kMaxTilePixels * 64];
  // The base pixel of grid point (qy, 0) (a packed row): taps add their offsets.
  const int32_t* row = xbuf + ((qy * in_step + r.pad_top - first_row) * r.Wp + r.pad_left) * L.CP;
  for (const auto& [m0, shape] : blocks) {
    TileArgs a{nullptr, tap_off.data() + ph.first, ph.count, in_step * L.CP, L.w + (ph.first * L.CP * L.Mp + m0), L.CP,
               L.Mp,    L.bias.data() + m0};
    for (int64_t qx = 0; qx < ph.cols; qx += shape.np) {
      a.x = row + qx * in_step * L.CP;
      shape.fn(a, acc);
      const int64_t valid = std::min<int64_t>(shape.np, ph.cols - qx);
      for (int64_t p = 0; p < valid; ++p)
        for (int64_t m = m0; m < m0 + shape.channels && m < L.M; m += kChannelBlock)
          finish(r.kernel, L, acc + p * shape.channels + (m - m0), m, std::min<int64_t>(kChannelBlock, L.M - m),
                 base + (qx + p) * pixel_stride + m);
    }
  }
  if (r.channels_last) return;
  for (int64_t m = 0; m < L.M; ++m) {
    int32_t* dst = out + ((n * L.M + m) * r.Ho + oy) * r.Wo + ph.rx;
    for (int64_t q = 0; q < ph.cols; ++q) dst[q * out_step] = rowbuf[q * L.M + m];
  }
}

// ------------------------------------------------------------------------------ input packing
struct Piece {
  const float* data;
  int64_t channels, offset;  // its channels are [offset, offset + channels) of the layer input
  int64_t sN, sC, sH, sW;
};

// A block of `rows` x `cols` values: dst[r * dst_row + c * dst_col] = the int16 of
// src[r * src_row + c * src_col] clamped to +-bound[r * bound_row + c * bound_col]; returns true
// if a value was NaN or not an integer. One kernel-set call per block; the inner loop vectorises.
struct Block {
  const float* src;
  int64_t src_row, src_col;
  int16_t* dst;
  int64_t dst_row, dst_col;
  const float* bound;
  int64_t bound_row, bound_col;
  int64_t rows, cols;
};

template <class Tag>
bool convert(Tag tag, const Block& b) {
  int bad = 0;
  cpu::run(tag, [&]() DUALRES_CPU_INLINE {
    const Block k = b;  // a local copy: the int16 stores must not look as if they could change it
    int local = 0;
    for (int64_t r = 0; r < k.rows; ++r) {
      const float* src = k.src + r * k.src_row;
      const float* bound = k.bound + r * k.bound_row;
      int16_t* dst = k.dst + r * k.dst_row;
      for (int64_t i = 0; i < k.cols; ++i) {
        const float v = src[i * k.src_col], a = bound[i * k.bound_col];
        float c = v > -a ? v : -a;  // NaN: -a, and reported below
        c = c < a ? c : a;
        const int32_t q = static_cast<int32_t>(c);
        local |= (v != v) | (static_cast<float>(q) != c);
        dst[i * k.dst_col] = static_cast<int16_t>(q);
      }
    }
    bad = local;
  });
  return bad != 0;
}

// Fills padded rows [first, last] of image n into buf (row first at buf); returns true if a value
// was NaN or not an integer.
template <class Tag>
bool pack_rows(Tag tag, const Run& r, const std::vector<Piece>& pieces, const float* bound, int64_t C, int64_t n,
               int64_t first, int64_t last, int16_t* buf) {
  const int64_t C2 = 2 * r.L->CP;
  bool bad = false;
  for (int64_t row = first; row <= last; ++row) {
    const int64_t iy = row - r.pad_top;
    int16_t* dst = buf + (row - first) * r.Wp * C2;
    if (iy < 0 || iy >= r.H) {
      std::memset(dst, 0, r.Wp * C2 * sizeof(int16_t));
      continue;
    }
    std::memset(dst, 0, r.pad_left * C2 * sizeof(int16_t));
    std::memset(dst + (r.pad_left + r.W) * C2, 0, (r.Wp - r.pad_left - r.W) * C2 * sizeof(int16_t));
    int16_t* interior = dst + r.pad_left * C2;
    if (C2 > C)
      for (int64_t ix = 0; ix < r.W; ++ix) interior[ix * C2 + C] = 0;
    for (const Piece& p : pieces) {
      const float* src = p.data + n * p.sN + iy * p.sH;
      int16_t* to = interior + p.offset;
      const float* a = bound + p.offset;
      if (p.sC == 1)  // channels-last: pixels by channels
        bad |= convert(tag, Block{src, p.sW, 1, to, C2, 1, a, 0, 1, r.W, p.channels});
      else  // channels by pixels
        bad |= convert(tag, Block{src, p.sC, p.sW, to, 1, C2, a, 1, 0, p.channels, r.W});
    }
  }
  return bad;
}

// ---------------------------------------------------------------------------- argument checks
void check_vector(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "int_conv: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "int_conv: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "int_conv: ", name, " must have shape (", n, "), got ", t.sizes());
}

// For each packed output channel: the largest |sum| a phase can reach with inputs within the
// bounds (A2: the bound of each int16 input slot), plus |bias|; checked below 2^31.
void check_exactness(const Layer& L, const Taps& taps, const std::vector<int32_t>& A2, const int64_t* bias) {
  const int16_t* w = reinterpret_cast<const int16_t*>(L.w);
  const int64_t Mp = L.Mp, CP = L.CP;
  std::vector<int64_t> worst(Mp, 0), sum(Mp);
  for (const Phase& ph : taps.phases) {
    std::fill(sum.begin(), sum.end(), 0);
    const int16_t* wp = w + ph.first * CP * Mp * 2;
    const int64_t pairs = ph.count * CP;
    cpu::dispatch([&](auto tag) {
      cpu::run(tag, [&]() DUALRES_CPU_INLINE {
        // Locals: stores to the sums must not look as if they could change the sizes.
        const int16_t* const wl = wp;
        const int32_t* const a = A2.data();
        int64_t* const s = sum.data();
        const int64_t n = pairs, mp = Mp, cp = CP;
        for (int64_t j = 0; j < n; ++j) {
          const int16_t* wr = wl + j * mp * 2;
          const int32_t a0 = a[2 * (j % cp)], a1 = a[2 * (j % cp) + 1];
          // |w| <= 2^15, A <= 2^15 - 1: the pair's sum is below 2^31
          for (int64_t m = 0; m < mp; ++m)
            s[m] += std::abs(int32_t(wr[2 * m])) * a0 + std::abs(int32_t(wr[2 * m + 1])) * a1;
        }
      });
    });
    for (int64_t m = 0; m < Mp; ++m) worst[m] = std::max(worst[m], sum[m]);
  }
  for (int64_t m = 0; m < Mp; ++m) {
    const int64_t total = worst[m] + (m < L.M ? std::abs(bias[m]) : 0);
    TORCH_CHECK_VALUE(total < kAccLimit, "int_conv: output channel ", m, " could reach ", total,
                      " >= 2^31 for inputs within in_bound: the int32 sums would not be exact");
  }
}

// ------------------------------------------------------------------------------------ the ops
at::Tensor int_conv_pack_cpu(const at::Tensor& weight, int64_t stride, int64_t padding, bool transposed) {
  TORCH_CHECK(weight.device().is_cpu(), "int_conv_pack: weight must be a CPU tensor");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3),
              "int_conv_pack: weight must be 4-D with square kernels, got ", weight.sizes());
  TORCH_CHECK(
      weight.scalar_type() == at::kShort || weight.scalar_type() == at::kInt || weight.scalar_type() == at::kLong,
      "int_conv_pack: weight must be int16, int32 or int64, got ", weight.scalar_type());
  const int64_t k = weight.size(2);
  check_settings(k, stride, padding, 0, transposed);
  at::Tensor w = weight.to(at::kLong);
  if (transposed) w = w.transpose(0, 1);  // (C_out, C_in, k, k)
  w = w.contiguous();
  const int64_t M = w.size(0), C = w.size(1);
  TORCH_CHECK_VALUE(M >= 1 && C >= 1, "int_conv_pack: empty weight");
  if (w.numel())
    TORCH_CHECK_VALUE(w.min().item<int64_t>() >= -32768 && w.max().item<int64_t>() <= 32767,
                      "int_conv_pack: weights must fit int16");
  const Taps taps = make_taps(k, stride, padding, transposed);
  const int64_t CP = (C + 1) / 2, Mp = round_up(M, kChannelBlock);
  at::Tensor packed = at::zeros({k * k, CP, Mp, 2}, at::TensorOptions().dtype(at::kShort));
  const int64_t* src = w.data_ptr<int64_t>();
  int16_t* dst = packed.data_ptr<int16_t>();
  for (int64_t t = 0; t < k * k; ++t) {
    const Tap& tap = taps.taps[t];
    for (int64_t c = 0; c < C; ++c)
      for (int64_t m = 0; m < M; ++m)
        dst[((t * CP + c / 2) * Mp + m) * 2 + c % 2] =
            static_cast<int16_t>(src[((m * C + c) * k + tap.ty) * k + tap.tx]);
  }
  return packed;
}

at::Tensor int_conv_cpu(at::TensorList inputs, const at::Tensor& packed, const at::Tensor& bias_in,
                        const at::Tensor& in_bound, const std::optional<at::Tensor>& multiplier,
                        const std::optional<at::Tensor>& low, const std::optional<at::Tensor>& high,
                        const std::optional<at::Tensor>& table, int64_t kernel_size, int64_t stride, int64_t padding,
                        int64_t output_padding, bool transposed, bool channels_last, int64_t isa) {
  check_settings(kernel_size, stride, padding, output_padding, transposed);
  const Kernel kernel = choose_kernel(isa);
  const int64_t k = kernel_size;
  TORCH_CHECK(!inputs.empty(), "int_conv: no inputs");
  const at::Tensor& first = inputs[0];
  TORCH_CHECK(first.dim() == 4, "int_conv: inputs must be 4-D (N, C, H, W), got ", first.sizes());
  const int64_t N = first.size(0), H = first.size(2), W = first.size(3);
  std::vector<Piece> pieces;
  int64_t C = 0;
  for (const at::Tensor& x : inputs) {
    TORCH_CHECK(x.device().is_cpu(), "int_conv: inputs must be CPU tensors");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "int_conv: inputs must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 4 && x.size(0) == N && x.size(2) == H && x.size(3) == W,
                "int_conv: inputs must share N, H and W, got ", first.sizes(), " and ", x.sizes());
    pieces.push_back({x.data_ptr<float>(), x.size(1), C, x.stride(0), x.stride(1), x.stride(2), x.stride(3)});
    C += x.size(1);
  }
  check_vector(in_bound, at::kLong, C, "in_bound (one per input channel)");
  const int64_t M = bias_in.numel();
  check_vector(bias_in, at::kLong, M, "bias");
  const int64_t CP = (C + 1) / 2, Mp = round_up(M, kChannelBlock);
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kShort && packed.is_contiguous() &&
                  packed.dim() == 4 && packed.size(0) == k * k && packed.size(1) == CP && packed.size(2) == Mp &&
                  packed.size(3) == 2,
              "int_conv: packed must be int_conv_pack's int16 tensor of shape (", k * k, ", ", CP, ", ", Mp,
              ", 2), got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(M >= 1, "int_conv: no output channels");

  Layer L;
  L.w = reinterpret_cast<const int32_t*>(packed.data_ptr<int16_t>());
  L.CP = CP;
  L.Mp = Mp;
  L.M = M;
  const bool requant = multiplier.has_value();
  TORCH_CHECK(requant == low.has_value() && requant == high.has_value(),
              "int_conv: multiplier, low and high go together");
  TORCH_CHECK(requant || !table.has_value(), "int_conv: a table needs the requantisation (multiplier, low, high)");
  L.mode = !requant ? Mode::kAccumulator : table.has_value() ? Mode::kTable : Mode::kValue;
  const at::Tensor bias = bias_in.contiguous();
  const int64_t* bp = bias.data_ptr<int64_t>();
  L.bias.assign(Mp, 0);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK_VALUE(bp[m] > -kAccLimit && bp[m] < kAccLimit, "int_conv: |bias| must be below 2^31");
    L.bias[m] = static_cast<int32_t>(bp[m]);
  }
  at::Tensor table_c;
  if (requant) {
    check_vector(*multiplier, at::kFloat, M, "multiplier");
    check_vector(*low, at::kLong, M, "low");
    check_vector(*high, at::kLong, M, "high");
    const at::Tensor mu = multiplier->contiguous(), lo = low->contiguous(), hi = high->contiguous();
    L.mult.assign(Mp, 0.0);
    L.low.assign(Mp, 0.0);
    L.high.assign(Mp, 0.0);
    int64_t lowest = 0, highest = 0;
    for (int64_t m = 0; m < M; ++m) {
      const float mv = mu.data_ptr<float>()[m];
      const int64_t l = lo.data_ptr<int64_t>()[m], h = hi.data_ptr<int64_t>()[m];
      TORCH_CHECK_VALUE(std::isfinite(mv), "int_conv: multiplier must be finite");
      TORCH_CHECK_VALUE(std::abs(l) <= (int64_t(1) << 53) && std::abs(h) <= (int64_t(1) << 53),
                        "int_conv: low and high must be within +-2^53");
      L.mult[m] = mv;
      L.low[m] = static_cast<double>(l);
      L.high[m] = static_cast<double>(h);
      lowest = m ? std::min(lowest, l) : l;
      highest = m ? std::max(highest, h) : h;
    }
    if (table.has_value()) {
      table_c = table->contiguous();
      TORCH_CHECK(table_c.device().is_cpu() && table_c.scalar_type() == at::kFloat && table_c.dim() == 1 &&
                      table_c.numel() % 2 == 1 && table_c.numel() < (int64_t(1) << 30),
                  "int_conv: table must be a 1-D float32 CPU tensor of odd length");
      L.table = table_c.data_ptr<float>();
      L.table_bound = static_cast<int32_t>(table_c.numel() / 2);
      TORCH_CHECK_VALUE(lowest >= -L.table_bound && highest <= L.table_bound,
                        "int_conv: low and high must be within the table's [-", L.table_bound, ", ", L.table_bound,
                        "]");
    }
  }
  // The bounds the inputs are clamped to: int16 slots (the pad channel of an odd C is 0).
  const at::Tensor ib = in_bound.contiguous();
  std::vector<int32_t> A2(2 * CP, 0);
  std::vector<float> boundf(C);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t a = ib.data_ptr<int64_t>()[c];
    TORCH_CHECK_VALUE(a >= 0 && a <= kOperandLimit, "int_conv: in_bound must be in [0, 32767], got ", a);
    A2[c] = static_cast<int32_t>(a);
    boundf[c] = static_cast<float>(a);
  }
  Taps taps = make_taps(k, stride, padding, transposed);
  check_exactness(L, taps, A2, bp);

  // Output size and each phase's grid.
  int64_t Ho, Wo;
  if (transposed) {
    Ho = (H - 1) * stride - 2 * padding + k + output_padding;
    Wo = (W - 1) * stride - 2 * padding + k + output_padding;
  } else {
    Ho = H + 2 * padding >= k ? (H + 2 * padding - k) / stride + 1 : 0;
    Wo = W + 2 * padding >= k ? (W + 2 * padding - k) / stride + 1 : 0;
  }
  TORCH_CHECK_VALUE(H >= 1 && W >= 1 && Ho >= 1 && Wo >= 1, "int_conv: input size ", H, "x", W,
                    " gives no output (output ", Ho, "x", Wo, ")");
  int64_t lo_y = 0, hi_y = H - 1, lo_x = 0, hi_x = W - 1;  // input rows/columns the taps reach
  for (Phase& ph : taps.phases) {
    ph.rows = transposed ? (Ho > ph.ry ? (Ho - ph.ry + stride - 1) / stride : 0) : Ho;
    ph.cols = transposed ? (Wo > ph.rx ? (Wo - ph.rx + stride - 1) / stride : 0) : Wo;
    if (!ph.rows || !ph.cols) continue;
    for (int64_t t = ph.first; t < ph.first + ph.count; ++t) {
      const Tap& tap = taps.taps[t];
      lo_y = std::min(lo_y, tap.dy);
      hi_y = std::max(hi_y, (ph.rows - 1) * taps.in_step + tap.dy);
      lo_x = std::min(lo_x, tap.dx);
      hi_x = std::max(hi_x, (ph.cols - 1) * taps.in_step + tap.dx);
    }
  }
  Run r;
  r.L = &L;
  r.taps = &taps;
  r.kernel = kernel;
  r.N = N;
  r.H = H;
  r.W = W;
  r.Ho = Ho;
  r.Wo = Wo;
  r.pad_top = -lo_y;
  r.pad_left = -lo_x;
  r.Hp = hi_y - lo_y + 1;
  r.Wp = hi_x - lo_x + 1;
  r.channels_last = channels_last;
  r.int_out = L.mode == Mode::kAccumulator;
  const auto out_opts = at::TensorOptions().dtype(r.int_out ? at::kInt : at::kFloat);
  at::Tensor out = at::empty({N, M, Ho, Wo}, out_opts.memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  r.out = out.data_ptr();

  // Work items: the rows of every phase grid, by image, then grid row, then phase. A thread takes
  // a run of items, converts the padded input rows they read into its own int16 buffer (rows
  // shared with a neighbour's run are converted by both), then computes them: one parallel region.
  struct Item {
    int64_t n, qy;
    const Phase* ph;
    int64_t first, last;  // the padded rows it reads (and the row of its grid point)
  };
  std::vector<std::pair<int64_t, int64_t>> reach(taps.phases.size(), {0, 0});  // dy range, 0 included
  int64_t widest = 0, deepest = 0, grid_rows = 0;
  for (size_t i = 0; i < taps.phases.size(); ++i) {
    const Phase& ph = taps.phases[i];
    for (int64_t t = ph.first; t < ph.first + ph.count; ++t)
      reach[i] = {std::min(reach[i].first, taps.taps[t].dy), std::max(reach[i].second, taps.taps[t].dy)};
    widest = std::max(widest, ph.cols);
    deepest = std::max(deepest, ph.count);
    grid_rows = std::max(grid_rows, ph.cols ? ph.rows : 0);
  }
  std::vector<Item> items;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t qy = 0; qy < grid_rows; ++qy)
      for (size_t i = 0; i < taps.phases.size(); ++i) {
        const Phase& ph = taps.phases[i];
        if (qy >= ph.rows || !ph.cols) continue;
        const int64_t y = qy * taps.in_step + r.pad_top;
        items.push_back({n, qy, &ph, y + reach[i].first, y + reach[i].second});
      }
  std::vector<int64_t> tap_off(taps.taps.size());
  for (size_t t = 0; t < taps.taps.size(); ++t) tap_off[t] = (taps.taps[t].dy * r.Wp + taps.taps[t].dx) * CP;
  const auto blocks = channel_blocks(kernel, Mp);
  // Below about 4M multiply-adds a run stays on one thread (a parallel region costs more).
  const int64_t item_work = std::max<int64_t>(1, widest * Mp * (2 * CP * deepest + 16));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 22) / item_work);
  const int64_t slack = (kMaxTilePixels * taps.in_step + 1) * 2 * CP;  // the last tile's pixels past a row
  std::atomic<bool> bad{false};
  cpu::dispatch([&](auto tag) {
    at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> rowbuf(channels_last ? 0 : widest * M);
      std::unique_ptr<int16_t[]> buf;
      int64_t capacity = 0;
      for (int64_t i = begin; i < end;) {
        int64_t j = i, first = items[i].first, last = items[i].last;
        for (; j < end && items[j].n == items[i].n; ++j) {
          first = std::min(first, items[j].first);
          last = std::max(last, items[j].last);
        }
        const int64_t size = (last - first + 1) * r.Wp * 2 * CP + slack;
        if (size > capacity) {
          buf.reset(new int16_t[size]);
          capacity = size;
        }
        if (pack_rows(tag, r, pieces, boundf.data(), C, items[i].n, first, last, buf.get())) bad.store(true);
        std::memset(buf.get() + size - slack, 0, slack * sizeof(int16_t));
        const int32_t* xbuf = reinterpret_cast<const int32_t*>(buf.get());
        for (; i < j; ++i)
          run_row(r, items[i].n, *items[i].ph, items[i].qy, xbuf, first, tap_off, blocks, rowbuf.data());
      }
    });
  });
  // The sums of a bad input were computed on clamped, truncated values: bounded, just meaningless.
  TORCH_CHECK_VALUE(!bad.load(), "int_conv: the inputs must be integers (found NaN or a fraction)");
  return out;
}

}  // namespace
}  // namespace dualres::integer

TORCH_LIBRARY_IMPL(dualres_ext, CPU, m) {
  using namespace dualres::integer;
  m.impl("int_conv_pack", &int_conv_pack_cpu);
  m.impl("int_conv", &int_conv_cpu);
}
