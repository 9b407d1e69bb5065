"""What the command-line applications (`train.compare`, `train.report`, `train.dissect`) share: the
run folder or release a checkpoint comes from, SyntheticParts test data with a re-rendering function,
and a display name per checkpoint.

A source is a released name (`models.list_pretrained()`), a zoo file or a Lightning checkpoint of
``train.py``; every application turns it into a model with `models.load_pretrained` alone.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import Tensor

from models.pretrained import list_pretrained, pretrained_entry

from .data import SyntheticParts

__all__ = ["checkpoint_file", "default_name", "load_synthetic", "run_config", "synthetic_recipe"]

_SYNTHETIC_ARGS = {"num_classes", "image_size", "seed", "clutter", "occlusion", "color_jitter", "shortcut", "test_size"}


def checkpoint_file(source: str | Path) -> Path:
    """The file behind a source: a released name's local file, else the path itself."""
    if str(source) in list_pretrained():
        file = pretrained_entry(str(source)).file
        if file is not None:
            return file
    return Path(source)


def run_config(source: str | Path) -> dict[str, Any]:
    """The training config of a source: a release's recorded data recipe (``{"data": ...}``), or the
    ``config.yaml`` of the train.py run folder ``runs/<name>/<stamp>/checkpoints/<file>``; else {}."""
    if str(source) in list_pretrained():
        return {"data": pretrained_entry(str(source)).manifest.get("data") or {}}
    config = Path(source).resolve().parent.parent / "config.yaml"
    if not (Path(source).is_file() and config.is_file()):
        return {}
    loaded = yaml.safe_load(config.read_text())
    return loaded if isinstance(loaded, dict) else {}


def synthetic_recipe(source: str | Path) -> dict[str, Any] | None:
    """SyntheticParts' init_args a source was trained with; {} when unknown, None when it was trained on
    other data."""
    data = run_config(source).get("data") or {}
    if not data:
        return {}
    if not str(data.get("class_path", "")).endswith("SyntheticParts"):
        return None
    return dict(data.get("init_args") or {})


def default_name(source: str | Path) -> str:
    """A released name as it is; the run name of runs/<name>/<stamp>/checkpoints/x.ckpt; else the stem."""
    if str(source) in list_pretrained():
        return str(source)
    parts = Path(source).resolve().parts
    return parts[-4] if len(parts) >= 4 and parts[-2] == "checkpoints" else Path(source).stem


def load_synthetic(data_args: dict[str, Any], num_images: int) -> dict[str, Any]:
    """The first `num_images` of SyntheticParts' test split as a dict of tensors, with a ``render_fn``
    for the FunnyBirds checks (see `explain.compare.evaluate`).

    Background objects are the single distractors: ``render_fn(i, ["distractor2"])`` re-renders image i
    without its third distractor. Keys of `data_args` that do not shape the test images are ignored.
    """
    args = {k: v for k, v in data_args.items() if k in _SYNTHETIC_ARGS}
    dm = SyntheticParts(**args, cache=False, augment=False)
    dataset = dm.dataset("test")
    if num_images > len(dataset):
        raise ValueError(f"asked for {num_images} images but the SyntheticParts test split has {len(dataset)}")
    items = [dataset[i] for i in range(num_images)]
    data = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    generator = dm.generator

    def render_fn(index: int, remove: Sequence[str]) -> Tensor:
        recipe = generator.recipe(index, "test")
        singles = [r for r in remove if r.startswith("distractor") and r != "distractors"]
        if singles:
            drop = {int(r[len("distractor"):]) for r in singles}
            recipe = dataclasses.replace(recipe, distractors=tuple(d for i, d in enumerate(recipe.distractors) if i not in drop))
        image = generator.render(recipe, remove=[r for r in remove if r not in singles]).image
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0

    data.update(render_fn=render_fn, part_names=list(dm.part_names), class_names=dm.class_names,
                background_names=[f"distractor{i}" for i in range(generator.clutter)])
    return data
