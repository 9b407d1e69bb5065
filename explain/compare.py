"""Compare explanation methods x models on one batch of data: per-image scores of every metric, their mean
and 95% t interval, and a Markdown table.

`evaluate` takes models and a dict of tensors (``"image"`` in [0, 1], ``"label"``, optional
``"part_masks"`` (B, P, H, W), ``"body_box"`` (B, 4), and for the FunnyBirds checks ``"render_fn"``,
``"index"``, ``"part_names"``, ``"background_names"``). The command line over datasets and checkpoints
is ``python -m train.compare``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from scipy import stats
from torch import Tensor, nn

from explain import metrics as M
from explain.posthoc import attribute, list_methods
from models.base import InterpretableClassifier

__all__ = ["METRICS", "HIGHER_IS_BETTER", "DEFAULT_METRICS", "pointing_tolerance", "evaluate", "summarise", "to_markdown"]

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


def pointing_tolerance(rule: float | str, width: int) -> float:
    """The pointing game's tolerance in pixels of an image `width` px wide.

    ``"torchray"`` (the default): TorchRay's 15 px at the image's own resolution, as the benchmark
    applies it to VOC and COCO images. ``"scaled"``: 15 px at 224 px scaled to the image,
    15 x width / 224 (4.3 px at 64 px), a stricter rule for small images where 15 px spans a large
    part of the object. A number is used as is. TorchRay's rule is the default because it is the
    definition the published pointing-game figures use and assumes nothing about the resolution the
    tolerance was meant for; pass ``tolerance="scaled"`` to compare small images at the paper's scale.

    Examples:
        >>> pointing_tolerance("torchray", 64), round(pointing_tolerance("scaled", 64), 2)
        (15.0, 4.29)
    """
    if rule == "torchray":
        return 15.0
    if rule == "scaled":
        return 15.0 * width / 224
    if isinstance(rule, (int, float)) and not isinstance(rule, bool) and rule > 0:
        return float(rule)
    raise ValueError(f"pointing_game tolerance must be 'torchray', 'scaled' or a number of pixels > 0, got {rule!r}")


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
    "pointing_game": lambda m, x, h, t, b, tolerance="torchray", **kw: M.pointing_game(
        m, x, h, t, masks=_part_union(b), tolerance=pointing_tolerance(tolerance, x.shape[-1]), **kw),
    "energy_pointing_game": lambda m, x, h, t, b, **kw: M.energy_pointing_game(m, x, h, t, masks=_box_mask(b), **kw),
    "relevance_mass": lambda m, x, h, t, b, **kw: M.relevance_mass(m, x, h, t, masks=_part_union(b), **kw),
    "funnybirds": _funnybirds,
}
HIGHER_IS_BETTER = {
    "deletion": False, "road_morf": False, "average_drop": False, "time_ms": False,
    "other_part": False, "body": False, "distractors": False, "background": False,  # prototype evidence rows
}  # every other column: higher is better
DEFAULT_METRICS = ("deletion", "insertion", "road_morf", "average_drop", "increase_in_confidence", "pointing_game",
                   "energy_pointing_game", "relevance_mass", "funnybirds")


# ----------------------------------------------------------------------------- evaluation
def _method_kwargs(method: str, quick: bool) -> dict:
    if not quick:
        return {}
    return {"rise": {"n_masks": 500}, "lime": {"n_samples": 64}, "kernel_shap": {"n_samples": 64},
            "integrated_gradients": {"n_steps": 16}, "smoothgrad": {"n_samples": 8},
            "xrai": {"steps": 20}, "extremal": {"max_iter": 100}, "meaningful": {"iterations": 100}}.get(method, {})


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


if __name__ == "__main__":  # the command line is train.compare
    raise SystemExit("error: the command line is python -m train.compare")
