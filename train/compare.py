"""Compare explanation methods x models on one test set: a CSV, a Markdown table (mean and 95% interval
per cell) and a figure grid of the same images explained by every method.

    python -m train.compare --checkpoint cam=cam_resnet18.synthparts resnet=runs/plain/.../best.ckpt \\
        --methods intrinsic gradcam integrated_gradients lime rise --num-images 100 --out runs/compare

Each SOURCE is a released name, a zoo file or a Lightning checkpoint of ``train.py``, loaded with
`models.load_pretrained`. The data is SyntheticParts' test split, built from the first checkpoint's
recipe (its release's manifest entry or its run's ``config.yaml``) and ``--data-arg key=value``;
``--data-file`` takes a ``torch.save``d dict of tensors instead ("image", "label", optional
"part_masks", "body_box"), read weights-only. The scores come from `explain.compare.evaluate`.

``--localisation upsampling smoothgrad randgrads prp`` adds, for every prototype model on SyntheticParts,
the rows ``prototypes/<method>`` of `train.prototype_evidence` (the share of prototypes on class parts,
other parts, body, distractors and background; pointing per prototype; consistency and stability);
``--methods`` may then be empty. ``--sanity [key=value ...]`` adds ``sanity.md``: `train.sanity`'s checks
of every prototype model for the ``--localisation`` methods (keys: num_images, top_k, random_images,
groups, sources).

``--config FILE`` reads the options from a YAML mapping (the long option names; flags on the command
line override it); ``--resolution 64`` or ``128`` is ``--config configs/compare/synthparts_<R>.yaml``,
the whole comparison of `docs/comparison.md` at that resolution:

    python -m train.compare --resolution 128
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

import torch
import yaml

from explain.compare import DEFAULT_METRICS, METRICS, evaluate, summarise, to_markdown
from explain.prototype_localisation import METHODS as LOCALISATIONS
from models.pretrained import config_file, load_pretrained

from .apps import default_name, load_synthetic, synthetic_recipe
from .errors import run_main
from .prototype_evidence import evidence_rows

__all__ = ["main"]


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _options(pairs: Sequence[str]) -> dict[str, dict]:
    """["rise.n_masks=2000", ...] -> {"rise": {"n_masks": 2000}} (values parsed as YAML)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name, dot, option = key.partition(".")
        if not (sep and dot and option):
            raise ValueError(f"expected NAME.option=value, got {pair!r}")
        out.setdefault(name, {})[option] = yaml.safe_load(value)
    return out


def _pairs(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ValueError(f"{flag} expects NAME=VALUE, got {bad[0]!r}")
    return [tuple(item.split("=", 1)) for item in items]  # type: ignore[misc]


PRESETS = config_file("configs/compare")  # the presets of docs/comparison.md, in the configs package
_PAIR_OPTIONS = ("model_methods", "method_arg", "metric_arg", "data_arg", "sanity")  # NAME=VALUE lists


def _config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """The options of a YAML file, checked against the parser, in the shapes its flags produce."""
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "resolution")}
    out = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise ValueError(f"--config {path}: unknown option {key!r} (options: {', '.join(sorted(actions))})")
        if dest in _PAIR_OPTIONS and isinstance(value, dict):
            value = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in value.items()]
        elif actions[dest].nargs in ("+", "*") and not isinstance(value, list):
            value = [value]
        out[dest] = [str(v) for v in value] if dest in _PAIR_OPTIONS else value
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, help="YAML mapping of these options (flags override it)")
    p.add_argument("--resolution", type=int, default=None,
                   help="the preset of docs/comparison.md: configs/compare/synthparts_<R>.yaml (64 or 128)")
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="[NAME=]SOURCE: a released name (models.list_pretrained()), a zoo file or a Lightning checkpoint")
    p.add_argument("--methods", nargs="*", default=["intrinsic", "gradcam", "integrated_gradients", "lime", "rise"])
    p.add_argument("--model-methods", nargs="*", default=[], help="NAME=m1,m2: other methods for model NAME")
    p.add_argument("--method-arg", nargs="*", default=[], help="METHOD.key=value (YAML value), e.g. rise.n_masks=2000")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help=f"of {sorted(METRICS)}")
    p.add_argument("--metric-arg", nargs="*", default=[],
                   help="METRIC.key=value (YAML value), e.g. deletion.step=128 pointing_game.tolerance=scaled")
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--data-file", default=None, help="torch.save'd dict of tensors instead of SyntheticParts")
    p.add_argument("--data-arg", nargs="*", default=[], help="SyntheticParts overrides, key=value (YAML values)")
    p.add_argument("--target", choices=["label", "prediction"], default="label", help="the class that is explained")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="fewer samples for RISE, LIME, SHAP, IG, SmoothGrad, XRAI, extremal, meaningful")
    p.add_argument("--figure-images", type=int, default=6)
    p.add_argument("--localisation", nargs="*", default=[], choices=list(LOCALISATIONS),
                   help="prototype ground-truth rows per localisation method (train.prototype_evidence)")
    p.add_argument("--evidence-top-k", type=int, default=3, help="prototypes per test image of the pointing rows")
    p.add_argument("--sanity", nargs="*", default=None,
                   help="key=value of train.sanity's checks (num_images, top_k, random_images, groups, sources): write sanity.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare")
    first = p.parse_args(argv)
    if first.config is not None and first.resolution is not None:
        raise ValueError("give --config or --resolution, not both")
    if first.resolution is not None:
        first.config = PRESETS / f"synthparts_{first.resolution}.yaml"
        if not first.config.is_file():
            known = sorted(f.stem.split("_")[-1] for f in PRESETS.glob("synthparts_*.yaml"))
            raise ValueError(f"--resolution {first.resolution}: no preset (resolutions: {', '.join(known)})")
    if first.config is None:
        args = first
    else:
        p.set_defaults(**_config_defaults(p, first.config))
        args = p.parse_args(argv)
    if not args.checkpoint:
        raise ValueError("give --checkpoint [NAME=]SOURCE ... (or --config / --resolution)")
    return args


def _read_data_file(path: str, num_images: int) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--data-file {path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is one clear line
        raise ValueError(f"--data-file {path}: cannot read it as a weights-only torch file ({type(exc).__name__})") from None
    if not (isinstance(data, dict) and isinstance(data.get("image"), torch.Tensor) and isinstance(data.get("label"), torch.Tensor)):
        raise ValueError(f"--data-file {path}: expected a dict of tensors with 'image' and 'label'")
    data = {k: v[:num_images] for k, v in data.items()}
    data.setdefault("index", torch.arange(len(data["image"])))
    return data


def _evidence(models: dict, specs: list, data: dict, args: argparse.Namespace) -> list[dict]:
    """The `train.prototype_evidence` rows of every prototype model trained on SyntheticParts."""
    if args.data_file:
        raise ValueError("--localisation needs SyntheticParts (the prototypes' sources are re-rendered), not --data-file")
    rows = []
    for name, source in specs:
        recipe = synthetic_recipe(source)
        if not callable(getattr(models[name], "prototype_active", None)) or not recipe:
            continue  # not a prototype model, or its push data is unknown
        rows += evidence_rows(name, models[name], recipe, data, args.localisation, top_k=args.evidence_top_k,
                              seed=args.seed, batch_size=args.batch_size)
    return rows


def _sanity(models: dict, specs: list, args: argparse.Namespace) -> str | None:
    """`train.sanity`'s table of every prototype model, for the ``--localisation`` methods (None: no such model)."""
    from .sanity import model_sanity_rows, to_markdown as sanity_markdown  # noqa: PLC0415

    options = {k: yaml.safe_load(v) for k, v in _pairs(args.sanity, "--sanity")}
    known = {"num_images", "top_k", "random_images", "groups", "sources"}
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"--sanity: unknown key {key!r} (keys: {', '.join(sorted(known))})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--sanity {key}={value!r}: expected a positive integer")
    rows = []
    for name, source in specs:
        if callable(getattr(models[name], "prototype_active", None)):
            rows += model_sanity_rows(name, source, models[name], args.localisation or list(LOCALISATIONS), **options)
    return sanity_markdown(rows) if rows else None


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the comparison and write ``results.csv`` (per image), ``summary.csv``, ``table.md`` and
    ``grid_<model>.png`` into ``--out``; returns the summary rows."""
    args = _parse_args(argv)
    torch.manual_seed(args.seed)
    # NAME=SOURCE, unless the whole argument is a file (Lightning names files like "epoch=3-step=9.ckpt")
    specs = [s.split("=", 1) if "=" in s and not Path(s).is_file() else [default_name(s), s] for s in args.checkpoint]
    models = {name: load_pretrained(source).to(args.device).eval() for name, source in specs}
    if args.data_file:
        data = _read_data_file(args.data_file, args.num_images)
    else:
        data_args = synthetic_recipe(specs[0][1]) or {}
        data_args.update({k: yaml.safe_load(v) for k, v in _pairs(args.data_arg, "--data-arg")})
        data = load_synthetic(data_args, args.num_images)
    model_methods = {name: methods.split(",") for name, methods in _pairs(args.model_methods, "--model-methods")}
    method_kwargs, metric_kwargs = _options(args.method_arg), _options(args.metric_arg)
    rows, heatmaps = evaluate(models, data, args.methods, args.metrics, target=args.target, batch_size=args.batch_size,
                              quick=args.quick, device=args.device, keep_heatmaps=args.figure_images,
                              model_methods=model_methods, method_kwargs=method_kwargs, metric_kwargs=metric_kwargs)
    if args.localisation:
        rows += _evidence(models, specs, data, args)
    if not rows:
        raise ValueError("nothing to compare: give --methods, or --localisation for prototype models")
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sanity is not None:
        table = _sanity(models, specs, args)
        if table is None:
            print("[compare] --sanity: no prototype model among the checkpoints, sanity.md not written", flush=True)
        else:
            (out / "sanity.md").write_text(table)
    _write_csv(out / "results.csv", rows)
    _write_csv(out / "summary.csv", summary)
    (out / "table.md").write_text(to_markdown(summary))
    from explain.viz import method_grid, save_figure  # noqa: PLC0415 (matplotlib only when drawing)

    for name, maps in heatmaps.items():
        if maps:
            save_figure(method_grid(data["image"][: args.figure_images], maps), out / f"grid_{name}.png")
    print(to_markdown(summary))
    return summary


if __name__ == "__main__":
    run_main(main)
