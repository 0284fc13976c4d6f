"""CUDA native rANS (csrc/rans/cuda): byte identity with the CPU coder, cross-decoding, batches,
escapes, empty/tiny inputs, many lanes, hostile streams.

Every test but the first needs a GPU (marked ``cuda``; tests/conftest.py skips them without one).
The random helpers are the CPU tests' (tests/rans_testlib.py), so both sides see the same inputs.
"""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dualres_ext
from dualres_ext import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rans_testlib import gaussian_workload, hostile_variants, random_symbols, random_tables, reseal_native  # noqa: E402

CUDA_OPS = ("rans_encode", "rans_decode", "rans_encode_batch", "rans_decode_batch")


def test_cuda_build_registers_cuda_kernels():
    """A CUDA build must expose CUDA kernels for the native stream ops; a CPU build must not."""
    has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"dualres_ext::{op}", "CUDA") for op in CUDA_OPS}
    if dualres_ext.build_info()["cuda"]:
        assert all(has.values()), has
    else:
        assert not any(has.values()), has


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_gpu_schedule_emulated_on_the_host(tmp_path):
    """The CUDA coder's lane plans and per-thread bodies (csrc/rans/rans_lanes.h), run in host loops:
    byte identity with the CPU encoder on batches, worst-case scratch, corrupt lanes (ASan)."""
    src = os.path.join(ROOT, "csrc", "rans", "tests", "test_rans_lanes.cpp")
    exe = str(tmp_path / "test_rans_lanes")
    base = ["g++", "-std=c++20", "-O1", "-g", "-Wall", "-Wextra", "-Werror", src, "-o", exe]
    sanitized = base[:-3] + ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"] + base[-3:]
    if subprocess.run(sanitized, capture_output=True).returncode != 0:
        subprocess.run(base, check=True, capture_output=True)  # no sanitizer runtime here
    r = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all tests passed" in r.stdout


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g


def design_workload(gen, n_ch=320):
    """A 320 x 48 x 32 latent: CompressAI's Gaussian tables when compressai is installed (the GPU
    machine may not have it), else the same tables from dualres_ext's own ops."""
    try:
        import compressai  # noqa: F401
    except ImportError:
        table = torch.exp(torch.linspace(math.log(0.11), math.log(256), 64))
        cdfs, lengths, offsets = ops.gaussian_cdf_tables(table)
        lo, hi = math.log(0.11), math.log(20.0)
        scales = torch.exp(torch.rand(1, n_ch, 48, 32, generator=gen) * (hi - lo) + lo)
        sym = torch.round(torch.randn(1, n_ch, 48, 32, generator=gen) * scales).int()
        return sym, ops.build_indexes(scales, table), cdfs.int(), lengths.int(), offsets.int()
    return gaussian_workload(gen, n_ch=n_ch)


def cuda(*tensors):
    return [t.cuda() for t in tensors]


def check_identity(sym, idx, cdfs, lengths, offsets, lanes):
    """GPU and CPU write the same bytes; each decodes the other's; returns the stream."""
    cpu_bytes = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=lanes)
    g_sym, g_idx, g_cdfs, g_lengths, g_offsets = cuda(sym, idx, cdfs, lengths, offsets)
    gpu_bytes = ops.rans_encode(g_sym, g_idx, g_cdfs, g_lengths, g_offsets, lanes=lanes)
    assert isinstance(gpu_bytes, bytes)
    assert gpu_bytes == cpu_bytes, f"GPU stream differs from the CPU's ({len(gpu_bytes)} vs {len(cpu_bytes)} bytes)"
    on_gpu = ops.rans_decode(cpu_bytes, g_idx, g_cdfs, g_lengths, g_offsets)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.int32 and on_gpu.shape == idx.shape
    assert torch.equal(on_gpu.cpu(), sym)
    assert torch.equal(ops.rans_decode(gpu_bytes, idx, cdfs, lengths, offsets), sym)
    return gpu_bytes


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(0,), (1,), (2,), (3, 5), (1, 7, 9, 11), (70001,)])
@pytest.mark.parametrize("lanes", [None, 1, 3, 64, 100000])
def test_byte_identity_and_cross_decoding_random_tables(gen, shape, lanes):
    for precision in (16, 11, 1):
        cdfs, lengths, offsets = random_tables(gen, int(torch.randint(1, 12, (1,), generator=gen)), precision)
        sym, idx = random_symbols(gen, cdfs, lengths, offsets, shape)
        check_identity(sym, idx, cdfs, lengths, offsets, lanes)


@pytest.mark.cuda
@pytest.mark.parametrize("lanes", [None, 1, 64, 1024, 65536])
def test_byte_identity_design_workload(gen, lanes):
    sym, idx, cdfs, lengths, offsets = design_workload(gen, n_ch=320)
    data = check_identity(sym, idx, cdfs, lengths, offsets, lanes)
    assert data[4] == 4  # 4 interleaved states, as the CPU encoder writes
    if lanes is not None:
        assert ops.rans_stream_info(data)["lanes"] == lanes


@pytest.mark.cuda
def test_low_entropy_auto_lanes_reencode_identical(gen):
    # Exercises the "fewer lanes when the payload is small" re-encode on both sides.
    sym, idx, cdfs, lengths, offsets = design_workload(gen, n_ch=320)
    idx = torch.zeros_like(idx)
    sym = torch.where(torch.rand(sym.shape, generator=gen) < 1e-4, 1, 0).int()
    check_identity(sym, idx, cdfs, lengths, offsets, None)


@pytest.mark.cuda
def test_escapes_everywhere(gen):
    cdfs, lengths, offsets = random_tables(gen, 5, 16, max_len=6)
    n = 50000
    idx = torch.randint(0, 5, (n,), generator=gen, dtype=torch.int32)
    # Every symbol outside its table: large magnitudes of both signs and the int32 extremes.
    sym = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
    sym[::7] = 2**31 - 1
    sym[3::7] = -(2**31)
    sym[5::7] = offsets[idx[5::7].long()].long() - 1 - torch.randint(0, 100, (len(sym[5::7]),), generator=gen)
    for lanes in (None, 1, 17):
        check_identity(sym.int(), idx, cdfs, lengths, offsets, lanes)


@pytest.mark.cuda
def test_many_lanes(gen):
    cdfs, lengths, offsets = random_tables(gen, 8)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (150000,))
    for lanes in (5000, 65536, 150000):  # 150000 is capped at 65536 on both sides
        data = check_identity(sym, idx, cdfs, lengths, offsets, lanes)
        assert ops.rans_stream_info(data)["lanes"] == min(lanes, 65536)


@pytest.mark.cuda
def test_batch_matches_single_streams(gen):
    sym0, idx0, cdfs, lengths, offsets = design_workload(gen, n_ch=64)
    shapes = [(1, 64, 48, 32), (0,), (1,), (3, 1000), (1, 192, 16, 24)]
    syms, idxs = [], []
    for shape in shapes:
        n = int(torch.tensor(shape).prod()) if shape != (0,) else 0
        take = torch.randint(0, sym0.numel(), (n,), generator=gen)
        syms.append(sym0.reshape(-1)[take].reshape(shape))
        idxs.append(idx0.reshape(-1)[take].reshape(shape))
    for lanes in (None, 7):
        expected = [ops.rans_encode(s, i, cdfs, lengths, offsets, lanes=lanes) for s, i in zip(syms, idxs)]
        g_tables = cuda(cdfs, lengths, offsets)
        got = ops.rans_encode_batch(cuda(*syms), cuda(*idxs), *g_tables, lanes=lanes)
        assert got == expected
        decoded = ops.rans_decode_batch(expected, cuda(*idxs), *g_tables)
        for d, s in zip(decoded, syms):
            assert d.device.type == "cuda" and d.shape == s.shape and torch.equal(d.cpu(), s)
    assert ops.rans_encode_batch([], [], *cuda(cdfs, lengths, offsets)) == []


@pytest.mark.cuda
def test_tables_of_mixed_precision_follow_the_cpu_rule(gen):
    # Rows 0-2 have 16-bit precision, rows 3-5 11-bit, row 6 is invalid (never used): each stream
    # only uses rows of one precision, which the CPU accepts; the GPU must agree byte for byte.
    c16, l16, o16 = random_tables(gen, 3, 16, max_len=20)
    c11, l11, o11 = random_tables(gen, 3, 11, max_len=20)
    cdfs = torch.zeros(7, 24, dtype=torch.int32)
    cdfs[0:3, : c16.shape[1]] = c16
    cdfs[3:6, : c11.shape[1]] = c11
    cdfs[6, :3] = torch.tensor([0, 5, 3])  # not increasing: invalid
    lengths = torch.cat([l16, l11, torch.tensor([3], dtype=torch.int32)])
    offsets = torch.cat([o16, o11, torch.tensor([0], dtype=torch.int32)])
    sa, ia = random_symbols(gen, c16, l16, o16, (5000,))
    sb, ib = random_symbols(gen, c11, l11, o11, (3000,))
    ib = ib + 3
    expected = [ops.rans_encode(s, i, cdfs, lengths, offsets) for s, i in ((sa, ia), (sb, ib))]
    g_tables = cuda(cdfs, lengths, offsets)
    assert ops.rans_encode_batch(cuda(sa, sb), cuda(ia, ib), *g_tables) == expected
    out = ops.rans_decode_batch(expected, cuda(ia, ib), *g_tables)
    assert torch.equal(out[0].cpu(), sa) and torch.equal(out[1].cpu(), sb)
    with pytest.raises(ValueError, match="increasing"):
        ops.rans_encode(*cuda(sa, torch.full_like(ia, 6)), *g_tables)


@pytest.mark.cuda
def test_hostile_streams_raise_value_error_not_device_faults(gen):
    cdfs, lengths, offsets = random_tables(gen, 6)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (20000,))
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=5)
    g_idx, g_cdfs, g_lengths, g_offsets = cuda(idx, cdfs, lengths, offsets)
    for what, bad in hostile_variants(data, gen):
        with pytest.raises(ValueError):
            ops.rans_decode(bad, g_idx, g_cdfs, g_lengths, g_offsets)
            pytest.fail(f"{what}: decoded without error")
    with pytest.raises(ValueError, match="symbol count"):
        ops.rans_decode(data, g_idx[:-1], g_cdfs, g_lengths, g_offsets)
    # Corrupt lane bytes behind a valid header and CRC (the CRC is recomputed): only the lane
    # decoder's own checks stand between these bytes and the GPU's memory.
    for _ in range(30):
        b = bytearray(data)
        pos = int(torch.randint(len(b) - 200, len(b), (1,), generator=gen))
        b[pos:] = os.urandom(len(b) - pos)
        try:
            out = ops.rans_decode(reseal_native(bytes(b)), g_idx, g_cdfs, g_lengths, g_offsets)
            assert out.shape == idx.shape  # an undetectable change decodes to some other symbols
        except ValueError:
            pass
    torch.cuda.synchronize()  # a device fault would surface here (and poison the context)
    assert torch.equal(ops.rans_decode(data, g_idx, g_cdfs, g_lengths, g_offsets).cpu(), sym)


def test_resealed_corrupt_lanes_on_cpu(gen):
    """The reseal helper reproduces valid streams, and the CPU decoder survives corrupt lanes
    behind a valid CRC (the same inputs the GPU test feeds its decoder)."""
    cdfs, lengths, offsets = random_tables(gen, 6)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (3000,))
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=3)
    assert reseal_native(data) == data
    errors = 0
    for _ in range(20):
        b = bytearray(data)
        pos = int(torch.randint(len(b) - 100, len(b), (1,), generator=gen))
        b[pos:] = os.urandom(len(b) - pos)
        try:
            ops.rans_decode(reseal_native(bytes(b)), idx, cdfs, lengths, offsets)
        except ValueError:
            errors += 1
    assert errors >= 15  # garbage lane tails are nearly always detected by the lane checks


@pytest.mark.cuda
def test_bad_indexes_and_devices(gen):
    cdfs, lengths, offsets = random_tables(gen, 3)
    sym, idx = random_symbols(gen, cdfs, lengths, offsets, (1000,), escapes=False)
    g_sym, g_idx, g_cdfs, g_lengths, g_offsets = cuda(sym, idx, cdfs, lengths, offsets)
    for bad in (3, -1):
        b_idx = g_idx.clone()
        b_idx[517] = bad
        with pytest.raises(ValueError, match="indexes"):
            ops.rans_encode(g_sym, b_idx, g_cdfs, g_lengths, g_offsets)
        data = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
        with pytest.raises(ValueError, match="indexes"):
            ops.rans_decode(data, b_idx, g_cdfs, g_lengths, g_offsets)
    with pytest.raises(ValueError, match="one device"):
        ops.rans_encode(g_sym, g_idx, cdfs, lengths, offsets)
    with pytest.raises(ValueError, match="one device"):
        ops.rans_encode(g_sym, idx, g_cdfs, g_lengths, g_offsets)
    # The stream may also live on the device.
    data = ops.rans_encode(sym, idx, cdfs, lengths, offsets)
    g_data = torch.frombuffer(bytearray(data), dtype=torch.uint8).cuda()
    assert torch.equal(ops.rans_decode(g_data, g_idx, g_cdfs, g_lengths, g_offsets).cpu(), sym)


@pytest.mark.cuda
def test_runs_on_the_current_stream(gen):
    sym, idx, cdfs, lengths, offsets = design_workload(gen, n_ch=64)
    expected = ops.rans_encode(sym, idx, cdfs, lengths, offsets, lanes=32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        g = cuda(sym, idx, cdfs, lengths, offsets)
        data = ops.rans_encode(*g, lanes=32)
        out = ops.rans_decode(data, g[1], *g[2:])
    side.synchronize()
    assert data == expected and torch.equal(out.cpu(), sym)


def test_batch_wrappers_on_the_cpu(gen):
    """The batch API also works on CPU tensors (a loop over the single-stream op)."""
    cdfs, lengths, offsets = random_tables(gen, 5)
    pairs = [random_symbols(gen, cdfs, lengths, offsets, shape) for shape in ((0,), (7,), (40, 50))]
    syms, idxs = [p[0] for p in pairs], [p[1] for p in pairs]
    datas = ops.rans_encode_batch(syms, idxs, cdfs, lengths, offsets, lanes=3)
    assert datas == [ops.rans_encode(s, i, cdfs, lengths, offsets, lanes=3) for s, i in pairs]
    outs = ops.rans_decode_batch(datas, idxs, cdfs, lengths, offsets)
    assert all(torch.equal(o, s) for o, s in zip(outs, syms))
    with pytest.raises(ValueError, match="same length"):
        ops.rans_encode_batch(syms, idxs[:2], cdfs, lengths, offsets)
    with pytest.raises(ValueError, match="same length"):
        ops.rans_decode_batch(datas[:1], idxs, cdfs, lengths, offsets)
