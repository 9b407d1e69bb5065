"""Compiled CPU kernels for the push's per-prototype work: high-activation boxes and patch images.

For each new prototype the push makes a 95th-percentile box of its upsampled activation map and a
small patch image. With vectorised torch both cost ~100 us per prototype on a CPU, mostly in many small
steps; these numba kernels do one map or box at a time in a plain loop, a few tens of microseconds,
split over `torch.get_num_threads()` threads (they release the GIL). They are an optimisation only:
where numba is missing (`AVAILABLE` is False) or the tensors are on an accelerator, the callers run
their torch reference paths, which the tests compare these kernels against.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps bare images working
    numba = None

__all__ = ["AVAILABLE", "boxes_above_percentile", "crop_boxes"]

AVAILABLE = numba is not None
_STEP = 8  # the bracket around the percentile is estimated from every 8th row and column
_SPREAD = 12  # it reaches this many sample ranks below the estimate (~770 extra pixels at 224 x 224)


def _jit(fn: Callable) -> Callable:
    return numba.njit(nogil=True, cache=True)(fn) if AVAILABLE else fn


@_jit
def _select(a, n, j):  # pragma: no cover - compiled
    """The j-th smallest (0-based) of a[:n], reordering a[:n] (quickselect, median-of-three pivot)."""
    lo, hi = 0, n - 1
    while hi > lo:
        x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
        if x > y:
            x, y = y, x
        if y > z:
            y = z
        pivot = max(x, y)
        i, k = lo, hi
        while i <= k:
            while a[i] < pivot:
                i += 1
            while a[k] > pivot:
                k -= 1
            if i <= k:
                a[i], a[k] = a[k], a[i]
                i += 1
                k -= 1
        if j <= k:
            hi = k
        elif j >= i:
            lo = i
        else:
            return a[j]
    return a[j]


@_jit
def _boxes(maps, yi, yw, xi, xw, k_low, k_up, weight, tie_rel, boxes, thresholds, ok):  # pragma: no cover - compiled
    """Per map: upsample (taps yi/xi, weights yw/xw per output row/column: x first, then y, in float32;
    torch rounds its sums differently, hence the tie margin), take the k_low-th and k_up-th largest
    pixels, lerp them by `weight` as torch.lerp does, and box the pixels >= that threshold. Only the
    pixels above a bracket estimated from a subsample are kept, and only the rows whose bound reaches
    the bracket are computed. ok[m] is False where the bracket missed, where the threshold is not
    finite, and where pixels within tie_rel * max|map| of the threshold would change the box (the
    caller redoes those with torch's own arithmetic)."""
    num, h, w = maps.shape
    H, W = yi.shape[0], xi.shape[0]
    rows = np.empty((h, W), np.float32)
    row_max, row_min = np.empty(h, np.float32), np.empty(h, np.float32)
    line = np.empty(W, np.float32)
    kept = np.empty(H * W, np.float32)
    kept_y, kept_x = np.empty(H * W, np.int64), np.empty(H * W, np.int64)
    scratch = np.empty(H * W, np.float32)
    sample = np.empty(((H + _STEP - 1) // _STEP) * ((W + _STEP - 1) // _STEP), np.float32)
    for m in range(num):
        mp = maps[m]
        tie = np.float32(0)
        for j in range(h):
            for i in range(w):
                tie = max(tie, abs(mp[j, i]))
        tie *= np.float32(tie_rel)
        for j in range(h):  # every source row interpolated along x
            hi_, lo_ = -np.inf, np.inf
            for x in range(W):
                v = mp[j, xi[x, 0]] * xw[x, 0]
                v += mp[j, xi[x, 1]] * xw[x, 1]
                v += mp[j, xi[x, 2]] * xw[x, 2]
                v += mp[j, xi[x, 3]] * xw[x, 3]
                rows[j, x] = v
                hi_, lo_ = max(hi_, v), min(lo_, v)
            row_max[j], row_min[j] = hi_, lo_
        s = 0
        for y in range(_STEP // 2, H, _STEP):
            for x in range(_STEP // 2, W, _STEP):
                v = rows[yi[y, 0], x] * yw[y, 0]
                v += rows[yi[y, 1], x] * yw[y, 1]
                v += rows[yi[y, 2], x] * yw[y, 2]
                v += rows[yi[y, 3], x] * yw[y, 3]
                sample[s] = v
                s += 1
        at = min(max(int(round(k_low * s / (H * W))), 1), s)
        low = -np.inf
        if s > 0 and at + _SPREAD <= s:
            low = _select(sample, s, s - (at + _SPREAD)) - tie
        count = 0
        for y in range(H):
            bound = np.float32(0)  # no pixel of this row exceeds it
            for t in range(4):
                bound += yw[y, t] * (row_max[yi[y, t]] if yw[y, t] >= 0 else row_min[yi[y, t]])
            if bound + tie < low:
                continue
            r0, r1, r2, r3 = yi[y, 0], yi[y, 1], yi[y, 2], yi[y, 3]
            w0, w1, w2, w3 = yw[y, 0], yw[y, 1], yw[y, 2], yw[y, 3]
            for x in range(W):
                v = rows[r0, x] * w0
                v += rows[r1, x] * w1
                v += rows[r2, x] * w2
                v += rows[r3, x] * w3
                line[x] = v
            for x in range(W):
                if line[x] >= low:
                    kept[count], kept_y[count], kept_x[count] = line[x], y, x
                    count += 1
        if count < k_low:  # the bracket missed: some order statistic lies below it
            ok[m] = False
            continue
        scratch[:count] = kept[:count]
        v_low = _select(scratch, count, count - k_low)
        v_up = v_low
        if k_up != k_low:  # k_up = k_low - 1: the smallest of what lies above v_low after selection
            v_up = scratch[count - k_low + 1]
            for i in range(count - k_low + 2, count):
                v_up = min(v_up, scratch[i])
        if abs(weight) < 0.5:  # torch.lerp
            thr = v_low + weight * (v_up - v_low)
        else:
            thr = v_up - (v_up - v_low) * (np.float32(1) - weight)
        thresholds[m] = thr
        if not (np.isfinite(thr) and thr - tie >= low):  # overflow, or pixels below low could be in the box
            ok[m] = False
            continue
        a0, a1, a2, a3, b0, b1, b2, b3 = W, H, -1, -1, W, H, -1, -1  # boxes at thr + tie and thr - tie
        for i in range(count):
            if kept[i] >= thr - tie:
                b0, b1, b2, b3 = min(b0, kept_x[i]), min(b1, kept_y[i]), max(b2, kept_x[i] + 1), max(b3, kept_y[i] + 1)
                if kept[i] >= thr + tie:
                    a0, a1, a2, a3 = min(a0, kept_x[i]), min(a1, kept_y[i]), max(a2, kept_x[i] + 1), max(a3, kept_y[i] + 1)
        ok[m] = a2 >= 0 and a0 == b0 and a1 == b1 and a2 == b2 and a3 == b3
        boxes[m, 0], boxes[m, 1], boxes[m, 2], boxes[m, 3] = a0, a1, a2, a3


@_jit
def _sample_taps(start, length, size, ratio, limit, low, high, frac):  # pragma: no cover - compiled
    """Bilinear taps of roi_align's size * ratio sample positions along one axis (aligned boxes)."""
    step = np.float32(length) / np.float32(size)
    for p in range(size):
        for s in range(ratio):
            t = np.float32(start) + np.float32(p) * step + (np.float32(s) + np.float32(0.5)) * step / np.float32(ratio)
            t = max(t, np.float32(0))
            i, q = int(t), p * ratio + s
            if i >= limit - 1:
                low[q], high[q], frac[q] = limit - 1, limit - 1, np.float32(0)
            else:
                low[q], high[q], frac[q] = i, i + 1, t - np.float32(i)


@_jit
def _crops(images, ids, boxes, size, ratio, out):  # pragma: no cover - compiled
    """uint8 crops of boxes (x0, y0, x1, y1) (pixel edges, inside the image) of images[ids], resized to
    size x size with torchvision's roi_align arithmetic (aligned, box shrunk to its pixel centres,
    ratio x ratio bilinear samples per output pixel), then clamp(0, 1) * 255, rounded half to even."""
    channels, height, width = images.shape[1], images.shape[2], images.shape[3]
    n = size * ratio
    y_low, y_high, y_frac = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.float32)
    x_low, x_high, x_frac = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.float32)
    acc = np.zeros(channels, np.float32)
    count = np.float32(ratio * ratio)
    for r in range(len(ids)):
        img = images[ids[r]]
        _sample_taps(boxes[r, 1], boxes[r, 3] - 1 - boxes[r, 1], size, ratio, height, y_low, y_high, y_frac)
        _sample_taps(boxes[r, 0], boxes[r, 2] - 1 - boxes[r, 0], size, ratio, width, x_low, x_high, x_frac)
        for py in range(size):
            for px in range(size):
                acc[:] = 0
                for iy in range(py * ratio, py * ratio + ratio):
                    ly = y_frac[iy]
                    hy = np.float32(1) - ly
                    a, b = y_low[iy], y_high[iy]
                    for ix in range(px * ratio, px * ratio + ratio):
                        lx = x_frac[ix]
                        hx = np.float32(1) - lx
                        w1, w2, w3, w4 = hy * hx, hy * lx, ly * hx, ly * lx
                        c0, c1 = x_low[ix], x_high[ix]
                        for c in range(channels):
                            acc[c] += w1 * img[c, a, c0] + w2 * img[c, a, c1] + w3 * img[c, b, c0] + w4 * img[c, b, c1]
                for c in range(channels):
                    v = min(max(acc[c] / count, np.float32(0)), np.float32(1)) * np.float32(255)
                    out[r, c, py, px] = np.uint8(np.rint(v))


# ------------------------------------------------------------------------------------ threads
_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _split(fn: Callable[[slice], None], total: int, minimum: int = 8) -> None:
    """fn(part) for contiguous parts of range(total), one per torch thread (at least `minimum` items each)."""
    global _POOL
    parts = max(1, min(torch.get_num_threads(), total // minimum))
    cuts = np.linspace(0, total, parts + 1).astype(int)
    slices = [slice(int(a), int(b)) for a, b in zip(cuts, cuts[1:])]
    if parts == 1:
        fn(slices[0])
        return
    if _POOL is None or _POOL._max_workers < parts:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="izoo-kernels")
    list(_POOL.map(fn, slices))  # list() re-raises the first exception of any part


# --------------------------------------------------------------------------------------- public
def boxes_above_percentile(maps: torch.Tensor, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray],
                           ranks: tuple[int, int, float], tie: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, h, w) finite float32 CPU maps -> boxes (N, 4) int64 (x0, y0, x1, y1), thresholds (N,) and
    ok (N,) bool (False: redo that map the dense way).

    rows, cols: (taps (n_out, 4) int64, weights (n_out, 4) float32) of each axis; ranks: the two order
    statistics as 1-based ranks from the top and their lerp weight; tie: relative to max|map|.
    """
    m = maps.detach().float().contiguous().numpy()
    num = len(m)
    boxes, thr, ok = np.zeros((num, 4), np.int64), np.zeros(num, np.float32), np.ones(num, np.bool_)
    k_low, k_up, weight = ranks
    _split(lambda s: _boxes(m[s], *rows, *cols, k_low, k_up, np.float32(weight), tie, boxes[s], thr[s], ok[s]), num)
    return torch.from_numpy(boxes), torch.from_numpy(thr), torch.from_numpy(ok)


def crop_boxes(images: torch.Tensor, image_ids: torch.Tensor, boxes: torch.Tensor, size: int, ratio: int = 2) -> torch.Tensor:
    """(B, C, H, W) CPU images, (N,) ids, (N, 4) integer boxes inside the image -> (N, C, size, size) uint8."""
    img = images.detach().float().contiguous().numpy()
    ids, bx = image_ids.long().contiguous().numpy(), boxes.long().contiguous().numpy()
    if len(ids) and (ids.min() < 0 or ids.max() >= len(img)):  # the kernel does not check its indices
        raise ValueError(f"crop_boxes: image ids must be in [0, {len(img)}), got {ids.min()}..{ids.max()}")
    out = np.zeros((len(bx), img.shape[1], size, size), np.uint8)
    _split(lambda s: _crops(img, ids[s], bx[s], size, ratio, out[s]), len(bx))
    return torch.from_numpy(out)
