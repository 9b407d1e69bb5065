"""Explanation metrics, batched on the model's device: ``metric(model, images, heatmaps, target, **kw) -> (B,)``.

`images` are what the model takes (zoo models: [0, 1]), `heatmaps` (B, H, W) at input resolution,
`target` the explained class per image (None = the model's prediction on the clean images). "Removed"
pixels become the zero of the model's normalised space, i.e. the dataset mean colour for zoo models
(`explain.posthoc.baseline_colour`), as the reference code zeroes the normalised tensor.

Faithfulness: `deletion`, `insertion` (Petsiuk et al. 2018), `road` (Rong et al. 2022), `average_drop`,
`increase_in_confidence` (Chattopadhyay et al. 2018). Localisation: `pointing_game` (Zhang et al. 2016),
`energy_pointing_game` (Wang et al. 2020), `relevance_mass`. Sanity: `model_randomisation` (Adebayo et
al. 2018). Two groups do not fit the per-image signature: `prototype_consistency` / `prototype_stability`
(Huang et al. 2023) score each prototype (P,), and `funnybirds` (Hesse et al. 2023) returns several
checks at once, some per threshold.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

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
    "pointing_game",
    "energy_pointing_game",
    "relevance_mass",
    "road_impute",
    "road",
    "average_drop",
    "increase_in_confidence",
    "spearman",
    "randomisation_curve",
    "model_randomisation",
    "prototype_consistency",
    "prototype_stability",
    "FUNNYBIRDS_THRESHOLDS",
    "part_importance",
    "funnybirds",
    "funnybirds_at_best_threshold",
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


def _input_std(model: nn.Module, images: Tensor) -> Tensor:
    """(1, C, 1, 1) std of the model's normalisation (1 for a model that takes normalised images)."""
    std = getattr(getattr(model, "normalize", None), "std", None)
    if isinstance(std, Tensor) and std.numel() == images.shape[1]:
        return std.reshape(1, -1, 1, 1).to(images)
    return images.new_ones(1, images.shape[1], 1, 1)


def _rank(heatmaps: Tensor) -> Tensor:
    """(B, H*W) rank of each pixel, 0 = most relevant; ties go to the lower pixel index first."""
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
    """Deletion AUC (lower = better): probability of `target` (default: the clean image's top-1) while
    the most relevant pixels are replaced by `substrate`, `step` pixels at a time (default: one image
    row, RISE's 224 at 224 px; RISE's batched evaluation used 8 rows)."""
    return _causal_auc(model, images, heatmaps, target, step, substrate, batch_size, insert=False)


@torch.no_grad()
def insertion(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    step: int | None = None, substrate: str | float | Tensor = "blur", batch_size: int = 64,
) -> Tensor:
    """Insertion AUC (higher = better): start from `substrate` (RISE's blurred image) and paste the
    most relevant pixels back first; same conventions as `deletion`."""
    return _causal_auc(model, images, heatmaps, target, step, substrate, batch_size, insert=True)


def _causal_auc(model, images, heatmaps, target, step, substrate, batch_size: int, insert: bool) -> Tensor:
    _check(images, heatmaps)
    _, target = target_probabilities(model, images, target, batch_size)
    other = _substrate(model, images, substrate)
    start, finish = (other, images) if insert else (images, other)
    return auc(perturbation_curve(model, start, finish, heatmaps, target, step or images.shape[-1], batch_size))


# ----------------------------------------------------------------------------- localisation
def pointing_game(
    model: nn.Module | None, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    masks: Tensor, tolerance: float = 15.0, points: Tensor | None = None,
) -> Tensor:
    """1 where a ground-truth pixel lies strictly within `tolerance` px of the heatmap's maximum, else 0.

    As TorchRay: hit iff some pixel (u, v) of `masks` (B, H, W) has (u - x)^2 + (v - y)^2 < tolerance^2,
    (x, y) the first argmax (or the given `points` (B, 2) as (x, y)). The paper's score is the mean of
    these hits per class, then over classes. `model` is not used.
    """
    _check(images, heatmaps)
    if masks.shape != heatmaps.shape:
        raise ValueError(f"masks must be (B, H, W) = {tuple(heatmaps.shape)}, got {tuple(masks.shape)}")
    height, width = heatmaps.shape[-2:]
    if points is None:
        flat = heatmaps.flatten(1).argmax(1)
        points = torch.stack([flat % width, flat // width], dim=1)
    points = points.to(heatmaps.device, torch.float64)
    ys = torch.arange(height, device=heatmaps.device, dtype=torch.float64)
    xs = torch.arange(width, device=heatmaps.device, dtype=torch.float64)
    d2 = (ys[None, :, None] - points[:, 1, None, None]) ** 2 + (xs[None, None, :] - points[:, 0, None, None]) ** 2
    return (masks.bool() & (d2 < tolerance**2)).flatten(1).any(1).float()


def energy_pointing_game(
    model: nn.Module | None, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *, masks: Tensor
) -> Tensor:
    """Share of the min-max normalised map's energy inside `masks` (B, H, W) (Score-CAM's proportion;
    pass the union of the boxes for several instances). A constant map counts as uniform."""
    _check(images, heatmaps)
    energy = _minmax(heatmaps, constant=1.0)
    return (energy * masks).flatten(1).sum(1) / energy.flatten(1).sum(1)


def relevance_mass(
    model: nn.Module | None, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *, masks: Tensor
) -> Tensor:
    """Share of the positive relevance inside `masks` (Arras et al. 2022's relevance mass accuracy);
    0 for a map without positive relevance."""
    _check(images, heatmaps)
    positive = F.relu(heatmaps.float())
    total = positive.flatten(1).sum(1)
    inside = (positive * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), 0.0)


# ----------------------------------------------------------------------------- ROAD
_ROAD_KERNEL = [[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]]


def road_impute(
    images: Tensor, removed: Tensor, noise: float = 0.0, generator: torch.Generator | None = None,
    tol: float = 1e-6, max_iter: int | None = None,
) -> Tensor:
    """ROAD's noisy linear imputation, every image and channel at once on the images' device.

    Each removed pixel equals the weighted mean of its in-image 8-neighbours (1/6 direct, 1/12 diagonal,
    renormalised at the border); this sparse system (a principal block of a graph Laplacian, so
    symmetric positive definite whenever one pixel is kept) is solved by Jacobi-preconditioned conjugate
    gradients instead of the reference's per-image ``scipy.sparse.linalg.spsolve``; then N(0, noise^2)
    is added to the imputed pixels.

    Args:
        images: (B, C, H, W).
        removed: (B, H, W) bool, True where the pixel is imputed.
        noise: absolute noise std, in the images' units (ROAD: 0.01 in normalised space).
        tol: stop when every system's residual norm is below tol x its right-hand side's norm.
        max_iter: CG iterations at most (default 4 (H + W)).
    """
    batch, channels, height, width = images.shape
    if removed.shape != (batch, height, width):
        raise ValueError(f"removed must be (B, H, W) = {(batch, height, width)}, got {tuple(removed.shape)}")
    if removed.flatten(1).all(1).any():
        raise ValueError("ROAD imputation needs at least one kept pixel per image")
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
    if noise > 0:
        v = v + noise * torch.randn(v.shape, generator=generator, device=v.device, dtype=dtype)
    return torch.where(u.bool(), v, x).reshape(images.shape).to(images.dtype)


_ROAD_FRACTIONS = {"morf": (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9), "lerf": (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)}


@torch.no_grad()
def road(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    order: str = "morf", fractions: Sequence[float] | None = None, noise: float = 0.01,
    seed: int = 0, batch_size: int = 64,
) -> Tensor:
    """ROAD: mean target probability over `fractions` of pixels removed and linearly imputed.

    `order` "morf" removes the most relevant pixels first (lower = better), "lerf" the least relevant
    (higher = better); default fractions are the paper's CIFAR-10 runs. `noise` is in normalised units
    (as the reference, which works on normalised tensors) and converted with the model's std.
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
    std = _input_std(model, images)
    x = images.repeat(len(fractions), 1, 1, 1)
    imputed = road_impute(x, removed, noise=0.0, generator=generator)
    if noise > 0:  # noise in normalised units -> pixel units, per channel
        eps = torch.randn(imputed.shape, generator=generator, device=images.device, dtype=imputed.dtype)
        imputed = torch.where(removed[:, None], imputed + noise * std * eps, imputed)
    probs, _ = target_probabilities(model, imputed, target.repeat(len(fractions)), batch_size)
    return probs.view(len(fractions), batch).mean(0)


# ----------------------------------------------------------------------------- confidence change
def _masked_by_map(model: nn.Module, images: Tensor, heatmaps: Tensor) -> Tensor:
    """x o L in normalised space: L the min-max scaled map (a constant map keeps nothing)."""
    base = baseline_colour(model, images)
    return base + (images - base) * _minmax(heatmaps, constant=0.0)[:, None]


@torch.no_grad()
def average_drop(model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, batch_size: int = 64) -> Tensor:
    """Per-image term of Average Drop (%): max(0, Y - O) / Y x 100, Y the target probability on the
    image, O on the image multiplied by its min-max scaled map (Grad-CAM++). Lower = better."""
    _check(images, heatmaps)
    y, target = target_probabilities(model, images, target, batch_size)
    o, _ = target_probabilities(model, _masked_by_map(model, images, heatmaps), target, batch_size)
    return F.relu(y - o) / y * 100


@torch.no_grad()
def increase_in_confidence(model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, batch_size: int = 64) -> Tensor:
    """Per-image term of Increase in Confidence (%): 100 where O > Y (see `average_drop`). Higher = better."""
    _check(images, heatmaps)
    y, target = target_probabilities(model, images, target, batch_size)
    o, _ = target_probabilities(model, _masked_by_map(model, images, heatmaps), target, batch_size)
    return (o > y).float() * 100


# ----------------------------------------------------------------------------- sanity check
def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..N along dim 1 with ties given their average rank (scipy's rankdata 'average')."""
    ordered = x.sort(dim=1).values
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    upto = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + upto + 1).to(torch.float64) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row of a and b (flattened after dim 0); NaN if one is constant."""
    ra = _average_ranks(a.flatten(1).double())
    rb = _average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).float()


def _parametrised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters, from the output down to the input (registration order reversed)."""
    layers = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return layers[::-1]


def randomisation_curve(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    explain_fn: Callable[[nn.Module, Tensor, Tensor], Tensor], seed: int = 0, absolute: bool = True,
) -> tuple[Tensor, list[str]]:
    """Cascading model-parameter randomisation (Adebayo et al. 2018): (B, L) Spearman correlations.

    A copy of the model is re-initialised layer by layer from the logits down (``reset_parameters``,
    else a normal draw with the weights' std), and after each layer the explanation
    ``explain_fn(model_copy, images, target)`` is compared with `heatmaps` (the original model's). With
    `absolute` (Quantus' default) both maps are compared in absolute value. `explain_fn` must find its
    layer by name (or layer=None), since the copy has its own modules. Returns the curve and layer names.
    """
    _check(images, heatmaps)
    if target is None:
        _, target = target_probabilities(model, images)
    randomised = copy.deepcopy(model)
    reference = heatmaps.abs() if absolute else heatmaps
    curve, names = [], []
    generator = torch.Generator().manual_seed(seed)
    for name, layer in _parametrised_layers(randomised):
        with torch.no_grad():
            if hasattr(layer, "reset_parameters"):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                    layer.reset_parameters()
            else:
                for p in layer.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=generator).to(p) * p.std().clamp_min(1e-3))
        new = explain_fn(randomised, images, target).detach()
        curve.append(spearman(reference, new.abs() if absolute else new))
        names.append(name or type(layer).__name__)
    return torch.stack(curve, dim=1), names


def model_randomisation(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    explain_fn: Callable[[nn.Module, Tensor, Tensor], Tensor], seed: int = 0, absolute: bool = True,
) -> Tensor:
    """Mean Spearman correlation over the cascade of `randomisation_curve` (lower = the explanation
    depends on the weights, i.e. passes the sanity check); an undefined correlation (constant map)
    counts as 0."""
    curve, _ = randomisation_curve(model, images, heatmaps, target, explain_fn=explain_fn, seed=seed, absolute=absolute)
    # A map that turns constant (Grad-CAM of a randomised net is often all zero) keeps no ranking.
    return torch.nan_to_num(curve, nan=0.0).mean(1)


# ----------------------------------------------------------------------------- prototype models
def _prototype_parts(
    activation_fn: Callable[[Tensor], Tensor], images: Tensor, keypoints: Tensor, labels: Tensor,
    prototype_class: Tensor, half_size: int | None, batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Part vectors (B, P, S) bool of each prototype on each image (Huang et al. 2023), and (B, P) True
    where the prototype belongs to the image's class (only those count).

    The activation map is upsampled bicubically to the image size; the region is the box of
    +-`half_size` px (clipped, bounds inclusive) around its first maximum; a part is hit when its
    visible keypoint (x, y) lies in the region.
    """
    height, width = images.shape[-2:]
    half = half_size if half_size is not None else round(36 * height / 224)  # 36 px at the paper's 224
    prototype_class = prototype_class.to(images.device)
    own = labels.to(images.device)[:, None] == prototype_class[None, :]
    kx, ky, visible = keypoints[..., 0].to(images.device), keypoints[..., 1].to(images.device), keypoints[..., 2] > 0
    hits = []
    for start in range(0, len(images), batch_size):
        acts = activation_fn(images[start:start + batch_size]).float()
        if acts.ndim != 4 or acts.shape[1] != len(prototype_class):
            raise ValueError(f"activation_fn must return (B, P={len(prototype_class)}, h, w), got {tuple(acts.shape)}")
        up = F.interpolate(acts, size=(height, width), mode="bicubic", align_corners=False)
        peak = up.flatten(2).argmax(2)
        py, px = peak // width, peak % width  # (b, P)
        sl = slice(start, start + len(acts))
        in_y = ((py - half).clamp(min=0)[..., None] <= ky[sl, None]) & (ky[sl, None] <= (py + half).clamp(max=height)[..., None])
        in_x = ((px - half).clamp(min=0)[..., None] <= kx[sl, None]) & (kx[sl, None] <= (px + half).clamp(max=width)[..., None])
        hits.append(in_y & in_x & visible[sl, None].to(images.device))
    return torch.cat(hits) & own[..., None], own


@torch.no_grad()
def prototype_consistency(
    activation_fn: Callable[[Tensor], Tensor], images: Tensor, keypoints: Tensor, labels: Tensor,
    prototype_class: Tensor, *, half_size: int | None = None, threshold: float = 0.8, batch_size: int = 64,
) -> Tensor:
    """(P,) 1 where a prototype is consistent (Huang et al. 2023), NaN where its class has no image.

    Per-prototype, not per-image: over the images of its class, the fraction of images (where the part
    is visible) whose region contains the part; consistent if some part reaches `threshold`. The paper's
    score is 100 x the mean. `activation_fn(images) -> (B, P, h, w)` gives the similarity maps, so any
    prototype model fits; `keypoints` (B, S, 3) are (x, y, visible) in pixels.
    """
    hits, own = _prototype_parts(activation_fn, images, keypoints, labels, prototype_class, half_size, batch_size)
    visible = (keypoints[..., 2] > 0).to(images.device)
    seen = (own[..., None] & visible[:, None]).sum(0).clamp(min=1)
    consistent = ((hits.sum(0) / seen) >= threshold).any(1).float()
    return torch.where(own.any(0), consistent, float("nan"))


@torch.no_grad()
def prototype_stability(
    activation_fn: Callable[[Tensor], Tensor], images: Tensor, keypoints: Tensor, labels: Tensor,
    prototype_class: Tensor, *, half_size: int | None = None, noise_std: float = 0.2, noise_clip: float = 0.25,
    pixel_std: Sequence[float] = (0.229, 0.224, 0.225), seed: int = 0, batch_size: int = 64,
) -> Tensor:
    """(P,) fraction of its class's images on which a prototype's part vector survives noise (Huang et
    al. 2023; the score is 100 x the mean). The noise is clip(N(0, noise_std^2), +-noise_clip) in
    normalised space, i.e. times `pixel_std` (the model's normalisation std) in pixel space."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype) * noise_std
    std = torch.as_tensor(pixel_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    noisy = images + noise.clamp(-noise_clip, noise_clip) * std
    clean, own = _prototype_parts(activation_fn, images, keypoints, labels, prototype_class, half_size, batch_size)
    perturbed, _ = _prototype_parts(activation_fn, noisy, keypoints, labels, prototype_class, half_size, batch_size)
    same = ((clean == perturbed).all(-1) & own).sum(0).float()
    count = own.sum(0)
    return torch.where(count > 0, same / count.clamp(min=1), float("nan"))


# ----------------------------------------------------------------------------- FunnyBirds-style checks
FUNNYBIRDS_THRESHOLDS = tuple(np.linspace(0.01, 0.50, 80).tolist())


def part_importance(heatmaps: Tensor, masks: Tensor) -> Tensor:
    """(B, N) attribution summed inside each mask (B, N, H, W) dilated by a 5 x 5 max-pool (FunnyBirds)."""
    dilated = F.max_pool2d(masks.float(), 5, stride=1, padding=2)
    return (heatmaps[:, None].float() * dilated).flatten(2).sum(2)


@torch.no_grad()
def funnybirds(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    render_fn: Callable[[int, list[str]], Tensor], indices: Tensor, part_names: Sequence[str],
    part_masks: Tensor | None = None, background_names: Sequence[str] = (),
    thresholds: Sequence[float] = FUNNYBIRDS_THRESHOLDS, relevance: float = 0.05, batch_size: int = 64,
) -> dict[str, Tensor]:
    """FunnyBirds' part-level faithfulness checks (Hesse et al. 2023) for images that can be re-rendered.

    ``render_fn(index, remove=[names]) -> (C, H, W)`` re-renders sample `index` without the named parts
    or background objects. A part is "important" when its `part_importance` exceeds t x the map's total,
    for each t in `thresholds`. The explained class is `target` (default: the prediction); FunnyBirds
    explains the label for SD and D and the prediction for PC and DC, which agree on correctly
    classified images. Masks not given (and all background masks) are the pixels that change when the
    object is removed. Returns (NaN where a check is undefined for an image):

    - ``single_deletion`` (B,): 0.5 x Spearman(part importance, target-logit drop when the part alone
      is removed) + 0.5.
    - ``preservation`` (B, T): 1 if the prediction survives removing every part that is not important.
    - ``deletion`` (B, T): 1 if removing the important parts changes the prediction.
    - ``distractibility`` (B, T): 1 - share of the irrelevant parts and background objects (removal
      moves the target logit by less than `relevance` of it, or raises it) that are called important.
    - ``background_independence`` (B,): 1 - share of background objects whose removal lowers the target
      logit by at least `relevance` of it (a property of the model, not of the map).
    - ``thresholds`` (T,). Use `funnybirds_at_best_threshold` on the results of a whole test set.
    """
    _check(images, heatmaps)
    parts, objects = list(part_names), list(part_names) + list(background_names)
    batch, num_parts = len(images), len(part_names)
    device = images.device

    def render(b: int, removed: Sequence[str]) -> Tensor:
        return render_fn(int(indices[b]), list(removed)).to(device, images.dtype)

    logits = _batched(model, images, batch_size)
    prediction = logits.argmax(1)
    target = prediction if target is None else torch.as_tensor(target, device=device).long()
    score = logits.gather(1, target[:, None])[:, 0]
    singles = torch.stack([torch.stack([render(b, [name]) for name in objects]) for b in range(batch)])
    removed_score = _batched(model, singles.flatten(0, 1), batch_size).view(batch, len(objects), -1)
    removed_score = removed_score.gather(2, target[:, None, None].expand(-1, len(objects), 1))[..., 0]
    masks = (singles - images[:, None]).abs().amax(2) > 0.5 / 255
    if part_masks is not None:
        masks[:, :num_parts] = part_masks.to(device).bool()
    importance = part_importance(heatmaps, masks)
    t = torch.as_tensor(thresholds, device=device, dtype=importance.dtype)
    important = importance[..., None] > heatmaps.flatten(1).sum(1)[:, None, None] * t  # (B, N, T)
    drop = score[:, None] - removed_score

    # Preservation and deletion: the important set only changes at a few thresholds, render each once.
    cache: dict[tuple[int, frozenset], Tensor] = {}
    keys = {(b, frozenset(p for p, keep in zip(parts, important[b, :num_parts, k].tolist()) if keep))
            for b in range(batch) for k in range(len(t))}
    wanted = [(b, s) for b, s in keys] + [(b, frozenset(parts) - s) for b, s in keys]
    for b, removed in set(wanted):
        cache[(b, removed)] = images[b] if not removed else render(b, sorted(removed))
    order = list(cache)
    predicted = _batched(model, torch.stack([cache[k] for k in order]), batch_size).argmax(1)
    changed = {k: bool(predicted[i] != prediction[k[0]]) for i, k in enumerate(order)}
    preservation = torch.zeros(batch, len(t), device=device)
    deletion_check = torch.zeros(batch, len(t), device=device)
    for b in range(batch):
        for k in range(len(t)):
            kept = frozenset(p for p, keep in zip(parts, important[b, :num_parts, k].tolist()) if keep)
            preservation[b, k] = float(not changed[(b, frozenset(parts) - kept)])
            deletion_check[b, k] = float(changed[(b, kept)])

    irrelevant = (drop.abs() < (relevance * score).abs()[:, None]) | (removed_score > score[:, None])
    n_irrelevant = irrelevant.sum(1, keepdim=True)
    distractibility = 1 - (important & irrelevant[..., None]).sum(1) / n_irrelevant.clamp(min=1)
    distractibility = torch.where(n_irrelevant > 0, distractibility, float("nan"))
    bg_drop, bg_score = drop[:, num_parts:], removed_score[:, num_parts:]
    relevant_bg = (bg_drop.abs() >= (relevance * score).abs()[:, None]) & (score[:, None] > bg_score)
    independence = 1 - relevant_bg.float().mean(1) if len(background_names) else torch.full((batch,), float("nan"), device=device)
    return {
        "single_deletion": 0.5 * spearman(importance[:, :num_parts], drop[:, :num_parts]) + 0.5,
        "preservation": preservation,
        "deletion": deletion_check,
        "distractibility": distractibility,
        "background_independence": independence,
        "thresholds": t,
    }


def funnybirds_at_best_threshold(results: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-image checks at the threshold that maximises mean (PC + DC) / 2 + D over all the images.

    FunnyBirds maximises (CSDC + PC + DC) / 3 + D; CSDC (minimal sufficient part sets) is not computed
    here. Returns (B,) tensors and the chosen ``threshold``.
    """
    score = (results["preservation"] + results["deletion"]).nanmean(0) / 2 + results["distractibility"].nanmean(0)
    best = int(torch.nan_to_num(score, nan=-1.0).argmax())
    out = {k: results[k][:, best] for k in ("preservation", "deletion", "distractibility")}
    out.update(single_deletion=results["single_deletion"], background_independence=results["background_independence"])
    out["threshold"] = results["thresholds"][best]
    return out
