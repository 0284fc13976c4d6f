"""Images in and out of the codec: PIL images, numpy arrays and tensors to the model's input
(a float32 (1, 3, H, W) batch in [0, 1]) and back, and the padding to the model's stride."""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .container import MAX_SIDE


def to_tensor(image) -> Tuple[torch.Tensor, bool]:
    """(1, 3, H, W) float32 in [0, 1], and whether the input was greyscale."""
    if isinstance(image, Image.Image):
        mode = image.mode
        if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise ValueError(
                f"image: PIL mode {mode!r} (high bit depth) is not supported; convert to 8-bit 'L' or 'RGB' first"
            )
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
            warnings.warn(
                f"image: PIL mode {mode!r} has an alpha channel; it is dropped (only colour is coded)", stacklevel=3
            )
        grey = mode in ("1", "L", "LA", "La")
        image = np.asarray(image.convert("L" if grey else "RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            t = torch.from_numpy(np.array(arr, dtype=np.float32)) / 255.0
        elif arr.dtype in (np.float32, np.float64, np.float16):
            t = torch.from_numpy(np.array(arr, dtype=np.float32))
        else:
            raise TypeError(f"image: numpy arrays must be uint8 (or float in [0, 1]), got {arr.dtype}")
        if t.dim() == 2:
            t = t[:, :, None]
        if t.dim() != 3:
            raise ValueError(f"image: expected an HxW or HxWxC array, got shape {arr.shape}")
        t = t.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 4:
            if t.size(0) != 1:
                raise ValueError(f"image: one image at a time, got a batch of {t.size(0)}")
            t = t[0]
        if t.dim() == 2:
            t = t[None]
        if t.dim() != 3:
            raise ValueError(f"image: expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif not t.is_floating_point():
            raise TypeError(f"image: tensors must be float in [0, 1] or uint8, got {t.dtype}")
        t = t.to("cpu", torch.float32)
    else:
        raise TypeError(f"image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    channels = t.size(0)
    if channels == 4 or channels == 2:
        warnings.warn(f"image: {channels} channels; the last (alpha) channel is dropped", stacklevel=3)
        t = t[:-1]
        channels -= 1
    if channels not in (1, 3):
        raise ValueError(f"image: expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {channels}")
    if t.size(1) < 1 or t.size(2) < 1:
        raise ValueError(f"image: empty image of size {t.size(2)}x{t.size(1)}")
    if t.size(1) > MAX_SIDE or t.size(2) > MAX_SIDE:
        raise ValueError(f"image: sides up to {MAX_SIDE} pixels are supported, got {t.size(2)}x{t.size(1)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("image contains NaN or Inf")
    if float(t.min()) < 0.0 or float(t.max()) > 1.0:
        raise ValueError(f"image: float values must lie in [0, 1], got [{float(t.min()):.4g}, {float(t.max()):.4g}]")
    grey = channels == 1
    if grey:
        t = t.expand(3, -1, -1)
    return t[None].contiguous(), grey


def pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple of ``multiple`` by replicating the border (any size, 1x1
    too: a flat continuation costs almost no bits). Gathers with clamped indices, which unlike
    ``F.pad(mode="replicate")`` has no limit on the pad width."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    rows = torch.arange(h + ph, device=x.device).clamp_(max=h - 1)
    cols = torch.arange(w + pw, device=x.device).clamp_(max=w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def from_tensor(x: torch.Tensor, grey: bool, output: str, metadata: Optional[dict] = None):
    """The decoded picture ``x`` (3, H, W) as ``output`` asks: ``"tensor"`` (clamped to [0, 1]),
    ``"numpy"`` (uint8) or ``"pil"`` (with ``metadata``'s entries in the image's ``info``)."""
    x = x.clamp(0.0, 1.0)
    if grey:
        x = x.mean(dim=0, keepdim=True)
    if output == "tensor":
        return x
    arr = (x.mul(255.0).round().to(torch.uint8)).permute(1, 2, 0).cpu().numpy()
    if grey:
        arr = arr[:, :, 0]
    if output == "numpy":
        return arr
    image = Image.fromarray(arr, mode="L" if grey else "RGB")
    image.info.update(metadata or {})
    return image
