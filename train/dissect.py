"""Network Dissection reports of model layers (`explain.dissect`) on SyntheticParts or a Broden folder.

    python -m train.dissect --model <released name | checkpoint file | arch:<registry name>> \\
        --data synthetic --config configs/cam/synthetic.yaml --out reports/dissect

A released name or a file is loaded with `models.load_pretrained`; ``arch:<name>`` builds the
registry's model with random weights (the baseline of the paper). ``--data synthetic`` draws
SyntheticParts with the checkpoint's own recipe (its release's manifest entry or its run's
``config.yaml``) unless ``--config`` names a training config; ``--data <folder>`` reads a
Broden-layout folder (`explain.concepts.BrodenConcepts`). ``--model released`` dissects every
released checkpoint that has a local file.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from explain.concepts import BrodenConcepts, ConceptSet
from explain.dissect import default_layer, dissect, write_report
from models import create_model
from models.pretrained import CheckpointError, list_pretrained, load_pretrained

from .apps import synthetic_recipe
from .data import SyntheticParts
from .errors import run_main

__all__ = ["main"]


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _synthetic_init(args: argparse.Namespace, spec: str) -> dict[str, Any]:
    """SyntheticParts arguments: the checkpoint's recipe (or --config), then --data-args, then --size."""
    init: dict[str, Any] = {}
    if args.config:
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file")
        data = (yaml.safe_load(Path(args.config).read_text()) or {}).get("data") or {}
        init.update(data.get("init_args") or {})
    elif not spec.startswith("arch:"):
        init.update(synthetic_recipe(spec) or {})
    init.update(_json_object(args.data_args, "--data-args"))
    if args.size is not None:
        init[f"{args.split}_size"] = args.size
    init.update(batch_size=args.batch_size, eval_batch_size=args.batch_size, num_workers=args.num_workers, augment=False)
    return init


def _model(spec: str, args: argparse.Namespace) -> nn.Module:
    """`arch:<name>` builds a registry model with random weights; any other source goes to `load_pretrained`."""
    if spec.startswith("arch:"):  # an untrained registry model: the random-weights baseline
        kwargs = _json_object(args.model_args, "--model-args")
        kwargs.setdefault("num_classes", _synthetic_init(args, spec).get("num_classes", 10))
        return create_model(spec[5:], **kwargs).eval()
    return load_pretrained(spec)


def _data(args: argparse.Namespace, spec: str, model: nn.Module) -> tuple[Iterable, ConceptSet]:
    if args.data != "synthetic":
        dataset = BrodenConcepts(args.data, split=args.split, image_size=args.image_size, max_images=args.size)
        return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers), dataset.concepts
    init = _synthetic_init(args, spec)
    init.setdefault("num_classes", getattr(model, "num_classes", 10))
    dm = SyntheticParts(**init)
    loaders = {"train": dm.push_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}
    return loaders[args.split](), ConceptSet.from_parts(dm.part_names)


def _report_name(spec: str, taken: set[str]) -> str:
    """Folder name of a model's report: the registry / released name, or for a file its stem, prefixed
    by the run name for train.py's runs/<name>/<time>/checkpoints/<file>; made unique with a suffix."""
    path = Path(spec)
    if path.suffix not in (".ckpt", ".pt", ".pth"):
        name = spec.replace(":", "_").replace("/", "_")
    elif path.parent.name == "checkpoints" and len(path.parents) > 3:
        name = f"{path.parents[2].name}_{path.stem}"
    else:
        name = path.stem
    unique, i = name, 1
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    return unique


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.dissect", description="Network Dissection reports of model layers.")
    p.add_argument("--model", nargs="+", required=True,
                   help="released names, checkpoint files, or arch:<registry name> (random weights); "
                        "'released' = every released checkpoint that is available")
    p.add_argument("--model-args", default="{}", help="JSON constructor arguments of arch: models")
    p.add_argument("--layer", default=None, help="dotted module name (default: an ICNN's interpretable layer, else the backbone)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a Broden-layout folder")
    p.add_argument("--config", default=None,
                   help="a training config whose data.init_args build SyntheticParts (default: the checkpoint's own recipe)")
    p.add_argument("--data-args", default="{}", help="JSON SyntheticParts arguments (override --config)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--size", type=int, default=None, help="number of images of the split")
    p.add_argument("--image-size", type=int, default=None, help="Broden: resize images to this side")
    p.add_argument("--out", default="reports/dissect")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    for flag, kind, default in (("--top-fraction", float, 0.005), ("--iou-threshold", float, 0.04), ("--bins", int, 2048), ("--top-k", int, 10)):
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--max-units", type=int, default=None, help="units shown in the HTML (best first)")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Dissect each model; writes <out>/<model>/report.html (and tally.csv, ...) and <out>/summary.csv."""
    args = _parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    specs = [m for m in args.model if m != "released"]
    released = list_pretrained() if "released" in args.model else []
    rows = []
    for spec in specs + released:
        try:
            model = _model(spec, args).to(device)
        except CheckpointError as exc:  # a release without a local file is skipped; a named source fails
            if spec not in released or spec in specs:
                raise
            print(f"skipping {spec}: {str(exc).splitlines()[0]}")
            continue
        loader, concepts = _data(args, spec, model)
        d = dissect(model, args.layer or default_layer(model), loader, concepts, top_fraction=args.top_fraction,
                    iou_threshold=args.iou_threshold, bins=args.bins, top_k=args.top_k, device=device)
        name = _report_name(spec, {row["model"] for row in rows})
        html_path = write_report(d, Path(args.out) / name, title=f"{name}: {d.layer}", max_units=args.max_units)
        s = d.summary()
        rows.append({"model": name, "layer": s["layer"], "units": s["units"], "detectors": s["detectors"],
                     "concepts": s["concepts"], "detected": ";".join(s["detected"]), "report": str(html_path)})
        print(f"{name} [{s['layer']}]: {s['detectors']}/{s['units']} detector units, {s['concepts']} concepts -> {html_path}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["model", "layer", "units", "detectors", "concepts", "detected", "report"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    run_main(main)
