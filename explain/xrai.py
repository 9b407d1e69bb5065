"""XRAI (Kapishnikov et al., ICCV 2019): integrated gradients summed into image regions, the regions
chosen greedily by attribution density, behind ``attribute(..., method="xrai")``.

Defaults are those of the official implementation (PAIR-code/saliency, ``saliency/core/xrai.py``):

- base attribution: integrated gradients (a Riemann sum over ``linspace(0, 1, steps)``, endpoints
  included, 100 steps) from a black baseline (every value the image's minimum) and a white one (its
  maximum), averaged, then the maximum over colour channels;
- candidate regions: Felzenszwalb segmentations of the image min-max scaled to [-1, 1] and resized to
  224 x 224, at scales 50, 100, 150, 250, 500, 1200 (sigma 0.8, min_size 150), resized back (nearest),
  every segment a mask dilated by a disk of radius 5;
- the full greedy algorithm: while the covered fraction is <= `area_threshold`, drop the masks that add
  fewer than `min_pixel_diff` new pixels and add the one whose new pixels have the highest mean
  attribution, which becomes their value; pixels never covered get their own mean attribution.

Integrated gradients run batched on the model's device; the segmentation (scikit-image) runs on the CPU,
the greedy selection per image on the device.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .posthoc import register_method

__all__ = ["FELZENSZWALB_SCALES", "xrai_segments", "xrai_regions", "pair_integrated_gradients"]

FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_MIN_SIZE = 150
SEGMENTATION_SIZE = (224, 224)
DILATION_RADIUS = 5


def _disk(radius: int, device) -> Tensor:
    """(1, 1, 2r+1, 2r+1) disk footprint, as skimage.morphology.disk (x^2 + y^2 <= r^2)."""
    r = torch.arange(-radius, radius + 1, device=device)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]


def xrai_segments(image: Tensor, scales: Sequence[int] = FELZENSZWALB_SCALES, dilation: int = DILATION_RADIUS) -> Tensor:
    """(n, H, W) bool candidate masks of one image (C, H, W): every Felzenszwalb segment of every scale,
    dilated by a disk of radius `dilation` (0: none), on the image's device."""
    from skimage.segmentation import felzenszwalb  # lazy: scikit-image is only needed here
    from skimage.transform import resize

    height, width = image.shape[-2:]
    im = image.detach().permute(1, 2, 0).double().cpu().numpy()
    lo, hi = im.min(), im.max()
    im = (im - lo) / (hi - lo if hi > lo else 1.0) * 2.0 - 1.0
    im = resize(im, SEGMENTATION_SIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    masks = []
    for scale in scales:
        seg = felzenszwalb(im, scale=scale, sigma=FELZENSZWALB_SIGMA, min_size=FELZENSZWALB_MIN_SIZE)
        seg = resize(seg, (height, width), order=0, preserve_range=True, mode="constant", anti_aliasing=False).astype(int)
        seg = torch.from_numpy(seg).to(image.device)
        masks.append(seg[None] == torch.arange(int(seg.min()), int(seg.max()) + 1, device=image.device)[:, None, None])
    out = torch.cat(masks)
    if dilation:
        out = F.conv2d(out[:, None].float(), _disk(dilation, image.device), padding=dilation)[:, 0] > 0
    return out


def xrai_regions(attr: Tensor, masks: Tensor, area_threshold: float = 1.0, min_pixel_diff: int = 50) -> Tensor:
    """XRAI's full greedy region selection on one attribution map (H, W) and candidate masks (n, H, W):
    the (H, W) map of region densities. Gains are computed in float64; ties go to the first mask."""
    shape = attr.shape
    a = attr.detach().double().flatten()
    m = masks.flatten(1)
    alive = torch.arange(len(m), device=m.device)  # the masks still in the pool, in their order
    current = torch.zeros_like(a, dtype=torch.bool)
    out = torch.full_like(a, float("-inf"))
    while float(current.double().mean()) <= area_threshold:
        added = m[alive] & ~current
        count = added.sum(1)
        keep = count >= min_pixel_diff
        if not keep.any():
            break
        alive, added, count = alive[keep], added[keep], count[keep]
        gain = (added * a).sum(1) / count
        best = int(gain.argmax())  # the first of equal gains, as the official strict '>' scan
        out[added[best]] = gain[best]
        current |= m[alive[best]]
        alive = torch.cat([alive[:best], alive[best + 1:]])
    uncovered = out == float("-inf")
    if uncovered.any():
        out[uncovered] = a[uncovered].mean()
    return out.view(shape).float()


def pair_integrated_gradients(
    model: nn.Module, images: Tensor, target: Tensor, baselines: Tensor, steps: int = 100,
    batch_size: int = 128, probability: bool = True,
) -> Tensor:
    """(B, C, H, W) integrated gradients as PAIR's ``IntegratedGradients``: the sum of the gradients at
    ``baseline + alpha (x - baseline)`` for alpha in ``linspace(0, 1, steps)``, times (x - baseline) / steps.
    `baselines` broadcasts against `images`; `batch_size` path points go through each pass.
    `probability`: differentiate the softmax probability of the target (PAIR's PyTorch example), else the logit."""
    batch = len(images)
    diff = images.detach() - baselines
    base = baselines.expand_as(images)
    total = torch.zeros_like(images, dtype=torch.float32)
    alphas = torch.linspace(0, 1, steps, device=images.device, dtype=images.dtype)
    for chunk in alphas.split(max(1, batch_size // batch)):
        x = (base[:, None] + chunk.view(1, -1, 1, 1, 1) * diff[:, None]).flatten(0, 1).requires_grad_(True)
        out = model(x).float()
        if probability:
            out = out.softmax(1)
        score = out.gather(1, target.repeat_interleave(len(chunk))[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
        total += grad.float().view(batch, len(chunk), *images.shape[1:]).sum(1)
    return total * diff / steps


@register_method("xrai", gradient=True)
def _xrai(
    model, images, target, layer, steps: int = 100, area_threshold: float = 1.0, min_pixel_diff: int = 50,
    batch_size: int = 128, probability: bool = True, segments: list[Tensor] | None = None,
) -> Tensor:
    """XRAI with the official defaults (module docstring). `segments`: per image an (n, H, W) bool stack of
    candidate masks instead of the Felzenszwalb ones. `batch_size` path points per backward pass;
    `probability`: integrate the gradient of the softmax probability (PAIR's example), else of the logit."""
    if steps < 2 or batch_size < 1 or not 0 < area_threshold <= 1 or min_pixel_diff < 1:
        raise ValueError(f"xrai needs steps >= 2, batch_size >= 1, 0 < area_threshold <= 1 and min_pixel_diff >= 1, "
                         f"got {steps}, {batch_size}, {area_threshold}, {min_pixel_diff}")
    if segments is not None and len(segments) != len(images):
        raise ValueError(f"xrai: segments must hold one mask stack per image ({len(images)}), got {len(segments)}")
    flat = images.detach().flatten(1)
    black = flat.amin(1).view(-1, 1, 1, 1)
    white = flat.amax(1).view(-1, 1, 1, 1)
    attr = sum(pair_integrated_gradients(model, images, target, b, steps, batch_size, probability) for b in (black, white)) / 2
    attr = attr.amax(1)
    maps = []
    for b in range(len(images)):
        masks = segments[b].to(images.device).bool() if segments is not None else xrai_segments(images[b])
        maps.append(xrai_regions(attr[b], masks, area_threshold, min_pixel_diff))
    return torch.stack(maps)
