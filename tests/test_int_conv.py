"""The native integer convolution (csrc/integer, :mod:`dualres_ext.ops.int_conv`) that runs
:class:`dualres_ext.integer.IntConv` on CPU: against plain PyTorch references (float64
convolutions, exact below 2^53, and the requantisation and table as PyTorch expressions) on
random layers with weights and inputs at their extremes, for every kernel set, layout, thread
count and mode; its refusals (clear exceptions for hostile or out-of-contract arguments); and the
same results in other processes (kernel sets forced by DUALRES_CPU_KERNELS, thread counts)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dualres_ext import integer as I
from dualres_ext.ops import int_conv as IC

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_testlib import SUPPORTED, cpu_kernels  # noqa: E402


def _isa_runs(isa: int) -> bool:
    """Whether the int_conv kernel ``isa`` runs here (the avx512 one also needs AVX-512 VNNI)."""
    one = torch.ones(1, dtype=torch.int64)
    try:
        IC.int_conv([torch.zeros(1, 1, 1, 1)], IC.pack(one.view(1, 1, 1, 1), 1, 0, False), one, one, kernel_size=1,
                    stride=1, padding=0, isa=isa)  # fmt: skip
        return True
    except ValueError:
        return False


ISAS = [isa for isa in (0, 1, 2) if _isa_runs(isa)]

# kind: (kernel, stride, padding, output_padding, transposed)
KINDS = {
    "conv1x1": (1, 1, 0, 0, False),
    "conv3x3": (3, 1, 1, 0, False),
    "conv3x3s2": (3, 2, 1, 0, False),
    "conv5x5s2": (5, 2, 2, 0, False),
    "conv3x3p0": (3, 1, 0, 0, False),
    "deconv5x5s2": (5, 2, 2, 1, True),
    "deconv3x3s2": (3, 2, 1, 1, True),
    "deconv4x4s2": (4, 2, 1, 0, True),
    "deconv5x5s2op0": (5, 2, 2, 0, True),
    "deconv1x1s2": (1, 2, 0, 1, True),  # phases without taps: the bias alone
    "deconv3x3s3": (3, 3, 0, 2, True),
}


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Layer:
    """A random integer layer: weights at and near ±weight_bound, input bounds ``act_bound`` (a
    third of the channels lower). Drawn with integer generators only (ATen's float generators
    differ between its CPU capabilities, and other processes must draw the same layers)."""

    def __init__(self, kind, c_in, c_out, act_bound=2047, weight_bound=511, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.k, self.stride, self.padding, self.output_padding, self.transposed = KINDS[kind]
        k = self.k
        shape = (c_in, c_out, k, k) if self.transposed else (c_out, c_in, k, k)
        w = torch.randint(-weight_bound, weight_bound + 1, shape, generator=g)
        extreme = torch.tensor([weight_bound, -weight_bound])[torch.randint(0, 2, shape, generator=g)]
        self.weight = torch.where(torch.randint(0, 2, shape, generator=g) == 0, extreme, w).to(torch.int16)
        self.in_bound = torch.full((c_in,), act_bound, dtype=torch.int64)
        self.in_bound[::3] = max(1, act_bound // 5)
        self.bias = torch.randint(-(1 << 20), 1 << 20, (c_out,), generator=g)
        self.multiplier = (torch.randint(10, 1000, (c_out,), generator=g).double() * 1e-6).float()
        self.low = -torch.randint(0, 300, (c_out,), generator=g)
        self.high = torch.randint(0, 300, (c_out,), generator=g)
        self.table = (torch.randint(-(1 << 20), 1 << 20, (2 * 300 + 1,), generator=g).double() / 1024).float()
        self.packed = IC.pack(self.weight, self.stride, self.padding, self.transposed)

    def geometry(self):
        return dict(
            kernel_size=self.k,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            transposed=self.transposed,
        )

    def run(self, inputs, mode="acc", **kw):
        extra = {"acc": (), "value": (self.multiplier, self.low, self.high)}
        extra["table"] = extra["value"] + (self.table,)
        return IC.int_conv(inputs, self.packed, self.bias, self.in_bound, *extra[mode], **self.geometry(), **kw)

    def reference(self, x, mode="acc"):
        """The same by PyTorch: float64 convolution of the clamped input (exact), then the
        requantisation and table as expressions."""
        b = self.in_bound.double()[None, :, None, None]
        x = torch.maximum(torch.minimum(x.double(), b), -b)
        w, bias = self.weight.double(), self.bias.double()
        if self.transposed:
            acc = F.conv_transpose2d(x, w, bias, self.stride, self.padding, self.output_padding)
        else:
            acc = F.conv2d(x, w, bias, self.stride, self.padding)
        if mode == "acc":
            return acc
        view = (1, -1, 1, 1)
        q = torch.round(acc * self.multiplier.double().view(view))
        q = torch.clamp(q, self.low.double().view(view), self.high.double().view(view))
        if mode == "value":
            return q
        return self.table[(q + 300).long()].double()

    def worst_inputs(self, n, h, w, seed):
        """At the bounds (all +A, all -A, signs aligned with each output channel's weights, random
        signs) and uniform within them, plus values far outside (clamped)."""
        g = torch.Generator().manual_seed(seed)
        bound = self.in_bound[None, :, None, None]
        shape = (n, bound.shape[1], h, w)
        wsum = self.weight.to(torch.int64).sum(dim=(1, 2, 3) if self.transposed else (0, 2, 3))
        align = torch.where(wsum >= 0, 1, -1)[None, :, None, None]
        signs = torch.randint(0, 2, shape, generator=g) * 2 - 1
        uniform = torch.randint(-(1 << 16), (1 << 16) + 1, shape, generator=g) * bound // (1 << 16)
        outside = torch.randint(-(1 << 20), 1 << 20, shape, generator=g)
        return [
            t.to(torch.float32).contiguous()
            for t in (
                bound.expand(shape),
                -bound.expand(shape),
                (align * bound).expand(shape),
                signs * bound,
                uniform,
                outside,
            )
        ]


CASES = [
    ("conv1x1", 80, 24, 2047, 511),
    ("conv3x3", 96, 40, 5141, 511),
    ("conv3x3", 37, 16, 2047, 511),  # odd input channels: a padded pair
    ("conv3x3s2", 48, 32, 8127, 511),
    ("conv5x5s2", 24, 8, 2047, 2047),
    ("conv3x3p0", 16, 96, 2047, 511),
    ("deconv5x5s2", 64, 48, 3285, 511),
    ("deconv3x3s2", 40, 24, 2047, 511),
    ("deconv4x4s2", 40, 24, 2047, 511),
    ("deconv5x5s2op0", 16, 80, 2047, 511),
    ("deconv1x1s2", 16, 8, 2047, 511),
    ("deconv3x3s3", 8, 17, 2047, 511),
    ("conv1x1", 2, 64, 32767, 32767),  # operands at the int16 limits (a pair sum near 2^31)
]


@pytest.mark.parametrize("kind,c_in,c_out,act_bound,weight_bound", CASES)
def test_accumulators_are_exact_at_the_bounds(kind, c_in, c_out, act_bound, weight_bound):
    layer = Layer(kind, c_in, c_out, act_bound, weight_bound, seed=c_in + c_out)
    for n, h, w in ((1, 7, 9), (3, 5, 13)):
        for i, x in enumerate(layer.worst_inputs(n, h, w, seed=h * w)):
            want = layer.reference(x)
            for isa in ISAS:
                for channels_last in (False, True):
                    got = layer.run([x], channels_last=channels_last, isa=isa)
                    assert got.dtype == torch.int32 and got.shape == want.shape
                    assert got.is_contiguous(
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format
                    )
                    assert torch.equal(got.double(), want), (kind, i, isa, channels_last)


@pytest.mark.parametrize("kind", ["conv3x3", "conv1x1", "deconv5x5s2", "conv3x3s2"])
@pytest.mark.parametrize("mode", ["value", "table"])
def test_requantisation_and_tables(kind, mode):
    layer = Layer(kind, 34, 40, seed=7)
    for x in layer.worst_inputs(2, 6, 11, seed=1)[2:5]:
        want = layer.reference(x, mode)
        for isa in ISAS:
            for channels_last in (False, True):
                got = layer.run([x], mode, channels_last=channels_last, isa=isa)
                assert got.dtype == torch.float32 and torch.equal(got.double(), want), (isa, channels_last)


def test_inputs_as_pieces_in_any_layout():
    """A list of inputs is their concatenation along the channels, whatever their strides."""
    layer = Layer("conv3x3", 48, 32, seed=3)
    x = layer.worst_inputs(2, 9, 10, seed=2)[4]
    want = layer.run([x], "table")
    a, b, c = x[:, :16], x[:, 16:17], x[:, 17:]
    wide = torch.zeros(2, 31, 9, 20)
    wide[..., ::2] = c  # a non-contiguous view
    pieces = [a.contiguous(memory_format=torch.channels_last), b.contiguous(), wide[..., ::2]]
    for isa in ISAS:
        assert torch.equal(layer.run(pieces, "table", isa=isa), want)
    assert torch.equal(layer.run([x.contiguous(memory_format=torch.channels_last)], "table"), want)


def test_thread_counts_and_kernel_sets_agree():
    layer = Layer("deconv5x5s2", 64, 48, seed=4)
    x = layer.worst_inputs(3, 12, 15, seed=5)[4]
    want = layer.run([x], "value", isa=0)
    for n in (1, 2, 3, 5):
        with threads(n):
            for isa in ISAS:
                assert torch.equal(layer.run([x], "value", isa=isa), want), (n, isa)
    for name in SUPPORTED:  # isa -1 follows the kernel set in use, as the input conversion does
        with cpu_kernels(name):
            assert torch.equal(layer.run([x], "value"), want), name


def test_the_fit_check_matches_the_kernel():
    """int16_fits (Python) and the kernel refuse the same layers: the largest phase sum of
    |w| * in_bound plus |bias| must stay below 2^31."""
    a = 7000
    for kind, taps in (("conv3x3", 9), ("deconv5x5s2", 9), ("deconv4x4s2", 4)):
        layer = Layer(kind, 1, 3, seed=1)
        w = torch.full(layer.weight.shape, 32767, dtype=torch.int16)
        packed = IC.pack(w, layer.stride, layer.padding, layer.transposed)
        in_bound = torch.full((1,), a)
        x = torch.zeros(1, 1, 5, 5)
        for margin in (0, 1):  # the largest bias that fits, then one more
            bias = torch.full((3,), (1 << 31) - 1 - taps * 32767 * a + margin)
            fits = IC.int16_fits(w, bias, in_bound, layer.transposed, layer.stride)
            assert fits == (margin == 0), kind
            if fits:
                out = IC.int_conv([x], packed, bias, in_bound, **layer.geometry())
                assert torch.equal(out.long(), bias.view(1, -1, 1, 1).expand(out.shape))
            else:
                with pytest.raises(ValueError, match="2\\^31"):
                    IC.int_conv([x], packed, bias, in_bound, **layer.geometry())


def test_hostile_arguments_raise_clearly():
    layer = Layer("conv3x3", 6, 5, act_bound=100, seed=2)
    x = layer.worst_inputs(1, 4, 5, seed=0)[4]
    valid = dict(
        inputs=[x],
        packed=layer.packed,
        bias=layer.bias,
        in_bound=layer.in_bound,
        multiplier=layer.multiplier,
        low=layer.low,
        high=layer.high,
        table=layer.table,
        kernel_size=3,
        stride=1,
        padding=1,
        output_padding=0,
        transposed=False,
        channels_last=False,
        isa=-1,
    )

    def call(**changes):  # the raw op: no wrapper in between
        return torch.ops.dualres_ext.int_conv(*dict(valid, **changes).values())

    assert torch.equal(call().double(), layer.reference(x, "table"))
    for bad in (float("nan"), 0.5, -1e-3):
        y = x.clone()
        y[0, 2, 1, 3] = bad
        for inputs in ([y], [y.contiguous(memory_format=torch.channels_last)], [y[:, :2], y[:, 2:]]):
            with pytest.raises(ValueError, match="integers"):
                call(inputs=inputs)
    y = x.clone()
    y[0, 1, 0, 0] = float("inf")  # clamped like any value outside the bounds
    assert torch.equal(call(inputs=[y]).double(), layer.reference(y, "table"))
    value_errors = [
        dict(in_bound=torch.full((6,), 40000)),  # operands beyond int16
        dict(in_bound=torch.full((6,), -1)),
        dict(bias=torch.full((5,), 1 << 31)),
        dict(multiplier=torch.full((5,), float("nan"))),
        dict(low=torch.full((5,), -301)),  # beyond the table
        dict(high=torch.full((5,), 301)),
        dict(table=torch.zeros(11)),
        dict(isa=7),
        dict(kernel_size=0),
        dict(stride=0),
        dict(padding=-1),
        dict(output_padding=1),  # for transposed convolutions only
        dict(inputs=[torch.zeros(1, 6, 1, 1)], padding=0),  # no output pixel
    ]
    for changes in value_errors:
        with pytest.raises(ValueError):
            call(**changes)
    runtime_errors = [
        dict(inputs=[]),
        dict(inputs=[x.double()]),
        dict(inputs=[x.int()]),
        dict(inputs=[x[:, :4]]),  # channels != in_bound's
        dict(inputs=[x[:, :3], x[:, 3:, :2]]),  # sizes differ
        dict(inputs=[x[0]]),
        dict(packed=layer.packed[:, :2].contiguous()),
        dict(packed=layer.packed.int()),
        dict(bias=layer.bias.int()),
        dict(bias=layer.bias[:4]),  # output channels != the packed weights'
        dict(in_bound=layer.in_bound[:5]),
        dict(multiplier=layer.multiplier.double()),
        dict(low=None),  # multiplier, low and high go together
        dict(multiplier=None, low=None, high=None),  # a table without requantisation
        dict(table=torch.zeros(601, dtype=torch.float64)),
        dict(table=torch.zeros(2, 601)),
        dict(kernel_size=5),  # the packed weights are 3x3
    ]
    for changes in runtime_errors:
        with pytest.raises(RuntimeError):
            call(**changes)
    # Packing: weights beyond int16, non-square kernels, floats.
    with pytest.raises(ValueError, match="int16"):
        IC.pack(torch.full((2, 2, 3, 3), 40000), 1, 1, False)
    with pytest.raises(RuntimeError):
        IC.pack(torch.zeros(2, 2, 3, 1, dtype=torch.int16), 1, 1, False)
    with pytest.raises(RuntimeError):
        IC.pack(torch.zeros(2, 2, 3, 3), 1, 1, False)


# ---------------------------------------------------------------------------- IntConv on the kernel
def _converted(kind, c_in, c_out, seed):
    g = torch.Generator().manual_seed(seed)
    k, stride, padding, output_padding, transposed = KINDS[kind]
    if transposed:
        layer = torch.nn.ConvTranspose2d(c_in, c_out, k, stride, padding, output_padding)
    else:
        layer = torch.nn.Conv2d(c_in, c_out, k, stride, padding)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.1)
        layer.bias.copy_(torch.randn(c_out, generator=g) * 0.1)
    return I.IntConv.convert(
        layer,
        torch.full((c_in,), 0.01, dtype=torch.float64),
        torch.full((c_in,), 2047),
        torch.full((c_out,), 0.02, dtype=torch.float64),
        torch.full((c_out,), -2047),
        torch.full((c_out,), 2047),
        weight_bits=10,
    )


@pytest.mark.parametrize("kind", ["conv3x3", "conv1x1", "deconv5x5s2", "conv3x3s2"])
def test_intconv_native_equals_the_float64_path(kind):
    conv = _converted(kind, 48, 32, seed=1)
    assert conv._runtime()["native"] is not None
    lut = I.IntLUT.tabulate(I.gelu, 0.02, 2047, 0.02, 2047)
    x = torch.randint(-2047, 2048, (2, 48, 6, 7)).float()
    pieces = [x[:, :20].contiguous(memory_format=torch.channels_last), x[:, 20:]]
    with I.float64_convolutions():
        want = conv(x, True)
        want_lut = lut(conv(x, True, lut.bound))
        want_acc = conv.accumulate(x)
    for channels_last in (False, True):
        assert torch.equal(conv(x, True, channels_last=channels_last), want)
        assert torch.equal(conv(pieces, True, table=lut, channels_last=channels_last), want_lut)
    assert torch.equal(conv(x, True, lut.bound), want + lut.bound)
    assert torch.equal(conv.accumulate(x), want_acc)
    # A table narrower than the layer's output range: the output clamped into it, as IntLUT does.
    narrow = I.IntLUT.tabulate(I.gelu, 0.02, 100, 0.02, 100)
    with I.float64_convolutions():
        want_narrow = narrow(conv(x, True))
    assert torch.equal(conv(x, True, table=narrow), want_narrow)
    # A table alone keeps a channels-last input channels-last (the next layer reads it faster).
    q = torch.randint(-3000, 3000, (2, 5, 4, 6)).float()
    q_cl = q.contiguous(memory_format=torch.channels_last)
    assert torch.equal(lut(q_cl), lut(q)) and lut(q_cl).is_contiguous(memory_format=torch.channels_last)


def test_intconv_takes_only_layers_that_fit():
    """Bounds beyond int16 (or sums beyond int32): the int8 GEMMs or float64, the same integers."""
    conv = _converted("conv3x3", 16, 8, seed=2)
    conv.in_bound.fill_(1 << 15)
    assert conv._runtime()["native"] is None
    x = torch.randint(-(1 << 15), (1 << 15) + 1, (1, 16, 5, 6)).float()
    with I.float64_convolutions():
        want = conv.accumulate(x)
    assert torch.equal(conv.accumulate(x), want)
    assert not I.int16_conv_ok(torch.device("meta"))


# ---------------------------------------------------------------------------- other processes
CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_int_conv as T
torch.set_num_threads(int(sys.argv[2]))
print(T.digest())
"""


def digest() -> str:
    """Hash of every case's outputs (accumulators, values, tables; NCHW) by the default kernels;
    each one checked against the PyTorch reference here, in whatever process runs it."""
    h = hashlib.sha256()
    for kind, c_in, c_out, act_bound, weight_bound in CASES:
        layer = Layer(kind, c_in, c_out, act_bound, weight_bound, seed=c_in + c_out)
        for x in layer.worst_inputs(2, 6, 9, seed=c_in)[2:5]:
            for mode in ("acc", "value", "table"):
                got = layer.run([x], mode)
                if not torch.equal(got.double(), layer.reference(x, mode)):
                    raise AssertionError(f"{kind} {mode}: not the reference")
                h.update(got.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "env",
    [
        {"DUALRES_CPU_KERNELS": "scalar", "threads": "1"},
        {"DUALRES_CPU_KERNELS": "avx2", "threads": "3"},
        {"DUALRES_CPU_KERNELS": "avx512", "threads": "2"},
        {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "threads": "4"},
    ],
    ids=["scalar-1thread", "avx2-3threads", "avx512-2threads", "aten-default-4threads"],
)
def test_identical_in_other_processes(env, package_env):
    kernels = env.get("DUALRES_CPU_KERNELS")
    if kernels and kernels not in SUPPORTED:
        pytest.skip(f"this CPU cannot run the {kernels} kernels")
    expected = digest()
    env = dict(env)
    n = env.pop("threads")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, os.path.dirname(os.path.abspath(__file__)), n],
        env={**package_env, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == expected
