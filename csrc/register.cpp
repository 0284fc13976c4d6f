// The one place where dualres_ext's operators are declared (TORCH_LIBRARY), plus the Python
// module init that lets `import dualres_ext._C` load the library and run these registrations.
// Kernels live per op family and device: csrc/<family>/cpu/*.cpp registers
// TORCH_LIBRARY_IMPL(dualres_ext, CPU, m), csrc/<family>/cuda/*.cu registers the CUDA ones.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/cpu_kernels.h"
#include "rans/cpu/rans_interleaved_simd.h"
#include "rans/rans_compat_tables.h"
#include "rans/rans_iv_tables.h"

namespace dualres {

// What this binary was built with, for bug reports and for tests that must know whether the
// CUDA kernels exist (a build without them must not pretend otherwise). `simd` and `native` are
// compile-time facts (the instruction set every function may assume; whether the build used
// -march=native), `cpu_kernels` the set the vector kernels use at run time and `cpu_supported`
// the sets this CPU could run (common/cpu_kernels.h). `compiler` comes last: its value has spaces.
std::string build_info() {
  std::string info;
#ifdef DUALRES_WITH_CUDA
  info += "cuda=1";
#else
  info += "cuda=0";
#endif
#ifdef _OPENMP
  info += " openmp=" + std::to_string(_OPENMP);
#else
  info += " openmp=0";
#endif
#if defined(__AVX512F__)
  info += " simd=avx512";
#elif defined(__AVX2__)
  info += " simd=avx2";
#elif defined(__ARM_NEON)
  info += " simd=neon";
#else
  info += " simd=baseline";
#endif
#ifdef DUALRES_NATIVE
  info += " native=1";
#else
  info += " native=0";
#endif
  info += std::string(" cpu_kernels=") + cpu::isa_name(cpu::kernels());
  info += " cpu_supported=" + cpu::supported_kernels();
  info += " compiler=" __VERSION__;
  return info;
}

std::string set_cpu_kernels(std::string kernels) {
  return cpu::set_kernels(kernels);
}

}  // namespace dualres

TORCH_LIBRARY(dualres_ext, m) {
  m.def("build_info() -> str", &dualres::build_info);
  // Makes the CPU ops use the kernels for `kernels` (scalar, avx2, avx512, auto) from now on, in
  // every thread; returns the set used before. Results do not depend on it (common/cpu_kernels.h).
  m.def("set_cpu_kernels(str kernels) -> str", &dualres::set_cpu_kernels);

  // --- rans (csrc/rans) ---
  // Native multi-lane stream (csrc/rans/FORMAT.md); lanes <= 0 lets the encoder choose.
  m.def(
      "rans_encode(Tensor symbols, Tensor indexes, Tensor cdfs, Tensor cdf_lengths, Tensor offsets, int lanes) -> "
      "Tensor");
  m.def("rans_decode(Tensor data, Tensor indexes, Tensor cdfs, Tensor cdf_lengths, Tensor offsets) -> Tensor");
  // A native stream's validated header: [precision, states per lane, symbols, lanes, lane lengths...].
  m.def("rans_stream_info(Tensor data) -> int[]");
  // A native stream without the bytes a container already knows (magic, version, precision,
  // CRC-32C, symbol count) and back; CPU bytes only.
  m.def("rans_embed(Tensor data, int symbols, int precision) -> Tensor");
  m.def("rans_restore(Tensor data, int symbols, int precision) -> Tensor");
  // CompressAI 1.2.8's byte format (compressai.ans); the stream variant continues from state = (byte pos, rANS state).
  m.def(
      "rans_encode_compat(Tensor symbols, Tensor indexes, Tensor cdfs, Tensor cdf_lengths, Tensor offsets) -> Tensor");
  m.def("rans_decode_compat(Tensor data, Tensor indexes, Tensor cdfs, Tensor cdf_lengths, Tensor offsets) -> Tensor");
  m.def(
      "rans_decode_compat_stream(Tensor data, Tensor(a!) state, Tensor indexes, Tensor cdfs, Tensor cdf_lengths, "
      "Tensor offsets) -> Tensor");
  // The same decoder with its tables prepared once into an opaque RansCompatTables handle (CPU
  // tensors). With means or dtype it returns CompressAI's dequantised values, dtype(symbols) +
  // means (float32/float64; means: CPU, of the indexes' element count; its dtype wins), from the
  // same pass; else the int32 symbols.
  dualres::rans::register_compat_tables_class();  // before the schemas naming it
  m.def(
      "rans_compat_prepare(Tensor cdfs, Tensor cdf_lengths, Tensor offsets) -> "
      "__torch__.torch.classes.dualres_ext.RansCompatTables");
  m.def(
      "rans_decode_compat_prepared(Tensor data, Tensor indexes, __torch__.torch.classes.dualres_ext.RansCompatTables "
      "tables, Tensor? means, ScalarType? dtype) -> Tensor");
  // Several native streams sharing one set of tables in one call (CUDA: one launch per step for
  // all of them; csrc/rans/cuda). Outputs are in input order.
  m.def(
      "rans_encode_batch(Tensor[] symbols, Tensor[] indexes, Tensor cdfs, Tensor cdf_lengths, Tensor offsets, int "
      "lanes) -> Tensor[]");
  m.def(
      "rans_decode_batch(Tensor[] data, Tensor[] indexes, Tensor cdfs, Tensor cdf_lengths, Tensor offsets) -> "
      "Tensor[]");
  // Interleaved stream, version 2 (csrc/rans/FORMAT.md): W states sharing one stream of 16-bit
  // words, G groups. Tables are prepared once into an opaque RansIvTables handle (CPU tensors).
  // isa: -1 auto, 0 scalar, 1 avx2, 2 avx512, 3 the CUDA warp body emulated on the host.
  dualres::rans::register_iv_tables_class();  // before the schemas naming it
  m.def(
      "rans_iv_prepare(Tensor cdfs, Tensor cdf_lengths, Tensor offsets) -> "
      "__torch__.torch.classes.dualres_ext.RansIvTables");
  m.def(
      "rans_iv_encode(Tensor symbols, Tensor indexes, __torch__.torch.classes.dualres_ext.RansIvTables tables, "
      "int width, int groups, bool chained, int isa) -> Tensor");
  m.def(
      "rans_iv_decode(Tensor data, Tensor indexes, __torch__.torch.classes.dualres_ext.RansIvTables tables, int isa) "
      "-> Tensor");
  // (symbols, per-group status on the indexes' device, 0 = ok): on CUDA nothing waits for the
  // device, and the caller reads the statuses of many streams at once (CPU: raises, zeros).
  m.def(
      "rans_iv_decode_deferred(Tensor data, Tensor indexes, __torch__.torch.classes.dualres_ext.RansIvTables "
      "tables) -> (Tensor, Tensor)");
  // [precision, width, chained, symbols, groups, words per group...] after a decoder's validation.
  m.def("rans_iv_stream_info(Tensor data) -> int[]");
  // 1: a well-formed multi-lane stream, 2: a well-formed interleaved one, 0: neither.
  m.def("rans_stream_kind(Tensor data) -> int");
  m.def("rans_iv_embed(Tensor data, int symbols, int precision) -> Tensor");
  m.def("rans_iv_restore(Tensor data, int symbols, int precision) -> Tensor");
  // [the isa -1 resolves to, the best this CPU supports]
  m.def("rans_iv_isa() -> int[]", &dualres::rans::rans_iv_isa);

  // --- gaussian (csrc/gaussian) ---
  // check: bit mask of scale problems that raise (1 NaN, 2 Inf, 4 negative); see gaussian_math.h.
  m.def("gaussian_build_indexes(Tensor scales, Tensor scale_table, float scale_bound, int check) -> Tensor");
  m.def("gaussian_quantize(Tensor y, Tensor? means) -> Tensor");
  m.def(
      "gaussian_quantize_indexes(Tensor y, Tensor? means, Tensor scales, Tensor scale_table, float scale_bound, "
      "int check) -> (Tensor, Tensor)");
  m.def("gaussian_dequantize(Tensor symbols, Tensor? means, ScalarType dtype) -> Tensor");
  m.def(
      "gaussian_likelihood(Tensor inputs, Tensor? means, Tensor scales, float scale_bound, "
      "float likelihood_bound) -> Tensor");
  m.def(
      "gaussian_likelihood_backward(Tensor grad, Tensor inputs, Tensor? means, Tensor scales, float scale_bound, "
      "float likelihood_bound) -> (Tensor, Tensor)");
  m.def("pmf_to_quantized_cdf(Tensor pmf, Tensor lengths, int precision) -> Tensor");
  m.def("gaussian_cdf_tables(Tensor scale_table, float tail_mass, int precision) -> (Tensor, Tensor, Tensor)");

  // --- integer convolutions (csrc/integer): dualres_ext.integer.IntConv on CPU ---
  // The int16 weight pairs int_conv reads, (k*k, ceil(C_in/2), C_out rounded up to 16, 2), from a
  // (C_out, C_in, k, k) weight ((C_in, C_out, k, k) transposed) of integers that fit int16.
  m.def("int_conv_pack(Tensor weight, int stride, int padding, bool transposed) -> Tensor");
  // bias + conv(clamp(cat(inputs, 1), +-in_bound), weight) in exact int32 sums (refused where an
  // int32 could overflow); inputs: float32 integers. With multiplier, low and high: requantised to
  // float32 (round half even of acc * multiplier in float64, clamped to [low, high]), through
  // `table` (float32, indexed by value + its half length) if given; without: the int32 sums.
  // Output (N, C_out, H_out, W_out), channels-last strides if channels_last. isa: -1 auto,
  // 0 scalar, 1 avx2, 2 avx512 (VNNI); the results do not depend on it.
  m.def(
      "int_conv(Tensor[] inputs, Tensor packed, Tensor bias, Tensor in_bound, Tensor? multiplier, Tensor? low, "
      "Tensor? high, Tensor? table, int kernel_size, int stride, int padding, int output_padding, bool transposed, "
      "bool channels_last, int isa) -> Tensor");

  // --- gdn (csrc/gdn) ---
  // beta (C,), gamma (C, C): effective (reparametrised) float32 parameters; bias (C,) is added to x first.
  m.def("gdn_forward(Tensor x, Tensor beta, Tensor gamma, Tensor? bias, bool inverse, bool simplified) -> Tensor");
  // In place (inference): x (NCHW- or channels-last-contiguous) is overwritten with the result.
  // Returns nothing: torch.compile functionalises a custom op that mutates an input only when no
  // output aliases it (the mutation is declared by Tensor(a!)).
  m.def("gdn_forward_(Tensor(a!) x, Tensor beta, Tensor gamma, Tensor? bias, bool inverse, bool simplified) -> ()");
  // Training forward (CPU): returns (y, scale) with scale = f(n), float32 in x's layout.
  m.def(
      "gdn_forward_save(Tensor x, Tensor beta, Tensor gamma, Tensor? bias, bool inverse, bool simplified) "
      "-> (Tensor, Tensor)");
  // Returns (grad_x, grad_beta, grad_gamma); grad_bias is grad_x summed over N, H, W. `scale` (optional)
  // is gdn_forward_save's second output: it saves recomputing the channel mixing.
  m.def(
      "gdn_backward(Tensor grad_y, Tensor x, Tensor beta, Tensor gamma, Tensor? bias, Tensor? scale, "
      "bool inverse, bool simplified) -> (Tensor, Tensor, Tensor)");
}

// `import dualres_ext._C` needs a module init; the module itself is empty because every
// entry point is reached through torch.ops.dualres_ext.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dualres_ext native operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
