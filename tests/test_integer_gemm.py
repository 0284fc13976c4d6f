"""The int8 GEMM form of :class:`dualres_ext.integer.IntConv` (CPU, for the layers the native int16
kernel does not take): balanced base-128 digits, one ``torch._int_mm`` per layer, against exact references (float64 convolutions, exact below 2^53, and
explicit int64 sums), on random layers with inputs and weights at their extremes; and the same
accumulators in other processes under other oneDNN instruction sets and ATen CPU kernels (the
non-VNNI ones saturate int16 pair sums of full-range int8 operands)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dualres_ext import integer as I

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_exact import _int64_reference as _int64_sums  # noqa: E402  (explicit int64 products and sums)

pytestmark = pytest.mark.skipif(not I.int8_gemm_ok(torch.device("cpu")), reason="no torch._int_mm on CPU")


def test_digits_round_trip():
    g = torch.Generator().manual_seed(0)
    for bound in (0, 1, 63, 64, 100, 2047, 5141, 8127, 8128, 8256, 1 << 20, (1 << 23) - 1):
        n = I.digit_count(bound)
        reach = sum(128**j for j in range(n))
        assert 63 * reach >= bound and (n == 1 or 63 * (reach - 128 ** (n - 1)) < bound)
        x = torch.randint(-bound, bound + 1, (4000,), generator=g)
        x = torch.cat([x, torch.tensor([-bound, bound, 0, min(bound, 64), -min(bound, 64), min(bound, 63)])])
        for dtype in (torch.float32, torch.int64, torch.int32):
            digits = I.split_digits(x.to(dtype), n)
            assert len(digits) == n
            back = torch.zeros_like(x)
            for j, d in enumerate(digits):
                assert d.dtype == dtype
                assert int(d.min()) >= -64 and int(d.max()) <= 63, (bound, j)
                back += d.to(torch.int64) * 128**j
            assert torch.equal(back, x)


def _layer(kind: str, c_in: int, c_out: int, act_bound: int, weight_bound: int, seed: int) -> I.IntConv:
    """An IntConv built from its buffers: random integer weights with many at ±weight_bound and
    at extreme base-128 digits, input bound ``act_bound`` (a third of the channels lower)."""
    g = torch.Generator().manual_seed(seed)
    k, stride, padding, output_padding, transposed = {
        "conv1x1": (1, 1, 0, 0, False),
        "conv3x3": (3, 1, 1, 0, False),
        "conv3x3s2": (3, 2, 1, 0, False),
        "conv5x5s2": (5, 2, 2, 0, False),
        "deconv5x5s2": (5, 2, 2, 1, True),
        "deconv3x3s2": (3, 2, 1, 1, True),
        "deconv4x4s2": (4, 2, 1, 0, True),
        "deconv1x1s2": (1, 2, 0, 1, True),
    }[kind]
    shape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
    w = torch.randint(-weight_bound, weight_bound + 1, shape, generator=g)
    pick = torch.randint(0, 4, shape, generator=g)
    extreme = torch.tensor(
        [weight_bound, -weight_bound, 63 + 128 * (weight_bound // 128), -64 - 128 * (weight_bound // 128)]
    )
    extreme = extreme.clamp(-weight_bound, weight_bound)
    w = torch.where(torch.rand(shape, generator=g) < 0.5, extreme[pick], w)
    in_bound = torch.full((c_in,), act_bound, dtype=torch.int64)
    in_bound[::3] = max(1, act_bound // 5)
    bias = torch.randint(-(1 << 20), 1 << 20, (c_out,), generator=g)
    meta = torch.tensor([int(transposed), stride, padding, output_padding, 0, 1])
    return I.IntConv(
        w.to(torch.int32),
        bias,
        torch.full((c_out,), 1e-3),
        in_bound,
        torch.full((c_out,), -4095),
        torch.full((c_out,), 4095),
        torch.tensor([0, c_in]),
        meta,
    )


def _inputs(conv: I.IntConv, batch: int, h: int, w: int, seed: int):
    """At the bounds (all +A, all -A, signs aligned with the weights, random signs), values whose
    digits are extreme (low digit -64 or 63), and uniform ones."""
    g = torch.Generator().manual_seed(seed)
    bound = conv.in_bound[None, :, None, None]
    shape = (batch, bound.shape[1], h, w)
    transposed = conv._settings()[0]
    wsum = conv.weight.to(torch.int64).sum(dim=(1, 2, 3) if transposed else (0, 2, 3))
    align = torch.where(wsum >= 0, 1, -1)[None, :, None, None]
    signs = torch.randint(0, 2, shape, generator=g) * 2 - 1
    digit_edges = torch.tensor([-64, 63, 64, -65, 128 + 63, -128 - 64])
    edges = digit_edges[torch.randint(0, len(digit_edges), shape, generator=g)]
    uniform = torch.round((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(torch.int64)
    out = [bound.expand(shape), -bound.expand(shape), align * bound, signs * bound, uniform]
    out.append(torch.maximum(torch.minimum(edges * (bound // 64).clamp(min=1), bound), -bound))
    return [a.to(torch.float32).contiguous() for a in out]


def _plan(conv: I.IntConv):
    """The int8 GEMM plan of ``conv`` (made here: 1x1 layers run a float64 GEMM in the model)."""
    return I.gemm_plan(conv.weight, conv.bias, conv.in_bound, *conv._settings())


def _gemm(plan, a: torch.Tensor) -> torch.Tensor:
    return I.gemm_accumulate(plan, a.float()).double()


def _reference(conv: I.IntConv, a: torch.Tensor) -> torch.Tensor:
    """``bias + conv(a)`` by ATen's float64 convolution: products and sums of integers below 2^53
    are exact in any order."""
    transposed, stride, padding, output_padding = conv._settings()
    w, b = conv.weight.double(), conv.bias.double()
    if transposed:
        return F.conv_transpose2d(a.double(), w, b, stride, padding, output_padding)
    return F.conv2d(a.double(), w, b, stride, padding)


CASES = [
    ("conv1x1", 80, 24, 2047, 511),
    ("conv3x3", 96, 40, 5141, 512),
    ("conv3x3s2", 48, 32, 8127, 511),
    ("conv5x5s2", 48, 32, 2047, 2047),
    ("deconv5x5s2", 64, 32, 3285, 511),
    ("deconv3x3s2", 40, 24, 2047, 511),
    ("deconv4x4s2", 40, 24, 2047, 511),
    ("deconv1x1s2", 16, 8, 2047, 511),  # phases without taps
    ("conv3x3", 32, 16, 1 << 15, 511),  # three activation digits
    ("conv1x1", 32, 16, 2047, 1 << 14),  # three weight digits
    ("conv3x3", 24, 8, 40, 60),  # one digit each
]


@pytest.mark.parametrize("kind,c_in,c_out,act_bound,weight_bound", CASES)
def test_int8_gemm_is_exact(kind, c_in, c_out, act_bound, weight_bound):
    conv = _layer(kind, c_in, c_out, act_bound, weight_bound, seed=c_in + act_bound)
    plan = _plan(conv)
    assert plan is not None  # the int8 path is the one under test
    assert plan["adigits"] == I.digit_count(act_bound) and plan["wdigits"] == I.digit_count(weight_bound)
    # the layer runs it where the native int16 kernel does not take the layer, except 1x1 layers
    # (one float64 GEMM, measured faster)
    rt = conv._runtime()
    assert (rt["native"] is not None) == I._int16.int16_fits(
        conv.weight, conv.bias, conv.in_bound, *conv._settings()[:2]
    )
    assert (rt["gemm"] is None) == (kind == "conv1x1" or rt["native"] is not None)
    for batch, h, w in ((1, 7, 9), (3, 6, 5)):
        for i, a in enumerate(_inputs(conv, batch, h, w, seed=batch + h)):
            got = _gemm(plan, a)
            want = _reference(conv, a)
            assert got.shape == want.shape
            assert torch.equal(got, want), (kind, i)
            got = conv.accumulate(a, bounded=True)
            assert got.dtype == torch.float64 and torch.equal(got, want), (kind, i)
            if batch == 1 and i in (0, 2):
                assert torch.equal(got, _int64_sums(conv, a).double()), (kind, i)
    # Out-of-bound inputs are clamped first.
    a = _inputs(conv, 1, 5, 6, 0)[3] * 1000
    bound = conv.in_bound[None, :, None, None].float()
    assert torch.equal(conv.accumulate(a), _reference(conv, torch.maximum(torch.minimum(a, bound), -bound)))


def test_sparse_high_weight_digits_get_their_own_gemm():
    """A weight digit that is zero in most columns runs on the other columns only: the same sums."""
    for kind in ("conv3x3", "conv1x1", "deconv5x5s2"):
        conv = _layer(kind, 48, 16, 2047, 511, seed=3)
        w = conv.weight.to(torch.int64)
        small = torch.randint(-64, 64, w.shape, generator=torch.Generator().manual_seed(4))
        keep = torch.zeros_like(w, dtype=torch.bool)
        if conv._settings()[0]:
            keep[:5] = True  # large weights in a few input channels only
        else:
            keep[:, :5] = True
        conv.weight.copy_(torch.where(keep, w, small).to(conv.weight.dtype))
        plan = _plan(conv)
        for block in plan["blocks"]:
            assert [len(digits) for _, _, digits in block["gemms"]] == [1, 1]
            assert block["gemms"][1][1].numel() <= I._SPARSE_DIGIT * block["gemms"][0][0].shape[1]
        for a in _inputs(conv, 2, 6, 7, seed=5):
            assert torch.equal(_gemm(plan, a), _reference(conv, a)), kind


def test_int8_gemm_falls_back_when_a_bound_fails():
    """Int32 blocks: the plan refuses depths whose partial sums could reach 2^31; the layer then
    runs the float64 convolution, with the same integers."""
    conv = _layer("conv3x3", 20000, 1, 63, 63, seed=1)
    assert _plan(conv) is None and conv._runtime()["gemm"] is None
    a = _inputs(conv, 1, 1, 1, 0)[0]
    assert torch.equal(conv.accumulate(a), _reference(conv, a))


@pytest.mark.parametrize("act_bound", [2047, 1 << 15])  # the native int16 kernel; the int8 GEMMs
def test_requantised_output_matches_the_float64_path(act_bound):
    conv = _layer("conv3x3", 64, 32, act_bound, 511, seed=5)
    assert (conv._runtime()["native"] is None) == (act_bound > 32767)
    a = _inputs(conv, 1, 8, 8, 1)[4]
    with I.float64_convolutions():
        want = conv(a, True)
        want_index = conv(a, True, 4095)
    assert torch.equal(conv(a, True), want) and torch.equal(conv(a, True, 4095), want_index)


# Other processes: other instruction sets and kernels must give the very accumulators.
CHILD = r"""
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
import test_integer_gemm as T
from dualres_ext import integer as I
torch.set_num_threads(int(sys.argv[2]))
print(T.full_range_control(), T.digest())
"""


def full_range_control() -> str:
    """Whether ``_int_mm`` is exact here on full-range int8 operands at a shape like the cases'
    (the control: non-VNNI oneDNN kernels saturate, which the 7-bit digits avoid)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (80, 864), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (864, 168), dtype=torch.int8, generator=g)
    return "exact" if torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()) else "saturates"


def digest() -> str:
    """Hash of the int8-path accumulators of every case on adversarial inputs; each one checked
    against the float64 reference here (in whatever process runs it)."""
    h = hashlib.sha256()
    for kind, c_in, c_out, act_bound, weight_bound in CASES:
        conv = _layer(kind, c_in, c_out, act_bound, weight_bound, seed=c_in + act_bound)
        plan = _plan(conv)
        for i, a in enumerate(_inputs(conv, 2, 6, 7, seed=c_in)):
            got = _gemm(plan, a)
            if not torch.equal(got, _reference(conv, a)):
                raise AssertionError(f"{kind} input {i}: not exact")
            h.update(got.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "env",
    [
        {"ONEDNN_MAX_CPU_ISA": "SSE41", "threads": "1"},
        {"ONEDNN_MAX_CPU_ISA": "AVX2"},
        {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "threads": "3"},
        {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
        {"ATEN_CPU_CAPABILITY": "avx2"},
        {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"},
    ],
    ids=["sse41-1thread", "avx2", "avx512core-3threads", "aten-default-sse41", "aten-avx2", "fpmath-bf16"],
)
def test_int8_gemm_identical_under_other_kernels(env, package_env):
    expected = digest()
    env = dict(env)
    threads = env.pop("threads", "2")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, os.path.dirname(os.path.abspath(__file__)), threads],
        env={**package_env, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    control, got = out.stdout.split()[-2:]
    assert got == expected
    if "ONEDNN_MAX_CPU_ISA" in env and "ATEN_CPU_CAPABILITY" not in env:
        # the child really ran a non-VNNI kernel, one that full-range int8 operands would break
        assert control == "saturates"


def test_int8_gemms_only_where_they_are_fast_and_exact():
    """CPU with oneDNN on (without it ``_int_mm`` is a slow loop): int8 GEMMs; elsewhere the float64
    convolutions, which give the same integers."""
    cpu = torch.device("cpu")
    assert I.int8_gemm_ok(cpu) == I._int_mm_on_cpu()
    with torch.backends.mkldnn.flags(enabled=False):
        assert not I.int8_gemm_ok(cpu)
    assert not I.int8_gemm_ok(torch.device("meta"))
