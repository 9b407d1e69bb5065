"""Every released checkpoint in checkpoints/ loads in one line, verifies its hash, and reaches the
accuracy its manifest records on the SyntheticParts test split."""
import importlib
import json

import pytest
import torch

import models
from models.pretrained import MANIFEST

RELEASED = json.loads(MANIFEST.read_text())["checkpoints"] if MANIFEST.is_file() else {}


def test_manifest_lists_declared_entries_with_small_files():
    for name, record in RELEASED.items():
        assert name in models.list_pretrained(), f"{name} is in the manifest but not declared next to its model"
        assert record["size_bytes"] < 15e6
        assert {"command", "seed", "sha256", "metrics", "config"} <= set(record)
    assert sum(r["size_bytes"] for r in RELEASED.values()) < 60e6


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_checkpoint_reaches_its_manifest_accuracy(name):
    record = RELEASED[name]
    model = models.load_pretrained(name)  # verifies the sha256 against the manifest
    assert not model.training
    module_name, _, cls_name = record["data"]["class_path"].rpartition(".")
    data = getattr(importlib.import_module(module_name), cls_name)(**record["data"]["init_args"])
    correct = total = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    assert abs(correct / total - record["metrics"]["test_acc"]) <= 0.005
