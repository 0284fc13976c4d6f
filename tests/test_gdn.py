"""Fused GDN / IGDN / GDN1 kernels and the layers built on them.

References: the plain PyTorch expression evaluated in float64 (forward and autograd gradients),
and compressai.layers.GDN / GDN1 for state-dict and output compatibility.
"""

import threading
import time

import pytest
import torch

import dualres_ext
from dualres_ext import layers, ops

MODES = [(False, False), (True, False), (False, True), (True, True)]  # (inverse, simplified)
MODE_IDS = ["GDN", "IGDN", "GDN1", "IGDN1"]
SHAPES = [(2, 1, 5, 7), (3, 3, 4, 6), (1, 191, 9, 11), (2, 16, 1, 1), (1, 3, 256, 161), (4, 24, 7, 3)]


def random_params(c, gen, dtype=torch.float64):
    """Effective parameters away from CompressAI's defaults (dense, non-symmetric gamma)."""
    beta = 0.2 + torch.rand(c, generator=gen, dtype=dtype)
    gamma = 0.3 * torch.rand(c, c, generator=gen, dtype=dtype) / max(1, c) ** 0.5
    bias = 0.5 * torch.randn(c, generator=gen, dtype=dtype)
    return beta, gamma, bias


def random_input(shape, gen, bias, simplified):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if simplified:
        # |x| has a kink at 0: keep x + bias away from it, or float32 rounding may flip its sign
        # and the gradients would legitimately differ from the float64 reference.
        shifted = x + (0.0 if bias is None else bias.reshape(1, -1, 1, 1))
        x = torch.where(shifted.abs() < 1e-3, x + 0.01, x)
    return x


def reference(x, beta, gamma, bias=None, inverse=False, simplified=False):
    """GDN written out with a matmul over channels (float64 autograd through conv2d is ~50x slower)."""
    if bias is not None:
        x = x + bias.reshape(1, -1, 1, 1)
    u = x.abs() if simplified else x * x
    n = beta.reshape(1, -1, 1, 1) + (u.permute(0, 2, 3, 1) @ gamma.t()).permute(0, 3, 1, 2)
    if simplified:
        return x * n if inverse else x / n
    return x * n.sqrt() if inverse else x / n.sqrt()


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_and_gradients_match_float64(mode, shape, channels_last):
    inverse, simplified = mode
    gen = torch.Generator().manual_seed(hash((mode, shape, channels_last)) % 2**31)
    c = shape[1]
    beta, gamma, bias = random_params(c, gen)
    use_bias = shape[0] % 2 == 0  # half the cases fold a bias in
    bias = bias if use_bias else None
    x = random_input(shape, gen, bias, simplified)

    ref_in = [t.clone().requires_grad_() for t in (x, beta, gamma)]
    ref_bias = None if bias is None else bias.clone().requires_grad_()
    y_ref = reference(*ref_in, ref_bias, inverse, simplified)
    grad = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    y_ref.backward(grad)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x32 = x.float().contiguous(memory_format=fmt).requires_grad_()
    p32 = [t.float().requires_grad_() for t in (beta, gamma)]
    b32 = None if bias is None else bias.float().requires_grad_()
    y = ops.gdn(x32, *p32, b32, inverse, simplified)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(grad.float().contiguous(memory_format=fmt))

    assert rel_err(y, y_ref) < 2e-6
    assert rel_err(x32.grad, ref_in[0].grad) < 1e-5
    # Parameter gradients are float32 sums over all pixels (with cancellation): looser bound.
    assert rel_err(p32[0].grad, ref_in[1].grad) < 1e-4
    assert rel_err(p32[1].grad, ref_in[2].grad) < 1e-4
    if bias is not None:
        assert rel_err(b32.grad, ref_bias.grad) < 1e-4


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_fused_path_is_taken_and_matches_compressai_expression(mode):
    gen = torch.Generator().manual_seed(1)
    beta, gamma, bias = random_params(32, gen, torch.float32)
    x = torch.randn(2, 32, 17, 13, generator=gen).requires_grad_()
    y = ops.gdn(x, beta, gamma, bias, *mode)
    # The native op's registered autograd (GeneratedBackwardFor_dualres_ext_gdn_forward...), not the fallback.
    assert "dualres_ext_gdn_forward" in type(y.grad_fn).__name__
    expected = ops.gdn_reference(x.double(), beta.double(), gamma.double(), bias.double(), *mode)
    assert rel_err(y, expected) < 2e-6
    assert rel_err(reference(x.double(), beta.double(), gamma.double(), bias.double(), *mode), expected) < 1e-12


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_with_and_without_saved_scale_agree(mode, channels_last):
    """The training forward saves f(n) for the backward; without it the backward recomputes n."""
    gen = torch.Generator().manual_seed(8)
    beta, gamma, bias = (t.float() for t in random_params(37, gen))
    x = random_input((2, 37, 11, 13), gen, bias.double(), mode[1]).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=gen)
    y, scale = torch.ops.dualres_ext.gdn_forward_save(x, beta, gamma, bias, *mode)
    assert torch.equal(y, torch.ops.dualres_ext.gdn_forward(x, beta, gamma, bias, *mode))
    with_scale = torch.ops.dualres_ext.gdn_backward(g, x, beta, gamma, bias, scale, *mode)
    without = torch.ops.dualres_ext.gdn_backward(g, x, beta, gamma, bias, None, *mode)
    for a, b in zip(with_scale, without):
        assert rel_err(a, b) < 1e-6


def test_non_contiguous_input_and_grad():
    gen = torch.Generator().manual_seed(2)
    beta, gamma, _ = random_params(6, gen)
    base = torch.randn(2, 6, 9, 8, generator=gen, dtype=torch.float64)
    x = base.float().transpose(2, 3).requires_grad_()  # neither NCHW- nor channels-last-contiguous
    y = ops.gdn(x, beta.float(), gamma.float())
    assert rel_err(y, reference(base.transpose(2, 3), beta, gamma)) < 2e-6
    g = torch.randn(2, 6, 9, 8, generator=gen).transpose(2, 3)  # non-contiguous grad, like x
    y.backward(g)
    xr = base.transpose(2, 3).clone().requires_grad_()
    reference(xr, beta, gamma).backward(g.double())
    assert rel_err(x.grad, xr.grad) < 1e-5


def test_float64_falls_back_to_reference():
    gen = torch.Generator().manual_seed(3)
    beta, gamma, bias = random_params(5, gen)
    x = torch.randn(1, 5, 4, 4, generator=gen, dtype=torch.float64)
    y = ops.gdn(x, beta, gamma, bias, inverse=True)
    assert y.dtype == torch.float64
    assert torch.allclose(y, ops.gdn_reference(x, beta, gamma, bias, inverse=True))


@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_forward(channels_last):
    gen = torch.Generator().manual_seed(4)
    beta, gamma, bias = (t.float() for t in random_params(12, gen))
    x = torch.randn(2, 12, 10, 9, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = ops.gdn(x, beta, gamma, bias)
    with torch.no_grad():
        xi = x.clone()
        out = ops.gdn(xi, beta, gamma, bias, inplace=True)
    assert out.data_ptr() == xi.data_ptr()
    assert torch.equal(out, expected)
    # When autograd records, inplace is ignored: x stays intact and gradients still flow.
    xg = x.clone().requires_grad_()
    out = ops.gdn(xg, beta, gamma, bias, inplace=True)
    assert out.data_ptr() != xg.data_ptr() and torch.equal(xg.detach(), x)


def test_module_inplace_flag_in_sequential():
    torch.manual_seed(9)
    plain = torch.nn.Sequential(layers.conv(3, 8), layers.GDN(8))
    fast = torch.nn.Sequential(layers.conv(3, 8), layers.GDN(8, inplace=True))
    fast.load_state_dict(plain.state_dict(), strict=True)  # same keys
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
    xg = x.clone().requires_grad_()
    fast(xg).sum().backward()  # with autograd the flag is ignored: gradients still flow
    assert xg.grad is not None and fast[1].gamma.grad is not None


# ---- compatibility with CompressAI ---------------------------------------------------------

try:  # the CUDA tests above and below must run on a GPU machine without compressai
    import compressai.layers as compressai_layers
except ImportError:
    compressai_layers = None
needs_compressai = pytest.mark.skipif(compressai_layers is None, reason="needs compressai")


@needs_compressai
@pytest.mark.parametrize("simplified", [False, True], ids=["GDN", "GDN1"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compressai_state_dict_loads_and_matches(simplified, inverse, channels_last):
    c = 24
    theirs = (compressai_layers.GDN1 if simplified else compressai_layers.GDN)(c, inverse=inverse)
    with torch.no_grad():  # non-default stored parameters, some below the lower bound
        theirs.beta.uniform_(-0.1, 1.5)
        theirs.gamma.uniform_(-0.05, 0.3)
    ours = (layers.GDN1 if simplified else layers.GDN)(c, inverse=inverse)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)

    x = torch.randn(2, c, 13, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    assert rel_err(yb, ya) < 1e-5
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert rel_err(xb.grad, xa.grad) < 1e-4
    # Gradients reach the *stored* parameters through the same reparametrisation / LowerBound.
    assert rel_err(ours.beta.grad, theirs.beta.grad) < 1e-4
    assert rel_err(ours.gamma.grad, theirs.gamma.grad) < 1e-4
    assert torch.equal(ours.beta.grad == 0, theirs.beta.grad == 0)


@needs_compressai
def test_fresh_module_equals_compressai_default_init():
    theirs, ours = compressai_layers.GDN(7, inverse=True), layers.GDN(7, inverse=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


# ---- blocks ------------------------------------------------------------------------------


def test_conv_deconv_shapes():
    assert layers.conv(3, 8)(torch.randn(1, 3, 32, 48)).shape == (1, 8, 16, 24)
    assert layers.deconv(8, 3, stride=4, kernel_size=9)(torch.randn(1, 8, 5, 6)).shape == (1, 3, 20, 24)


# ---- errors --------------------------------------------------------------------------------


def test_bad_inputs_raise():
    m = layers.GDN(4)
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(1, 3, 5, 5))
    beta, gamma = m.effective_params()
    with pytest.raises(TypeError, match="floating point"):
        ops.gdn(torch.ones(1, 4, 2, 2, dtype=torch.int32), beta, gamma)
    with pytest.raises(ValueError, match="gamma must have shape"):
        ops.gdn(torch.randn(1, 4, 2, 2), beta, gamma[:3])
    with pytest.raises(ValueError, match="beta must have shape"):
        ops.gdn(torch.randn(1, 4, 2, 2), beta[:2], gamma)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.gdn(torch.randn(1, 4, 2, 2), beta, gamma, torch.zeros(5))
    with pytest.raises(ValueError, match="gamma contains NaN"):
        ops.gdn(torch.randn(1, 4, 2, 2), beta, gamma.detach().clone().fill_(float("nan")))
    with torch.no_grad():
        m.beta[1] = float("inf")
    with pytest.raises(ValueError, match="beta contains NaN or Inf"):
        m(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="in_channels"):
        layers.GDN(-1)
    with pytest.raises(ValueError, match="beta_min"):
        layers.GDN(3, beta_min=0.0)
    # The C++ kernels check what reaches them directly through torch.ops as well.
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.dualres_ext.gdn_forward(
            torch.randn(1, 4, 2, 2, dtype=torch.float64), beta.detach(), gamma.detach(), None, False, False
        )
    with pytest.raises(RuntimeError, match="gamma"):
        torch.ops.dualres_ext.gdn_forward(
            torch.randn(1, 4, 2, 2), beta.detach(), gamma.detach()[:, :3], None, False, False
        )


def test_empty_batch():
    beta, gamma = torch.ones(3), torch.eye(3) * 0.1
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = ops.gdn(x, beta.requires_grad_(), gamma.requires_grad_())
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(gamma.grad, torch.zeros(3, 3))


def test_op_releases_the_gil():
    x = torch.randn(1, 96, 256, 256)
    beta, gamma = torch.ones(96), torch.eye(96) * 0.1
    started, elapsed = threading.Event(), []

    def work():
        started.set()
        t = time.perf_counter()
        torch.ops.dualres_ext.gdn_forward(x, beta, gamma, None, False, False)
        elapsed.append(time.perf_counter() - t)

    th = threading.Thread(target=work)
    th.start()
    started.wait()
    ticks = []
    while th.is_alive():
        ticks.append(time.perf_counter())
    th.join()
    # Holding the GIL, the kernel would freeze this loop for its whole duration.
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 100 and max(gaps, default=0.0) < 0.5 * elapsed[0]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("shape", [(2, 0, 4, 5), (0, 0, 3, 3), (0, 3, 4, 5), (2, 3, 0, 5)])
def test_empty_input_forward_backward(mode, shape):
    """No channels or no pixels: empty output, empty dx, zero parameter gradients (no kernel runs)."""
    inverse, simplified = mode
    c = shape[1]
    x = torch.zeros(shape, requires_grad=True)
    beta, gamma, bias = (t.float().requires_grad_() for t in random_params(c, torch.Generator().manual_seed(0)))
    y = ops.gdn(x, beta, gamma, bias, inverse, simplified)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(beta.grad, torch.zeros(c)) and torch.equal(gamma.grad, torch.zeros(c, c))
    assert torch.equal(bias.grad, torch.zeros(c))


@pytest.mark.parametrize("cls", [layers.GDN, layers.GDN1])
@pytest.mark.parametrize("inverse", [False, True])
def test_empty_channels_module(cls, inverse):
    m = cls(0, inverse=inverse)
    x = torch.randn(2, 0, 4, 5, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_matches_cpu(mode, dtype, channels_last):
    assert dualres_ext.build_info()["cuda"], "CUDA GPU present but the extension was built without CUDA"
    inverse, simplified = mode
    gen = torch.Generator().manual_seed(7)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for shape in ((2, 3, 5, 7), (1, 191, 19, 23), (3, 1, 1, 1), (1, 192, 64, 96)):
        c = shape[1]
        beta, gamma, bias = (t.float() for t in random_params(c, gen))
        x = random_input(shape, gen, bias.double(), simplified).to(dtype).float()  # representable in dtype
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xc = x.clone().requires_grad_()
        pc = [t.clone().requires_grad_() for t in (beta, gamma, bias)]
        y_cpu = ops.gdn(xc, *pc, inverse, simplified)
        g = torch.randn(y_cpu.shape, generator=gen).to(dtype).float()
        y_cpu.backward(g)

        xg = x.cuda().to(dtype).contiguous(memory_format=fmt).requires_grad_()
        pg = [t.cuda().requires_grad_() for t in (beta, gamma, bias)]
        y = ops.gdn(xg, *pg, inverse, simplified)
        assert y.dtype == dtype and "dualres_ext_gdn_forward" in type(y.grad_fn).__name__
        y.backward(g.cuda().to(dtype))
        assert rel_err(y.float().cpu(), y_cpu) < tol
        assert rel_err(xg.grad.float().cpu(), xc.grad) < 5 * tol
        for a, b in zip(pg, pc):
            assert rel_err(a.grad.cpu(), b.grad) < 5 * tol
        with torch.no_grad():
            xi = x.cuda().to(dtype).contiguous(memory_format=fmt)
            out = ops.gdn(xi, beta.cuda(), gamma.cuda(), bias.cuda(), inverse, simplified, inplace=True)
            assert out.data_ptr() == xi.data_ptr()
            assert rel_err(out.float().cpu(), y_cpu) < tol


@needs_compressai
@pytest.mark.cuda
def test_cuda_module_matches_compressai():
    theirs = compressai_layers.GDN(64).cuda()
    with torch.no_grad():
        theirs.gamma.uniform_(0.0, 0.3)
    ours = layers.GDN(64).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 64, 31, 33, device="cuda")
    assert rel_err(ours(x), theirs(x)) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("c", [0, 1, 320, 4096])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_channel_counts(c, mode, channels_last):
    """No channels (returns empty results, not a division by zero), a model's width, and the most
    channels the CUDA kernels take (4096: one pixel per tile), forward and backward against the CPU."""
    inverse, simplified = mode
    gen = torch.Generator().manual_seed(11)
    beta, gamma, bias = (t.float() for t in random_params(c, gen))
    shape = (2, c, 3, 5) if c <= 320 else (1, c, 2, 3)
    x = random_input(shape, gen, bias.double(), simplified).float()
    xc = x.clone().requires_grad_()
    pc = [t.clone().requires_grad_() for t in (beta, gamma, bias)]
    y_cpu = ops.gdn(xc, *pc, inverse, simplified)
    g = torch.randn(shape, generator=gen)
    y_cpu.backward(g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xg = x.cuda().contiguous(memory_format=fmt).requires_grad_()
    pg = [t.cuda().requires_grad_() for t in (beta, gamma, bias)]
    y = ops.gdn(xg, *pg, inverse, simplified)
    y.backward(g.cuda())
    torch.cuda.synchronize()
    assert y.shape == shape and xg.grad.shape == shape
    if c == 0:
        for p in pg:
            assert p.grad.numel() == 0
        return
    assert rel_err(y.cpu(), y_cpu) < 1e-5
    assert rel_err(xg.grad.cpu(), xc.grad) < 5e-5
    for a, b in zip(pg, pc):
        assert rel_err(a.grad.cpu(), b.grad) < 5e-5


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [layers.GDN, layers.GDN1])
def test_cuda_empty_channels_module(cls):
    m = cls(0).cuda()
    x = torch.randn(2, 0, 4, 5, device="cuda", requires_grad=True)
    y = m(x)
    y.sum().backward()
    torch.cuda.synchronize()
    assert y.shape == x.shape and x.grad.shape == x.shape
