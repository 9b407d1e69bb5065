"""Network Dissection (Bau et al., CVPR 2017) for any model.

Two passes over an unshuffled loader of dict batches (``"image"`` in [0, 1] and concepts, see
:mod:`explain.concepts`), batched on the model's device:

1. every unit's threshold T_k with P(a_k > T_k) = 0.005 over all positions of all images, from a
   streaming per-unit histogram (`StreamingQuantile`; its error is bounded and reported), and every
   unit's top-k images by maximum activation;
2. activation maps upsampled (bilinear) to the concept maps' resolution, M_k = S_k > T_k, and per unit
   and concept the intersection and union summed over the whole dataset (a bincount of the labels
   under the active pixels, a matmul for the unions); IoU_{k,c} = sum |M_k & L_c| / sum |M_k | L_c|.

A unit is a detector of its best concept when that IoU > 0.04. `write_report` writes NetDissect's
report: ``tally.csv``, ``report.html`` (summary, bar graph, one section per unit with its label, IoU
and top images with the thresholded region), ``bargraph.svg`` and ``images/`` in one folder.

The command line over released models and datasets is ``python -m train.dissect``.
"""
from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .concepts import ConceptSet, concept_batch
from .posthoc import find_layer, resolve_layer

__all__ = [
    "Dissection",
    "StreamingQuantile",
    "count_detectors",
    "default_layer",
    "dissect",
    "layer_output",
    "write_report",
    "write_tally",
]


# ------------------------------------------------------------------------------------ layer access
class _LayerReached(Exception):
    """Raised by the hook to end the forward pass once the layer has run (the rest is not needed)."""


def layer_output(model: nn.Module, layer: nn.Module | str, images: Tensor, stop: bool = True) -> Tensor:
    """Output (B, C, h, w) of `layer` (a module or dotted name) on `images`, keeping the autograd graph.

    With `stop` the forward pass ends right after the layer: it saves the rest of the network, and no
    later in-place op (a ReLU after a hooked conv) can alter the returned tensor.
    """
    module = resolve_layer(model, layer)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            got = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"the dissected layer must output a (B, C, h, w) tensor, got {got}")
        captured.append(output if stop else output.clone())
        if stop:
            raise _LayerReached

    handle = module.register_forward_hook(hook)
    try:
        model(images)
    except _LayerReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {type(module).__name__} did not run in the forward pass of {type(model).__name__}")
    return captured[0]


def default_layer(model: nn.Module, image_size: int = 64) -> str | nn.Module:
    """The layer dissected when none is named: an ICNN's last interpretable layer (`feature_layer`),
    else the trunk (`backbone`), else the last module with a spatial 4-D output (`find_layer`)."""
    if isinstance(getattr(model, "feature_layer", None), nn.Module):
        return model.feature_layer
    if isinstance(getattr(model, "backbone", None), nn.Module):
        return "backbone"
    param, was_training = next(model.parameters(), None), model.training
    try:
        return find_layer(model.eval(), torch.zeros(1, 3, image_size, image_size, device=param.device if param is not None else "cpu"))
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------ quantiles
class StreamingQuantile:
    """Per-unit histograms over a running range: quantiles of a stream of activations never held at once.

    Unit k has `bins` equal bins over [lo_k, lo_k + width_k]. A value outside the range doubles it
    towards the value, merging bin pairs, so every count stays exact for its (coarser) bin. A quantile
    is read like `torch.quantile` (linear between the order statistics of rank floor(r) and ceil(r),
    r = q (n - 1)): the true value lies in the span from the first of their bins to the last, and so
    does the estimate, so the error is at most that span, reported per unit as `error_bound`. It is one
    bin, width / bins, when both order statistics share a bin (two when they straddle an edge); and
    width < 4 (max - min), since a doubling only happens while more than a quarter of the new range
    lies between the extremes seen (apart from the floor of 1e-6 max(|x|, 1) given to a unit whose
    first batch is constant, such as a dead ReLU).
    """

    def __init__(self, num_units: int, bins: int = 2048, device: Any = None) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(num_units, bins, dtype=torch.long, device=device)
        self.lo = torch.zeros(num_units, dtype=torch.float64, device=device)
        self.width = torch.zeros(num_units, dtype=torch.float64, device=device)
        self.count = 0

    def _grow(self, vmin: Tensor, vmax: Tensor) -> None:
        half = self.bins // 2
        while True:
            up = vmax > self.lo + self.width
            down = ~up & (vmin < self.lo)
            if not (up.any() or down.any()):
                return
            merged = self.counts.view(-1, half, 2).sum(dim=2)
            zeros = torch.zeros_like(merged)
            grown = torch.where(up[:, None], torch.cat([merged, zeros], dim=1), torch.cat([zeros, merged], dim=1))
            self.counts = torch.where((up | down)[:, None], grown, self.counts)
            self.lo = torch.where(down, self.lo - self.width, self.lo)
            self.width = torch.where(up | down, 2 * self.width, self.width)

    def update(self, values: Tensor) -> None:
        """Add (num_units, N) values."""
        values = values.detach().to(self.counts.device, torch.float64)
        if values.dim() != 2 or values.shape[0] != self.counts.shape[0]:
            raise ValueError(f"values must be ({self.counts.shape[0]}, N), got {tuple(values.shape)}")
        if values.shape[1] == 0:
            return
        vmin, vmax = values.amin(dim=1), values.amax(dim=1)
        if not (torch.isfinite(vmin).all() and torch.isfinite(vmax).all()):
            raise ValueError("activations contain NaN or inf; cannot compute their quantiles")
        if self.count == 0:
            # A constant first batch (a dead ReLU unit) gets a tiny range that doubles when needed.
            self.lo, self.width = vmin, (vmax - vmin).clamp(min=1e-6 * max(float(vmax.abs().max()), 1.0))
        else:
            self._grow(vmin, vmax)
        index = ((values - self.lo[:, None]) / self.width[:, None] * self.bins).floor().long().clamp_(0, self.bins - 1)
        index += torch.arange(values.shape[0], device=index.device)[:, None] * self.bins
        self.counts += torch.bincount(index.flatten(), minlength=self.counts.numel()).view_as(self.counts)
        self.count += values.shape[1]

    def quantile(self, q: float) -> tuple[Tensor, Tensor]:
        """(estimate (C,), error_bound (C,)) of the q-quantile of each unit's values (float64)."""
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if self.count == 0:
            raise ValueError("no values were added")
        rank = q * (self.count - 1)
        j0, j1 = math.floor(rank), math.ceil(rank)
        cum = self.counts.cumsum(dim=1)
        step = self.width / self.bins

        def locate(j: int) -> tuple[Tensor, Tensor]:
            b = torch.searchsorted(cum, torch.full((cum.shape[0], 1), j, device=cum.device), right=True)
            inside = self.counts.gather(1, b)
            frac = (j - (cum.gather(1, b) - inside) + 0.5) / inside  # uniform spread within the bin
            return b[:, 0], self.lo + (b[:, 0] + frac[:, 0]) * step

        b0, v0 = locate(j0)
        b1, v1 = locate(j1)
        return v0 + (rank - j0) * (v1 - v0), (b1 - b0 + 1) * step


# ------------------------------------------------------------------------------------ dissection
@dataclass
class Dissection:
    """Result of `dissect` for one layer (C units, K concepts).

    intersection, union, activation (C, K) are dataset sums of |M_k & L_c|, |M_k | L_c| and |M_k| on
    the images annotated for c's category; truth (K,) sums |L_c|. top_* hold each unit's top images by
    maximum activation: positions in loader order, scores, raw maps (C, k, h, w), and `top_slots` into
    `top_images` (U, 3, t, t) uint8 thumbnails.
    """

    layer: str
    concepts: ConceptSet
    thresholds: Tensor
    threshold_error: Tensor
    intersection: Tensor
    union: Tensor
    activation: Tensor
    truth: Tensor
    num_images: int
    top_fraction: float
    iou_threshold: float
    top_positions: Tensor
    top_scores: Tensor
    top_maps: Tensor
    top_slots: Tensor
    top_images: Tensor

    @property
    def iou(self) -> Tensor:
        """(C, K) IoU pooled over the dataset (0 where the union is empty)."""
        return self.intersection.double() / self.union.clamp(min=1).double()

    @property
    def best_concept(self) -> Tensor:
        """(C,) index of each unit's concept of highest IoU."""
        return self.iou.argmax(dim=1)

    @property
    def score(self) -> Tensor:
        """(C,) IoU of each unit's best concept."""
        return self.iou.amax(dim=1)

    @property
    def detectors(self) -> Tensor:
        """(C,) bool: the unit detects its best concept (IoU > iou_threshold)."""
        return self.score > self.iou_threshold

    def label(self, unit: int) -> str | None:
        """The concept a unit detects, or None when it detects none."""
        return self.concepts.names[int(self.best_concept[unit])] if self.detectors[unit] else None

    def summary(self) -> dict[str, Any]:
        """Units, detector units, distinct detected concepts, and both per concept category."""
        best, det = self.best_concept[self.detectors].tolist(), int(self.detectors.sum())
        per_category: dict[str, dict[str, int]] = {}
        for cat in dict.fromkeys(self.concepts.categories):
            found = [b for b in best if self.concepts.categories[b] == cat]
            per_category[cat] = {"detectors": len(found), "concepts": len(set(found))}
        return {
            "layer": self.layer, "units": int(self.thresholds.numel()), "detectors": det,
            "concepts": len(set(best)), "per_category": per_category,
            "detected": sorted({self.concepts.names[b] for b in best}),
        }


def _update_top(top: tuple[Tensor, Tensor, Tensor] | None, act: Tensor, first: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge a batch into the per-unit top-k (scores, positions, maps) by maximum activation."""
    b, c = act.shape[:2]
    scores = act.amax(dim=(2, 3)).T
    positions = torch.arange(first, first + b, device=act.device).expand(c, b)
    maps = act.transpose(0, 1)
    if top is not None:
        scores, positions, maps = (torch.cat(pair, dim=1) for pair in zip(top, (scores, positions, maps)))
    best = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return scores.gather(1, best), positions.gather(1, best), maps[torch.arange(c, device=act.device)[:, None], best]


def _batches(model: nn.Module, layer: nn.Module, loader: Iterable, num_concepts: int, dev: torch.device,
             max_batches: int | None) -> Iterable[tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]]:
    """(images and activations on `dev`, concept maps, annotated, dataset indices or None) per batch."""
    for batch in islice(loader, max_batches):
        images, maps, annotated = concept_batch(batch, num_concepts)
        images = images.to(dev)
        yield images, maps, annotated, layer_output(model, layer, images).float(), batch.get("index")


def _thumbnails(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def dissect(
    model: nn.Module,
    layer: nn.Module | str,
    loader: Iterable,
    concepts: ConceptSet,
    top_fraction: float = 0.005,
    iou_threshold: float = 0.04,
    bins: int = 2048,
    top_k: int = 10,
    thumbnail: int = 112,
    unit_chunk: int | None = None,
    device: Any = None,
    max_batches: int | None = None,
) -> Dissection:
    """Dissect `layer` of `model` against `concepts` over `loader` (unshuffled; it is read twice).

    Args:
        model: called on images in [0, 1]; run in eval mode (its mode is restored after).
        layer: a module of `model` or its dotted name; its output (B, C, h, w) holds the C units.
        loader: dict batches with ``"image"`` and ``"part_masks"`` or ``"concept_maps"``.
        concepts: the K concept names (value k + 1 in concept maps is concept k).
        top_fraction: P(a_k > T_k) (NetDissect's 0.005).
        iou_threshold: a unit is a detector when its best IoU exceeds it (0.04).
        bins: histogram bins per unit of the streaming quantile (error <= one bin, see `StreamingQuantile`).
        top_k: images kept per unit for the report (0 = none: counts only).
        thumbnail: side of the kept image thumbnails (capped at the image side).
        unit_chunk: units upsampled at once (None: keep a chunk near 2^24 mask pixels).
    """
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    num_concepts, was_training = len(concepts), model.training
    layer_name = layer if isinstance(layer, str) else next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
    layer = resolve_layer(model, layer)  # fails before any pass when the name is wrong
    model.eval()
    try:
        # Pass 1: thresholds and top images.
        sketch, top, seen, order = None, None, 0, []
        for images, _, _, act, index in _batches(model, layer, loader, num_concepts, dev, max_batches):
            if sketch is None:
                sketch = StreamingQuantile(act.shape[1], bins, dev)
            sketch.update(act.transpose(0, 1).flatten(1))
            if top_k > 0:
                top = _update_top(top, act, seen, top_k)
            order.append(index.cpu() if index is not None else torch.arange(seen, seen + len(images)))
            seen += len(images)
        if sketch is None:
            raise ValueError("the loader yielded no batches")
        thresholds, error = sketch.quantile(1 - top_fraction)
        thresholds = thresholds.float()
        c = thresholds.numel()
        wanted = top[1].unique() if top is not None else torch.zeros(0, dtype=torch.long, device=dev)

        # Pass 2: pooled intersections and unions, thumbnails of the top images.
        inter = torch.zeros(c, num_concepts + 1, dtype=torch.long, device=dev)
        activation = torch.zeros(c, num_concepts, dtype=torch.float64, device=dev)
        truth = torch.zeros(num_concepts + 1, dtype=torch.long, device=dev)
        thumbs, seen2 = [], 0
        stream = _batches(model, layer, loader, num_concepts, dev, max_batches)
        for i, (images, maps, annotated, act, index) in enumerate(stream):
            b, size, maps = len(images), maps.shape[-2:], maps.to(dev)
            annotated = annotated.to(dev) if annotated is not None else None
            if i >= len(order) or seen2 + b > seen or (index is not None and not torch.equal(index.cpu(), order[i])):
                raise ValueError("the loader must yield the same images in the same order on each pass (do not shuffle)")
            truth += torch.bincount(maps.flatten(), minlength=num_concepts + 1)
            chunk = unit_chunk or max(1, (1 << 24) // max(1, b * size.numel()))
            for c0 in range(0, c, chunk):
                up = F.interpolate(act[:, c0:c0 + chunk], size=size, mode="bilinear", align_corners=False)
                region = up > thresholds[c0:c0 + chunk, None, None]
                area = region.sum(dim=(2, 3)).double()  # (B, c)
                activation[c0:c0 + chunk] += area.sum(0)[:, None] if annotated is None else area.T @ annotated.double()
                bi, ui, yi, xi = region.nonzero(as_tuple=True)
                keys = (ui[:, None] * (num_concepts + 1) + maps[bi, :, yi, xi]).flatten()
                n = region.shape[1] * (num_concepts + 1)
                inter[c0:c0 + chunk] += torch.bincount(keys, minlength=n).view(-1, num_concepts + 1)
            pick = torch.isin(torch.arange(seen2, seen2 + b, device=dev), wanted)
            if pick.any():
                thumbs.append(_thumbnails(images[pick], min(thumbnail, images.shape[-1])))
            seen2 += b
        if seen2 != seen:
            raise ValueError(f"the loader yielded {seen} images on the first pass and {seen2} on the second")
    finally:
        model.train(was_training)

    inter, truth = inter[:, 1:], truth[1:]  # drop "no concept"
    union = activation.round().long() + truth[None, :] - inter
    if top is None:
        empty = torch.zeros(c, 0, dtype=torch.long)
        top = (empty.float(), empty, torch.zeros(c, 0, *act.shape[-2:]))
    return Dissection(
        layer=str(layer_name), concepts=concepts, thresholds=thresholds.cpu(), threshold_error=error.cpu(),
        intersection=inter.cpu(), union=union.cpu(), activation=activation.round().long().cpu(), truth=truth.cpu(),
        num_images=seen, top_fraction=top_fraction, iou_threshold=iou_threshold,
        top_positions=top[1].cpu(), top_scores=top[0].cpu(), top_maps=top[2].cpu(),
        top_slots=torch.searchsorted(wanted, top[1]).cpu() if wanted.numel() else top[1].cpu(),
        top_images=torch.cat(thumbs) if thumbs else torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
    )


def count_detectors(model: nn.Module, layer: nn.Module | str, loader: Iterable, concepts: ConceptSet, **kwargs: Any) -> dict[str, Any]:
    """Number of detector units and of distinct concepts they detect (for comparing networks):
    `Dissection.summary()` of a dissection without the report images."""
    kwargs.setdefault("top_k", 0)
    return dissect(model, layer, loader, concepts, **kwargs).summary()


# ------------------------------------------------------------------------------------ report
def write_tally(d: Dissection, path: str | Path) -> Path:
    """NetDissect's tally.csv: units by descending score; unit, category, label, score, then per
    category its best concept's label, truth, activation, intersect and iou. Units are 0-based channel
    indices (NetDissect writes unit + 1); `label` is empty for a unit that is not a detector."""
    path = Path(path)
    cats = list(dict.fromkeys(d.concepts.categories))
    columns = ["unit", "category", "label", "score", "detector"]
    columns += [f"{cat}-{field}" for cat in cats for field in ("label", "truth", "activation", "intersect", "iou")]
    iou, order = d.iou, d.score.argsort(descending=True, stable=True).tolist()
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for u in order:
            best = int(d.best_concept[u])
            row: list[Any] = [u, d.concepts.categories[best], d.label(u) or "", f"{float(d.score[u]):.6f}", int(d.detectors[u])]
            for cat in cats:
                members = [k for k, kc in enumerate(d.concepts.categories) if kc == cat]
                k = members[int(iou[u, members].argmax())]
                row += [d.concepts.names[k], int(d.truth[k]), int(d.activation[u, k]), int(d.intersection[u, k]), f"{float(iou[u, k]):.6f}"]
            writer.writerow(row)
    return path


def _unit_strip(d: Dissection, unit: int, gap: int = 3) -> np.ndarray:
    """(t, n t + gaps, 3) uint8: the unit's top images, dimmed outside the thresholded region (as
    NetDissect draws them) and with the region's outline in yellow."""
    tiles = []
    for r in range(d.top_slots.shape[1]):
        image = d.top_images[d.top_slots[unit, r]].float() / 255
        t = image.shape[-1]
        up = F.interpolate(d.top_maps[unit, r][None, None], size=(t, t), mode="bilinear", align_corners=False)[0, 0]
        mask = (up > d.thresholds[unit]).float()
        inner = -F.max_pool2d(-mask[None, None], 3, stride=1, padding=1)[0, 0]
        tile = image * (0.2 + 0.8 * mask)
        tile = torch.where((mask - inner).bool(), torch.tensor([1.0, 0.9, 0.0])[:, None, None], tile)
        tiles += [tile, torch.ones(3, t, gap)]
    strip = torch.cat(tiles[:-1], dim=2) if tiles else torch.ones(3, 8, 8)
    return (strip.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _bar_graph(d: Dissection, path: Path) -> None:
    """Detector units per concept, NetDissect's bar graph (SVG), coloured by category."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    best = d.best_concept[d.detectors].tolist()
    names = sorted(set(best), key=lambda k: (-best.count(k), d.concepts.names[k]))
    cats = list(dict.fromkeys(d.concepts.categories))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(3.0, 0.35 * len(names) + 1.5), 2.6))
    ax.bar(range(len(names)), [best.count(k) for k in names],
           color=[colours(cats.index(d.concepts.categories[k]) % 10) for k in names])
    ax.set_xticks(range(len(names)), [d.concepts.names[k] for k in names], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("detector units")
    ax.set_title(f"{d.layer}: {len(best)} detectors, {len(names)} concepts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(d: Dissection, out_dir: str | Path, title: str | None = None, max_units: int | None = None) -> Path:
    """Write NetDissect's report into `out_dir`: report.html, tally.csv, summary.json, bargraph.svg and
    images/unit_XXXX.png (one strip per unit); returns the HTML path. `max_units` keeps the best units."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    write_tally(d, out / "tally.csv")
    _bar_graph(d, out / "bargraph.svg")
    summary = d.summary()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    order = d.score.argsort(descending=True, stable=True).tolist()[:max_units]
    title = html.escape(title or f"Network Dissection of {d.layer}")
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:sans-serif;margin:1em}.unit{margin:1em 0;border-top:1px solid #ccc}"
        ".unit h2{font-size:1em;margin:.4em 0}.unit img{image-rendering:pixelated;height:112px}"
        ".no{color:#999}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p class='summary'>{summary['detectors']}/{summary['units']} units covering {summary['concepts']} "
        f"concepts with IoU &gt; {d.iou_threshold:g}</p>",
        f"<p>{d.num_images} images; thresholds at the top {100 * d.top_fraction:g}% of each unit's activations; "
        "IoU pooled over the dataset. <a href='tally.csv'>tally.csv</a></p>",
        "<img src='bargraph.svg' alt='detector units per concept'>",
    ]
    for u in order:
        best, score = int(d.best_concept[u]), float(d.score[u])
        name, cat = html.escape(d.concepts.names[best]), html.escape(d.concepts.categories[best])
        label = f"{name} ({cat})" if d.detectors[u] else f"<span class='no'>no label (best: {name})</span>"
        rel = f"images/unit_{u:04d}.png"
        if d.top_slots.shape[1]:
            Image.fromarray(_unit_strip(d, u)).save(out / rel)
        parts.append(
            f"<div class='unit' id='unit-{u}'><h2>unit {u}: {label}, IoU {score:.3f}</h2>"
            f"<p>threshold {float(d.thresholds[u]):.4g}; top {d.top_slots.shape[1]} images by maximum activation</p>"
            + (f"<img src='{rel}' alt='unit {u} top images'>" if d.top_slots.shape[1] else "") + "</div>"
        )
    parts.append("</body></html>\n")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


if __name__ == "__main__":  # the command line is train.dissect
    raise SystemExit("error: the command line is python -m train.dissect")
