"""The main job: compress the bundled photo with DualRes at a few qualities and compare with
JPEG and WebP at the same file size (``python -m dualres_ext demo``)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..codec import decode, encode, resolve_model
from ..models.refine import check_refinement
from .classic import available_codecs, match_size
from .metrics import psnr

BUNDLED_PHOTO = Path(__file__).resolve().parent.parent / "assets" / "astronaut.png"


def _label(img: Image.Image, text: str) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + 18), "white")
    out.paste(img, (0, 18))
    ImageDraw.Draw(out).text((4, 3), text, fill="black")
    return out


def run_demo(image_path: Optional[str] = None, out_dir: str = "dualres_demo", qualities: Sequence[int] = (0, 2, 5),
             weights=None, device=None, log=print, refine_steps: int = 0,
             refine_rounds: Optional[int] = None) -> list:
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
    log(f"DualRes demo: {path.name} ({w}x{h}), weights: {model.name}"
        + (f", trained {meta['steps']} steps" if meta.get("steps") is not None else "")
        + (f", latent refinement {refine_steps} steps + up to {refine_rounds} rounds"
           if refine_steps or refine_rounds else ""))
    encode(rgb, quality=qualities[0], device=device, weights=weights)  # warm-up (tables, thread pool)

    codecs = available_codecs()
    peers = [k for k in ("jpeg420", "webp") if k in codecs]
    header = f"{'quality':>7} {'bytes':>7} {'bpp':>6} {'PSNR':>7} {'enc ms':>7} {'dec ms':>7} | " + " | ".join(
        f"{codecs[k].name} same size: bpp / PSNR" for k in peers)
    log(header)
    log("-" * len(header))
    rows, panels = [], [_label(Image.fromarray(rgb), "original")]
    for q in qualities:
        t0 = time.perf_counter()
        data = encode(rgb, quality=q, device=device, weights=weights, refine_steps=refine_steps,
                      refine_rounds=refine_rounds)
        t1 = time.perf_counter()
        rec = decode(data, device=device, output="numpy", weights=weights)
        t2 = time.perf_counter()
        row = {"quality": q, "bytes": len(data), "bpp": 8 * len(data) / (h * w), "psnr": psnr(rgb, rec),
               "encode_ms": 1e3 * (t1 - t0), "decode_ms": 1e3 * (t2 - t1)}
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
            if q == qualities[len(qualities) // 2]:
                panels.append(_label(Image.fromarray(crec), f"{codecs[k].name} {row[k]['bpp']:.3f} bpp {row[k]['psnr']:.2f} dB"))
        if q == qualities[len(qualities) // 2]:
            panels.insert(1, _label(Image.fromarray(rec), f"DualRes q{q} {row['bpp']:.3f} bpp {row['psnr']:.2f} dB"))
        log(f"{q:>7} {len(data):>7} {row['bpp']:>6.3f} {row['psnr']:>6.2f}dB {row['encode_ms']:>7.1f} {row['decode_ms']:>7.1f} | "
            + " | ".join(peer_text))
        rows.append(row)
    sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width
    sheet.save(os.path.join(out_dir, "side_by_side.png"))
    log(f"wrote reconstructions and side_by_side.png to {os.path.abspath(out_dir)}")
    return rows
