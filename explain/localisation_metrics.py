"""Localisation metrics: does a heatmap, or a prototype's region, land on the ground-truth object or part.

`pointing_game` (Zhang et al. 2016), `energy_pointing_game` (Wang et al. 2020) and `relevance_mass`
(Arras et al. 2022) score each image's heatmap against masks, ``metric(model, images, heatmaps, target,
*, masks) -> (B,)`` (the model is not used). `prototype_consistency` / `prototype_stability` (Huang et
al. 2023) score each prototype (P,) against part keypoints.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.perturbation_metrics import _check, _minmax

__all__ = ["pointing_game", "energy_pointing_game", "relevance_mass", "prototype_consistency", "prototype_stability",
           "protocol_half_size", "part_vectors", "consistency_from_parts", "stability_from_parts", "stability_noise"]


# ----------------------------------------------------------------------------- localisation
def pointing_game(
    model: nn.Module | None, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    masks: Tensor, tolerance: float = 15.0, points: Tensor | None = None,
) -> Tensor:
    """Pointing game (Zhang et al. 2016): 1 where a ground-truth pixel lies strictly within `tolerance` px of the heatmap's maximum, else 0.

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
    """Energy pointing game (Wang et al. 2020): share of the min-max normalised map's energy inside `masks` (B, H, W) (Score-CAM's proportion;
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


# ----------------------------------------------------------------------------- prototype models
# The protocol of Huang et al. (CVPR 2023), official code ``EvalProtoPNet/util/eval_interpretability.py``:
# on the test images of a prototype's class, the prototype's activation map is upsampled bicubically to the
# image (cv2 INTER_CUBIC there, torch bicubic here: both a = -0.75, replicated borders), its first maximum
# in row-major order is the centre of the region [y - half, y + half] x [x - half, x + half] clipped to
# [0, size] with inclusive bounds (``in_bbox``), and a part is hit when its visible keypoint, at integer
# pixel coordinates (``int(...)``), lies in the region. Consistency: some part hit on >= 80% of the
# images where it is visible. Stability: the share of images whose part vector survives the noise
# clip(N(0, 0.2^2), +-0.25) added to the normalised image (not clipped to the valid range afterwards).
# Deviations: `half_size` defaults to 36 px at 224 px scaled to the image (the official 36 at any size
# is available as half_size=36); a prototype without a class of its own (a ProtoTree node) is scored on
# the images of every class in its class set ((P, K) bool `prototype_class`), the official code having
# only class-specific prototypes; the noise is drawn from a seeded generator.
def _class_sets(prototype_class: Tensor, num_labels: int) -> Tensor:
    """(P,) class ids (-1 = none) or (P, K) bool -> (P, K') bool with K' covering every label."""
    if prototype_class.dtype == torch.bool and prototype_class.ndim == 2:
        sets = prototype_class
    elif prototype_class.ndim == 1:
        k = max(int(prototype_class.max()) + 1 if len(prototype_class) else 0, num_labels)
        sets = F.one_hot(prototype_class.long().clamp(min=0), max(k, 1)).bool() & (prototype_class >= 0)[:, None]
    else:
        raise ValueError(f"prototype_class must be (P,) class ids or (P, K) bool, got {tuple(prototype_class.shape)} "
                         f"{prototype_class.dtype}")
    if sets.shape[1] < num_labels:
        sets = F.pad(sets, (0, num_labels - sets.shape[1]))
    return sets


def _own(labels: Tensor, prototype_class: Tensor, device: torch.device) -> Tensor:
    """(B, P) True where the prototype belongs to the image's class (only those pairs count)."""
    labels = labels.to(device).long()
    sets = _class_sets(prototype_class.to(device), int(labels.max()) + 1 if len(labels) else 0)
    return sets[:, labels].T


def protocol_half_size(height: int) -> int:
    """The protocol's 36 px half size at 224 px, scaled to an image `height` px high (10 at 64 px)."""
    return round(36 * height / 224)


def part_vectors(maps: Tensor, keypoints: Tensor, half_size: int | None = None,
                 size: tuple[int, int] | None = None) -> Tensor:
    """(B, P, S) bool: which visible keypoints (B, S, 3) = (x, y, visible) lie in each prototype's region.

    `maps` (B, P, h, w) are upsampled bicubically to `size` (default: already the image size when
    h x w is; pass it otherwise) and the region is the +-`half_size` box around the first maximum.
    """
    if size is None:
        size = tuple(maps.shape[-2:])
    height, width = size
    half = protocol_half_size(height) if half_size is None else int(half_size)
    up = maps.float() if tuple(maps.shape[-2:]) == (height, width) else \
        F.interpolate(maps.float(), size=(height, width), mode="bicubic", align_corners=False)
    peak = up.flatten(2).argmax(2)
    py, px = peak // width, peak % width  # (B, P)
    keypoints = keypoints.to(maps.device)
    kx, ky = keypoints[..., 0].trunc()[:, None], keypoints[..., 1].trunc()[:, None]  # int(x) as the official code
    visible = (keypoints[..., 2] > 0)[:, None]
    in_y = ((py - half).clamp(min=0)[..., None] <= ky) & (ky <= (py + half).clamp(max=height)[..., None])
    in_x = ((px - half).clamp(min=0)[..., None] <= kx) & (kx <= (px + half).clamp(max=width)[..., None])
    return in_y & in_x & visible


def _prototype_parts(
    activation_fn: Callable[[Tensor], Tensor], images: Tensor, keypoints: Tensor, labels: Tensor,
    prototype_class: Tensor, half_size: int | None, batch_size: int,
) -> tuple[Tensor, Tensor]:
    """`part_vectors` (B, P, S) of each prototype on each image, False outside the prototype's classes,
    and (B, P) True where the prototype belongs to the image's class (only those count)."""
    own = _own(labels, prototype_class, images.device)
    hits = []
    for start in range(0, len(images), batch_size):
        acts = activation_fn(images[start:start + batch_size])
        if acts.ndim != 4 or acts.shape[1] != own.shape[1]:
            raise ValueError(f"activation_fn must return (B, P={own.shape[1]}, h, w), got {tuple(acts.shape)}")
        hits.append(part_vectors(acts, keypoints[start:start + len(acts)], half_size, tuple(images.shape[-2:])))
    return torch.cat(hits).to(images.device) & own[..., None], own


def consistency_from_parts(hits: Tensor, own: Tensor, keypoints: Tensor, threshold: float = 0.8) -> Tensor:
    """(P,) 1 where some part is hit on >= `threshold` of the own images where it is visible, NaN where a
    prototype has no own image. `hits` (B, P, S) part vectors, `own` (B, P), `keypoints` (B, S, 3)."""
    visible = (keypoints[..., 2] > 0).to(hits.device)
    seen = (own[..., None] & visible[:, None]).sum(0).clamp(min=1)  # the official denominator: 0 -> 1
    consistent = (((hits & own[..., None]).sum(0) / seen) >= threshold).any(1).float()
    return torch.where(own.any(0), consistent, float("nan"))


def stability_from_parts(clean: Tensor, noisy: Tensor, own: Tensor) -> Tensor:
    """(P,) share of the own images whose part vector (B, P, S) is the same with and without noise."""
    same = ((clean == noisy).all(-1) & own).sum(0).float()
    count = own.sum(0)
    return torch.where(count > 0, same / count.clamp(min=1), float("nan"))


def stability_noise(images: Tensor, pixel_std: Sequence[float] | Tensor = (0.229, 0.224, 0.225), *,
                    noise_std: float = 0.2, noise_clip: float = 0.25, seed: int = 0) -> Tensor:
    """The protocol's noisy images: clip(N(0, noise_std^2), +-noise_clip) in normalised space, i.e. times
    the model's normalisation std `pixel_std` in pixel space (no clipping of the result)."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype) * noise_std
    std = torch.as_tensor(pixel_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images + noise.clamp(-noise_clip, noise_clip) * std


@torch.no_grad()
def prototype_consistency(
    activation_fn: Callable[[Tensor], Tensor], images: Tensor, keypoints: Tensor, labels: Tensor,
    prototype_class: Tensor, *, half_size: int | None = None, threshold: float = 0.8, batch_size: int = 64,
) -> Tensor:
    """(P,) 1 where a prototype is consistent (Huang et al. 2023), NaN where its class has no image.

    Per-prototype, not per-image: over the images of its class, the fraction of images (where the part
    is visible) whose region contains the part; consistent if some part reaches `threshold`. The paper's
    score is 100 x the mean. `activation_fn(images) -> (B, P, h, w)` gives the similarity maps, so any
    prototype model fits; `keypoints` (B, S, 3) are (x, y, visible) in pixels; `prototype_class` (P,)
    class ids (-1 = none) or (P, K) bool class sets.
    """
    hits, own = _prototype_parts(activation_fn, images, keypoints, labels, prototype_class, half_size, batch_size)
    return consistency_from_parts(hits, own, keypoints, threshold)


@torch.no_grad()
def prototype_stability(
    activation_fn: Callable[[Tensor], Tensor], images: Tensor, keypoints: Tensor, labels: Tensor,
    prototype_class: Tensor, *, half_size: int | None = None, noise_std: float = 0.2, noise_clip: float = 0.25,
    pixel_std: Sequence[float] | Tensor = (0.229, 0.224, 0.225), seed: int = 0, batch_size: int = 64,
) -> Tensor:
    """(P,) fraction of its class's images on which a prototype's part vector survives noise (Huang et
    al. 2023; the score is 100 x the mean). The noise is `stability_noise`: pass the model's
    normalisation std as `pixel_std` (ImageNet's by default)."""
    noisy = stability_noise(images, pixel_std, noise_std=noise_std, noise_clip=noise_clip, seed=seed)
    clean, own = _prototype_parts(activation_fn, images, keypoints, labels, prototype_class, half_size, batch_size)
    perturbed, _ = _prototype_parts(activation_fn, noisy, keypoints, labels, prototype_class, half_size, batch_size)
    return stability_from_parts(clean, perturbed, own)
