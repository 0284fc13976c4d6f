"""Input validation of the public ops: wrong types, dtypes, devices, shapes, ranges and NaN must
come back as TypeError/ValueError naming the argument -- never a crash, a RuntimeError from the
op schema, an AttributeError, or a silently wrong result (the cases below were found by a sweep;
the first group were not caught before)."""

import math

import pytest
import torch

from dualres_ext import ans, ops

NAN = float("nan")


@pytest.fixture(scope="module")
def t():
    cdfs, lengths, offsets = ops.gaussian_cdf_tables(torch.tensor([0.2, 1.0, 4.0]))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    idx = torch.randint(0, 3, (40,), generator=gen, dtype=torch.int32)
    sym = (torch.randn(40, generator=gen) * 3).round().to(torch.int32)
    return dict(
        cdfs=cdfs,
        lengths=lengths,
        offsets=offsets,
        idx=idx,
        sym=sym,
        native=ops.rans_encode(sym, idx, cdfs, lengths, offsets),
        compat=ops.rans_encode_compat(sym, idx, cdfs, lengths, offsets),
    )


def _tab(t):
    return t["cdfs"], t["lengths"], t["offsets"]


def _u8(b):
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


x4 = lambda: torch.randn(1, 4, 5, 5)  # noqa: E731


# (name, call, expected exception, text the message must contain)
FIXED = [
    (
        "compat_stream data bytes",
        lambda t: ops.rans_decode_compat_stream(t["compat"], torch.zeros(2, dtype=torch.int64), t["idx"], *_tab(t)),
        TypeError,
        "data",
    ),
    (
        "compat_stream state list",
        lambda t: ops.rans_decode_compat_stream(_u8(t["compat"]), [0, 0], t["idx"], *_tab(t)),
        TypeError,
        "state",
    ),
    ("gdn beta list", lambda t: ops.gdn(x4(), [1.0] * 4, torch.eye(4)), TypeError, "beta"),
    ("gdn gamma list", lambda t: ops.gdn(x4(), torch.ones(4), [[0.0] * 4] * 4), TypeError, "gamma"),
    ("gdn bias list", lambda t: ops.gdn(x4(), torch.ones(4), torch.eye(4), bias=[0.0] * 4), TypeError, "bias"),
    (
        "build_indexes NaN table",
        lambda t: ops.build_indexes(torch.rand(10), torch.tensor([NAN, 1.0, 2.0])),
        ValueError,
        "scale_table",
    ),
    (
        "build_indexes NaN bound",
        lambda t: ops.build_indexes(torch.rand(10), torch.tensor([0.5, 1.0]), scale_bound=NAN),
        ValueError,
        "scale_bound",
    ),
    (
        "pmf lengths beyond int32",
        lambda t: ops.pmf_to_quantized_cdf(torch.rand(2, 5), torch.tensor([2**33, 5])),
        ValueError,
        "lengths",
    ),
    # ceil(1e9 * 6.1) wrapped in an int32 cast and came back as a 3-entry table.
    ("cdf_tables huge scale", lambda t: ops.gaussian_cdf_tables(torch.tensor([1.0, 1e9])), ValueError, "scale_table"),
    (
        "cdf_tables scale just too large",
        lambda t: ops.gaussian_cdf_tables(torch.tensor([6000.0])),
        ValueError,
        "precision",
    ),
]

ALREADY = [
    ("rans_decode idx float", lambda t: ops.rans_decode(t["native"], t["idx"].float(), *_tab(t)), TypeError, "indexes"),
    ("rans_decode idx negative", lambda t: ops.rans_decode(t["native"], t["idx"] - 1, *_tab(t)), ValueError, "indexes"),
    (
        "rans_decode idx too large",
        lambda t: ops.rans_decode(t["native"], t["idx"] + 3, *_tab(t)),
        ValueError,
        "indexes",
    ),
    (
        "rans_decode idx meta",
        lambda t: ops.rans_decode(t["native"], t["idx"].to("meta"), *_tab(t)),
        ValueError,
        "indexes",
    ),
    ("rans_decode data list", lambda t: ops.rans_decode([1, 2], t["idx"], *_tab(t)), TypeError, "data"),
    (
        "rans_decode data int64",
        lambda t: ops.rans_decode(torch.zeros(5, dtype=torch.int64), t["idx"], *_tab(t)),
        TypeError,
        "data",
    ),
    (
        "rans_decode lengths huge",
        lambda t: ops.rans_decode(t["native"], t["idx"], t["cdfs"], t["lengths"] * 1000, t["offsets"]),
        ValueError,
        "cdf_lengths",
    ),
    (
        "rans_decode lengths negative",
        lambda t: ops.rans_decode(t["native"], t["idx"], t["cdfs"], -t["lengths"], t["offsets"]),
        ValueError,
        "cdf_lengths",
    ),
    (
        "rans_decode cdfs garbage",
        lambda t: ops.rans_decode(
            t["native"],
            t["idx"],
            torch.randint(-5, 70000, t["cdfs"].shape, dtype=torch.int32),
            t["lengths"],
            t["offsets"],
        ),
        ValueError,
        "cdfs",
    ),
    (
        "rans_decode offsets shape",
        lambda t: ops.rans_decode(t["native"], t["idx"], t["cdfs"], t["lengths"], t["offsets"][:2]),
        ValueError,
        "offsets",
    ),
    (
        "rans_decode too few indexes",
        lambda t: ops.rans_decode(t["native"], t["idx"][:-1], *_tab(t)),
        ValueError,
        "symbol count",
    ),
    (
        "rans_encode symbols beyond int32",
        lambda t: ops.rans_encode(t["sym"].long() * 2**40, t["idx"], *_tab(t)),
        ValueError,
        "symbols",
    ),
    ("rans_encode lanes 0", lambda t: ops.rans_encode(t["sym"], t["idx"], *_tab(t), lanes=0), ValueError, "lanes"),
    ("rans_encode lanes float", lambda t: ops.rans_encode(t["sym"], t["idx"], *_tab(t), lanes=2.0), TypeError, "lanes"),
    ("rans_encode lanes bool", lambda t: ops.rans_encode(t["sym"], t["idx"], *_tab(t), lanes=True), TypeError, "lanes"),
    ("rans_encode shapes", lambda t: ops.rans_encode(t["sym"][:5], t["idx"], *_tab(t)), ValueError, "shape"),
    (
        "rans_encode_compat 12-bit tables",
        lambda t: ops.rans_encode_compat(
            t["sym"], t["idx"] * 0, *ops.gaussian_cdf_tables(torch.tensor([1.0]), precision=12)
        ),
        ValueError,
        "16-bit",
    ),
    (
        "rans_encode_compat value too large",
        lambda t: ops.rans_encode_compat(t["sym"] * 0 + 2**31 - 1, t["idx"], *_tab(t)),
        ValueError,
        "CompressAI",
    ),
    (
        "compat_stream state int32",
        lambda t: ops.rans_decode_compat_stream(
            _u8(t["compat"]), torch.zeros(2, dtype=torch.int32), t["idx"], *_tab(t)
        ),
        TypeError,
        "state",
    ),
    (
        "compat_stream state 3",
        lambda t: ops.rans_decode_compat_stream(
            _u8(t["compat"]), torch.zeros(3, dtype=torch.int64), t["idx"], *_tab(t)
        ),
        ValueError,
        "state",
    ),
    (
        "compat_stream state position",
        lambda t: ops.rans_decode_compat_stream(_u8(t["compat"]), torch.tensor([10**6, 2**31]), t["idx"], *_tab(t)),
        ValueError,
        "state",
    ),
    (
        "RansDecoder before set_stream",
        lambda t: ans.RansDecoder().decode_stream(t["idx"], *_tab(t)),
        ValueError,
        "set_stream",
    ),
    (
        "gdn x int",
        lambda t: ops.gdn(torch.ones(1, 4, 2, 2, dtype=torch.int32), torch.ones(4), torch.eye(4)),
        TypeError,
        "x",
    ),
    ("gdn x 3-D", lambda t: ops.gdn(torch.randn(4, 5, 5), torch.ones(4), torch.eye(4)), ValueError, "x"),
    ("gdn beta shape", lambda t: ops.gdn(x4(), torch.ones(3), torch.eye(4)), ValueError, "beta"),
    ("gdn gamma NaN", lambda t: ops.gdn(x4(), torch.ones(4), torch.full((4, 4), NAN)), ValueError, "gamma"),
    (
        "gdn bias device",
        lambda t: ops.gdn(x4(), torch.ones(4), torch.eye(4), bias=torch.empty(4, device="meta")),
        ValueError,
        "bias",
    ),
    (
        "build_indexes scales int",
        lambda t: ops.build_indexes(torch.ones(3, dtype=torch.int32), torch.tensor([0.5, 1.0])),
        TypeError,
        "scales",
    ),
    (
        "build_indexes NaN scales",
        lambda t: ops.build_indexes(torch.tensor([NAN]), torch.tensor([0.5, 1.0])),
        ValueError,
        "NaN",
    ),
    (
        "build_indexes table 2-D",
        lambda t: ops.build_indexes(torch.rand(3), torch.rand(2, 2)),
        ValueError,
        "scale_table",
    ),
    ("quantize NaN", lambda t: ops.quantize_symbols(torch.tensor([NAN])), ValueError, "NaN"),
    ("quantize beyond int32", lambda t: ops.quantize_symbols(torch.tensor([1e20])), ValueError, "int32"),
    ("quantize means shape", lambda t: ops.quantize_symbols(torch.rand(3), torch.rand(4)), ValueError, "means"),
    (
        "quantize_and_index shapes",
        lambda t: ops.quantize_and_index(torch.rand(3), torch.rand(4), torch.tensor([0.5, 1.0])),
        ValueError,
        "scales",
    ),
    ("dequantize list", lambda t: ops.dequantize([1, 2]), TypeError, "symbols"),
    ("likelihood shapes", lambda t: ops.gaussian_likelihood(torch.rand(3), torch.rand(4)), ValueError, "broadcast"),
    (
        "pmf lengths too large",
        lambda t: ops.pmf_to_quantized_cdf(torch.rand(2, 5), torch.tensor([100, 5])),
        ValueError,
        "lengths",
    ),
    ("pmf NaN", lambda t: ops.pmf_to_quantized_cdf(torch.tensor([[NAN, 0.5, 0.5]])), ValueError, "pmf"),
    ("pmf all zero", lambda t: ops.pmf_to_quantized_cdf(torch.zeros(1, 4)), ValueError, "pmf"),
    (
        "pmf too many symbols",
        lambda t: ops.pmf_to_quantized_cdf(torch.rand(1, 50), precision=1),
        ValueError,
        "precision",
    ),
    (
        "cdf_tables tail NaN",
        lambda t: ops.gaussian_cdf_tables(torch.tensor([1.0]), tail_mass=NAN),
        ValueError,
        "tail_mass",
    ),
    ("cdf_tables int table", lambda t: ops.gaussian_cdf_tables(torch.tensor([1, 2])), TypeError, "scale_table"),
]


@pytest.mark.parametrize("name,call,exc,text", FIXED + ALREADY, ids=[c[0] for c in FIXED + ALREADY])
def test_bad_input_is_refused(t, name, call, exc, text):
    with pytest.raises(exc) as info:
        call(t)
    assert text.lower() in str(info.value).lower(), str(info.value)


def test_cdf_tables_limit_is_exact():
    """The new size check refuses only what the kernel refuses: the largest scale that fits
    16 bits still builds its table, 1% more does not (and it is the long table, not a wrapped one)."""
    multiplier = -float(torch.special.ndtri(torch.tensor(1e-9 / 2, dtype=torch.float64)))
    s = (2**11 - 1) / multiplier * 0.999
    cdf, length, offset = ops.gaussian_cdf_tables(torch.tensor([s]), precision=12)
    assert int(length[0]) == 2 * math.ceil(s * multiplier) + 3 and int(offset[0]) == -math.ceil(s * multiplier)
    with pytest.raises(ValueError, match="12-bit"):
        ops.gaussian_cdf_tables(torch.tensor([s * 1.01]), precision=12)


def test_valid_edge_inputs_still_work(t):
    """Non-contiguous, 2-D, empty inputs are legal and give the right answer."""
    idx2 = t["idx"].reshape(4, 10)
    assert torch.equal(ops.rans_decode(t["native"], idx2, *_tab(t)), t["sym"].reshape(4, 10))
    wide = torch.zeros(80, dtype=torch.int32)
    wide[::2] = t["idx"]
    assert torch.equal(ops.rans_decode(t["native"], wide[::2], *_tab(t)), t["sym"])
    empty = torch.empty(0, dtype=torch.int32)
    assert ops.rans_decode(ops.rans_encode(empty, empty, *_tab(t)), empty, *_tab(t)).numel() == 0
    x = torch.randn(1, 4, 6, 10)[..., ::2]
    beta, gamma = torch.rand(4) + 0.5, torch.rand(4, 4) * 0.1
    torch.testing.assert_close(ops.gdn(x, beta, gamma), ops.gdn_reference(x, beta, gamma))
