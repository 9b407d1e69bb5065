"""Test-time intervention curves of concept bottleneck models on SyntheticParts' test split: a CSV, a
Markdown table and a figure of task accuracy against the number of concept groups replaced by the truth.

    python -m train.intervene --checkpoint joint=cbm_resnet18.synthparts seq=runs/.../final.ckpt \\
        --num-images 500 --trials 5 --out runs/intervene

Each SOURCE is a released name, a zoo file or a Lightning checkpoint of ``train.py`` (loaded with
`models.load_pretrained`). The data is the first checkpoint's SyntheticParts recipe with ``--data-arg``
overrides; the curves come from `explain.interventions.intervention_curve` (random group order per
image, ``accuracy`` the best of ``--trials`` per n as the paper's figure, ``accuracy_mean`` their mean).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from explain.concept_views import intervention_figure, is_concept_model
from explain.interventions import concept_outputs, intervention_curve
from explain.viz import save_figure
from models.pretrained import load_pretrained

from .apps import default_name, load_synthetic, synthetic_recipe
from .errors import run_main

__all__ = ["main", "to_markdown"]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.intervene", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="[NAME=]SOURCE of concept bottleneck models")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--trials", type=int, default=5, help="random group orders per image (the paper: 5, best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-arg", nargs="*", default=[], help="SyntheticParts overrides, key=value (YAML values)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/intervene")
    return p.parse_args(argv)


def to_markdown(curves: dict[str, dict[str, Any]], digits: int = 3) -> str:
    """One row per model: accuracy (best of trials / mean) after n intervened groups, n = 0 ... G."""
    groups = max((c["groups"] for c in curves.values()), key=len)
    lines = ["| model | " + " | ".join(f"{n}" for n in groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for name, c in curves.items():
        cells = [f"{best:.{digits}f} / {mean:.{digits}f}" for best, mean in zip(c["accuracy"], c["accuracy_mean"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nCells: task accuracy, best of the trials / their mean; columns: intervened groups.\n"


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Write ``curves.csv``, ``table.md`` and ``intervention.png`` into ``--out``; returns the curves by name."""
    args = _parse_args(argv)
    specs = [s.split("=", 1) if "=" in s and not Path(s).is_file() else [default_name(s), s] for s in args.checkpoint]
    loaded = {name: load_pretrained(source).to(args.device).eval() for name, source in specs}
    for name, model in loaded.items():
        if not is_concept_model(model):
            raise ValueError(f"{name}: {type(model).__name__} has no concepts to intervene on")
    data_args = synthetic_recipe(specs[0][1])
    if data_args is None:
        raise ValueError(f"{specs[0][1]} was not trained on SyntheticParts; train.intervene reads its test split")
    data_args.update({k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in args.data_arg)})
    data = load_synthetic(data_args, args.num_images)
    curves = {}
    for name, model in loaded.items():
        logits = concept_outputs(model, data["image"], args.batch_size)
        curves[name] = intervention_curve(model, logits, data["concepts"], data["label"], trials=args.trials, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "groups", "accuracy_best", "accuracy_mean"])
        for name, c in curves.items():
            writer.writerows([name, n, best, mean] for n, best, mean in zip(c["groups"], c["accuracy"], c["accuracy_mean"]))
    (out / "table.md").write_text(to_markdown(curves))
    save_figure(intervention_figure(curves, f"Test-time intervention, {args.num_images} SyntheticParts test images"),
                out / "intervention.png")
    print(to_markdown(curves))
    return curves


if __name__ == "__main__":
    run_main(main)
