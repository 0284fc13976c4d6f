"""The image codec: encode/decode API, container checks, weights files, CLI."""

import math
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualres_ext import codec, imageio
from dualres_ext.models import build, zoo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_testlib import TINY  # noqa: E402  (a small configuration keeps the tests fast)


def make_model(seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model = build("compact", **TINY)
    with torch.no_grad():  # larger latents: random-init weights then code many symbols
        for p in (model.gain_h, model.gain_l):
            p.add_(math.log(24.0))
        for p in (model.inv_gain_h, model.inv_gain_l):
            p.sub_(math.log(24.0))
    model.eval().update(force=True)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def photo_like(h, w, channels=3):
    """A smooth random image with some texture (not a constant)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(channels)], -1)
    noise = np.random.rand(h, w, channels)
    return np.clip(127 + 80 * base + 40 * noise, 0, 255).astype(np.uint8)


def test_round_trip_matches_forward(model):
    img = photo_like(70, 100)
    quality = 2.25
    data = codec.encode(img, quality=quality, weights=model)
    assert data[:4] == codec.MAGIC
    out = codec.decode(data, weights=model, output="tensor")
    # What forward predicts for the padded image, cropped back.
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = model(imageio.pad(x, 64), quality)["x_hat"][0, :, :70, :100].clamp(0, 1)
    assert out.shape == (3, 70, 100)
    assert torch.equal(out, expected)
    arr = codec.decode(data, weights=model, output="numpy")
    assert arr.dtype == np.uint8 and arr.shape == (70, 100, 3)
    assert np.array_equal(arr, (expected * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    pil = codec.decode(data, weights=model)
    assert pil.mode == "RGB" and pil.size == (100, 70)


def test_top_level_exports():
    import dualres_ext

    assert dualres_ext.encode is codec.encode and dualres_ext.decode is codec.decode
    from dualres_ext import decode, encode  # noqa: F401


@pytest.mark.parametrize("size", [(1, 1), (1, 70), (65, 3), (37, 5), (64, 128)])
def test_any_size(model, size):
    h, w = size
    img = photo_like(h, w)
    data = codec.encode(img, quality=1, weights=model)
    out = codec.decode(data, weights=model, output="numpy")
    assert out.shape == (h, w, 3)
    head = codec.parse_header(data)
    assert (head["width"], head["height"]) == (w, h)


def test_pad_replicates_border():
    x = torch.rand(1, 3, 5, 3)
    p = imageio.pad(x, 64)
    assert p.shape == (1, 3, 64, 64)
    assert torch.equal(p[..., :5, :3], x)
    assert torch.equal(p[..., 10, 2], x[..., 4, 2]) and torch.equal(p[..., 0, 40], x[..., 0, 2])


def test_grey_and_rgba(model):
    grey = photo_like(40, 33, 1)[:, :, 0]
    for image in (grey, Image.fromarray(grey, "L")):
        data = codec.encode(image, quality=3, weights=model)
        assert codec.parse_header(data)["grey"]
        out = codec.decode(data, weights=model)
        assert out.mode == "L" and out.size == (33, 40)
        assert codec.decode(data, weights=model, output="numpy").shape == (40, 33)
    rgb = photo_like(20, 30)
    alpha = np.random.randint(0, 256, (20, 30, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], -1)
    with pytest.warns(UserWarning, match="alpha"):
        data_a = codec.encode(rgba, quality=3, weights=model)
    with pytest.warns(UserWarning, match="alpha"):
        data_p = codec.encode(Image.fromarray(rgba, "RGBA"), quality=3, weights=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data_rgb = codec.encode(rgb, quality=3, weights=model)
    assert data_a == data_rgb == data_p


def test_tensor_inputs(model):
    img = photo_like(48, 64)
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    data = codec.encode(t, quality=4, weights=model)
    assert codec.encode(t[None], quality=4, weights=model) == data
    assert codec.encode(img, quality=4, weights=model) == data
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        codec.encode(t * 2, quality=4, weights=model)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(torch.full((3, 4, 4), float("nan")), weights=model)
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(img.astype(np.int32), weights=model)
    with pytest.raises(ValueError, match="channels"):
        codec.encode(torch.rand(5, 8, 8), weights=model)
    with pytest.raises(ValueError, match="one image"):
        codec.encode(torch.rand(2, 3, 8, 8), weights=model)
    with pytest.raises(TypeError, match="PIL image"):
        codec.encode([[1, 2]], weights=model)


def test_quality_checks(model):
    img = photo_like(8, 8)
    for bad in (-1, 5.5, float("nan")):
        with pytest.raises(ValueError, match="quality"):
            codec.encode(img, quality=bad, weights=model)
    with pytest.raises(TypeError, match="quality"):
        codec.encode(img, quality="3", weights=model)
    sizes = [len(codec.encode(photo_like(64, 64), quality=q, weights=model)) for q in (0, 5)]
    assert sizes[1] > sizes[0]


@pytest.fixture(scope="module")
def stream(model):
    return codec.encode(photo_like(64, 96), quality=2, weights=model)


def test_bad_magic_and_version(model, stream):
    with pytest.raises(codec.BitstreamError, match="magic"):
        codec.decode(b"GIF89a" + stream[6:], weights=model)
    with pytest.raises(codec.BitstreamError, match="magic"):
        codec.decode(b"", weights=model)
    bad = bytearray(stream)
    bad[4] = 99
    with pytest.raises(codec.BitstreamError, match="version 99"):
        codec.decode(bytes(bad), weights=model)
    assert codec.VERSION == 5 and stream[4] == 3  # a model without exact networks writes version 3
    bad[4] = 1  # the float32-parameter streams: refused by name, not decoded into garbage
    with pytest.raises(codec.BitstreamError, match="version 1 .*re-encode"):
        codec.decode(bytes(bad), weights=model)
    assert issubclass(codec.BitstreamError, ValueError)
    with pytest.raises(TypeError, match="bytes"):
        codec.decode("not bytes", weights=model)


def test_truncation(model, stream):
    for cut in sorted({5, 20, len(stream) // 2, len(stream) - 5, len(stream) - 1}):
        with pytest.raises(codec.BitstreamError, match="truncated|checksum"):
            codec.decode(stream[:cut], weights=model)
    with pytest.raises(codec.BitstreamError, match="trailing"):
        codec.decode(stream + b"\0", weights=model)


def test_bit_flips(model, stream):
    rng = np.random.default_rng()
    positions = rng.choice(np.arange(5, len(stream)), size=min(25, len(stream) - 5), replace=False)
    for pos in positions:
        bad = bytearray(stream)
        bad[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(codec.BitstreamError):
            codec.decode(bytes(bad), weights=model)


def test_header_fields_and_checks(model, stream):
    head = codec.parse_header(stream)
    assert head["version"] == 3 and head["quality"] == 2.0  # no exact networks: version 3
    assert head["weights_id"] == codec.weights_id(model)
    assert len(head["sections"]) == 1 + 2 + 3
    # A well-formed stream whose fields are invalid (checksum recomputed) is still rejected.
    body = bytearray(stream[:-4])
    body[6] = 0x80  # unknown flag
    with pytest.raises(codec.BitstreamError, match="flags"):
        codec.parse_header(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))


def pack_version_2(head, sections) -> bytes:
    """A version-2 stream (docs/BITSTREAM.md, "Version 2"): 26-byte header, u32 section lengths,
    sections as the entropy models write them."""
    flags = head["flags"] & (codec.FLAG_GREY | codec.FLAG_CUDA)
    body = struct.pack(
        "<4sBBBBfIIIH",
        codec.MAGIC,
        2,
        head["config_id"],
        flags,
        0,
        head["quality"],
        head["weights_id"],
        head["width"],
        head["height"],
        len(sections),
    )
    body += struct.pack(f"<{len(sections)}I", *[len(s) for s in sections]) + b"".join(sections)
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def test_sections_are_embedded_rans_streams(model):
    """Version 3 stores each native rANS stream without the fields the container implies; the
    model's symbol counts and precision 16 restore them exactly."""
    from dualres_ext import ops

    img = photo_like(64, 96)
    stream = codec.encode(img, quality=2, weights=model)
    head = codec.parse_header(stream)
    assert not head["flags"] & codec.FLAG_COMPAT
    counts = model.symbol_counts((1, 2))  # 64 x 96 pixels: z is 1 x 2
    assert counts == [model.config["Z"] * 2] + [c * 128 for c in model.coder_h.slices] + [
        c * 32 for c in model.coder_l.slices
    ]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y_h, y_l = model.analysis(imageio.pad(x, 64), 2.0)
        coded = model.compress_latents(y_h, y_l, model.hyper_analysis(y_h, y_l), lanes="multilane")
    written = [s[0] for s in coded["strings"]]
    restored = [ops.rans_restore(s, n, 16) for s, n in zip(head["sections"], counts)]
    assert restored == written
    assert [ops.rans_stream_info(s)["symbols"] for s in written] == counts
    # 8 to 17 bytes saved per section, besides the smaller header (20 bytes, was 26) and the
    # varint section lengths (were u32).
    saved = sum(len(w) - len(e) for w, e in zip(written, head["sections"]))
    assert 8 * len(written) <= saved <= 17 * len(written)
    assert len(pack_version_2(head, written)) - len(stream) >= saved + 6 + 2 * len(written)


def test_version_5_sections_are_embedded_interleaved_streams():
    """Version 5 (the shipped weights' default) stores each section as an interleaved rANS stream
    without the fields the container implies; restored, they are the model's own strings, whose
    width the encoder chose by their size."""
    from dualres_ext.ops import rans_interleaved

    shipped, _ = zoo.resolve_model(None, None)
    img = photo_like(128, 192)
    stream = codec.encode(img, quality=4)
    head = codec.parse_header(stream)
    assert head["version"] == 5 and not head["flags"] & codec.FLAG_COMPAT
    counts = shipped.symbol_counts((2, 3))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y_h, y_l = shipped.analysis(imageio.pad(x, 64), 4.0)
        written = [s[0] for s in shipped.compress_latents(y_h, y_l, shipped.hyper_analysis(y_h, y_l))["strings"]]
    restored = [rans_interleaved.restore(s, n, 16) for s, n in zip(head["sections"], counts)]
    assert restored == written
    infos = [rans_interleaved.stream_info(s) for s in written]
    assert [i["symbols"] for i in infos] == counts
    # The states of every section cost at most 0.25% of its words (W = 1 when even one state would not).
    for info in infos:
        words = 2 * sum(info["group_words"])
        assert info["width"] == 1 or 4 * info["width"] * info["groups"] <= 0.0025 * words
    # magic, version, precision, CRC-32C and the symbol count's varint: 8 + 1..3 bytes per section
    saved = sum(len(w) - len(e) for w, e in zip(written, head["sections"]))
    assert 9 * len(written) <= saved <= 11 * len(written)
    # A section that is not a valid embedded stream is refused as a corrupted bitstream.
    bad = dict(head, sections=[head["sections"][0][:1]] + head["sections"][1:])
    with pytest.raises(codec.BitstreamError, match="corrupted"):
        codec._restore_sections(shipped, bad, (2, 3))


def test_version_2_streams_still_decode(model, stream):
    head = codec.parse_header(stream)
    counts = model.symbol_counts((1, 2))
    from dualres_ext import ops

    v2 = pack_version_2(head, [ops.rans_restore(s, n, 16) for s, n in zip(head["sections"], counts)])
    assert codec.parse_header(v2)["version"] == 2
    assert np.array_equal(
        codec.decode(v2, weights=model, output="numpy"), codec.decode(stream, weights=model, output="numpy")
    )
    bad = bytearray(v2)
    bad[7] = 1  # version 2's reserved byte
    with pytest.raises(codec.BitstreamError, match="flags"):
        codec.decode(bytes(bad[:-4]) + struct.pack("<I", zlib.crc32(bytes(bad[:-4]))), weights=model)


def test_compressai_string_models_flag_their_sections(model):
    """A model built with lanes=None writes CompressAI's single-lane strings; version 3 says so in
    its flags, and a decoder coding native streams refuses them by name instead of failing in the
    entropy decoder."""
    import copy

    compat = copy.deepcopy(model)
    compat.gaussian_conditional.lanes = compat.entropy_bottleneck.lanes = None
    img = photo_like(64, 64)
    data = codec.encode(img, quality=1, weights=compat)
    head = codec.parse_header(data)
    assert head["flags"] & codec.FLAG_COMPAT
    assert np.array_equal(
        codec.decode(data, weights=compat, output="numpy"),
        codec.decode(codec.encode(img, quality=1, weights=model), weights=model, output="numpy"),
    )
    with pytest.raises(codec.BitstreamError, match="CompressAI single-lane sections.*lanes=None"):
        codec.decode(data, weights=model)
    # And a native-lanes stream decodes with a lanes=None model (native headers are recognised).
    native = codec.encode(img, quality=1, weights=model)
    assert np.array_equal(
        codec.decode(native, weights=compat, output="numpy"), codec.decode(native, weights=model, output="numpy")
    )
    compat.entropy_bottleneck.lanes = "auto"
    with pytest.raises(ValueError, match="disagree on lanes"):
        codec.encode(img, quality=1, weights=compat)


def test_weights_mismatch_is_detected(model, stream):
    other = make_model()
    with pytest.raises(codec.BitstreamError, match="other weights"):
        codec.decode(stream, weights=other)


def test_default_weights_missing(monkeypatch, tmp_path, stream):
    monkeypatch.setattr(zoo, "DEFAULT_WEIGHTS", tmp_path / "none.pt")
    with pytest.raises(codec.WeightsNotFoundError, match="weights=PATH"):
        codec.encode(photo_like(8, 8))
    with pytest.raises(codec.WeightsNotFoundError):
        codec.decode(stream)


def test_model_must_be_ready():
    m = build("compact", **TINY)
    with pytest.raises(ValueError, match="training mode"):
        codec.encode(photo_like(8, 8), weights=m)
    with pytest.raises(ValueError, match="update"):
        codec.encode(photo_like(8, 8), weights=m.eval())


def test_save_and_load_weights(tmp_path, model):
    path = tmp_path / "w.pt"
    codec.save_weights(model, path, metadata={"steps": 0})
    loaded = codec.load_weights(path)
    assert loaded.metadata == {"steps": 0} and not loaded.training
    assert loaded.config == model.config
    img = photo_like(30, 50)
    data = codec.encode(img, quality=3, weights=str(path))
    assert np.array_equal(
        codec.decode(data, weights=path, output="numpy"), codec.decode(data, weights=loaded, output="numpy")
    )
    # fp16 storage: the file is about half the size of the float32 parameters
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size < 0.7 * n_bytes + 200_000
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a"):
        codec.load_weights(tmp_path / "junk.pt")


def _cli(*args, cwd):
    env = dict(os.environ)
    root = str(Path(codec.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "dualres_ext", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_round_trip(tmp_path, model):
    weights = tmp_path / "w.pt"
    codec.save_weights(model, weights)
    img = photo_like(45, 70)
    Image.fromarray(img).save(tmp_path / "in.png")
    r = _cli("compress", "in.png", "out.drx", "--quality", "1.5", "--weights", str(weights), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bpp" in r.stdout
    r = _cli("decompress", "out.drx", "back.png", "--weights", str(weights), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = np.asarray(Image.open(tmp_path / "back.png"))
    data = (tmp_path / "out.drx").read_bytes()
    assert np.array_equal(back, codec.decode(data, weights=weights, output="numpy"))


def test_cli_errors(tmp_path, model, capsys, monkeypatch):
    """Error paths in-process (a subprocess per case would cost seconds each)."""
    from dualres_ext.__main__ import main

    weights = tmp_path / "w.pt"
    codec.save_weights(model, weights)
    Image.fromarray(photo_like(8, 8)).save(tmp_path / "in.png")
    (tmp_path / "bad.drx").write_bytes(codec.encode(photo_like(8, 8), weights=model)[:-3])
    monkeypatch.chdir(tmp_path)
    cases = [
        (["compress", "missing.png", "x.drx", "--weights", str(weights)], 1, "no such file"),
        (["compress", "w.pt", "x.drx", "--weights", str(weights)], 1, "not a readable image"),
        (["compress", "in.png", "x.drx", "--quality", "9", "--weights", str(weights)], 1, "quality"),
        (["compress", "in.png", "x.drx", "--weights", "nope.pt"], 4, "not found"),
        (["decompress", "in.png", "x.png", "--weights", str(weights)], 3, "magic"),
        (["decompress", "bad.drx", "x.png", "--weights", str(weights)], 3, "truncated"),
        (["decompress", "missing.drx", "x.png", "--weights", str(weights)], 1, "no such file"),
    ]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith("dualres: error:"), (argv, err)
    monkeypatch.setattr(zoo, "DEFAULT_WEIGHTS", tmp_path / "none.pt")
    assert main(["compress", "in.png", "x.drx"]) == 4
    assert "no trained DualRes weights" in capsys.readouterr().err


def test_cli_weights_describes_a_file(tmp_path, model, capsys, monkeypatch):
    import json

    from dualres_ext.__main__ import main

    weights = tmp_path / "w.pt"
    val = {"loss": 1.25, "per_quality": [{"bpp": 0.2 + 0.1 * q, "psnr": 28.0 + q, "loss": 0.5} for q in range(6)]}
    lineage = [
        {"step": 0, "command": "python python/train.py --first"},
        {"step": 40, "widened": {"N": 48}, "command": "python python/widen_model.py a b --N 48"},
    ]
    codec.save_weights(
        model,
        weights,
        metadata={
            "steps": 77,
            "training_command": "python python/train.py --last",
            "training_images": 3,
            "validation": val,
            "lineage": lineage,
        },
    )
    assert main(["weights", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert f"N={model.config['N']}, N1={model.config['N1']}" in out and "77 steps on 3 images" in out
    assert "validation loss 1.2500" in out and "q5 0.700 bpp / 33.00 dB" in out
    assert "  0: python python/train.py --first" in out and "  40: python python/widen_model.py a b --N 48" in out
    assert main(["weights", "--weights", str(weights), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["lineage"] == lineage and info["config"]["M_L"] == model.config["M_L"]
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["weights_id"] == codec.weights_id(codec.load_weights(weights))

    Image.fromarray(photo_like(8, 8)).save(tmp_path / "in.png")
    assert main(["weights", "--weights", str(tmp_path / "in.png")]) == 1
    assert "not a readable DualRes weights file" in capsys.readouterr().err
    assert main(["weights", "--weights", str(tmp_path / "none.pt")]) == 4
    monkeypatch.setattr(zoo, "DEFAULT_WEIGHTS", tmp_path / "none.pt")
    assert main(["weights"]) == 4
    assert "no trained DualRes weights" in capsys.readouterr().err


def test_weights_id_follows_changes(model):
    m = make_model()
    before = codec.weights_id(m)
    assert codec.weights_id(m) == before
    with torch.no_grad():
        m.g_s[0].weight[0, 0, 0, 0] += 1e-3  # an in-place change is seen
    assert codec.weights_id(m) != before
    with pytest.raises(ValueError, match="device"):
        codec.encode(photo_like(8, 8), weights=model, device="meta")
