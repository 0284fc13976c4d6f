"""The format in Pillow (open, lazy load, save, metadata), lists of images through encode/decode,
and the dataset of .drx files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

import dualres_ext
from dualres_ext import codec, container
from dualres_ext.data import DrxDataset


def picture(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1) % 256
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_open_reads_the_header_and_decodes_on_load(tmp_path):
    data = codec.encode(picture(0), quality=2)
    path = tmp_path / "a.drx"
    path.write_bytes(data)
    with Image.open(path) as img:
        assert (img.format, img.size, img.mode) == ("DRX", (80, 48), "RGB")
        assert img.tile, "pixels must not be decoded before load()"
        assert img.info["quality"] == 2
        np.testing.assert_array_equal(np.asarray(img), codec.decode(data, output="numpy"))
    grey = codec.encode(picture(1)[..., 0], quality=1)
    assert Image.open(io.BytesIO(grey)).mode == "L"
    assert Image.MIME["DRX"] == "image/x-dualres" and Image.EXTENSION[".drx"] == "DRX"


def test_save_writes_what_encode_writes(tmp_path):
    img = Image.fromarray(picture(2))
    img.save(tmp_path / "b.drx", quality=3)
    assert (tmp_path / "b.drx").read_bytes() == codec.encode(img, quality=3)
    buf = io.BytesIO()
    img.save(buf, format="DRX", max_bytes=700)
    assert len(buf.getvalue()) <= 700 and Image.open(buf).size == img.size


def test_exif_and_icc_profile_survive_the_round_trip(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "a camera maker"  # Make
    exif[0x0131] = "dualres_ext test"  # Software
    icc = srgb_profile()
    src = tmp_path / "src.png"
    Image.fromarray(picture(3)).save(src, icc_profile=icc, exif=exif)
    with Image.open(src) as img:
        img.save(tmp_path / "c.drx", quality=1)  # metadata comes from the image's info
    with Image.open(tmp_path / "c.drx") as img:
        assert img.info["icc_profile"] == icc
        assert img.getexif()[0x010F] == "a camera maker"
        img.load()
        img.save(tmp_path / "back.png")
    with Image.open(tmp_path / "back.png") as img:
        assert img.info["icc_profile"] == icc
    # explicit values win, and an empty one drops the entry
    Image.open(src).save(tmp_path / "d.drx", quality=1, exif=b"", icc_profile=b"not an ICC profile")
    assert codec.read_metadata((tmp_path / "d.drx").read_bytes()) == {"icc_profile": b"not an ICC profile"}


def test_metadata_section_rules():
    plain = codec.encode(picture(4), quality=1)
    tagged = codec.encode(picture(4), quality=1, metadata={"xmp": b"<x/>", "exif": b"Exif\0\0MM"})
    head = container.parse_header(tagged)
    assert (
        head["flags"] & container.FLAG_METADATA and not container.parse_header(plain)["flags"] & container.FLAG_METADATA
    )
    assert head["metadata"] == {"exif": b"Exif\0\0MM", "xmp": b"<x/>"}
    assert len(head["sections"]) == len(container.parse_header(plain)["sections"])
    np.testing.assert_array_equal(codec.decode(tagged, output="numpy"), codec.decode(plain, output="numpy"))
    # a reader skips the tags it does not know; a repeated or truncated entry is refused
    assert container.parse_metadata(b"\x09\x02ab\x03\x01z") == {"xmp": b"z"}
    with pytest.raises(container.BitstreamError, match="twice"):
        container.parse_metadata(b"\x03\x01z\x03\x01z")
    with pytest.raises(container.BitstreamError, match="truncated"):
        container.parse_metadata(b"\x03\x05z")
    with pytest.raises(ValueError, match="unknown entries"):
        codec.encode(picture(4), metadata={"gps": b"1"})
    with pytest.raises(TypeError, match="must be bytes"):
        codec.encode(picture(4), metadata={"exif": 5})


def test_foreign_and_damaged_files(tmp_path):
    png = io.BytesIO()
    Image.fromarray(picture(5)).save(png, format="PNG")
    assert Image.open(png).format == "PNG"
    data = bytearray(codec.encode(picture(5), quality=0))
    data[-1] ^= 0xFF
    with pytest.raises(Exception, match="cannot identify|DualRes"):
        Image.open(io.BytesIO(bytes(data)))


def test_lists_encode_and_decode_like_single_images():
    images = [picture(6), picture(7), picture(8, 40, 70), picture(9)[..., 0]]
    streams = codec.encode(images, quality=2.5)
    assert isinstance(streams, list) and len(streams) == 4
    singles = [codec.encode(img, quality=2.5) for img in images]
    for got, single in zip(streams, singles):
        # the batched analysis may round its last float32 bit differently: sizes agree closely
        assert abs(len(got) - len(single)) <= max(8, len(single) // 50)
    pictures = codec.decode(streams + singles[:1], output="numpy")
    assert [p.shape for p in pictures] == [(48, 80, 3), (48, 80, 3), (40, 70, 3), (48, 80), (48, 80, 3)]
    for stream, got in zip(streams, pictures):
        alone = codec.decode(stream, output="numpy").astype(int)
        assert np.abs(alone - got.astype(int)).max() <= 1
    per_image = codec.encode(images[:2], quality=1, metadata=[{"xmp": b"a"}, None])
    assert [codec.read_metadata(s) for s in per_image] == [{"xmp": b"a"}, {}]
    with pytest.raises(ValueError, match="2 entries for 3 images"):
        codec.encode(images[:3], metadata=[{}, {}])


def test_batches_code_and_decode_each_stream_as_alone():
    """With the exact networks a batch runs the entropy parameters and the coder for all its
    pictures at once: the same symbols and parameters as each alone, so the very same latents
    (and, from the same latents, the same streams); float64 version-3 streams too, one by one."""
    model, _ = codec.resolve_model(None, None)
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.random((3, 3, 128, 128))).float()
    with torch.no_grad():
        y_h, y_l = model.analysis(x, 2.0)
        z = model.hyper_analysis(y_h, y_l)
        batch = model.compress_latents(y_h, y_l, z)
        for b in range(3):
            alone = model.compress_latents(y_h[b : b + 1], y_l[b : b + 1], z[b : b + 1])
            assert [s[0] for s in alone["strings"]] == [s[b] for s in batch["strings"]]
    images = [picture(20, 64, 96), picture(21, 64, 96), picture(22, 60, 90)]
    streams = codec.encode(images, quality=1.5) + [codec.encode(images[0], quality=1.5, version=3)]
    heads = [codec.parse_header(s) for s in streams]
    together = codec._decode_all_latents(model, codec.weights_id(model), heads)
    for head, (got_h, got_l) in zip(heads, together):
        want_h, want_l = codec._decode_latents(model, codec.weights_id(model), [head])
        assert torch.equal(got_h, want_h) and torch.equal(got_l, want_l)
    # A damaged stream in a batch fails the batch with a BitstreamError, never silently.
    bad = bytearray(streams[1])
    bad[-30] ^= 0x20
    with pytest.raises(codec.BitstreamError):
        codec.decode([streams[0], bytes(bad)])


# Every way a tensor's values reach Python (on a GPU: a wait for the device).
_READ_BACKS = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__")


def _forbid_read_backs_in_the_slice_loop(monkeypatch, model) -> None:
    """Makes every read-back method raise while ``model``'s exact slice loop runs."""
    loop = model.exact.decode_latents

    def forbid(*args, **kwargs):
        raise AssertionError("a host read-back inside the slice loop")

    def guarded(*args, **kwargs):
        with monkeypatch.context() as m:
            for name in _READ_BACKS:
                m.setattr(torch.Tensor, name, forbid)
            return loop(*args, **kwargs)

    monkeypatch.setattr(model.exact, "decode_latents", guarded)


def test_encoder_slice_loop_never_reads_back_to_the_host(monkeypatch):
    """The encoder's slice loop (entropy parameters, indexes, quantisation) keeps its symbols where
    the model runs and reads nothing back until every slice is done: on a GPU no slice waits for
    the host. Checked on the CPU by making every read-back method raise inside the loop."""
    model, _ = codec.resolve_model(None, None)
    x = torch.from_numpy(np.random.default_rng(12).random((2, 3, 64, 128))).float()
    with torch.no_grad():
        y_h, y_l = model.analysis(x, 3.0)
        z = model.hyper_analysis(y_h, y_l)
        expected = model.compress_latents(y_h, y_l, z)  # also fills the layers' caches
    _forbid_read_backs_in_the_slice_loop(monkeypatch, model)
    with torch.no_grad():
        assert model.compress_latents(y_h, y_l, z)["strings"] == expected["strings"]
        # The symbols' range is checked after the loop: a latent that has no int32 symbol raises.
        for bad in (float("nan"), 3e9):
            broken = y_l.clone()
            broken[1, 2, 3, 4] = bad
            with pytest.raises(ValueError, match="not finite or outside the int32 range"):
                model.compress_latents(y_h, broken, z)


def test_decoder_slice_loop_never_reads_back_to_the_host(monkeypatch):
    """The decoder's slice loop decodes each slice where the model runs and leaves the streams'
    statuses there (``decode_deferred``), read once after the loop: as for the encoder, checked
    by making every read-back method raise inside the loop."""
    model, _ = codec.resolve_model(None, None)
    x = torch.from_numpy(np.random.default_rng(13).random((2, 3, 64, 128))).float()
    with torch.no_grad():
        coded = model.compress(x, 2.0)
        expected = model.decompress_latents(coded["strings"], coded["shape"])
    _forbid_read_backs_in_the_slice_loop(monkeypatch, model)
    with torch.no_grad():
        got = model.decompress_latents(coded["strings"], coded["shape"])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_dataset_decodes_in_loader_workers(tmp_path):
    for i in range(4):
        (tmp_path / "sub" if i % 2 else tmp_path).mkdir(exist_ok=True)
        ((tmp_path / "sub" if i % 2 else tmp_path) / f"{i}.drx").write_bytes(codec.encode(picture(10 + i), quality=1))
    (tmp_path / "notes.txt").write_text("not a picture")
    dataset = DrxDataset(tmp_path)
    assert len(dataset) == 4
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 48, 80)] * 2
    first = codec.decode(dataset.files[0].read_bytes(), output="tensor")
    # workers run one thread each: the float32 synthesis may round its last bits differently
    torch.testing.assert_close(batches[0][0], first, atol=1e-4, rtol=0)
    flipped = DrxDataset([dataset.files[0]], transform=lambda t: t.flip(-1))
    assert torch.equal(flipped[0], first.flip(-1))
    with pytest.raises(NotADirectoryError):
        DrxDataset(tmp_path / "missing")


def test_import_registers_the_format():
    assert "DRX" in Image.OPEN and "DRX" in Image.SAVE
    assert dualres_ext.encode is codec.encode
