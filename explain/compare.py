"""Compare explanation methods x models on one test set: a CSV, a Markdown table (mean and 95% interval
per cell) and a figure grid of the same images explained by every method.

    python -m explain.compare --checkpoint cam=runs/cam/.../best.ckpt resnet=runs/plain/.../best.ckpt \\
        --methods intrinsic gradcam integrated_gradients lime rise --num-images 100 --out runs/compare

Checkpoints are Lightning checkpoints of zoo models, read with ``weights_only=True``; the class comes from
``--model-class``, the checkpoint (``zoo_class_path``, LightningCLI's ``_class_path``) or the run's
``config.yaml`` next to ``checkpoints/``. The data is
SyntheticParts' test split, built from the run's ``data`` config (so it matches training) or from
``--data-arg key=value``; ``--data-file`` takes a ``torch.save``d dict of tensors instead ("image",
"label", optional "part_masks", "body_box"). Only `main` touches `train/` (lazily, in
`load_synthetic`): ``explain/`` stays importable without it, as the design's import rule asks.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml
from scipy import stats
from torch import Tensor, nn

from explain import metrics as M
from explain.posthoc import attribute, list_methods
from models.base import InterpretableClassifier
from models.pretrained import FORMAT as ZOO_FORMAT
from models.pretrained import list_pretrained, load_pretrained, pretrained_entry

__all__ = ["METRICS", "HIGHER_IS_BETTER", "load_model", "load_synthetic", "evaluate", "summarise", "to_markdown", "main"]

# name -> fn(model, images, heatmaps, target, batch, **options) -> (B,) or a dict of (B,) / (B, T) tensors
MetricFn = Callable[..., Any]


def _part_union(batch: dict) -> Tensor:
    if "part_masks" not in batch:
        raise ValueError("this metric needs 'part_masks' in the data")
    return batch["part_masks"].any(1)


def _box_mask(batch: dict) -> Tensor:
    """Mask of the object's box (x0, y0, x1, y1, edges, x1 exclusive); the part union without boxes."""
    if "body_box" not in batch:
        return _part_union(batch)
    height, width = batch["image"].shape[-2:]
    box = batch["body_box"]
    ys = torch.arange(height, device=box.device)[None, :, None] + 0.5
    xs = torch.arange(width, device=box.device)[None, None, :] + 0.5
    return (xs >= box[:, 0, None, None]) & (xs < box[:, 2, None, None]) & (ys >= box[:, 1, None, None]) & (ys < box[:, 3, None, None])


def _funnybirds(model, images, heatmaps, target, batch, **kw) -> dict[str, Tensor]:
    if "render_fn" not in batch:
        raise ValueError("funnybirds needs data that can be re-rendered (SyntheticParts)")
    return M.funnybirds(
        model, images, heatmaps, target, render_fn=batch["render_fn"], indices=batch["index"],
        part_names=batch["part_names"], part_masks=batch.get("part_masks"), background_names=batch["background_names"],
        **kw,
    )


METRICS: dict[str, MetricFn] = {
    "deletion": lambda m, x, h, t, b, **kw: M.deletion(m, x, h, t, **kw),
    "insertion": lambda m, x, h, t, b, **kw: M.insertion(m, x, h, t, **kw),
    "road_morf": lambda m, x, h, t, b, **kw: M.road(m, x, h, t, order="morf", **kw),
    "road_lerf": lambda m, x, h, t, b, **kw: M.road(m, x, h, t, order="lerf", **kw),
    "average_drop": lambda m, x, h, t, b, **kw: M.average_drop(m, x, h, t, **kw),
    "increase_in_confidence": lambda m, x, h, t, b, **kw: M.increase_in_confidence(m, x, h, t, **kw),
    # default tolerance: 15 px at the paper's 224 px, scaled to the image (at 64 px 15 px covers most objects)
    "pointing_game": lambda m, x, h, t, b, **kw: M.pointing_game(
        m, x, h, t, masks=_part_union(b), **{"tolerance": 15 * x.shape[-1] / 224, **kw}),
    "energy_pointing_game": lambda m, x, h, t, b, **kw: M.energy_pointing_game(m, x, h, t, masks=_box_mask(b), **kw),
    "relevance_mass": lambda m, x, h, t, b, **kw: M.relevance_mass(m, x, h, t, masks=_part_union(b), **kw),
    "funnybirds": _funnybirds,
}
HIGHER_IS_BETTER = {
    "deletion": False, "road_morf": False, "average_drop": False, "time_ms": False,
}  # every other column: higher is better
DEFAULT_METRICS = ("deletion", "insertion", "road_morf", "average_drop", "increase_in_confidence", "pointing_game",
                   "energy_pointing_game", "relevance_mass", "funnybirds")


# ----------------------------------------------------------------------------- loading
def _class_path(checkpoint: Path, ckpt: dict, model_class: str | None) -> str:
    hparams = ckpt.get("hyper_parameters") or {}
    for found in (model_class, ckpt.get("zoo_class_path"), hparams.get("_class_path")):
        if found:
            return found
    config = checkpoint.resolve().parent.parent / "config.yaml"  # runs/<name>/<stamp>/checkpoints/x.ckpt
    if config.is_file():
        model_cfg = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        if model_cfg.get("class_path"):
            return model_cfg["class_path"]
    raise ValueError(f"cannot tell the model class of {checkpoint}: no _class_path, no {config}; pass --model-class")


def load_model(path: str | Path, model_class: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A zoo model in eval mode on `device` from a released name, a zoo file or a Lightning checkpoint.

    Files are read weights-only; `model_class` names the class when a Lightning checkpoint does not tell it.
    """
    if model_class is None and str(path) in list_pretrained():
        return load_pretrained(str(path)).to(device).eval()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (and no released checkpoint of that name)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if model_class is None and (ckpt.get("format") == ZOO_FORMAT or ckpt.get("zoo_class_path")):
        return load_pretrained(path, check_hash=False).to(device).eval()
    hparams = dict(ckpt.get("hyper_parameters") or {})
    module, _, name = _class_path(path, ckpt, model_class).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    model = cls(**kwargs)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def _run_config(checkpoint: str | Path) -> dict:
    """The training config of a run's checkpoint, or the data recipe a released checkpoint records."""
    if str(checkpoint) in list_pretrained():
        entry = pretrained_entry(str(checkpoint))
        return {"data": entry.manifest.get("data") or {}}
    config = Path(checkpoint).resolve().parent.parent / "config.yaml"
    return yaml.safe_load(config.read_text()) if config.is_file() else {}


def load_synthetic(data_args: dict, num_images: int) -> dict:
    """The first `num_images` of SyntheticParts' test split and a ``render_fn`` for the FunnyBirds checks.

    Imports ``train.data`` here, lazily, so that ``explain`` does not depend on ``train`` at import
    time. Background objects are the single distractors: ``render_fn(i, ["distractor2"])`` re-renders
    image i without its third distractor.
    """
    from train.data import SyntheticParts  # noqa: PLC0415 (lazy on purpose, see the docstring)

    args = {k: v for k, v in data_args.items() if k in {"num_classes", "image_size", "seed", "clutter", "occlusion",
                                                        "color_jitter", "shortcut", "test_size"}}
    dm = SyntheticParts(**args, cache=False, augment=False)
    dataset = dm.dataset("test")
    if num_images > len(dataset):
        raise ValueError(f"asked for {num_images} images but the test split has {len(dataset)}")
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


# ----------------------------------------------------------------------------- evaluation
def _method_kwargs(method: str, quick: bool) -> dict:
    if not quick:
        return {}
    return {"rise": {"n_masks": 500}, "lime": {"n_samples": 64}, "kernel_shap": {"n_samples": 64},
            "integrated_gradients": {"n_steps": 16}, "smoothgrad": {"n_samples": 8}}.get(method, {})


def evaluate(
    models: dict[str, nn.Module], data: dict, methods: Sequence[str], metrics: Sequence[str], *,
    target: str = "label", batch_size: int = 32, quick: bool = False, device: str | torch.device = "cpu",
    keep_heatmaps: int = 0, model_methods: dict[str, Sequence[str]] | None = None,
    method_kwargs: dict[str, dict] | None = None, metric_kwargs: dict[str, dict] | None = None,
) -> tuple[list[dict], dict[str, dict[str, Tensor]]]:
    """Per-image scores as rows {model, method, metric, image, value}, and the first `keep_heatmaps`
    heatmaps per model and method (for the figure). `model_methods` overrides `methods` per model;
    "intrinsic" is skipped for models without their own explain()."""
    model_methods = dict(model_methods or {})
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    unknown = [m for m in {*methods, *(x for v in model_methods.values() for x in v)} if m not in list_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list_methods()}")
    rows: list[dict] = []
    kept: dict[str, dict[str, Tensor]] = {}
    n = len(data["image"])
    for model_name, model in models.items():
        kept[model_name] = {}
        for method in model_methods.get(model_name, methods):
            if method == "intrinsic" and not _has_own_explain(model):
                continue
            heatmaps, values, funny = [], {m: [] for m in metrics if m != "funnybirds"}, []
            seconds = 0.0
            for start in range(0, n, batch_size):
                batch = {k: (v[start:start + batch_size].to(device) if isinstance(v, Tensor) else v) for k, v in data.items()}
                images = batch["image"]
                with torch.no_grad():
                    predicted = model(images).argmax(1)
                explained = batch["label"] if target == "label" else predicted
                tic = time.perf_counter()
                kwargs = {**_method_kwargs(method, quick), **(method_kwargs or {}).get(method, {})}
                maps = attribute(model, images, explained, method=method, **kwargs)
                seconds += time.perf_counter() - tic
                heatmaps.append(maps[: max(0, keep_heatmaps - start)].cpu())
                for metric in metrics:
                    out = METRICS[metric](model, images, maps, explained, batch, **(metric_kwargs or {}).get(metric, {}))
                    if metric == "funnybirds":
                        funny.append(out)
                    else:
                        values[metric].append(out.detach().float().cpu())
            columns = {m: torch.cat(v) for m, v in values.items()}
            if funny:
                merged = {k: torch.cat([f[k].cpu() for f in funny]) for k in funny[0] if k != "thresholds"}
                merged["thresholds"] = funny[0]["thresholds"].cpu()
                best = M.funnybirds_at_best_threshold(merged)
                columns.update({f"fb_{k}": v for k, v in best.items() if k != "threshold"})
            columns["time_ms"] = torch.full((n,), 1000 * seconds / n)
            print(f"[compare] {model_name} / {method}: {n} images, {seconds:.1f} s explaining", flush=True)
            for metric, column in columns.items():
                rows += [{"model": model_name, "method": method, "metric": metric, "image": i, "value": float(v)}
                         for i, v in enumerate(column.tolist())]
            kept[model_name][method] = torch.cat(heatmaps)
    return rows, kept


def _has_own_explain(model: nn.Module) -> bool:
    explain = getattr(type(model), "explain", None)
    return explain is not None and explain is not InterpretableClassifier.explain


def summarise(rows: list[dict], confidence: float = 0.95) -> list[dict]:
    """Mean and two-sided t interval per (model, method, metric), over the finite per-image values."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["metric"]), []).append(r["value"])
    out = []
    for (model, method, metric), values in groups.items():
        finite = [v for v in values if math.isfinite(v)]
        n = len(finite)
        mean = sum(finite) / n if n else float("nan")
        if n > 1:
            sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
            half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        else:
            half = float("nan")
        out.append({"model": model, "method": method, "metric": metric, "n": n, "mean": mean,
                    "ci_low": mean - half, "ci_high": mean + half})
    return out


def to_markdown(summary: list[dict], digits: int = 3) -> str:
    """One row per (model, method), one column per metric: "mean ± half-width" (95% t interval)."""
    metrics = list(dict.fromkeys(s["metric"] for s in summary))
    rows = list(dict.fromkeys((s["model"], s["method"]) for s in summary))
    cell = {(s["model"], s["method"], s["metric"]): s for s in summary}
    head = [f"{m} {'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}" for m in metrics]
    lines = ["| model | method | " + " | ".join(head) + " |", "|" + "---|" * (len(metrics) + 2)]
    for model, method in rows:
        cells = []
        for metric in metrics:
            s = cell.get((model, method, metric))
            if s is None or not math.isfinite(s["mean"]):
                cells.append("–")
            elif math.isfinite(s["ci_high"]) and s["ci_high"] > s["ci_low"]:
                cells.append(f"{s['mean']:.{digits}f} ± {(s['ci_high'] - s['ci_low']) / 2:.{digits}f}")
            else:
                cells.append(f"{s['mean']:.{digits}f}")
        lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- command line
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


def _default_name(checkpoint: Path) -> str:
    """The run name of runs/<name>/<stamp>/checkpoints/x.ckpt, else the file's stem."""
    parts = checkpoint.resolve().parts
    return parts[-4] if len(parts) >= 4 and parts[-2] == "checkpoints" else checkpoint.stem


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m explain.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="[NAME=]SOURCE: a released name (models.list_pretrained()), a zoo file or a Lightning checkpoint")
    p.add_argument("--model-class", default=None, help="class path when the checkpoint does not tell it")
    p.add_argument("--methods", nargs="+", default=["intrinsic", "gradcam", "integrated_gradients", "lime", "rise"])
    p.add_argument("--model-methods", nargs="*", default=[], help="NAME=m1,m2: other methods for model NAME")
    p.add_argument("--method-arg", nargs="*", default=[], help="METHOD.key=value (YAML value), e.g. rise.n_masks=2000")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help=f"of {sorted(METRICS)}")
    p.add_argument("--metric-arg", nargs="*", default=[], help="METRIC.key=value (YAML value), e.g. deletion.step=128")
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--data-file", default=None, help="torch.save'd dict of tensors instead of SyntheticParts")
    p.add_argument("--data-arg", nargs="*", default=[], help="SyntheticParts overrides, key=value (YAML values)")
    p.add_argument("--target", choices=["label", "prediction"], default="label", help="the class that is explained")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="fewer samples for RISE, LIME, SHAP, IG, SmoothGrad")
    p.add_argument("--figure-images", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the comparison and write ``results.csv`` (per image), ``summary.csv``, ``table.md`` and
    ``grid_<model>.png`` into ``--out``; returns the summary rows."""
    args = _parse_args(argv)
    torch.manual_seed(args.seed)
    specs = [s.split("=", 1) if "=" in s else [_default_name(Path(s)), s] for s in args.checkpoint]
    models = {name: load_model(path, args.model_class, args.device) for name, path in specs}
    if args.data_file:
        data = torch.load(args.data_file, map_location="cpu", weights_only=True)
        data = {k: v[: args.num_images] for k, v in data.items()}
        data.setdefault("index", torch.arange(len(data["image"])))
    else:
        data_args = dict((_run_config(specs[0][1]).get("data") or {}).get("init_args") or {})
        data_args.update({k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.data_arg)})
        data = load_synthetic(data_args, args.num_images)
    model_methods = {name: methods.split(",") for name, methods in (a.split("=", 1) for a in args.model_methods)}
    method_kwargs, metric_kwargs = _options(args.method_arg), _options(args.metric_arg)
    rows, heatmaps = evaluate(models, data, args.methods, args.metrics, target=args.target, batch_size=args.batch_size,
                              quick=args.quick, device=args.device, keep_heatmaps=args.figure_images,
                              model_methods=model_methods, method_kwargs=method_kwargs, metric_kwargs=metric_kwargs)
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    main()
