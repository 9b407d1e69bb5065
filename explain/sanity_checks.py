"""Sanity checks and fidelity of prototype localisations (Xu-Darme et al., CVPRW 2023), batched.

- `prototype_randomisation`: the cascading weight randomisation of Adebayo et al. (2018) applied to a
  prototype's map: the prototypes (their vectors; for a model whose prototypes are channels, such as
  PIP-Net, the layer that makes them, its ``prototype_layers()``), then every parametrised layer of the latent function from the top
  down, are re-initialised one step after the other, and after each step the maps of the
  randomised copy are compared with the original ones (Spearman rank correlation and SSIM). A map
  that stays similar does not show what the weights compute.
- `prototype_fidelity`: the deletion test of the spec (A.2, mask mode): the pixels of the top `area`
  of the map are set to the model's mean colour, and the similarity at the original closest cell is
  divided by its value before (lower = the map found what the similarity uses).
- `mask_relevance` / `energy_relevance`: the share of the top-`area` pixels (of the map's energy)
  inside an object or part mask (the spec's relevance; CaBRNet's energy relevance).

`spearman` (rank correlation of flattened maps) and `ssim` (Wang et al. 2004) compare maps.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .prototype_localisation import Localisation, localise_prototypes
from .prp import model_normalisation

__all__ = ["spearman", "ssim", "reinitialise", "randomisation_steps", "prototype_randomisation", "deletion_masks",
           "prototype_fidelity", "mask_relevance", "energy_relevance"]

FIDELITY_AREAS = (0.005, 0.01, 0.02, 0.05)


# ----------------------------------------------------------------------------- comparing maps
def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..N along dim 1 with ties given their average rank (scipy's rankdata 'average')."""
    ordered = x.sort(dim=1).values
    below = torch.searchsorted(ordered, x.contiguous(), right=False)
    upto = torch.searchsorted(ordered, x.contiguous(), right=True)
    return (below + upto + 1).to(torch.float64) / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row of a and b (flattened after dim 0); NaN if one is constant.

    Examples:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 30.0], [3.0, 2.0, 1.0]])).tolist()
        [1.0, -1.0]
    """
    ra = _average_ranks(a.flatten(1).double())
    rb = _average_ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).float()


def ssim(a: Tensor, b: Tensor, sigma: float = 1.5, window: int = 11) -> Tensor:
    """(N,) mean structural similarity (Wang et al. 2004: Gaussian window 11 / sigma 1.5, K1 = 0.01,
    K2 = 0.03, valid region) of maps (N, H, W), each min-max normalised to [0, 1] first (data range 1)."""
    def norm(x: Tensor) -> Tensor:
        flat = x.flatten(1).double()
        lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
        return ((x.double() - lo) / (hi - lo).clamp_min(1e-12))[:, None]

    a, b = norm(a), norm(b)
    window = min(window, a.shape[-1], a.shape[-2])
    x = torch.arange(window, dtype=torch.float64, device=a.device) - (window - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (g[:, None] * g[None]) / g.sum() ** 2
    blur = lambda t: F.conv2d(t, kernel[None, None])  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1).float()


# ----------------------------------------------------------------------------- randomisation
def reinitialise(layer: nn.Module, generator: torch.Generator) -> None:
    """Re-draw a layer's own parameters: its ``reset_parameters`` under a seed from `generator`, else a
    normal draw with the weights' std."""
    with torch.no_grad():
        if hasattr(layer, "reset_parameters"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                layer.reset_parameters()
        else:
            for p in layer.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=generator).to(p) * p.std().clamp_min(1e-3))


def randomisation_steps(model: nn.Module, images: Tensor, groups: int | None = None) -> list[tuple[str, list[nn.Module]]]:
    """The cascade of `prototype_randomisation`: ("prototypes", []) first, then the parametrised modules that
    ``model.latent`` calls, from the last called to the first, in `groups` consecutive groups (None = one
    module a step). A group is named after its first and last module."""
    called: list[nn.Module] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, *_: called.append(mod) if mod not in called else None)
             for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    try:
        with torch.no_grad():
            model.latent(images[:1].to(model.device))
    finally:
        for h in hooks:
            h.remove()
    layers = called[::-1]
    if groups is not None and 0 < groups < len(layers):
        bounds = [round(i * len(layers) / groups) for i in range(groups + 1)]
        chunks = [layers[bounds[i]:bounds[i + 1]] for i in range(groups)]
    else:
        chunks = [[m] for m in layers]
    named = [(names[c[0]] if len(c) == 1 else f"{names[c[0]]} .. {names[c[-1]]}", c) for c in chunks]
    return [("prototypes", []), *named]


@torch.no_grad()
def _randomise_prototypes(model: nn.Module, generator: torch.Generator) -> None:
    layers = getattr(model, "prototype_layers", None)
    if callable(layers):  # prototypes that are channels of a layer (PIP-Net): re-draw that layer
        for layer in layers():
            reinitialise(layer, generator)
        return
    protos = model.prototype_tensor().detach()
    ids = torch.arange(len(protos), device=protos.device)
    noise = torch.randn(protos.shape, generator=generator).to(protos)
    model.assign_prototypes(ids, noise * protos.std().clamp_min(1e-3) + protos.mean())


def prototype_randomisation(
    model: nn.Module, images: Tensor, prototypes: Tensor | None = None, method: str = "upsampling", *,
    groups: int | None = None, seed: int = 0, randomise_prototypes: bool = True, reference: Localisation | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Cascading randomisation of a prototype model (Xu-Darme et al. 2023), compared map by map with the original.

    The prototypes of every image (`prototypes`, as `localise_prototypes`) and the method's options
    stay fixed; the cells are each model's own closest cells. Without `randomise_prototypes` the cascade
    starts at the top layer. `reference` (the original model's localisation) saves its computation. Returns ``spearman`` and ``ssim``
    (B, P, L) after each of the L steps of `randomisation_steps` (cumulative), and ``steps`` (names).
    A constant map gives a NaN Spearman correlation.
    """
    reference = reference or localise_prototypes(model, images, prototypes, method, **options)
    randomised = copy.deepcopy(model)
    steps = randomisation_steps(randomised, images, groups)[0 if randomise_prototypes else 1:]
    generator = torch.Generator().manual_seed(seed)
    b, p = reference.prototypes.shape
    size = reference.maps.shape[-2:]
    rho, sim = [], []
    for name, modules in steps:
        if name == "prototypes":
            _randomise_prototypes(randomised, generator)
        for module in modules:
            reinitialise(module, generator)
        new = localise_prototypes(randomised, images, reference.prototypes, method, **options)
        a, c = reference.maps.reshape(-1, *size), new.maps.reshape(-1, *size)
        rho.append(spearman(a, c).view(b, p))
        sim.append(ssim(a, c).view(b, p))
    return {"spearman": torch.stack(rho, dim=2), "ssim": torch.stack(sim, dim=2), "steps": [n for n, _ in steps]}


# ----------------------------------------------------------------------------- fidelity, relevance
def deletion_masks(maps: Tensor, area: float) -> Tensor:
    """(..., H, W) bool: the pixels above the value at sorted index int(N (1 - area)) of each map (the
    official mask mode)."""
    if not 0 < area < 1:
        raise ValueError(f"area must be in (0, 1), got {area}")
    flat = maps.flatten(-2)
    n = flat.shape[-1]
    threshold = flat.sort(dim=-1).values[..., min(int(n * (1 - area)), n - 1)]
    return maps > threshold[..., None, None]


@torch.no_grad()
def prototype_fidelity(model: nn.Module, images: Tensor, localisation: Localisation, *,
                       areas: Sequence[float] = FIDELITY_AREAS, batch_size: int = 64) -> Tensor:
    """Prototype fidelity (Xu-Darme et al. 2023): (B, P, A) similarity at the closest cell after deleting the top-`area` pixels of each map, over the
    similarity before (lower = more faithful; NaN where the similarity before is not positive).

    Deleted pixels take the model's mean colour (``model.normalize.mean``: 0 in normalised space).
    """
    images = images.to(model.device).float()
    b, p = localisation.prototypes.shape
    mean, _ = model_normalisation(model, images.shape[1], images)
    ids = localisation.prototypes.to(images.device)
    cells = localisation.cells.to(images.device)

    def similarity_at(x: Tensor, pair_ids: Tensor, pair_cells: Tensor) -> Tensor:
        out = []
        for start in range(0, len(x), batch_size):
            sl = slice(start, start + batch_size)
            d = model.distances(x[sl])
            n = torch.arange(len(d), device=d.device)
            out.append(model.similarity(d[n, pair_ids[sl], pair_cells[sl, 0], pair_cells[sl, 1]]))
        return torch.cat(out)

    was = model.training
    model.eval()
    try:
        before = similarity_at(images.repeat_interleave(p, 0), ids.flatten(), cells.flatten(0, 1)).view(b, p)
        ratios = []
        for area in areas:
            masks = deletion_masks(localisation.maps.to(images.device), area)  # (B, P, H, W)
            ratio = []
            for start in range(0, b * p, batch_size):
                pairs = torch.arange(start, min(start + batch_size, b * p), device=images.device)
                m = masks.flatten(0, 1)[pairs][:, None].to(images.dtype)
                x = images[pairs // p] * (1 - m) + mean * m
                ratio.append(similarity_at(x, ids.flatten()[pairs], cells.flatten(0, 1)[pairs]))
            after = torch.cat(ratio).view(b, p)
            ratios.append(torch.where(before > 0, after / before.clamp_min(1e-30), float("nan")))
    finally:
        model.train(was)
    return torch.stack(ratios, dim=2)


def mask_relevance(maps: Tensor, masks: Tensor, areas: Sequence[float] = (0.05,)) -> Tensor:
    """Mask relevance (Xu-Darme et al. 2023): (B, P, A) share of the top-`area` pixels of each map
    (B, P, H, W) inside the mask (B, H, W) of its image."""
    inside = masks.bool()[:, None].to(maps.device)
    out = []
    for area in areas:
        sel = deletion_masks(maps, area)
        out.append((sel & inside).flatten(2).sum(2) / sel.flatten(2).sum(2).clamp_min(1))
    return torch.stack(out, dim=2).float()


def energy_relevance(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy relevance (Xu-Darme et al. 2023): (B, P) sum of the map inside the mask of its image over
    the map's total (maps are non-negative)."""
    maps = maps.clamp_min(0)
    inside = (maps * masks[:, None].to(maps)).flatten(2).sum(2)
    total = maps.flatten(2).sum(2)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), float("nan"))
