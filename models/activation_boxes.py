"""High-activation boxes: the tight box around the pixels at or above a percentile of an upsampled map.

ProtoPNet's `find_high_activation_crop` upsamples a prototype's (h, w) activation map bicubically to
the image size, takes the 95th percentile and boxes the pixels at or above it. Done literally for the
2,000 prototypes of a CUB model that is 100M upsampled pixels and 2,000 sorts: most of a push.

`high_activation_boxes` gives the same boxes on a CPU with a compiled kernel (`models.cpu_kernels`):
per map it interpolates the rows once, estimates a bracket around the percentile from every 8th row
and column, computes only the rows whose bound reaches the bracket, keeps the pixels above it and
selects the two order statistics among them. Its sums are float32 like torch's but may round
differently, so where pixels within float rounding of the threshold would change the box (the boxes
at thr +- 4e-6 max|map| differ), and where the bracket missed, the map goes the dense way. So the
boxes equal those of `dense_high_activation_boxes` (upsample everything, torch.quantile), which also
serves accelerators and machines without numba.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels

__all__ = ["box_of_mask", "dense_high_activation_boxes", "high_activation_boxes", "upsample_maps"]

# Pixels this close to the threshold may fall on the other side of it in torch's own rounding of the
# sums: float32, 16 terms whose weights sum to at most 1.375 per axis in absolute value (1.89 in 2-D);
# the largest difference measured between the kernel's values and torch's is 5.9e-7 of max|map|.
_TIE = 4e-6
# Maps whose largest |value| lies outside this range go the dense way: the float32 sums could
# overflow, or the tie margin underflow.
_SAFE = (1e-30, 1e30)


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> (N, H, W) bicubic (the official code uses cv2 INTER_CUBIC; both use a = -0.75)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]


def _quantile_ranks(n: int, percentile: float) -> tuple[int, int, Tensor]:
    """torch.quantile's 'linear' order statistics, as 1-based ranks from the top, and the lerp weight.

    As torch computes them: q rounded to float32, its rank q (n - 1) and that rank's fraction in double.
    """
    rank = float(torch.tensor(percentile / 100, dtype=torch.float32)) * (n - 1)
    below, above = math.floor(rank), math.ceil(rank)
    return n - below, n - above, torch.tensor(rank - below, dtype=torch.float32)


def box_of_mask(mask: Tensor) -> Tensor:
    """(N, H, W) bool, each with some True -> (N, 4) (x0, y0, x1, y1), x1/y1 exclusive.

    Examples:
        >>> mask = torch.zeros(1, 5, 6, dtype=torch.bool)
        >>> mask[0, 1:3, 2:5] = True
        >>> box_of_mask(mask).tolist()
        [[2, 1, 5, 3]]
    """
    rows, cols = mask.any(dim=2).int(), mask.any(dim=1).int()  # argmax below = first True
    y0, y1 = rows.argmax(dim=1), mask.shape[1] - rows.flip(1).argmax(dim=1)
    x0, x1 = cols.argmax(dim=1), mask.shape[2] - cols.flip(1).argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def dense_high_activation_boxes(
    maps: Tensor, size: tuple[int, int], percentile: float = 95.0, chunk: int = 64
) -> tuple[Tensor, Tensor]:
    """The literal computation: upsample every map, torch.quantile, box. The reference for the fast path."""
    if len(maps) == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=maps.device), torch.zeros(0, device=maps.device)
    boxes, thresholds = [], []
    for part in maps.split(chunk):
        up = upsample_maps(part, size)
        # Same linear interpolation between order statistics as np.percentile's default.
        thr = torch.quantile(up.flatten(1), percentile / 100, dim=1)
        boxes.append(box_of_mask(up >= thr[:, None, None]))
        thresholds.append(thr)
    return torch.cat(boxes), torch.cat(thresholds)


# ------------------------------------------------------------------------------------ fast boxes
@functools.lru_cache(maxsize=16)
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's bicubic taps along one axis: source indices (n_out, 4) and float32 weights (n_out, 4).

    Read off torch itself (upsampling unit vectors), so the weights are torch's own float32 values;
    taps that the border clamps onto the same source index come out merged (zero-weight padding).
    """
    unit = upsample_maps(torch.eye(n_in, dtype=torch.float32).view(n_in, n_in, 1), (n_out, 1))[..., 0].T  # (n_out, n_in)
    taps, weights = np.zeros((n_out, 4), np.int64), np.zeros((n_out, 4), np.float32)
    for o in range(n_out):
        nonzero = unit[o].nonzero()[:, 0]
        taps[o, : len(nonzero)], weights[o, : len(nonzero)] = nonzero.numpy(), unit[o, nonzero].numpy()
    return taps, weights


def high_activation_boxes(
    maps: Tensor, size: tuple[int, int], percentile: float = 95.0
) -> tuple[Tensor, Tensor]:
    """Tight boxes around the pixels at or above the `percentile` of each bicubically upsampled map.

    Args:
        maps: (N, h, w) activation (similarity) maps at latent resolution.
        size: (H, W) input resolution.
        percentile: ProtoPNet's `find_high_activation_crop` uses 95.

    Returns:
        boxes (N, 4) int64 as (x0, y0, x1, y1), x1/y1 exclusive, and the thresholds (N,).
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    maps = maps.detach()
    if (not cpu_kernels.AVAILABLE or maps.device.type != "cpu" or maps.numel() == 0
            or not bool(torch.isfinite(maps).all())):
        return dense_high_activation_boxes(maps, size, percentile)
    k_low, k_up, weight = _quantile_ranks(size[0] * size[1], percentile)
    boxes, thr, ok = cpu_kernels.boxes_above_percentile(
        maps, _taps(maps.shape[1], size[0]), _taps(maps.shape[2], size[1]), (k_low, k_up, float(weight)), _TIE)
    scale = maps.abs().flatten(1).amax(dim=1)
    unsafe = (scale > _SAFE[1]) | ((scale < _SAFE[0]) & (scale > 0))
    if bool(unsafe.any()):
        odd = unsafe.nonzero()[:, 0]
        boxes[odd], thr[odd] = dense_high_activation_boxes(maps[odd], size, percentile)
    if not bool((ok | unsafe).all()):
        redo = (~ok & ~unsafe).nonzero()[:, 0]
        boxes[redo], thr[redo] = _redo_boxes(maps[redo], size, percentile)
    return boxes, thr


def _redo_boxes(maps: Tensor, size: tuple[int, int], percentile: float) -> tuple[Tensor, Tensor]:
    """The dense computation with a linear-time selection (np.partition) instead of torch.quantile's
    sort: the same order statistics, lerp, thresholds and boxes, several times faster."""
    k_low, k_up, weight = _quantile_ranks(size[0] * size[1], percentile)
    up = upsample_maps(maps, size)
    n = size[0] * size[1]
    picked = np.partition(up.flatten(1).numpy(), [n - k_low, n - k_up], axis=1)
    thr = torch.lerp(torch.from_numpy(picked[:, n - k_low]), torch.from_numpy(picked[:, n - k_up]), weight)
    return box_of_mask(up >= thr[:, None, None]), thr
