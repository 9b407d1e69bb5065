"""Explanation metrics, batched on the model's device: ``metric(model, images, heatmaps, target, **kw) -> (B,)``.

`images` are what the model takes (zoo models: [0, 1]), `heatmaps` (B, H, W) at input resolution,
`target` the explained class per image (None = the model's prediction on the clean images). "Removed"
pixels become the zero of the model's normalised space, i.e. the dataset mean colour for zoo models
(`explain.posthoc.baseline_colour`), as the reference code zeroes the normalised tensor.

Faithfulness: `deletion`, `insertion` (Petsiuk et al. 2018), `road` (Rong et al. 2022), `average_drop`,
`increase_in_confidence` (Chattopadhyay et al. 2018). Localisation: `pointing_game` (Zhang et al. 2016),
`energy_pointing_game` (Wang et al. 2020), `relevance_mass`. Sanity: `model_randomisation` (Adebayo et
al. 2018); of prototype maps, `prototype_randomisation`, `prototype_fidelity`, `mask_relevance` and
`energy_relevance` (Xu-Darme et al. 2023, `explain.sanity_checks`). Two groups do not fit the per-image signature: `prototype_consistency` / `prototype_stability`
(Huang et al. 2023) score each prototype (P,), and `funnybirds` (Hesse et al. 2023) returns several
checks at once, some per threshold.

Perturbation metrics live in `explain.perturbation_metrics`, localisation metrics in
`explain.localisation_metrics`; this module holds the sanity check and the FunnyBirds checks and
re-exports everything, so ``from explain import metrics as M; M.deletion(...)`` reaches all of them.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain import localisation_metrics, perturbation_metrics, sanity_checks
from explain.localisation_metrics import *  # noqa: F403 - re-exported
from explain.perturbation_metrics import *  # noqa: F403 - re-exported
from explain.sanity_checks import *  # noqa: F403 - re-exported
from explain.sanity_checks import reinitialise
from explain.perturbation_metrics import _batched, _check, target_probabilities

__all__ = [
    *perturbation_metrics.__all__,
    *localisation_metrics.__all__,
    *sanity_checks.__all__,
    "randomisation_curve",
    "model_randomisation",
    "FUNNYBIRDS_THRESHOLDS",
    "part_importance",
    "funnybirds",
    "funnybirds_at_best_threshold",
]


# ----------------------------------------------------------------------------- sanity check
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
        reinitialise(layer, generator)
        new = explain_fn(randomised, images, target).detach()
        curve.append(spearman(reference, new.abs() if absolute else new))
        names.append(name or type(layer).__name__)
    return torch.stack(curve, dim=1), names


def model_randomisation(
    model: nn.Module, images: Tensor, heatmaps: Tensor, target: Tensor | None = None, *,
    explain_fn: Callable[[nn.Module, Tensor, Tensor], Tensor], seed: int = 0, absolute: bool = True,
) -> Tensor:
    """Model randomisation (Adebayo et al. 2018): mean Spearman correlation over the cascade of `randomisation_curve` (lower = the explanation
    depends on the weights, i.e. passes the sanity check); an undefined correlation (constant map)
    counts as 0."""
    curve, _ = randomisation_curve(model, images, heatmaps, target, explain_fn=explain_fn, seed=seed, absolute=absolute)
    # A map that turns constant (Grad-CAM of a randomised net is often all zero) keeps no ranking.
    return torch.nan_to_num(curve, nan=0.0).mean(1)


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
