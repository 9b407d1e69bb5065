"""A static HTML report of zoo checkpoints: accuracy, prototypes or filter parts, example explanations,
and for a ProtoTree the tree.

    python -m train.report SOURCE [SOURCE ...] --out report/ [--data synthetic] [--num-images 4]

SOURCE is ``[NAME=]`` a released name (``protopnet_resnet18.synthparts``), a zoo file or a Lightning
checkpoint of ``train.py``, loaded with `models.load_pretrained`. The figures and the page come from
`explain.report`. Example explanations and filter parts need images: ``--data synthetic`` draws
SyntheticParts' test split (the recipe of the release or of the run folder when there is one);
``auto`` does so when the checkpoint was trained on SyntheticParts. Accuracy is what the checkpoint
records (zoo metadata, the best score of a ModelCheckpoint monitoring an accuracy, a ProtoTree run's
``prototree.json``), else it is evaluated on ``--eval-images`` test images when there is data.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from explain import viz
from explain.because import because_scores
from explain.prototype_localisation import METHODS
from explain.prototype_parts import part_labels, parts_summary
from explain.report import model_figures, render_section, write_report
from models.pretrained import _read as read_checkpoint
from models.pretrained import load_pretrained

from .apps import checkpoint_file, default_name, load_synthetic, synthetic_recipe
from .errors import run_main
from .prototype_evidence import prototype_source_parts

__all__ = ["recorded_accuracy", "main"]


def recorded_accuracy(payload: dict[str, Any], path: str | Path | None = None) -> dict[str, float]:
    """Accuracies a checkpoint records: zoo ``meta`` (its ``metrics`` too), the best score of every
    ModelCheckpoint that monitors an accuracy, and the last stage of a ProtoTree run's ``prototree.json``."""
    found: dict[str, float] = {}
    meta = payload.get("meta") or {}
    for key, value in {**meta, **(meta.get("metrics") or {})}.items():
        if "acc" in str(key) and isinstance(value, (int, float)):
            found[str(key)] = float(value)
    for state in (payload.get("callbacks") or {}).values():
        monitor, score = (state or {}).get("monitor"), (state or {}).get("best_model_score")
        if monitor and "acc" in monitor and score is not None and float(score) >= 0:  # -1: not pushed yet
            found[f"{monitor} (best checkpoint)"] = float(score)
    tree_json = Path(path).resolve().parent.parent / "prototree.json" if path is not None else None
    if tree_json is not None and tree_json.is_file():
        stages = {k: v for k, v in json.loads(tree_json.read_text()).items() if isinstance(v, dict)}
        if stages:
            stage, results = list(stages.items())[-1]
            found.update({f"test {k} ({stage})": float(v) for k, v in results.items() if k.startswith("acc")})
    return found


def _synthetic_args(model: nn.Module, source: str, payload: dict[str, Any], image_size: int | None) -> dict | None:
    """SyntheticParts arguments of the source's recipe, or a default that fits the model; None if it was
    trained on other data."""
    args = synthetic_recipe(source)
    if args is None:
        return None
    if not args:
        args = {"num_classes": getattr(model, "num_classes", 10)}
        pushed_size = getattr(model, "prototype_image_size", None)  # ProtoPNet remembers its push images
        meta_size = (payload.get("meta") or {}).get("image_size")
        args["image_size"] = int(meta_size or (pushed_size[0] if pushed_size is not None and pushed_size[0] > 0 else 64))
    if image_size:
        args["image_size"] = image_size
    return args


def _uses_synthetic(source: str, payload: dict[str, Any]) -> bool:
    meta = payload.get("meta") or {}
    return bool(synthetic_recipe(source)) or "synthetic" in str(meta.get("dataset", "")).lower()


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def _prototype_evidence(model: nn.Module, recipe: dict, images: torch.Tensor, localisation: str) -> dict[str, Any]:
    """Gallery labels of a prototype model trained on SyntheticParts: the part each prototype shows on its
    source (by `localisation`'s map) and its "because" scores on the test images."""
    if not (viz.is_prototype_model(model) and bool((model.prototype_source_index >= 0).any())):
        return {}
    parts = prototype_source_parts(model, recipe, localisation)
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in parts_summary(parts).items())
    because = because_scores(model, images[:32])
    return {"part_labels": part_labels(parts), "because": because.as_dict(),
            "evidence_note": f"Under each patch: the part its {localisation} map covers on its source image (prototypes "
                             f"on: {shares}) and its 'this looks like that, because' scores on {min(32, len(images))} "
                             "test images (Nauta et al. 2020: similarity lost when the image's hue, shape, texture, "
                             "contrast or saturation is changed)."}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="released names, zoo files or Lightning checkpoints ([NAME=]SOURCE)")
    p.add_argument("--out", default="report", help="folder of index.html")
    p.add_argument("--data", choices=["auto", "synthetic", "none"], default="auto",
                   help="images for explanations: SyntheticParts' test split, none, or auto (if trained on it)")
    p.add_argument("--num-images", type=int, default=4, help="example images explained per model")
    p.add_argument("--eval-images", type=int, default=200, help="test images to evaluate accuracy when none is recorded")
    p.add_argument("--evaluate", action="store_true", help="evaluate accuracy even when the checkpoint records one")
    p.add_argument("--image-size", type=int, default=None, help="SyntheticParts image size (default: the run's or 64)")
    p.add_argument("--title", default="interpretable-zoo report")
    p.add_argument("--localisation", default="upsampling", choices=list(METHODS),
                   help="method of the prototype maps and boxes in 'this looks like that' (explain.prototype_localisation)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Build the report; returns the path of index.html."""
    args = _parse_args(argv)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    sections = []
    for spec in args.checkpoints:
        # NAME=SOURCE, unless the whole argument is a file (Lightning names files like "epoch=3-step=9.ckpt")
        name, source = spec.split("=", 1) if "=" in spec and not Path(spec).is_file() else (None, spec)
        name = name or default_name(source)
        model = load_pretrained(source)  # the one loader: released names, zoo files, Lightning checkpoints
        payload = read_checkpoint(checkpoint_file(source))  # weights only: what the file records besides weights
        accuracy, note = recorded_accuracy(payload, checkpoint_file(source)), None
        images = labels = class_names = None
        use_data = args.data == "synthetic" or (args.data == "auto" and _uses_synthetic(source, payload))
        data_args = _synthetic_args(model, source, payload, args.image_size) if use_data else None
        if data_args is not None:
            n = max(args.num_images, args.eval_images if (args.evaluate or not accuracy) else 32)
            data_args["test_size"] = max(int(data_args.get("test_size", 0)), n)
            data = load_synthetic(data_args, n)
            if len(data["class_names"]) != model.num_classes:
                raise ValueError(f"{source}: the model has {model.num_classes} classes but the synthetic data has "
                                 f"{len(data['class_names'])}; pass a checkpoint of a SyntheticParts run or --data none")
            images, labels, class_names = data["image"], data["label"], data["class_names"]
            if args.evaluate or not accuracy:
                accuracy[f"evaluated on {n} SyntheticParts test images"] = _accuracy(model, images, labels)
        else:
            note = "No images given (--data none, or not a SyntheticParts run): example explanations are left out."
        recipe = synthetic_recipe(source)  # the sources are samples of the recipe the model was pushed with
        evidence = _prototype_evidence(model, recipe, images, args.localisation) if images is not None and recipe else {}
        figures = model_figures(model, images, labels, class_names, args.num_images, localisation=args.localisation,
                                **evidence)
        sections.append(render_section(name, source, model, accuracy, figures, note))
    path = write_report(sections, args.out, args.title)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_main(main)
