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

__all__ = ["pointing_game", "energy_pointing_game", "relevance_mass", "prototype_consistency", "prototype_stability"]


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
