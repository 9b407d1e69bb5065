"""Perturbation masks learned by gradient descent: extremal perturbations (Fong, Patrick & Vedaldi,
ICCV 2019) and meaningful perturbation (Fong & Vedaldi, ICCV 2017), behind
``attribute(..., method="extremal")`` and ``attribute(..., method="meaningful")``.

Both optimise one mask per image (and per area) for the whole batch at once: the objective is a sum of
per-image terms and the optimisers (SGD with momentum, Adam) act elementwise, so in eval mode every
image's mask is the one it would get alone.

**Extremal perturbations**, as TorchRay's ``extremal_perturbation``: a smooth mask (parameters on a grid of
stride `step`, each pixel the smooth maximum, coldness 20, of its neighbouring parameters weighted by
``exp(-2 max(0, d / sigma - 0.5)^2)``) picks, per pixel, a level of a blur pyramid (8 levels, sigma 20 down
to 0); the reward is the target logit of the perturbed image (``preserve``), minus it (``delete``), or
their difference (``dual``); the area constraint is ``mean((sort(m) - r_a)^2)`` over the mask with its
margin, r_a = (1 - a) N zeros then a N ones, weighted by lambda = 300, growing x1.0035 per iteration. SGD
(lr 0.01, momentum 0.9, dampening 0.9), 800 iterations, parameters clamped to [0, 1], the batch flipped
horizontally on even iterations. The map is the sum of the masks of all `areas`.

**Meaningful perturbation**, as the official Caffe code (``optimize_mask.py``): minimise
``l1 sum|m - 1| + tv sum (|grad m|)^beta + p_c(x m + blur(x) (1 - m))`` over a mask m at 1/8 of the
image, upsampled (nearest) and blurred before use; p_c the softmax probability; Adam (lr 0.1), 300
iterations, m clipped to [0, 1]; a random jitter of up to 4 px. The map is 1 - m (the deleted region).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .posthoc import baseline_colour, register_method

__all__ = ["gaussian_blur", "blur_pyramid", "SmoothMask", "extremal_perturbation", "meaningful_perturbation",
           "meaningful_objective", "total_variation"]

VARIANTS = ("preserve", "delete", "dual")


def gaussian_blur(x: Tensor, sigma: float, padding: str = "zeros") -> Tensor:
    """(N, C, H, W) separable Gaussian filter, support ceil(4 sigma), kernel normalised to sum 1;
    `padding` "zeros" (TorchRay's ``imsmooth``) or "replicate" (PIL's edge extension)."""
    if sigma <= 0:
        return x
    width = math.ceil(4 * sigma)
    taps = torch.arange(-width, width + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    if padding == "replicate":
        x = F.pad(x, (width,) * 4, mode="replicate")
        pad = 0
    elif padding == "zeros":
        pad = width
    else:
        raise ValueError(f"padding must be 'zeros' or 'replicate', got {padding!r}")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), padding=(pad, 0), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), padding=(0, pad), groups=channels)


def blur_pyramid(images: Tensor, base: Tensor, levels: int = 8, max_blur: float = 20.0) -> Tensor:
    """(B, L, C, H, W): level l blurred with sigma max_blur (1 - l / (L - 1)), the last level the image.

    TorchRay blurs the normalised input with zero padding, i.e. towards the dataset mean at the borders;
    here the images are in the model's input space, so they are blurred around `base` (the mean colour
    for zoo models, 0 for a model that takes normalised input), which is the same operation."""
    sigmas = [(1 - t) * max_blur for t in torch.linspace(0, 1, levels).tolist()]
    return torch.stack([base + gaussian_blur(images - base, s) for s in sigmas], dim=1)


def _apply_pyramid(pyramid: Tensor, masks: Tensor) -> Tensor:
    """Per pixel, interpolate linearly between the pyramid levels m (L - 1) and the next one.
    pyramid (N, L, C, H, W), masks (N, 1, H, W) in [0, 1] -> (N, C, H, W)."""
    levels = pyramid.shape[1]
    w = masks * (levels - 1)
    k = w.floor()
    w = (w - k)[:, :, None]
    k = k.long()[:, :, None].expand(-1, -1, pyramid.shape[2], -1, -1)
    low = pyramid.gather(1, k)
    high = pyramid.gather(1, (k + 1).clamp(max=levels - 1))
    return ((1 - w) * low + w * high)[:, 0]


class SmoothMask:
    """Smooth masks of shape (H, W) from parameters on a grid of stride `step` (TorchRay's parametrisation).

    Parameter (i, j) sits at pixel (step i, step j); pixel u of the mask is
    ``smoothmax_k(w_k(u) p_k)`` over the (2r + 1)^2 parameters around its grid cell, r = 1 + ceil(sigma / step),
    with ``w_k(u) = exp(-2 max(0, |u - c_k| / sigma - 0.5)^2)`` and ``smoothmax(v) = sum v softmax(20 v)``.
    The mask is computed with a margin of sigma pixels on every side (the area constraint sees it), then
    clamped to [0, 1]; `generate` returns (cropped (N, 1, H, W), with margin).
    """

    coldness = 20.0

    def __init__(self, shape: tuple[int, int], step: int = 7, sigma: float = 21.0, device=None) -> None:
        if int(step) != step or step < 1 or sigma <= 0:
            raise ValueError(f"SmoothMask needs an integer step >= 1 and sigma > 0, got {step}, {sigma}")
        self.shape, self.step, self.sigma = tuple(shape), int(step), float(sigma)
        self.margin = self.sigma
        self.padding = 1 + math.ceil((self.margin + self.sigma) / step)
        self.radius = 1 + math.ceil(self.sigma / step)
        self.grid = tuple(math.ceil(z / step) for z in self.shape)  # the parameter grid
        size = 2 * self.radius + 1
        self.cells = tuple(g + 2 * self.padding - size + 1 for g in self.grid)  # grid cells with a margin
        self.full = tuple(step * c - step + 1 for c in self.cells)  # the mask with its margin
        uy = torch.arange(self.full[0], dtype=torch.float32)[:, None]
        ux = torch.arange(self.full[1], dtype=torch.float32)[None, :]
        offsets = torch.arange(size, dtype=torch.float32)
        # centre of the neighbouring parameter (ky, kx) of pixel (uy, ux), in the frame of the full mask
        cy = self.margin + step * (torch.div(uy, step, rounding_mode="floor")[None] + offsets[:, None, None] - self.padding)
        cx = self.margin + step * (torch.div(ux, step, rounding_mode="floor")[None] + offsets[:, None, None] - self.padding)
        dist = torch.sqrt((uy[None, None] - cy[:, None]) ** 2 + (ux[None, None] - cx[None, :]) ** 2)  # (ky, kx, H, W)
        self.weight = torch.exp(-2 * (dist / self.sigma - 0.5).clamp(min=0) ** 2).flatten(0, 1)[None].to(device)

    def generate(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """(mask cropped to the image, mask with its margin) of mask parameters: a smooth maximum of the
        kernel-weighted parameters near each pixel (TorchRay's smooth mask)."""
        size = 2 * self.radius + 1
        near = F.unfold(params, size, padding=self.padding).view(len(params), size * size, *self.cells)
        near = near.repeat_interleave(self.step, 2).repeat_interleave(self.step, 3)[:, :, : self.full[0], : self.full[1]]
        z = self.weight * near
        full = (z * torch.softmax(self.coldness * z, dim=1)).sum(1, keepdim=True).clamp(0, 1)
        m = round(self.margin)
        return full[:, :, m:m + self.shape[0], m:m + self.shape[1]], full


def _reward(logits: Tensor, target: Tensor, contrastive: bool) -> Tensor:
    score = logits.gather(1, target[:, None])[:, 0]
    if contrastive:  # target minus the best other class
        others = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf"))
        score = score - others.amax(1)
    return score


def extremal_perturbation(
    model: nn.Module, images: Tensor, target: Tensor, areas: Sequence[float] | float = (0.1,), variant: str = "preserve",
    max_iter: int = 800, step: int = 7, sigma: float = 21.0, levels: int = 8, max_blur: float = 20.0,
    jitter: bool = True, contrastive: bool = False, lam: float = 300.0, lam_growth: float = 1.0035,
    lr: float = 0.01, momentum: float = 0.9,
) -> tuple[Tensor, Tensor]:
    """Extremal masks (see the module docstring) of every image and area, all optimised together:
    (B, A, H, W) and the same with their margin (B, A, H + 2 margin', W + 2 margin'), on which the area
    constraint is imposed (as TorchRay, so with small images a mask may cover more than a of the image)."""
    areas = [float(a) for a in ([areas] if isinstance(areas, (int, float)) else areas)]
    if variant not in VARIANTS:
        raise ValueError(f"extremal variant must be one of {VARIANTS}, got {variant!r}")
    if not areas or not all(0 < a < 1 for a in areas) or max_iter < 1:
        raise ValueError(f"extremal needs areas in (0, 1) and max_iter >= 1, got {areas}, {max_iter}")
    batch, n_areas = len(images), len(areas)
    device = images.device
    images = images.detach()
    pyramid = blur_pyramid(images, baseline_colour(model, images), levels, max_blur).repeat_interleave(n_areas, 0)
    gen = SmoothMask(images.shape[-2:], step, sigma, device)
    params = torch.ones(batch * n_areas, 1, *gen.grid, device=device)
    n = gen.full[0] * gen.full[1]
    reference = torch.ones(n_areas, n, device=device)
    for i, a in enumerate(areas):
        reference[i, : int(n * (1 - a))] = 0
    reference = reference.repeat(batch, 1)
    target = target.repeat_interleave(n_areas)
    optimiser = torch.optim.SGD([params], lr=lr, momentum=momentum, dampening=momentum)
    weight = lam
    for t in range(max_iter):
        params.requires_grad_(True)
        mask, full = gen.generate(params)
        if variant == "preserve":
            x = _apply_pyramid(pyramid, mask)
        elif variant == "delete":
            x = _apply_pyramid(pyramid, 1 - mask)
        else:
            x = torch.cat([_apply_pyramid(pyramid, mask), _apply_pyramid(pyramid, 1 - mask)])
        if jitter and t % 2 == 0:
            x = x.flip(3)
        reward = _reward(model(x).float(), target.repeat(2) if variant == "dual" else target, contrastive)
        if variant == "delete":
            reward = -reward
        elif variant == "dual":
            reward = reward[: len(target)] - reward[len(target):]
        regul = ((full.flatten(1).sort(1).values - reference) ** 2).mean(1) * weight
        energy = (reward - regul).sum()
        (grad,) = torch.autograd.grad(-energy, params)
        params.grad = grad
        optimiser.step()
        with torch.no_grad():
            params.clamp_(0, 1)
        weight *= lam_growth
    return mask.detach().view(batch, n_areas, *mask.shape[-2:]), full.detach().view(batch, n_areas, *full.shape[-2:])


@register_method("extremal", gradient=True)
def _extremal(
    model, images, target, layer, areas=(0.1,), variant: str = "preserve", max_iter: int = 800, step: int = 7,
    sigma: float = 21.0, jitter: bool = True, contrastive: bool = False, smooth: float = 0.0,
) -> Tensor:
    """Extremal perturbations (TorchRay defaults; module docstring): the sum of the masks of `areas`
    (TorchRay's pointing-game saliency), smoothed with a Gaussian of sigma `smooth` x min(H, W) if > 0."""
    masks, _ = extremal_perturbation(model, images, target, areas, variant, max_iter, step, sigma,
                                     jitter=jitter, contrastive=contrastive)
    saliency = masks.sum(1, keepdim=True)
    if smooth > 0:
        saliency = gaussian_blur(saliency, smooth * min(images.shape[-2:]))
    return saliency[:, 0]


# ----------------------------------------------------------------------------- meaningful perturbation
def total_variation(mask: Tensor, beta: float = 3.0) -> Tensor:
    """(N,) sum over pixels of (dx^2 + dy^2)^(beta / 2), forward differences (0 on the last row / column),
    of masks (N, 1, h, w), as the official ``tv``."""
    dy = F.pad(mask[..., 1:, :] - mask[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(mask[..., :, 1:] - mask[..., :, :-1], (0, 1, 0, 0))
    return (dy**2 + dx**2).pow(beta / 2).flatten(1).sum(1)


def _upsampled(mask: Tensor, scale: int, size: tuple[int, int], blur: float) -> Tensor:
    up = mask.repeat_interleave(scale, 2).repeat_interleave(scale, 3)[..., : size[0], : size[1]]
    return gaussian_blur(up, blur, padding="replicate")


def meaningful_objective(
    model: nn.Module, images: Tensor, nulls: Tensor, mask: Tensor, target: Tensor, l1: float = 1e-4,
    tv: float = 1e-2, beta: float = 3.0, scale: int = 8, mask_blur: float = 5.0,
) -> dict[str, Tensor]:
    """The terms (each (B,)) of the deletion game for low-resolution masks (B, 1, h, w): "probability"
    p_c(x M + null (1 - M)) with M the mask upsampled x`scale` (nearest) and blurred, "l1" = l1 sum|m - 1|,
    "tv" = tv TV_beta(m), and their sum "objective"."""
    big = _upsampled(mask, scale, images.shape[-2:], mask_blur)
    x = images * big + nulls * (1 - big)
    terms = {"probability": torch.softmax(model(x).float(), 1).gather(1, target[:, None])[:, 0],
             "l1": l1 * (mask - 1).abs().flatten(1).sum(1), "tv": tv * total_variation(mask, beta)}
    terms["objective"] = terms["probability"] + terms["l1"] + terms["tv"]
    return terms


def meaningful_perturbation(
    model: nn.Module, images: Tensor, target: Tensor, iterations: int = 300, lr: float = 0.1, l1: float = 1e-4,
    tv: float = 1e-2, beta: float = 3.0, scale: int = 8, mask_blur: float = 5.0, blur: float = 10.0,
    jitter: int = 4, seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """(masks (B, H, W) upsampled and blurred as the official output, objective per iteration (B, T)).

    The null image is the image blurred with sigma `blur` px (edges replicated, as PIL). Jitter as the
    official code: image and null resized to (H + jitter, W + jitter), a random crop of (H, W) per
    iteration (the same offsets for every image). The mask starts uniform at random; offsets and the start
    come from a CPU generator seeded with `seed`.
    """
    if iterations < 1 or scale < 1 or jitter < 0:
        raise ValueError(f"meaningful needs iterations >= 1, scale >= 1 and jitter >= 0, got {iterations}, {scale}, {jitter}")
    images = images.detach()
    size = images.shape[-2:]
    nulls = gaussian_blur(images, blur, padding="replicate")
    if jitter:
        big = (size[0] + jitter, size[1] + jitter)
        wide_images = F.interpolate(images, size=big, mode="bilinear", align_corners=False)
        wide_nulls = F.interpolate(nulls, size=big, mode="bilinear", align_corners=False)
    generator = torch.Generator().manual_seed(seed)
    grid = (math.ceil(size[0] / scale), math.ceil(size[1] / scale))
    mask = torch.rand(1, 1, *grid, generator=generator).expand(len(images), -1, -1, -1).to(images).clone()
    mask.requires_grad_(True)
    optimiser = torch.optim.Adam([mask], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    history = []
    for _ in range(iterations):
        if jitter:
            i, j = (int(v) for v in torch.randint(0, jitter, (2,), generator=generator))
            x, null = wide_images[..., i:i + size[0], j:j + size[1]], wide_nulls[..., i:i + size[0], j:j + size[1]]
        else:
            x, null = images, nulls
        terms = meaningful_objective(model, x, null, mask, target, l1, tv, beta, scale, mask_blur)
        history.append(terms["objective"].detach())
        (grad,) = torch.autograd.grad(terms["objective"].sum(), mask)
        mask.grad = grad
        optimiser.step()
        with torch.no_grad():
            mask.clamp_(0, 1)
    return _upsampled(mask.detach(), scale, size, mask_blur)[:, 0], torch.stack(history, 1)


@register_method("meaningful", gradient=True)
def _meaningful(
    model, images, target, layer, iterations: int = 300, lr: float = 0.1, l1: float = 1e-4, tv: float = 1e-2,
    beta: float = 3.0, scale: int = 8, mask_blur: float = 5.0, blur: float = 10.0, jitter: int = 4, seed: int = 0,
) -> Tensor:
    """Meaningful perturbation (Fong & Vedaldi 2017; defaults of the official code, module docstring):
    1 - the learned deletion mask, so the deleted region is the salient one."""
    masks, _ = meaningful_perturbation(model, images, target, iterations, lr, l1, tv, beta, scale, mask_blur,
                                       blur, jitter, seed)
    return 1 - masks
