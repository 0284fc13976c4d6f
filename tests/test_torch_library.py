"""dualres_ext as a PyTorch library: torch.library conventions for every op (fake kernels,
registered autograd, opcheck) and the training path under torch.compile / torch.export.

Every op in torch.ops.dualres_ext needs an entry in OPCHECK_CASES (representative random inputs)
or in NOT_TRACEABLE (with the reason): a new op without one fails test_every_op_has_an_entry.
Compiled code runs with backend="aot_eager" (the fake kernels, functionalisation and the AOT
autograd graphs, without inductor's slow C++ compilation); one test runs inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import dualres_ext
from dualres_ext import layers, ops
from dualres_ext.entropy_models import EntropyBottleneck, GaussianConditional
from dualres_ext.models import build
from dualres_ext.models.loss import rate_distortion
from dualres_ext.ops import rans_interleaved

CUDA = torch.cuda.is_available() and dualres_ext.build_info()["cuda"]
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# Ops whose kernels exist on the CPU only (the CUDA build registers no CUDA kernel for them).
CPU_ONLY = {
    "gdn_forward_save",
    "rans_embed",
    "rans_restore",
    "rans_iv_embed",
    "rans_iv_restore",
    "rans_encode_compat",
    "rans_decode_compat",
    "rans_decode_compat_stream",
    "pmf_to_quantized_cdf",
    "gaussian_cdf_tables",
    "int_conv_pack",
    "int_conv",
}
# Ops with a CUDA kernel only (the CPU wrapper loops over rans_encode / rans_decode instead).
CUDA_ONLY = {"rans_encode_batch", "rans_decode_batch"}

NOT_TRACEABLE = {
    "build_info": "returns a str describing the binary, no tensors: nothing to trace",
    "set_cpu_kernels": "sets process-wide state from a str, no tensors: nothing to trace",
    "rans_stream_info": "returns the header's Python integers (list length read from the bytes): metadata",
    "rans_iv_stream_info": "returns the header's Python integers (list length read from the bytes): metadata",
    "rans_stream_kind": "returns a Python integer read from the bytes: metadata",
    "rans_iv_isa": "returns the CPU coder choice as integers, no tensors: nothing to trace",
    # The interleaved coder takes its prepared tables as a TorchBind handle, which fake tensor mode
    # cannot stand in for without a fake class; coding runs outside traced graphs.
    "rans_iv_prepare": "returns an opaque TorchBind handle of prepared tables",
    "rans_iv_encode": "takes the TorchBind handle of prepared tables (no fake class)",
    "rans_iv_decode": "takes the TorchBind handle of prepared tables (no fake class)",
    "rans_iv_decode_deferred": "takes the TorchBind handle of prepared tables (no fake class)",
    # The same for the CompressAI-format decoder's prepared tables.
    "rans_compat_prepare": "returns an opaque TorchBind handle of prepared tables",
    "rans_decode_compat_prepared": "takes the TorchBind handle of prepared tables (no fake class)",
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tables():
    """A small CompressAI-layout table set (the Gaussian tables of three scales)."""
    cdfs, lengths, offsets = ops.gaussian_cdf_tables(torch.tensor([0.5, 1.0, 3.0]))
    return cdfs, lengths, offsets


def _coding_inputs(device):
    g = _gen(1)
    cdfs, lengths, offsets = _tables()
    indexes = torch.randint(0, 3, (2, 3, 5), generator=g, dtype=torch.int32)
    symbols = torch.randint(-4, 5, (2, 3, 5), generator=g, dtype=torch.int32)
    return [t.to(device) for t in (symbols, indexes, cdfs, lengths, offsets)]


def _gdn_args(device, channels_last=False, bias=True):
    g = _gen(2)
    x = torch.randn(2, 4, 5, 3, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    beta = torch.rand(4, generator=g) + 0.5
    gamma = torch.rand(4, 4, generator=g) * 0.1
    b = torch.randn(4, generator=g) * 0.1 if bias else None
    return [t if t is None else t.to(device) for t in (x, beta, gamma, b)]


def _cases_gdn_forward(device):
    for cl in (False, True):
        for inverse, simplified in ((False, False), (True, True)):
            x, beta, gamma, bias = _gdn_args(device, cl)
            yield (
                x.requires_grad_(),
                beta.requires_grad_(),
                gamma.requires_grad_(),
                bias.requires_grad_(),
                inverse,
                simplified,
            )
    x, beta, gamma, _ = _gdn_args(device, bias=False)
    yield x, beta, gamma, None, False, False


def _cases_gdn_forward_(device):
    x, beta, gamma, bias = _gdn_args(device)
    yield x, beta, gamma, bias, False, False


def _cases_gdn_backward(device):
    for cl in (False, True):
        x, beta, gamma, bias = _gdn_args(device, cl)
        grad = torch.randn(x.shape, generator=_gen(3)).to(device)
        yield grad, x, beta, gamma, bias, None, False, False
        if device == "cpu":
            scale = torch.ops.dualres_ext.gdn_forward_save(x, beta, gamma, bias, False, False)[1]
            yield grad, x, beta, gamma, bias, scale, False, False


def _likelihood_tensors(device, dtype=torch.float64, means=True):
    g = _gen(4)
    x = (torch.randn(2, 3, 4, 5, generator=g) * 3).to(device, dtype)
    s = (torch.rand(2, 3, 4, 5, generator=g) * 2).to(device, dtype)
    m = torch.randn(2, 3, 4, 5, generator=g).to(device, dtype) if means else None
    return x, m, s


def _cases_gaussian_likelihood(device):
    for means in (True, False):
        x, m, s = _likelihood_tensors(device, means=means)
        yield x.requires_grad_(), None if m is None else m.requires_grad_(), s.requires_grad_(), 0.11, 1e-9


def _cases_gaussian_likelihood_backward(device):
    x, m, s = _likelihood_tensors(device)
    yield torch.randn(x.shape, generator=_gen(5), dtype=x.dtype).to(device), x, m, s, 0.11, 1e-9


def _scales(device, dtype=torch.float32):
    return (torch.rand(2, 3, 4, generator=_gen(6)) * 10).to(device, dtype)


def _cases_build_indexes(device):
    table = torch.tensor([0.11, 0.5, 1.0, 4.0], device=device)
    yield _scales(device), table, 0.11, 7


def _cases_quantize(device):
    y = (torch.randn(2, 3, 4, generator=_gen(7)) * 5).to(device)
    yield y, None
    yield y, torch.randn(2, 3, 4, generator=_gen(8)).to(device)


def _cases_quantize_indexes(device):
    y = (torch.randn(2, 3, 4, generator=_gen(7)) * 5).to(device)
    table = torch.tensor([0.11, 0.5, 1.0, 4.0], device=device)
    yield y, torch.randn(2, 3, 4, generator=_gen(8)).to(device), _scales(device), table, 0.11, 7


def _cases_dequantize(device):
    symbols = torch.randint(-5, 6, (2, 3, 4), generator=_gen(9), dtype=torch.int32).to(device)
    yield symbols, None, torch.float32
    yield symbols, torch.randn(2, 3, 4, generator=_gen(10), dtype=torch.float64).to(device), torch.float64


def _cases_pmf_to_quantized_cdf(device):
    pmf = torch.rand(3, 6, generator=_gen(11)) + 0.01
    yield pmf / pmf.sum(1, keepdim=True), torch.tensor([6, 4, 2], dtype=torch.int32), 16


def _cases_gaussian_cdf_tables(device):
    yield torch.tensor([0.11, 0.7, 2.5]), 1e-9, 16


def _cases_rans_encode(device):
    symbols, indexes, cdfs, lengths, offsets = _coding_inputs(device)
    yield symbols, indexes, cdfs, lengths, offsets, 0
    yield symbols, indexes, cdfs, lengths, offsets, 3


def _native_stream(device="cpu", lanes=2):
    symbols, indexes, cdfs, lengths, offsets = _coding_inputs(device)
    data = torch.ops.dualres_ext.rans_encode(symbols, indexes, cdfs, lengths, offsets, lanes)
    return data, indexes, cdfs, lengths, offsets, symbols.numel()


def _cases_rans_decode(device):
    data, indexes, cdfs, lengths, offsets, _ = _native_stream(device)
    yield data.to(device), indexes, cdfs, lengths, offsets


def _cases_rans_embed(device):
    data, *_, n = _native_stream()
    yield data, n, 16


def _cases_rans_restore(device):
    data, *_, n = _native_stream()
    yield torch.ops.dualres_ext.rans_embed(data, n, 16), n, 16


def _interleaved_stream():
    symbols, indexes, cdfs, lengths, offsets = _coding_inputs("cpu")
    data = rans_interleaved.encode(symbols, indexes, cdfs, lengths, offsets, width=8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), indexes.numel()


def _cases_rans_iv_embed(device):
    data, n = _interleaved_stream()
    yield data, n, 16


def _cases_rans_iv_restore(device):
    data, n = _interleaved_stream()
    yield torch.ops.dualres_ext.rans_iv_embed(data, n, 16), n, 16


def _cases_rans_encode_compat(device):
    yield tuple(_coding_inputs("cpu"))


def _compat_stream():
    symbols, indexes, cdfs, lengths, offsets = _coding_inputs("cpu")
    return (
        torch.ops.dualres_ext.rans_encode_compat(symbols, indexes, cdfs, lengths, offsets),
        indexes,
        cdfs,
        lengths,
        offsets,
    )


def _cases_rans_decode_compat(device):
    yield _compat_stream()


def _cases_rans_decode_compat_stream(device):
    data, indexes, cdfs, lengths, offsets = _compat_stream()
    yield data, torch.zeros(2, dtype=torch.int64), indexes.reshape(-1)[:7], cdfs, lengths, offsets


def _cases_rans_encode_batch(device):
    symbols, indexes, cdfs, lengths, offsets = _coding_inputs(device)
    yield [symbols, symbols[:1]], [indexes, indexes[:1]], cdfs, lengths, offsets, 0


def _cases_rans_decode_batch(device):
    data, indexes, cdfs, lengths, offsets, _ = _native_stream(device)
    yield [data, data], [indexes, indexes], cdfs, lengths, offsets


def _int_conv_layer(transposed):
    """A small integer layer: 6 input channels (bound 300), 5 output channels, 10-bit weights."""
    g = _gen(12)
    k, stride, padding, output_padding = (5, 2, 2, 1) if transposed else (3, 1, 1, 0)
    shape = (6, 5, k, k) if transposed else (5, 6, k, k)
    weight = torch.randint(-511, 512, shape, generator=g, dtype=torch.int16)
    bias = torch.randint(-1000, 1000, (5,), generator=g)
    return weight, bias, torch.full((6,), 300), (k, stride, padding, output_padding, transposed)


def _cases_int_conv_pack(device):
    for transposed in (False, True):
        weight, _, _, (k, stride, padding, _, _) = _int_conv_layer(transposed)
        yield weight, stride, padding, transposed


def _cases_int_conv(device):
    g = _gen(13)
    for transposed in (False, True):
        weight, bias, in_bound, (k, stride, padding, output_padding, _) = _int_conv_layer(transposed)
        packed = torch.ops.dualres_ext.int_conv_pack(weight, stride, padding, transposed)
        x = torch.randint(-300, 301, (2, 6, 4, 5), generator=g).float()
        inputs = [x[:, :4], x[:, 4:]]
        multiplier = torch.full((5,), 1e-3)
        low, high = torch.full((5,), -20), torch.full((5,), 20)
        table = torch.randn(41, generator=g)
        geometry = (k, stride, padding, output_padding, transposed)
        yield inputs, packed, bias, in_bound, None, None, None, None, *geometry, False, -1
        yield inputs, packed, bias, in_bound, multiplier, low, high, None, *geometry, True, -1
        yield [x], packed, bias, in_bound, multiplier, low, high, table, *geometry, False, 0


OPCHECK_CASES = {
    "gdn_forward": _cases_gdn_forward,
    "gdn_forward_": _cases_gdn_forward_,
    "gdn_forward_save": _cases_gdn_forward,
    "gdn_backward": _cases_gdn_backward,
    "gaussian_likelihood": _cases_gaussian_likelihood,
    "gaussian_likelihood_backward": _cases_gaussian_likelihood_backward,
    "gaussian_build_indexes": _cases_build_indexes,
    "gaussian_quantize": _cases_quantize,
    "gaussian_quantize_indexes": _cases_quantize_indexes,
    "gaussian_dequantize": _cases_dequantize,
    "pmf_to_quantized_cdf": _cases_pmf_to_quantized_cdf,
    "gaussian_cdf_tables": _cases_gaussian_cdf_tables,
    "rans_encode": _cases_rans_encode,
    "rans_decode": _cases_rans_decode,
    "rans_embed": _cases_rans_embed,
    "rans_restore": _cases_rans_restore,
    "rans_iv_embed": _cases_rans_iv_embed,
    "rans_iv_restore": _cases_rans_iv_restore,
    "rans_encode_compat": _cases_rans_encode_compat,
    "rans_decode_compat": _cases_rans_decode_compat,
    "rans_decode_compat_stream": _cases_rans_decode_compat_stream,
    "rans_encode_batch": _cases_rans_encode_batch,
    "rans_decode_batch": _cases_rans_decode_batch,
    "int_conv_pack": _cases_int_conv_pack,
    "int_conv": _cases_int_conv,
}

# Ops whose output size depends on the data (an unbacked size in the fake kernel): opcheck's
# AOT-dispatch tests cannot compare such outputs, the fake-tensor and schema tests still run.
DATA_DEPENDENT = {
    "rans_encode",
    "rans_embed",
    "rans_restore",
    "rans_iv_embed",
    "rans_iv_restore",
    "rans_encode_compat",
    "rans_encode_batch",
    "gaussian_cdf_tables",
}


def _namespace_ops():
    prefix = "dualres_ext::"
    return {
        name[len(prefix) :].split(".")[0] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)
    }


def test_every_op_has_an_entry():
    names = _namespace_ops()
    assert names, "no op registered in torch.ops.dualres_ext"
    missing = names - set(OPCHECK_CASES) - set(NOT_TRACEABLE)
    assert not missing, f"ops without an opcheck entry (add one to OPCHECK_CASES or NOT_TRACEABLE): {missing}"
    stale = (set(OPCHECK_CASES) | set(NOT_TRACEABLE)) - names
    assert not stale, f"entries for ops that do not exist: {stale}"


def _opcheck_params():
    for name in sorted(OPCHECK_CASES):
        for device in DEVICES:
            if (device == "cuda" and name in CPU_ONLY) or (device == "cpu" and name in CUDA_ONLY):
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            yield pytest.param(name, device, id=f"{name}-{device}", marks=marks)


@pytest.mark.parametrize("name,device", list(_opcheck_params()))
def test_opcheck(name, device):
    op = getattr(torch.ops.dualres_ext, name).default
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if name not in DATA_DEPENDENT:
        utils += ("test_aot_dispatch_dynamic",)
    cases = list(OPCHECK_CASES[name](device))
    assert cases
    for args in cases:
        torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("name", sorted(NOT_TRACEABLE))
def test_untraceable_ops_take_no_tensors_or_return_metadata(name):
    schema = getattr(torch.ops.dualres_ext, name).default._schema
    returns = [str(r.type) for r in schema.returns]
    handles = [a for a in list(schema.arguments) + list(schema.returns) if "torch.classes" in str(a.type)]
    assert returns in (["str"], ["int"], ["List[int]"]) or handles, (
        f"{name}: {returns} -- a tensor op needs a fake kernel"
    )


# ---- GDN: compile, export -----------------------------------------------------------------------


def _grads(module, *inputs):
    return [t.grad.clone() for t in (*inputs, *module.parameters()) if t.grad is not None]


@pytest.mark.parametrize(
    "cls,inverse,channels_last", [(layers.GDN, False, False), (layers.GDN, True, True), (layers.GDN1, False, True)]
)
def test_gdn_compiles_fullgraph_with_identical_values_and_gradients(cls, inverse, channels_last):
    torch._dynamo.reset()
    m = cls(8, inverse=inverse)
    with torch.no_grad():
        m.gamma.add_(torch.rand(8, 8, generator=_gen(12)) * 0.05)
    x = torch.randn(2, 8, 6, 5, generator=_gen(13))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(8, generator=_gen(14)) * 0.1

    def run(fn):
        m.zero_grad()
        xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = fn(xi, bias=bi)
        y.backward(torch.ones_like(y) * 0.5)
        return y.detach(), [xi.grad, bi.grad] + _grads(m)

    y_eager, g_eager = run(m)
    y_comp, g_comp = run(torch.compile(m, backend="aot_eager", fullgraph=True))
    assert torch.equal(y_comp, y_eager) and y_comp.stride() == y_eager.stride()
    assert len(g_comp) == len(g_eager) and all(torch.equal(a, b) for a, b in zip(g_comp, g_eager))
    with torch.no_grad():  # the inference path (gdn_forward, no autograd) traces as well
        assert torch.equal(torch.compile(m, backend="aot_eager", fullgraph=True)(x), m(x))


def test_gdn_compiles_with_inductor():
    torch._dynamo.reset()
    m = layers.GDN(4)
    x = torch.randn(1, 4, 4, 4, generator=_gen(15), requires_grad=True)
    y = torch.compile(m, fullgraph=True)(x)
    y.sum().backward()
    g = x.grad.clone()
    x.grad = None
    y_eager = m(x)
    y_eager.sum().backward()
    assert torch.equal(y, y_eager) and torch.equal(g, x.grad)


def test_gdn_exports():
    m = layers.GDN(8, inverse=True)
    x = torch.randn(2, 8, 6, 5, generator=_gen(16))
    exported = torch.export.export(m, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("dualres_ext.gdn_forward" in t for t in targets), targets
    assert torch.equal(exported.module()(x), m(x))


def test_gdn_checks_finite_parameters_in_the_cpu_kernel():
    m = layers.GDN(4)
    with torch.no_grad():
        m.beta[1] = float("inf")
    x = torch.randn(1, 4, 2, 2)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for fn in (m, compiled):  # the check runs in C++, so compiled code keeps it
        with pytest.raises(ValueError, match="beta contains NaN or Inf"):
            fn(x)
    # Explicitly off: only the Python check goes; the CPU kernel still refuses.
    with pytest.raises(ValueError, match="beta contains NaN or Inf"):
        ops.gdn(x, *m.effective_params(), check_finite=False)


# ---- entropy models --------------------------------------------------------------------------------


def test_gaussian_conditional_compiles_with_identical_values_and_gradients():
    torch._dynamo.reset()
    gc = GaussianConditional(None)
    g = _gen(17)
    y = torch.randn(2, 4, 5, 6, generator=g) * 3
    scales = torch.rand(2, 4, 5, 6, generator=g) * 2
    scales[0, 0] = 0.01  # below the scale bound: its gradient rule
    means = torch.randn(2, 4, 5, 6, generator=g)

    def run(fn):
        tensors = [t.clone().requires_grad_() for t in (y, scales, means)]
        lik = fn(*tensors)
        lik.backward(torch.randn(lik.shape, generator=_gen(18)))
        return lik.detach(), [t.grad for t in tensors]

    for fn in (gc.likelihood, lambda v, s, m: gc(v, s, m, training=False)[1]):
        lik_eager, g_eager = run(fn)
        lik_comp, g_comp = run(torch.compile(fn, backend="aot_eager", fullgraph=True))
        assert torch.equal(lik_comp, lik_eager)
        assert all(torch.equal(a, b) for a, b in zip(g_comp, g_eager))
    # Training forward (additive noise): compiles without graph breaks.
    gc.train()
    out, lik = torch.compile(gc, backend="aot_eager", fullgraph=True)(y, scales, means)
    assert out.shape == lik.shape == y.shape and (out - y).abs().max() <= 0.5


def test_entropy_bottleneck_compiles():
    torch._dynamo.reset()
    eb = EntropyBottleneck(4)
    z = torch.randn(2, 4, 3, 3, generator=_gen(19)) * 4
    compiled = torch.compile(eb, backend="aot_eager", fullgraph=True)
    eb.eval()
    assert all(torch.equal(a, b) for a, b in zip(compiled(z), eb(z)))
    eb.train()
    out, lik = compiled(z.requires_grad_())
    lik.log().sum().backward()
    assert out.shape == lik.shape == z.shape and z.grad is not None


# ---- DualRes training step --------------------------------------------------------------------------

TINY = dict(N=16, N1=8, M_H=16, M_L=16, N_hyper=16, Z=8, slices_H=(8, 8), slices_L=(8, 8), hidden=16)


@pytest.mark.parametrize("quality", [3, torch.tensor([0.5, 4.0])], ids=["int", "tensor"])
def test_dualres_training_step_compiles_fullgraph(quality):
    torch._dynamo.reset()
    model = build("compact", **TINY).train()
    x = torch.rand(2, 3, 64, 64, generator=_gen(20))

    def step(model, x):
        out = model(x, quality)
        return rate_distortion(out, x, 0.01)["loss"]

    def run(fn):
        model.zero_grad()
        torch.manual_seed(0)  # the likelihoods' additive noise
        loss = fn(model, x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_eager, g_eager = run(step)
    loss_comp, g_comp = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    assert torch.isfinite(loss_comp) and len(g_comp) == len(g_eager)
    # Same values up to float rounding (AOT autograd may order the gradient sums differently).
    torch.testing.assert_close(loss_comp, loss_eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dualres_quality_check_stays_eager():
    model = build("compact", **TINY)
    with pytest.raises(ValueError, match="quality must lie in"):
        model(torch.rand(1, 3, 64, 64), torch.tensor([7.0]))
