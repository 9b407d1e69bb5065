"""Perturbation metrics: what the model says when the pixels a heatmap ranks first are removed or kept.

Batched on the images' device: ``metric(model, images, heatmaps, target, **kw) -> (B,)``. `images` are
what the model takes (zoo models: [0, 1]), `heatmaps` (B, H, W) at input resolution, `target` the
explained class per image (None = the model's prediction on the clean images). "Removed" pixels become
the zero of the model's normalised space, i.e. the dataset mean colour for zoo models
(`explain.posthoc.baseline_colour`), as the reference code zeroes the normalised tensor.

`deletion`, `insertion` (Petsiuk et al. 2018), `road` (Rong et al. 2022), `average_drop`,
`increase_in_confidence` (Chattopadhyay et al. 2018).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.posthoc import baseline_colour

__all__ = [
    "target_probabilities",
    "perturbation_curve",
    "auc",
    "deletion",
    "insertion",
    "rise_blur_kernel",
    "blur",
    "road_impute",
    "road",
    "average_drop",
    "increase_in_confidence",
]


# ----------------------------------------------------------------------------- helpers
def _check(images: Tensor, heatmaps: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    expected = (images.shape[0], *images.shape[-2:])
    if tuple(heatmaps.shape) != expected:
        raise ValueError(f"heatmaps must be (B, H, W) = {expected} to match the images, got {tuple(heatmaps.shape)}")
    if not torch.isfinite(heatmaps).all():
        raise ValueError("heatmaps contain NaN or inf")


def _batched(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def target_probabilities(model: nn.Module, images: Tensor, target: Tensor | int | None = None, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Softmax probability of `target` (default: the prediction) per image, and the target used."""
    probs = torch.softmax(_batched(model, images, batch_size).float(), dim=1)
    if target is None:
        target = probs.argmax(dim=1)
    elif isinstance(target, int):
        target = torch.full((len(images),), target, device=images.device)
    target = torch.as_tensor(target, device=images.device).long()
    return probs.gather(1, target[:, None])[:, 0], target


def _minmax(heatmaps: Tensor, constant: float) -> Tensor:
    """Per-map min-max scaling to [0, 1]; a constant map becomes `constant` everywhere."""
    flat = heatmaps.flatten(1).float()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    scaled = torch.where(hi > lo, (flat - lo) / torch.where(hi > lo, hi - lo, 1.0), constant)
    return scaled.view_as(heatmaps)


def _rank(heatmaps: Tensor) -> Tensor:
    """(B, H*W) rank of each pixel, 0 = most relevant; ties go to the lower flat index y * W + x first
    (a stable sort, the same on every device)."""
    order = heatmaps.flatten(1).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


# ----------------------------------------------------------------------------- deletion / insertion
def rise_blur_kernel(size: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's ``gkern(11, 5)``: scipy's gaussian_filter (reflect mode) applied to a centred impulse, so
    a (size, size) kernel that sums to 1 but is flatter than a truncated Gaussian."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    return torch.from_numpy(gaussian_filter(impulse, sigma)).float()


def blur(images: Tensor, base: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's insertion substrate: per-channel `rise_blur_kernel` with zero padding *in normalised
    space*, i.e. around `base` (the mean colour) in pixel space (normalising is per-channel affine)."""
    kernel = rise_blur_kernel(size, sigma).to(images)[None, None].expand(images.shape[1], 1, -1, -1)
    return base + F.conv2d(images - base, kernel, padding=size // 2, groups=images.shape[1])


@torch.no_grad()
def perturbation_curve(
    model: nn.Module, start: Tensor, finish: Tensor, heatmaps: Tensor, target: Tensor, step: int, batch_size: int = 64
) -> Tensor:
    """(B, n_steps + 1) target probabilities while pixels go from `start` to `finish`, most relevant first.

    Entry i has the first min(i * step, H * W) pixels of the ranking replaced (n_steps = ceil(HW / step)),
    as RISE's CausalMetric. All (image, step) pairs are evaluated in batches of `batch_size`.
    """
    batch, _, height, width = start.shape
    n_steps = math.ceil(height * width / step)
    ranks = _rank(heatmaps)
    counts = (torch.arange(n_steps + 1, device=start.device) * step).clamp(max=height * width)
    b_idx = torch.arange(batch, device=start.device).repeat_interleave(n_steps + 1)
    s_idx = torch.arange(n_steps + 1, device=start.device).repeat(batch)
    scores = torch.empty(batch * (n_steps + 1), device=start.device)
    for chunk in torch.arange(len(b_idx), device=start.device).split(batch_size):
        b, s = b_idx[chunk], s_idx[chunk]
        replaced = (ranks[b] < counts[s][:, None]).view(-1, 1, height, width)
        x = torch.where(replaced, finish[b], start[b])
        scores[chunk] = torch.softmax(model(x).float(), dim=1).gather(1, target[b][:, None])[:, 0]
    return scores.view(batch, n_steps + 1)


def auc(curve: Tensor) -> Tensor:
    """Trapezoid rule on [0, 1] for (B, n + 1) equally spaced scores: (sum s - s_0/2 - s_n/2) / n."""
    n = curve.shape[1] - 1
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


def _substrate(model: nn.Module, images: Tensor, substrate: str | float | Tensor) -> Tensor:
    base = baseline_colour(model, images)
    if isinstance(substrate, Tensor):
        return substrate.to(images).expand_as(images)
    if isinstance(substrate, (int, float)):
        return torch.full_like(images, float(substrate))
    if substrate == "mean":
        return base.expand_as(images)
    if substrate == "blur":
        return blur(images, base)
    raise ValueError(f"substrate must be 'mean', 'blur', a number or a tensor, got {substrate!r}")


@torch.no_grad()
def deletion(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    step: int | None = None, substrate: str | float | Tensor = "mean", batch_size: int = 64,
) -> Tensor:
    """Deletion AUC (Petsiuk et al. 2018; lower = better): probability of `target` (default: the clean image's top-1) while
    the most relevant pixels are replaced by `substrate`, `step` pixels at a time (default: one image
    row, RISE's 224 at 224 px; RISE's batched evaluation used 8 rows).

    Ties: pixels of equal heatmap value go in row-major order, the lower flat index y * W + x first
    (a constant map deletes row by row from the top left). RISE ranks with ``np.flip(np.argsort(...))``,
    whose order among ties its unstable sort leaves open (reversed index order were the sort stable).
    """
    return _causal_auc(model, images, heatmaps, target, step, substrate, batch_size, insert=False)


@torch.no_grad()
def insertion(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    step: int | None = None, substrate: str | float | Tensor = "blur", batch_size: int = 64,
) -> Tensor:
    """Insertion AUC (Petsiuk et al. 2018; higher = better): start from `substrate` (RISE's blurred image) and paste the
    most relevant pixels back first; same conventions as `deletion`, ties included (equal values are
    pasted back in row-major order, the lower flat index y * W + x first)."""
    return _causal_auc(model, images, heatmaps, target, step, substrate, batch_size, insert=True)


def _causal_auc(model, images, heatmaps, target, step, substrate, batch_size: int, insert: bool) -> Tensor:
    _check(images, heatmaps)
    _, target = target_probabilities(model, images, target, batch_size)
    other = _substrate(model, images, substrate)
    start, finish = (other, images) if insert else (images, other)
    return auc(perturbation_curve(model, start, finish, heatmaps, target, step or images.shape[-1], batch_size))


# ----------------------------------------------------------------------------- ROAD
_ROAD_KERNEL = [[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]]


def road_impute(
    images: Tensor, removed: Tensor, noise: float = 0.0, generator: torch.Generator | None = None,
    tol: float = 1e-6, max_iter: int | None = None, solver: str = "auto",
) -> Tensor:
    """ROAD's noisy linear imputation of the removed pixels of every image and channel.

    Each removed pixel equals the weighted mean of its in-image 8-neighbours (1/6 direct, 1/12 diagonal,
    renormalised at the border); this sparse system (a principal block of a graph Laplacian, so
    symmetric positive definite whenever one pixel is kept) is solved exactly by a sparse LU
    factorisation per image, its channels as right-hand sides (``solver="direct"``, as the reference's
    ``scipy.sparse.linalg.spsolve``), or for all images at once on their device by Jacobi-preconditioned
    conjugate gradients (``"cg"``); ``"auto"`` takes the direct solve on the CPU and CG elsewhere.
    Then N(0, noise^2) is added to the imputed pixels.

    Args:
        images: (B, C, H, W).
        removed: (B, H, W) bool, True where the pixel is imputed.
        noise: absolute noise std, in the images' units (ROAD: 0.01 on pixels in [0, 1]).
        tol: CG stops when every system's residual norm is below tol x its right-hand side's norm.
        max_iter: CG iterations at most (default 4 (H + W)).
        solver: "auto", "direct" or "cg".
    """
    batch, channels, height, width = images.shape
    if removed.shape != (batch, height, width):
        raise ValueError(f"removed must be (B, H, W) = {(batch, height, width)}, got {tuple(removed.shape)}")
    if removed.flatten(1).all(1).any():
        raise ValueError("ROAD imputation needs at least one kept pixel per image")
    if solver not in ("auto", "direct", "cg"):
        raise ValueError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    if solver == "direct" or (solver == "auto" and images.device.type == "cpu"):
        v = _road_direct(images, removed)
    else:
        v = _road_cg(images, removed, tol, max_iter)
    v = v.to(images.dtype if images.dtype == torch.float64 else torch.float32)  # both solvers draw the same noise
    if noise > 0:
        v = v + noise * torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype)
    return torch.where(removed[:, None], v, images.to(v.dtype)).to(images.dtype)


def _road_direct(images: Tensor, removed: Tensor) -> Tensor:
    """The imputed images in float64 by one sparse LU solve per image (on the CPU)."""
    import scipy.sparse as sparse  # noqa: PLC0415
    from scipy.sparse.linalg import splu  # noqa: PLC0415

    batch, channels, height, width = images.shape
    kernel = np.asarray(_ROAD_KERNEL)
    offsets = [(dy, dx, kernel[dy + 1, dx + 1]) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    pixels = images.detach().double().cpu().numpy()
    out = pixels.copy()
    for b, mask in enumerate(removed.cpu().numpy()):
        ys, xs = np.nonzero(mask)
        n = len(ys)
        if n == 0:
            continue
        unknown = np.full((height, width), -1)
        unknown[ys, xs] = np.arange(n)
        degree, rhs = np.zeros(n), np.zeros((n, channels))
        rows, cols, vals = [np.arange(n)], [np.arange(n)], []
        for dy, dx, weight in offsets:
            y, x = ys + dy, xs + dx
            inside = np.flatnonzero((y >= 0) & (y < height) & (x >= 0) & (x < width))
            y, x = y[inside], x[inside]
            degree[inside] += weight
            other = unknown[y, x]
            coupled = other >= 0
            rows.append(inside[coupled])
            cols.append(other[coupled])
            vals.append(np.full(int(coupled.sum()), -weight))
            np.add.at(rhs, inside[~coupled], weight * pixels[b][:, y[~coupled], x[~coupled]].T)
        matrix = sparse.csc_matrix((np.concatenate([degree, *vals]), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(n, n))
        out[b][:, ys, xs] = splu(matrix).solve(rhs).T
    return torch.from_numpy(out).to(images.device)


def _road_cg(images: Tensor, removed: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """The imputed images, every (image, channel) system at once by Jacobi-preconditioned CG."""
    batch, channels, height, width = images.shape
    dtype = images.dtype if images.dtype == torch.float64 else torch.float32
    # One single-channel system per (image, channel): fold the channels into the batch.
    x = images.to(dtype).reshape(batch * channels, 1, height, width)
    u = removed.to(dtype).repeat_interleave(channels, dim=0)[:, None]
    kernel = torch.tensor(_ROAD_KERNEL, dtype=dtype, device=images.device)[None, None]
    tiny = torch.finfo(dtype).tiny

    def neighbours(v: Tensor) -> Tensor:
        return F.conv2d(v, kernel, padding=1)

    degree = neighbours(torch.ones_like(x[:1]))  # in-image neighbour weight (1 inside, less at borders)

    def apply(v: Tensor) -> Tensor:  # A v on the removed pixels, 0 elsewhere
        return u * (degree * v - neighbours(u * v))

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(dim=(2, 3), keepdim=True)

    b = u * neighbours((1 - u) * x)
    v = b / degree  # Jacobi start
    r = b - apply(v)
    z = r / degree
    p, rz = z, dot(r, z)
    threshold = (tol * b.norm(dim=(2, 3), keepdim=True)).clamp_min(tiny) ** 2
    for it in range(max_iter or 4 * (height + width)):
        ap = apply(p)
        alpha = rz / dot(p, ap).clamp_min(tiny)
        v = v + alpha * p
        r = r - alpha * ap
        if it % 10 == 9 and bool((dot(r, r) <= threshold).all()):  # sync with the device every 10 steps
            break
        z = r / degree
        rz_new = dot(r, z)
        p, rz = z + (rz_new / rz.clamp_min(tiny)) * p, rz_new
    return v.reshape(images.shape)


_ROAD_FRACTIONS = {"morf": (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9), "lerf": (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)}


@torch.no_grad()
def road(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    order: str = "morf", fractions: Sequence[float] | None = None, noise: float = 0.01,
    seed: int = 0, batch_size: int = 64,
) -> Tensor:
    """ROAD (Rong et al. 2022): mean target probability over `fractions` of pixels removed and linearly imputed.

    `order` "morf" removes the most relevant pixels first (lower = better), "lerf" the least relevant
    (higher = better); default fractions are the paper's CIFAR-10 runs. Pixels of equal heatmap value
    are removed in row-major order (lower y * W + x first), in both orders. `noise` is the std of the
    Gaussian noise added to the imputed pixels in pixel units, as the reference, which imputes images
    in [0, 1] and normalises afterwards (so the model sees noise / std in its normalised space).
    Pixel-scattered maps (integrated gradients) score poorly: an isolated removed pixel is
    imputed from its kept neighbours, so removing it hides little (docs/comparison.md).
    """
    _check(images, heatmaps)
    if order not in _ROAD_FRACTIONS:
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    fractions = tuple(fractions or _ROAD_FRACTIONS[order])
    if not all(0 < f < 1 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1), got {fractions}")
    _, target = target_probabilities(model, images, target, batch_size)
    batch, _, height, width = images.shape
    ranks = _rank(heatmaps if order == "morf" else -heatmaps).view(batch, height, width)
    counts = torch.tensor([round(f * height * width) for f in fractions], device=images.device)
    removed = (ranks[None] < counts[:, None, None, None]).flatten(0, 1)  # (F * B, H, W)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    imputed = road_impute(images.repeat(len(fractions), 1, 1, 1), removed, noise=noise, generator=generator)
    probs, _ = target_probabilities(model, imputed, target.repeat(len(fractions)), batch_size)
    return probs.view(len(fractions), batch).mean(0)


# ----------------------------------------------------------------------------- confidence change
def _masked_by_map(model: nn.Module, images: Tensor, heatmaps: Tensor) -> Tensor:
    """x o L in normalised space: L the min-max scaled map (a constant map keeps nothing)."""
    base = baseline_colour(model, images)
    return base + (images - base) * _minmax(heatmaps, constant=0.0)[:, None]


@torch.no_grad()
def average_drop(model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, batch_size: int = 64) -> Tensor:
    """Per-image term of Average Drop (%) (Chattopadhay et al. 2018): max(0, Y - O) / Y x 100, Y the target probability on the
    image, O on the image multiplied by its min-max scaled map (Grad-CAM++). Lower = better."""
    _check(images, heatmaps)
    y, target = target_probabilities(model, images, target, batch_size)
    o, _ = target_probabilities(model, _masked_by_map(model, images, heatmaps), target, batch_size)
    return F.relu(y - o) / y * 100


@torch.no_grad()
def increase_in_confidence(model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, batch_size: int = 64) -> Tensor:
    """Per-image term of Increase in Confidence (%) (Chattopadhay et al. 2018): 100 where O > Y (see
    `average_drop`). Higher = better."""
    _check(images, heatmaps)
    y, target = target_probabilities(model, images, target, batch_size)
    o, _ = target_probabilities(model, _masked_by_map(model, images, heatmaps), target, batch_size)
    return (o > y).float() * 100
