"""Filter-level part metrics of Zhang et al. (Interpretable CNNs, CVPR 2018).

They read one conv layer of any model through a forward hook, stream over a loader of dict batches
(``"image"`` in [0, 1], ``"part_masks"`` (B, S, H, W) bool, ``"keypoints"`` (B, S, 3) = (x, y, visible),
optionally ``"label"``), so ordinary and interpretable CNNs are scored on the same footing.

- `part_interpretability`: per filter, the threshold T_f with p(x > T_f) = 0.5% over all positions of all
  maps; the upsampled region above it is compared with each part mask per image; P_{f,k} is the fraction
  of the images containing part k where IoU > 0.2; P_f = max_k P_{f,k}; the score is the mean over filters.
- `location_instability`: the inferred part location is the receptive-field centre of the filter's most
  active unit; for each landmark, the std (ddof=1) of its distance to that location over the filter's
  top-100 images (by max activation, among images where the landmark is visible), divided by the image
  diagonal; the score is the mean over filters of the mean over landmarks (lower is better).

Which map to read is the caller's choice of layer. The released `computeStability.m` reads the raw
(pre-ReLU, unmasked) output of the new conv layer (`InterpretableCNN.raw_feature_layer`); with the
released code's centroid mask the peak of the masked map can sit elsewhere, so the two differ.
`filter_class_assignment` gives each filter a category by the paper's statistic (``"mean"``) or by the
released multi-class stability script's (``"max"``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import ReceptiveField

__all__ = [
    "PartInterpretability",
    "LocationInstability",
    "capture_layer",
    "layer_activations",
    "activation_thresholds",
    "filter_class_assignment",
    "part_interpretability",
    "location_instability",
]


@dataclass
class PartInterpretability:
    """value: mean over filters of P_f; per_filter (C,); per_filter_part (C, S), NaN where no image
    has the part; best_part (C,) argmax_k; thresholds (C,) T_f."""

    value: float
    per_filter: Tensor
    per_filter_part: Tensor
    best_part: Tensor
    thresholds: Tensor


@dataclass
class LocationInstability:
    """value: mean over filters (those with >= 2 images for every landmark) of the mean over landmarks;
    per_filter (C,) and per_filter_part (C, S), divided by the image diagonal, NaN where undefined."""

    value: float
    per_filter: Tensor
    per_filter_part: Tensor


# ----------------------------------------------------------------------------------------- plumbing
def _resolve_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"model {type(model).__name__} has no submodule {layer!r}") from None


@contextmanager
def capture_layer(model: nn.Module, layer: nn.Module | str) -> Iterator[list[Tensor]]:
    """Collect the layer's (B, C, h, w) outputs of every forward inside the block; the hook is removed
    on exit, also when an exception escapes."""
    outputs: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            kind = type(output).__name__ if not isinstance(output, Tensor) else f"a {output.dim()}-d tensor"
            raise TypeError(f"the hooked layer must output a (B, C, h, w) tensor, got {kind}")
        outputs.append(output.detach().clone())  # a later in-place op (ReLU(inplace=True)) must not change it

    handle = _resolve_layer(model, layer).register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def _device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _require(batch: Any, key: str) -> Tensor:
    if not isinstance(batch, dict) or key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(f"filter metrics need dict batches with {key!r}; got {found}")
    return batch[key]


def _activation_batches(
    model: nn.Module, layer: nn.Module | str, loader: Iterable, device: Any, max_batches: int | None
) -> Iterator[tuple[dict, Tensor]]:
    """(batch on the device, layer activations (B, C, h, w)) for each batch, model in eval mode."""
    dev = _device(model, device)
    with _eval_mode(model), capture_layer(model, layer) as outputs, torch.no_grad():
        for batch in islice(loader, max_batches):
            images = _require(batch, "image").to(dev)
            outputs.clear()
            model(images)
            if not outputs:
                raise RuntimeError("the hooked layer did not run in the model's forward")
            on_device = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}
            yield on_device, outputs[-1].float()


@contextmanager
def _activation_stream(
    model: nn.Module, layer: nn.Module | str, loader: Iterable, device: Any, max_batches: int | None
) -> Iterator[Iterator[tuple[dict, Tensor]]]:
    """`_activation_batches`, closed on exit so the hook goes even when the caller's loop raises."""
    stream = _activation_batches(model, layer, loader, device, max_batches)
    try:
        yield stream
    finally:
        stream.close()


def layer_activations(model: nn.Module, layer: nn.Module | str, images: Tensor) -> Tensor:
    """The layer's activations (B, C, h, w) for a batch of images in [0, 1] (model in eval mode)."""
    with _activation_stream(model, layer, [{"image": images}], None, None) as stream:
        return next(stream)[1]


def _num_images(loader: Iterable, max_batches: int | None) -> int | None:
    dataset, batch_size = getattr(loader, "dataset", None), getattr(loader, "batch_size", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        return None
    n = len(dataset)
    if batch_size and getattr(loader, "drop_last", False):
        n = n // batch_size * batch_size
    return min(n, max_batches * batch_size) if max_batches is not None and batch_size else n


# ----------------------------------------------------------------------------------------- thresholds
def activation_thresholds(
    model: nn.Module,
    layer: nn.Module | str,
    loader: Iterable,
    top_fraction: float = 0.005,
    num_images: int | None = None,
    max_batches: int | None = None,
    device: Any = None,
) -> Tensor:
    """Per-filter T_f (C,) such that p(x > T_f) <= `top_fraction` over every position of every map.

    T_f is the (k + 1)-th largest activation with k = floor(top_fraction * positions), so exactly k
    positions exceed it when there are no ties (and ties at T_f, such as a mass of zeros, never count).
    Streams a per-filter top-(k + 1) buffer, which needs the number of images in advance: `num_images`,
    else ``len(loader.dataset)``; a plain iterable is listed once first.
    """
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
    if num_images is None:
        num_images = _num_images(loader, max_batches)
    if num_images is None:
        loader = list(islice(loader, max_batches))
        num_images = sum(len(_require(b, "image")) for b in loader)
    top: Tensor | None = None
    keep, seen = 0, 0
    with _activation_stream(model, layer, loader, device, max_batches) as stream:
        for _, act in stream:
            b, c, h, w = act.shape
            if top is None:
                keep = math.floor(top_fraction * num_images * h * w) + 1
                top = act.new_full((c, 0), float("-inf"))
            values = torch.cat([top, act.permute(1, 0, 2, 3).reshape(c, -1)], dim=1)
            top = values.topk(min(keep, values.shape[1]), dim=1).values
            seen += b
    if top is None:
        raise ValueError("the loader yielded no batches")
    if seen > num_images:
        raise ValueError(f"the loader yielded {seen} images but num_images={num_images}; pass the right num_images")
    k = math.floor(top_fraction * seen * h * w)
    return top[:, min(k, top.shape[1] - 1)]


def filter_class_assignment(
    model: nn.Module,
    layer: nn.Module | str,
    loader: Iterable,
    num_classes: int,
    statistic: str = "mean",
    max_batches: int | None = None,
    device: Any = None,
) -> Tensor:
    """(C,) class of each filter: argmax_c of the mean over images of class c of a per-image statistic
    of the filter's map, so that any model's filters can be scored on their own category's images.

    statistic: ``"mean"`` (mean_ij x: the paper's sum_ij x up to n^2) or ``"max"`` (max_ij x: the
    released multi-class `step_computeStability_multiClass.m`, which scores each filter's location
    instability on the class with the highest mean peak).
    """
    if statistic not in ("mean", "max"):
        raise ValueError(f"statistic must be 'mean' or 'max', got {statistic!r}")
    sums: Tensor | None = None
    counts = torch.zeros(num_classes)
    with _activation_stream(model, layer, loader, device, max_batches) as stream:
        for batch, act in stream:
            onehot = F.one_hot(_require(batch, "label").long(), num_classes).float()
            per_image = act.mean(dim=(2, 3)) if statistic == "mean" else act.flatten(2).amax(dim=2)
            sums = (per_image.T @ onehot) if sums is None else sums + per_image.T @ onehot
            counts += onehot.sum(dim=0).cpu()
    if sums is None:
        raise ValueError("the loader yielded no batches")
    means = sums.cpu() / counts.clamp(min=1)
    return means.masked_fill(counts[None, :] == 0, float("-inf")).argmax(dim=1)


def _filter_class_mask(batch: dict, filter_classes: Tensor | None, num_filters: int) -> Tensor | None:
    """(B, C) bool: the image counts for the filter (its label is the filter's class); None = all."""
    if filter_classes is None:
        return None
    if filter_classes.shape != (num_filters,):
        raise ValueError(f"filter_classes must have shape ({num_filters},), got {tuple(filter_classes.shape)}")
    labels = _require(batch, "label")
    return labels[:, None] == filter_classes.to(labels.device)[None, :]


# ----------------------------------------------------------------------------------------- metrics
def part_interpretability(
    model: nn.Module,
    layer: nn.Module | str,
    loader: Iterable,
    top_fraction: float = 0.005,
    iou_threshold: float = 0.2,
    upsample: str = "bilinear",
    thresholds: Tensor | None = None,
    filter_classes: Tensor | None = None,
    num_images: int | None = None,
    filter_chunk: int = 64,
    max_batches: int | None = None,
    device: Any = None,
) -> PartInterpretability:
    """Part interpretability of every filter of `layer` (higher is better).

    Args:
        model, layer: the model (called on images in [0, 1]) and a module or dotted name in it.
        loader: dict batches with ``"image"`` and ``"part_masks"`` (and ``"label"`` for filter_classes).
        top_fraction: the share of positions above T_f (0.5%).
        iou_threshold: an image is a hit when IoU > this (0.2, stricter than NetDissect's 0.04).
        upsample: ``"bilinear"`` (activation maps upsampled, then thresholded, as NetDissect) or ``"nearest"``.
        thresholds: precomputed T_f (C,); None = `activation_thresholds` (one more pass).
        filter_classes: (C,) class per filter; then a filter is scored on the images of its class only.
        filter_chunk: filters upsampled at once (memory: B x chunk x H x W).
    """
    if upsample not in ("bilinear", "nearest"):
        raise ValueError(f"upsample must be 'bilinear' or 'nearest', got {upsample!r}")
    if filter_chunk < 1:
        raise ValueError(f"filter_chunk must be >= 1, got {filter_chunk}")
    if thresholds is None:
        if iter(loader) is loader:  # a one-shot iterator: two passes need it listed
            loader = list(islice(loader, max_batches))
        thresholds = activation_thresholds(model, layer, loader, top_fraction, num_images, max_batches, device)
    hits: Tensor | None = None
    counts: Tensor | None = None
    with _activation_stream(model, layer, loader, device, max_batches) as stream:
        for batch, act in stream:
            masks = _require(batch, "part_masks").bool()
            b, c = act.shape[:2]
            size = masks.shape[-2:]
            part_flat = masks.flatten(2).float()  # (B, S, HW)
            part_area = part_flat.sum(dim=2)  # (B, S)
            valid = (part_area > 0)[:, None, :].expand(b, c, -1)  # (B, C, S)
            by_class = _filter_class_mask(batch, filter_classes, c)
            if by_class is not None:
                valid = valid & by_class[..., None]
            thr = thresholds.to(act.device)
            batch_hits = []
            for c0 in range(0, c, filter_chunk):
                chunk = act[:, c0:c0 + filter_chunk]
                kw = {"align_corners": False} if upsample == "bilinear" else {}
                up = F.interpolate(chunk, size=size, mode=upsample, **kw)
                region = (up > thr[c0:c0 + filter_chunk, None, None]).flatten(2).float()  # (B, c, HW)
                inter = torch.bmm(region, part_flat.transpose(1, 2))  # (B, c, S)
                union = region.sum(dim=2)[..., None] + part_area[:, None, :] - inter
                batch_hits.append(inter / union.clamp(min=1) > iou_threshold)
            hit = torch.cat(batch_hits, dim=1) & valid
            hits = hit.sum(dim=0) if hits is None else hits + hit.sum(dim=0)
            counts = valid.sum(dim=0) if counts is None else counts + valid.sum(dim=0)
    if hits is None:
        raise ValueError("the loader yielded no batches")
    per_part = (hits.float() / counts.clamp(min=1)).masked_fill(counts == 0, float("nan")).cpu()
    per_filter = torch.nan_to_num(per_part, nan=-1.0).max(dim=1)
    p_f = per_filter.values.clamp(min=0.0)  # a filter with no scorable image has P_f = 0
    return PartInterpretability(
        value=float(p_f.mean()), per_filter=p_f, per_filter_part=per_part,
        best_part=per_filter.indices, thresholds=thresholds.cpu(),
    )


def _unit_centres(receptive_field: ReceptiveField | None, h: int, w: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Pixel-index coordinates (centre of pixel (i, j) is (y=i, x=j)) of the cells' receptive-field centres.

    A `ReceptiveField` uses pixel-edge coordinates (`start` = centre of cell 0), hence the -0.5. Without
    one the cells are taken to tile the image evenly.
    """
    if receptive_field is not None:
        rows = receptive_field.start + torch.arange(h) * receptive_field.jump - 0.5
        cols = receptive_field.start + torch.arange(w) * receptive_field.jump - 0.5
    else:
        rows = (torch.arange(h) + 0.5) * (height / h) - 0.5
        cols = (torch.arange(w) + 0.5) * (width / w) - 0.5
    return rows.float(), cols.float()


def location_instability(
    model: nn.Module,
    layer: nn.Module | str,
    loader: Iterable,
    top_k: int = 100,
    parts: Sequence[int] | None = None,
    receptive_field: ReceptiveField | None = None,
    filter_classes: Tensor | None = None,
    max_batches: int | None = None,
    device: Any = None,
) -> LocationInstability:
    """Location instability of every filter of `layer` (lower is better).

    Args:
        model, layer: the model and a module or dotted name in it.
        loader: dict batches with ``"image"`` and ``"keypoints"`` (B, S, 3) = (x, y, visible).
        top_k: images per filter and landmark, by the filter's max activation (100 in the code).
        parts: landmark indices to use (None = all S).
        receptive_field: maps a cell to its centre (e.g. ``model.receptive_field(image_size)``); None
            uses ``model.receptive_field`` when the model has it, else evenly tiling cells.
        filter_classes: (C,) class per filter; then only images of the filter's class are candidates.
    """
    if top_k < 2:
        raise ValueError(f"top_k must be >= 2 (a standard deviation needs two images), got {top_k}")
    scores: Tensor | None = None
    dists: Tensor | None = None
    diagonal = None
    with _activation_stream(model, layer, loader, device, max_batches) as stream:
        for batch, act in stream:
            keypoints = _require(batch, "keypoints").float()
            if parts is not None:
                keypoints = keypoints[:, list(parts)]
            b, c, h, w = act.shape
            height, width = _require(batch, "image").shape[-2:]
            if diagonal is None:
                diagonal = math.hypot(height, width)
                rf = receptive_field
                if rf is None and callable(getattr(model, "receptive_field", None)):
                    rf = model.receptive_field(height)
                rows, cols = (t.to(act.device) for t in _unit_centres(rf, h, w, height, width))
            best, index = act.flatten(2).max(dim=2)  # (B, C)
            py, px = rows[index // w], cols[index % w]  # (B, C)
            d = torch.hypot(px[..., None] - keypoints[:, None, :, 0], py[..., None] - keypoints[:, None, :, 1])  # (B, C, S)
            valid = (keypoints[..., 2] > 0)[:, None, :].expand_as(d)
            by_class = _filter_class_mask(batch, filter_classes, c)
            if by_class is not None:
                valid = valid & by_class[..., None]
            s = torch.where(valid, best[..., None], torch.full_like(d, float("-inf"))).permute(1, 2, 0)  # (C, S, B)
            d = d.permute(1, 2, 0)
            if scores is not None:
                s, d = torch.cat([scores, s], dim=2), torch.cat([dists, d], dim=2)
            scores, order = s.topk(min(top_k, s.shape[2]), dim=2)
            dists = d.gather(2, order)
    if scores is None:
        raise ValueError("the loader yielded no batches")
    used = torch.isfinite(scores)
    n = used.sum(dim=2)
    mean = torch.where(used, dists, 0.0).sum(dim=2) / n.clamp(min=1)
    var = torch.where(used, (dists - mean[..., None]) ** 2, 0.0).sum(dim=2) / (n - 1).clamp(min=1)
    per_part = (var.sqrt() / diagonal).masked_fill(n < 2, float("nan")).cpu()
    per_filter = per_part.mean(dim=1)  # NaN if any landmark lacks two images, as in the released code
    finite = per_filter[torch.isfinite(per_filter)]
    value = float(finite.mean()) if finite.numel() else float("nan")
    return LocationInstability(value=value, per_filter=per_filter, per_filter_part=per_part)
