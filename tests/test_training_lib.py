"""dualres_ext.training: what the training scripts share (checkpoints, parameter groups, the
weight average, validation on the rate-distortion loss)."""

import os
import sys

import pytest
import torch

from dualres_ext.models import build
from dualres_ext.models.loss import rate_distortion
from dualres_ext.training import (
    WeightAverage,
    checkpoint_config,
    is_checkpoint,
    load_checkpoint,
    optimizer_groups,
    parameter_groups,
    psnr_of_mse,
    save_checkpoint,
    validate,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_testlib import TINY  # noqa: E402  (a small configuration keeps the tests fast)


def test_weight_average_is_the_exponential_moving_average():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    snapshots = [[p.detach().double().clone() for p in model.parameters()]]
    avg = WeightAverage(model, decay=0.75)
    for _ in range(3):  # three "optimiser steps" to fresh random weights, each followed by update()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        avg.update()
        snapshots.append([p.detach().double().clone() for p in model.parameters()])
    # avg_3 = 0.75^3 w_0 + 0.25 (0.75^2 w_1 + 0.75 w_2 + w_3), in float64
    coef = [0.75**3, 0.25 * 0.75**2, 0.25 * 0.75, 0.25]
    for i, got in enumerate(avg.averaged().parameters()):
        want = sum(c * snap[i] for c, snap in zip(coef, snapshots))
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
        assert not got.requires_grad
    # The source model is not touched by the average, and the average by later source changes only via update().
    torch.testing.assert_close(next(model.parameters()).double(), snapshots[-1][0])
    # A saved average resumes as it was.
    again = WeightAverage(model, decay=0.75, state=avg.model.state_dict())
    for a, b in zip(again.model.parameters(), avg.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_checkpoints_save_atomically_and_load_back(tmp_path):
    path = str(tmp_path / "last.pt")
    state = {
        "model_name": "compact",
        "config": {"N": 8},
        "optimizer": {"state": {}},
        "step": 7,
        "state_dict": {"w": torch.arange(3.0)},
    }
    save_checkpoint(path, state)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    back = load_checkpoint(path)
    assert back["step"] == 7 and torch.equal(back["state_dict"]["w"], torch.arange(3.0))
    assert is_checkpoint(back) and not is_checkpoint({"format": "weights"}) and not is_checkpoint([1])
    # The configuration: as recorded, "modulation" defaulting to off where it predates the option.
    assert checkpoint_config(back) == {"N": 8, "modulation": False}
    assert checkpoint_config({"config": {"N": 8, "modulation": True}})["modulation"] is True


def test_parameter_and_optimizer_groups():
    plain = build("compact", **TINY)
    main, aux = parameter_groups(plain)
    names = {id(p): n for n, p in plain.named_parameters()}
    assert aux and all(names[id(p)].endswith(".quantiles") for p in aux)
    assert len(main) + len(aux) == len(list(plain.parameters()))
    groups = optimizer_groups(plain)
    assert [g["name"] for g in groups] == ["main"] and groups[0]["params"] == main

    modulated = build("compact", **TINY, modulation=True)
    main, _ = parameter_groups(modulated)
    groups = optimizer_groups(modulated)
    assert [g["name"] for g in groups] == ["main", "modulation"]
    # The two groups, in order, are parameter_groups' main list: the saved optimiser state's indexing.
    assert groups[0]["params"] + groups[1]["params"] == main


def test_validate_is_the_rate_distortion_loss_at_every_quality():
    torch.manual_seed(0)
    model = build("compact", **TINY)
    crops = [
        torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8),
        torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8),
    ]
    got = validate(model, crops, "cpu")
    assert model.training  # left as training expects it
    assert len(got["per_quality"]) == len(model.lambdas)
    model.eval()
    with torch.no_grad():
        for q, lmbda in enumerate(model.lambdas):
            rds = [rate_distortion(model(c[None].float() / 255, q), c[None].float() / 255, lmbda) for c in crops]
            want_loss = sum(rd["loss"].item() for rd in rds) / len(rds)
            want_psnr = sum(psnr_of_mse(rd["mse"].item()) for rd in rds) / len(rds)
            assert got["per_quality"][q]["loss"] == pytest.approx(want_loss, rel=1e-6)
            assert got["per_quality"][q]["psnr"] == pytest.approx(want_psnr, rel=1e-6)
    assert got["loss"] == pytest.approx(sum(p["loss"] for p in got["per_quality"]) / len(model.lambdas))
