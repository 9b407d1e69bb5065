"""Every SyntheticParts recipe runs through the CLI, at its own 64 px and with the 128 px overlay."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from train.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.parent.name for p in (ROOT / "configs").glob("*/synthetic.yaml"))
OVERLAY = ROOT / "configs" / "overlays" / "synthparts_128.yaml"
# The latent grid of each prototype family at 128 px: stride-16 trunks 8 x 8, PIP-Net's stride-8 trunk 16 x 16.
GRID_128 = {"protopnet": 8, "prototree": 8, "protopool": 8, "pipnet": 16}


def test_every_family_has_a_synthetic_recipe():
    assert set(RECIPES) >= {"bcos", "cam", "cbm", "icnn", "pipnet", "plain", "protopnet", "protopool", "prototree"}


@pytest.mark.parametrize("family", RECIPES)
def test_recipe_trains_a_step_at_128_px(family, tmp_path):
    cli = main(["fit", "--config", str(ROOT / "configs" / family / "synthetic.yaml"), "--config", str(OVERLAY),
                "--data.init_args.train_size", "16", "--data.init_args.val_size", "8", "--data.init_args.test_size", "8",
                "--data.init_args.batch_size", "8", "--trainer.fast_dev_run", "1", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.accelerator", "cpu", "--test_after_fit", "false", "--runs_root", str(tmp_path)])
    assert cli.trainer.global_step >= 1
    batch = next(iter(cli.datamodule.train_dataloader()))
    images = batch["image"]
    assert images.shape[-2:] == (128, 128)
    model = cli.model.eval()
    with torch.no_grad():
        logits = model(images[:2])
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        if family in GRID_128:
            assert model.distances(images[:2]).shape[-2:] == (GRID_128[family], GRID_128[family])
    assert all(math.isfinite(float(v)) for k, v in cli.trainer.callback_metrics.items() if "loss" in k)
