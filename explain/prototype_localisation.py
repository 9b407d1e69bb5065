"""Where a prototype's evidence lies in an image: one function for every prototype family and method.

``localise_prototypes(model, images, prototypes=None, method="upsampling", **options) -> Localisation``
gives, for each image and selected prototype, a pixel map (B, P, H, W) and its box (B, P, 4) as
(x0, y0, x1, y1), x1/y1 exclusive (the format of the stored records, ``prototype_box``).
`localise_sources` does the same for each prototype on its own source image at its stored latent
position. Only the prototype interface (`models.prototype_model`) is used, so every family gets them.

The methods are those compared by Xu-Darme et al. (CVPRW 2023, companion code
``prototype_sanity_checks``; spec `explanations_next.md` A.1-A.4):

- ``upsampling``: the similarity map upsampled bicubically, box of the pixels at or above its 95th
  percentile: exactly the maps and boxes of `PrototypeModel.prototype_evidence` (and, on a source,
  of the family's `push_boxes`, i.e. the stored ``prototype_box``).
- ``smoothgrad``: the gradient of the prototype's distance at its closest latent cell (h*, w*),
  averaged over 10 copies with Gaussian noise of std 0.2 x (max - min) of the normalised image,
  times the normalised input (``grad_x_input``); gradients and input in the normalised space the
  official code works in.
- ``randgrads``: uniform [0, 1) noise per input element (a baseline that knows nothing of the model).
- ``prp``: prototypical relevance propagation (`explain.prp`) from the similarity at (h*, w*).

Post-processing of the last three (the official ``polarity_and_collapse``): absolute value, mean over
colour channels, Gaussian blur (not for randgrads), min-max normalisation. Their box is, as for
upsampling, the tight box of the pixels at or above the `percentile` of the map, so that every method
boxes the same share of the image.

Deviation: the official blur has sigma = 5 px on 224 px CUB images; here sigma defaults to
5 x min(H, W) / 224 (1.4 px at 64 px), the same share of the image; ``blur_sigma=5`` gives the official
value. The official (h*, w*) is the first minimum of the distance map in row-major order, as here.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.activation_boxes import box_of_mask, high_activation_boxes, upsample_maps
from models.prototype_model import register_localisation

from .prp import model_normalisation, prp_relevance

__all__ = ["Localisation", "METHODS", "gaussian_blur", "localise_prototypes", "localise_sources", "percentile_boxes"]

METHODS = ("upsampling", "smoothgrad", "randgrads", "prp")
# Options of one method beyond percentile, cells, batch_size, blur_sigma, normalize (seed: any method).
_OPTIONS = {"upsampling": {"seed"}, "smoothgrad": {"samples", "noise", "grad_x_input", "seed"}, "randgrads": {"seed"},
            "prp": {"seed"}}


@dataclass
class Localisation:
    """Pixel maps and boxes of prototypes on images.

    Attributes:
        maps: (B, P, H, W) float (upsampling: the similarity itself; other methods: min-max normalised).
        boxes: (B, P, 4) int64 (x0, y0, x1, y1), x1/y1 exclusive.
        prototypes: (B, P) the prototype of each map.
        cells: (B, P, 2) the latent (row, col) each gradient method starts from (the closest cell).
        method: the method's name.
    """

    maps: Tensor
    boxes: Tensor
    prototypes: Tensor
    cells: Tensor
    method: str

    @staticmethod
    def methods() -> tuple[str, ...]:
        """The names `localise_prototypes` accepts."""
        return METHODS


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


# ----------------------------------------------------------------------------- post-processing
@functools.lru_cache(maxsize=32)
def _reflect_index(n: int, radius: int) -> Tensor:
    """Indices of scipy.ndimage's 'reflect' extension (d c b a | a b c d | d c b a) by `radius`."""
    idx = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(idx < n, idx, 2 * n - 1 - idx)


def gaussian_blur(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """(N, H, W) filtered as `scipy.ndimage.gaussian_filter(map, sigma)` (mode 'reflect', truncate 4)."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    n, h, w = maps.shape
    out = maps[:, _reflect_index(h, radius).to(maps.device)]  # (N, H + 2r, W)
    out = F.conv1d(out.transpose(1, 2).reshape(-1, 1, h + 2 * radius), kernel.view(1, 1, -1)).view(n, w, h).transpose(1, 2)
    out = out[:, :, _reflect_index(w, radius).to(maps.device)]
    return F.conv1d(out.reshape(-1, 1, w + 2 * radius), kernel.view(1, 1, -1)).view(n, h, w)


def _minmax(maps: Tensor) -> Tensor:
    """Per map (x - min) / (max - min + float32 eps), as the official ``normalize_min_max``."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
    return (maps - lo) / (hi - lo + torch.finfo(torch.float32).eps)


def percentile_boxes(maps: Tensor, percentile: float = 95.0) -> Tensor:
    """(N, 4) tight boxes (x0, y0, x1, y1) of the pixels at or above the `percentile` of each pixel map (N, H, W)."""
    if len(maps) == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=maps.device)
    thr = torch.quantile(maps.flatten(1).float(), percentile / 100, dim=1)
    return box_of_mask(maps >= thr[:, None, None].to(maps.dtype))


def _post_process(grads: Tensor, sigma: float, normalize: bool) -> Tensor:
    """(N, C, H, W) -> (N, H, W): |.|, channel mean, blur, min-max."""
    maps = gaussian_blur(grads.abs().mean(dim=1), sigma)
    return _minmax(maps) if normalize else maps


# ----------------------------------------------------------------------------- the methods
def _smoothgrad(model: nn.Module, images: Tensor, ids: Tensor, cells: Tensor, keys: Tensor, *, samples: int = 10,
                noise: float = 0.2, grad_x_input: bool = True, seed: int = 0) -> Tensor:
    """(N, C, H, W) SmoothGrad of the distances d_ids(cells) in the model's normalised space."""
    mean, std = model_normalisation(model, images.shape[1], images)
    normalised = (images - mean) / std
    spread = normalised.flatten(1).amax(1) - normalised.flatten(1).amin(1)  # (N,)
    noises = torch.stack([torch.randn((samples, *images.shape[1:]), generator=_generator(images.device, seed, int(k)),
                                      device=images.device, dtype=images.dtype) for k in keys])
    noisy = (images[:, None] + noises * (noise * spread)[:, None, None, None, None] * std[:, None]).flatten(0, 1)
    noisy.requires_grad_(True)
    with torch.enable_grad():
        dist = model.distances(noisy)
        n = torch.arange(len(noisy), device=dist.device)
        rep = lambda t: t.to(dist.device).repeat_interleave(samples)  # noqa: E731
        target = dist[n, rep(ids), rep(cells[:, 0]), rep(cells[:, 1])]
        (grad,) = torch.autograd.grad(target.sum(), noisy)
    grad = (grad * std).view(len(images), samples, *images.shape[1:]).mean(1)  # d/d(normalised input)
    return grad * normalised if grad_x_input else grad


def _randgrads(images: Tensor, keys: Tensor, seed: int = 0) -> Tensor:
    return torch.stack([torch.rand(images.shape[1:], generator=_generator(images.device, seed, int(k)),
                                   device=images.device, dtype=images.dtype) for k in keys])


def _generator(device: torch.device, seed: int, key: int) -> torch.Generator:
    """A generator for one (image, prototype) pair: results do not depend on the batching."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + key) % 2**63)


def _pixel_maps(model: nn.Module, images: Tensor, pairs: Tensor, ids: Tensor, cells: Tensor, keys: Tensor, method: str,
                batch_size: int, blur_sigma: float | None, normalize: bool, **options: Any) -> Tensor:
    """(N, H, W) maps of the gradient methods for pairs (image index `pairs`, prototype `ids`, cell `cells`)."""
    size = images.shape[-2:]
    sigma = 5.0 * min(size) / 224 if blur_sigma is None else float(blur_sigma)
    per = int(options.get("samples", 10)) if method == "smoothgrad" else 1
    chunk = max(1, batch_size // per)
    out = []
    for start in range(0, len(pairs), chunk):
        sl = slice(start, start + chunk)
        x = images[pairs[sl]]
        if method == "smoothgrad":
            grads = _smoothgrad(model, x, ids[sl], cells[sl], keys[sl], **options)
        elif method == "prp":
            grads = prp_relevance(model, x, ids[sl], cells[sl])
        else:
            grads = _randgrads(x, keys[sl], **options)
        out.append(_post_process(grads.detach().float(), 0.0 if method == "randgrads" else sigma, normalize))
    return torch.cat(out) if out else images.new_zeros(0, *size)


def _select(model: nn.Module, batch: int, prototypes: Tensor | None, device: torch.device) -> Tensor:
    """(B, P) prototype ids from None (every active prototype), (P,) shared ids or (B, P) per image."""
    if prototypes is None:
        ids = model.prototype_active().nonzero().squeeze(1)
        return ids.to(device)[None].expand(batch, -1)
    ids = torch.as_tensor(prototypes, device=device).long()
    if ids.ndim == 1:
        ids = ids[None].expand(batch, -1)
    if ids.ndim != 2 or ids.shape[0] != batch:
        raise ValueError(f"prototypes must be (P,) or (B={batch}, P) prototype ids, got shape {tuple(ids.shape)}")
    if len(ids.flatten()) and (int(ids.min()) < 0 or int(ids.max()) >= model.num_prototypes):
        raise ValueError(f"prototype ids must be in [0, {model.num_prototypes}), got {ids.min()}..{ids.max()}")
    return ids


def _check(model: nn.Module, images: Tensor, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown localisation method {method!r}; expected one of {METHODS}")
    if not all(callable(getattr(model, n, None)) for n in ("latent", "distances", "similarity", "prototype_tensor")):
        raise TypeError(f"{type(model).__name__} is not a prototype model (models.prototype_model.PrototypeModel)")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")


def _localise(model: nn.Module, images: Tensor, ids: Tensor, method: str, cells: Tensor | None, source: bool,
              percentile: float = 95.0, batch_size: int = 64, blur_sigma: float | None = None, normalize: bool = True,
              **options: Any) -> Localisation:
    size = tuple(images.shape[-2:])
    b, k = ids.shape
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        raise ValueError(f"localisation method {method!r} takes no option(s) {sorted(unknown)}; its own are {sorted(_OPTIONS[method])}")
    if method in ("upsampling", "prp"):
        options.pop("seed", None)  # deterministic
    with _evaluating(model), torch.no_grad():
        dist = torch.cat([model.distances(part) for part in images.split(batch_size)])  # (B, P, h, w)
        h, w = dist.shape[-2:]
        picked = dist.gather(1, ids[:, :, None, None].expand(b, k, h, w))
        if cells is None:
            flat = picked.flatten(2).argmin(2)
            cells = torch.stack([flat // w, flat % w], dim=2)
        cells = torch.as_tensor(cells, device=images.device).long().view(b, k, 2)
        if method == "upsampling":
            sims = model.similarity(picked).flatten(0, 1)
            maps = upsample_maps(sims, size).view(b, k, *size)
            boxes = model.push_boxes(sims, size) if source else high_activation_boxes(sims, size, percentile)[0]
            return Localisation(maps, boxes.view(b, k, 4).to(images.device), ids, cells, method)
    pairs = torch.arange(b, device=images.device).repeat_interleave(k)
    flat_ids = ids.flatten()
    keys = pairs * model.num_prototypes + flat_ids  # one random stream per (image, prototype)
    with _evaluating(model):
        maps = _pixel_maps(model, images, pairs, flat_ids, cells.flatten(0, 1), keys, method, batch_size, blur_sigma,
                           normalize, **options)
    boxes = percentile_boxes(maps, percentile)
    return Localisation(maps.view(b, k, *size), boxes.view(b, k, 4), ids, cells, method)


def localise_prototypes(model: nn.Module, images: Tensor, prototypes: Tensor | None = None, method: str = "upsampling",
                        **options: Any) -> Localisation:
    """Pixel maps and boxes of prototypes on test images, batched on the model's device.

    Args:
        model: a prototype model (`models.prototype_model.PrototypeModel`).
        images: (B, C, H, W) in [0, 1].
        prototypes: None (every active prototype), (P,) ids shared by all images, or (B, P) per image.
        method: one of `METHODS` (see the module docstring).
        options: ``percentile`` (95, the box), ``cells`` ((B, P, 2) latent (row, col) to explain instead
            of the closest cell), ``batch_size`` (64 forward images per backward pass), ``blur_sigma``
            (None = 5 px at 224 px, scaled), ``normalize`` (min-max, True), ``seed`` (0; the noise of
            smoothgrad and randgrads, drawn per image and prototype), ``samples`` (10) and ``noise``
            (0.2) of smoothgrad, ``grad_x_input`` (True).
    """
    _check(model, images, method)
    images = images.to(model.device).float()
    ids = _select(model, len(images), prototypes, images.device)
    return _localise(model, images, ids, method, options.pop("cells", None), False, **options)


def localise_sources(model: nn.Module, images: Tensor, prototypes: Tensor | None = None, method: str = "upsampling",
                     **options: Any) -> Localisation:
    """Each prototype on its own source image, at its stored latent position (``prototype_position``).

    `images` (P, C, H, W) are the source images of `prototypes` (P,) (None = every active prototype),
    in that order (e.g. the push data at ``prototype_source_index``). Returns maps (P, 1, H, W) and boxes
    (P, 1, 4); with ``upsampling`` the boxes are the family's `push_boxes`, i.e. the stored
    ``prototype_box`` of a pushed prototype. Options as `localise_prototypes`.
    """
    _check(model, images, method)
    ids = _select(model, 1, prototypes, model.device)[0]
    if len(images) != len(ids):
        raise ValueError(f"localise_sources needs one source image per prototype: {len(ids)} prototypes, {len(images)} images")
    position = model.prototype_position.to(model.device)[ids]
    if bool((position < 0).any()):
        missing = ids[(position < 0).any(1)].tolist()
        raise ValueError(f"prototypes {missing[:20]} were never pushed: no source position is stored")
    return _localise(model, images.to(model.device).float(), ids[:, None], method, position[:, None], True, **options)


def _explain_localiser(method: str):
    def localise(model: nn.Module, images: Tensor, ids: Tensor, **options: Any) -> tuple[Tensor, Tensor]:
        loc = localise_prototypes(model, images, ids, method, **options)
        return loc.maps, loc.boxes

    return localise


for _name in METHODS[1:]:
    register_localisation(_name, _explain_localiser(_name))
