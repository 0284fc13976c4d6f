"""The main job: compress the bundled photo with DualRes at a few qualities and compare with
JPEG and WebP at the same file size (``python -m dualres_ext demo``).

Besides the reconstructions, the demo writes ``side_by_side.png`` (:func:`side_by_side`): the
original and the middle quality's DualRes, JPEG and WebP pictures at full size, and under them
the same detail region of each, enlarged (nearest neighbour) so that the codecs' artefacts show.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..codec import decode, encode, resolve_model
from ..models.refine import check_refinement
from .classic import available_codecs, match_size
from .metrics import psnr

BUNDLED_PHOTO = Path(__file__).resolve().parent.parent / "assets" / "astronaut.png"


MARGIN = 8  # pixels between the panels of side_by_side.png and around them
DETAIL_COLOUR = (230, 30, 30)  # the frame that marks the detail region on the original


def _font(size: int):
    """Pillow's bundled scalable font at ``size`` pixels (Pillow >= 10.1 with FreeType); older or
    FreeType-less builds get the small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # no size argument (old Pillow) or no FreeType
        return ImageFont.load_default()


def detail_window(
    rgb: np.ndarray, reconstructions: Sequence[np.ndarray], width: int, height: int, step: int = 4
) -> Tuple[int, int]:
    """Top-left ``(x, y)`` of the ``width`` x ``height`` window where the reconstructions' summed
    squared error is largest: where the codecs have to give up the most detail, which is where
    their differences show. All reconstructions count alike (no codec's errors are preferred).
    Candidate positions are ``step`` pixels apart."""
    h, w = rgb.shape[:2]
    width, height = min(width, w), min(height, h)
    ref = rgb.astype(np.float64)
    err = np.zeros((h, w))
    for rec in reconstructions:
        err += ((rec.astype(np.float64) - ref) ** 2).sum(axis=2)
    # Window sums from the integral image, at every candidate position.
    integral = np.pad(err, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    ys = np.arange(0, h - height + 1, step)
    xs = np.arange(0, w - width + 1, step)
    sums = (
        integral[ys[:, None] + height, xs[None, :] + width]
        - integral[ys[:, None], xs[None, :] + width]
        - integral[ys[:, None] + height, xs[None, :]]
        + integral[ys[:, None], xs[None, :]]
    )
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(xs[ix]), int(ys[iy])


def side_by_side(
    rgb: np.ndarray, views: Sequence[Tuple[str, str, np.ndarray]], zoom: Optional[int] = None
) -> Tuple[Image.Image, dict]:
    """The comparison picture and its layout.

    ``views``: ``(title, figures, reconstruction)`` per codec (e.g. ``("DualRes q2", "0.408 bpp,
    31.69 dB", rec)``), shown after the original. Row one: every picture at full size, each under
    a two-line label, the detail region framed on the original. Row two: that region of each
    (:func:`detail_window`) enlarged ``zoom`` times with nearest-neighbour sampling (default 3,
    or 2 for pictures under 384 pixels on the short side), the same size as the full views,
    labelled with the region's PSNR.

    Returns ``(image, layout)``; ``layout``: ``"box"`` (x, y, width, height of the region in the
    picture), ``"zoom"``, ``"full"`` and ``"crops"`` (the top-left corner of each picture, original
    first, in the comparison image), ``"label_height"``.
    """
    h, w = rgb.shape[:2]
    if zoom is None:
        zoom = 3 if min(h, w) >= 384 else 2
    cw, ch = max(1, w // zoom), max(1, h // zoom)
    x0, y0 = detail_window(rgb, [rec for _, _, rec in views], cw, ch)
    font_size = int(np.clip(w // 24, 11, 22))
    font = _font(font_size)
    line = font_size + 4
    label_h = 2 * line + 4
    panels = [("original", f"{w}x{h}", rgb)] + list(views)
    cols = len(panels)
    sheet_w = MARGIN + cols * (w + MARGIN)
    row_h = label_h + max(h, ch * zoom)
    sheet = Image.new("RGB", (sheet_w, MARGIN + 2 * (row_h + MARGIN)), "white")
    draw = ImageDraw.Draw(sheet)
    layout = {"box": (x0, y0, cw, ch), "zoom": zoom, "full": [], "crops": [], "label_height": label_h}
    for i, (title, figures, img) in enumerate(panels):
        x = MARGIN + i * (w + MARGIN)
        # Row one: the whole picture.
        top = MARGIN
        draw.text((x + 2, top), title, fill="black", font=font)
        draw.text((x + 2, top + line), figures, fill=(60, 60, 60), font=font)
        sheet.paste(Image.fromarray(img), (x, top + label_h))
        layout["full"].append((x, top + label_h))
        # Row two: the detail region, enlarged.
        top = MARGIN + row_h + MARGIN
        crop = img[y0 : y0 + ch, x0 : x0 + cw]
        detail = (
            f"{cw}x{ch} px at ({x0}, {y0}), framed above"
            if i == 0
            else f"PSNR here {_psnr_text(rgb[y0 : y0 + ch, x0 : x0 + cw], crop)}"
        )
        draw.text((x + 2, top), f"{title}: detail {zoom}x", fill="black", font=font)
        draw.text((x + 2, top + line), detail, fill=(60, 60, 60), font=font)
        sheet.paste(Image.fromarray(crop).resize((cw * zoom, ch * zoom), Image.NEAREST), (x, top + label_h))
        layout["crops"].append((x, top + label_h))
    # Frame the region on the original (outside it, so that the region itself stays visible).
    fx, fy = layout["full"][0]
    draw.rectangle((fx + x0 - 2, fy + y0 - 2, fx + x0 + cw + 1, fy + y0 + ch + 1), outline=DETAIL_COLOUR, width=2)
    return sheet, layout


def _psnr_text(a: np.ndarray, b: np.ndarray) -> str:
    value = psnr(a, b)
    return "identical" if value == float("inf") else f"{value:.2f} dB"


def run_demo(
    image_path: Optional[str] = None,
    out_dir: str = "dualres_demo",
    qualities: Sequence[int] = (0, 2, 5),
    weights=None,
    device=None,
    log=print,
    refine_steps: int = 0,
    refine_rounds: Optional[int] = None,
) -> list:
    """Run the demo; returns one dict per quality with sizes, PSNRs and timings.

    ``refine_steps``, ``refine_rounds``: encode with latent refinement (``encode(...,
    refine_steps=N, refine_rounds=R)``): smaller files at the same quality, for an encoding time
    that grows with N and R."""
    refine_steps, refine_rounds = check_refinement(refine_steps, refine_rounds)

    path = Path(image_path) if image_path else BUNDLED_PHOTO
    rgb = np.asarray(Image.open(path).convert("RGB"))
    h, w = rgb.shape[:2]
    os.makedirs(out_dir, exist_ok=True)
    model, _ = resolve_model(weights, device)
    meta = getattr(model, "metadata", {}) or {}
    log(
        f"DualRes demo: {path.name} ({w}x{h}), weights: {model.name}"
        + (f", trained {meta['steps']} steps" if meta.get("steps") is not None else "")
        + (
            f", latent refinement {refine_steps} steps + up to {refine_rounds} rounds"
            if refine_steps or refine_rounds
            else ""
        )
    )
    encode(rgb, quality=qualities[0], device=device, weights=weights)  # warm-up (tables, thread pool)

    codecs = available_codecs()
    peers = [k for k in ("jpeg420", "webp") if k in codecs]
    header = f"{'quality':>7} {'bytes':>7} {'bpp':>6} {'PSNR':>7} {'enc ms':>7} {'dec ms':>7} | " + " | ".join(
        f"{codecs[k].name} same size: bpp / PSNR" for k in peers
    )
    log(header)
    log("-" * len(header))
    rows: List[dict] = []
    views: List[Tuple[str, str, np.ndarray]] = []  # what side_by_side.png shows: the middle quality
    shown = qualities[len(qualities) // 2]
    for q in qualities:
        t0 = time.perf_counter()
        data = encode(
            rgb, quality=q, device=device, weights=weights, refine_steps=refine_steps, refine_rounds=refine_rounds
        )
        t1 = time.perf_counter()
        rec = decode(data, device=device, output="numpy", weights=weights)
        t2 = time.perf_counter()
        row = {
            "quality": q,
            "bytes": len(data),
            "bpp": 8 * len(data) / (h * w),
            "psnr": psnr(rgb, rec),
            "encode_ms": 1e3 * (t1 - t0),
            "decode_ms": 1e3 * (t2 - t1),
        }
        Image.fromarray(rec).save(os.path.join(out_dir, f"dualres_q{q}.png"))
        peer_text = []
        for k in peers:
            match = match_size(codecs[k], rgb, len(data))
            if match is None:
                row[k] = None
                peer_text.append("cannot go this small".ljust(30))
                continue
            cq, cdata = match
            crec = codecs[k].decode(cdata)
            row[k] = {"quality": cq, "bytes": len(cdata), "bpp": 8 * len(cdata) / (h * w), "psnr": psnr(rgb, crec)}
            Image.fromarray(crec).save(os.path.join(out_dir, f"{k}_same_size_as_q{q}.png"))
            peer_text.append(f"{row[k]['bpp']:.3f} / {row[k]['psnr']:.2f} dB (q={cq})".ljust(30))
            if q == shown:
                views.append(
                    (f"{codecs[k].name}, same size", f"{row[k]['bpp']:.3f} bpp, {row[k]['psnr']:.2f} dB", crec)
                )
        if q == shown:
            views.insert(0, (f"DualRes q{q}", f"{row['bpp']:.3f} bpp, {row['psnr']:.2f} dB", rec))
        log(
            f"{q:>7} {len(data):>7} {row['bpp']:>6.3f} {row['psnr']:>6.2f}dB {row['encode_ms']:>7.1f} {row['decode_ms']:>7.1f} | "
            + " | ".join(peer_text)
        )
        rows.append(row)
    sheet, _ = side_by_side(rgb, views)
    sheet.save(os.path.join(out_dir, "side_by_side.png"))
    log(f"wrote reconstructions and side_by_side.png to {os.path.abspath(out_dir)}")
    return rows
