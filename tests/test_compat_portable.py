"""compat.accelerate(model, portable=True): the hyper synthesis of CompressAI hyperprior models on
integers (exact_hyperprior.py); marked streams; the default stays CompressAI's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("compressai")

from compressai.zoo import bmshj2018_hyperprior, mbt2018_mean  # noqa: E402

from dualres_ext import compat  # noqa: E402
from dualres_ext.exact_hyperprior import MARK, is_portable  # noqa: E402


def _image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:192]
    img = np.stack([np.sin(xx / 9.0 + c) * np.cos(yy / 7.0 - c) for c in range(3)], -1) * 90 + 128
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255) / 255.0
    return torch.from_numpy(img).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("make", [mbt2018_mean, bmshj2018_hyperprior])
def test_portable_round_trip_and_marks(make):
    x = _image()
    torch.manual_seed(0)
    plain = make(quality=2, pretrained=False).eval()
    compat.accelerate(plain)
    plain.update(force=True)
    torch.manual_seed(0)
    portable = make(quality=2, pretrained=False).eval()
    compat.accelerate(portable, portable=True)
    portable.update(force=True)
    assert is_portable(portable) and not is_portable(plain)
    with torch.no_grad():
        a = plain.compress(x)
        b = portable.compress(x)
        assert all(bytes(s).startswith(MARK) for s in b["strings"][0])
        assert not any(bytes(s).startswith(MARK) for s in a["strings"][0])
        assert a["strings"][1] == b["strings"][1]  # z is coded as before
        out = portable.decompress(b["strings"], b["shape"])["x_hat"]
        assert out.shape == x.shape
        with pytest.raises(ValueError, match="not marked"):
            portable.decompress(a["strings"], a["shape"])
        # forward keeps the float network
        torch.testing.assert_close(portable(x)["x_hat"], plain(x)["x_hat"])
        # the exact hyper synthesis gives the same values with and without oneDNN
        z_hat = portable.entropy_bottleneck.decompress(b["strings"][1], b["shape"])
        exact = portable.h_s.__dict__["_dualres_exact"]
        ref = exact(z_hat)
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(exact(z_hat), ref)
