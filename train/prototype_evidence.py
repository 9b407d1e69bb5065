"""Prototype evidence on SyntheticParts: the ground truth of `explain.prototype_parts` and the
consistency and stability of Huang et al. (2023), for any prototype model trained on it.

A prototype's source is sample ``prototype_source_index`` of the push data, the train split rendered
without augmentation, so `source_samples` re-renders it from the recipe's seed with its part, body and
distractor masks. `evidence_rows` gives, per localisation method, the rows of `train.compare`'s table
(``{model, method, metric, image, value}``; ``image`` is a prototype id for per-prototype figures):

- ``class_part`` / ``other_part`` / ``body`` / ``distractors`` / ``background``: 1 where the prototype's
  source evidence lies mostly there (the means are the model's shares of prototypes); ``part_share``: the
  share of its source evidence on any part;
- ``pointing`` (per test image and top-k prototype): the map's maximum lies on a part of the test image;
  ``pointing_same_part``: on the part the prototype represents on its source;
- ``consistency`` / ``stability`` (per prototype): Huang et al.'s protocol
  (`explain.localisation_metrics`), the region centred on the maximum of the method's map (for
  "upsampling", the protocol's own bicubically upsampled similarity map).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from explain import localisation_metrics as L
from explain.prototype_localisation import localise_prototypes, localise_sources
from explain.prototype_parts import EVIDENCE_PERCENTILE, PrototypeParts, parts_summary, pointed_parts, prototype_class_sets, source_parts
from explain.prp import model_normalisation

from .apps import _SYNTHETIC_ARGS
from .synthetic import PART_NAMES, SyntheticPartsGenerator

__all__ = ["REGION_NAMES", "source_samples", "prototype_source_parts", "evidence_rows"]

REGION_NAMES = (*PART_NAMES, "body", "distractors")  # then "background": every other pixel


def _generator(recipe: dict[str, Any]) -> SyntheticPartsGenerator:
    args = {k: v for k, v in recipe.items() if k in _SYNTHETIC_ARGS and k != "test_size"}
    return SyntheticPartsGenerator(**args)


def source_samples(recipe: dict[str, Any], indices: Sequence[int]) -> dict[str, Tensor]:
    """Train-split samples `indices` of a SyntheticParts recipe: "image" (N, 3, H, W) in [0, 1], "label",
    "regions" (N, R, H, W) bool (the parts, body, distractors of `REGION_NAMES`), "part_variants" (N, S)
    and the recipe's "class_variants" (K, S)."""
    generator = _generator(recipe)
    samples = [generator.sample(int(i), "train") for i in indices]
    regions = [np.concatenate([s.part_masks, s.body_mask[None], s.distractor_mask[None]]) for s in samples]
    return {"image": torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples]),
            "label": torch.tensor([s.label for s in samples]),
            "regions": torch.from_numpy(np.stack(regions)),
            "part_variants": torch.tensor([s.recipe.variants for s in samples]),
            "class_variants": torch.from_numpy(generator.class_variants)}


def _pushed(model: nn.Module) -> Tensor:
    return (model.prototype_active().cpu() & (model.prototype_source_index.cpu() >= 0)).nonzero().squeeze(1)


def prototype_source_parts(model: nn.Module, recipe: dict[str, Any], method: str = "upsampling", *,
                           evidence: str = "top", percentile: float = EVIDENCE_PERCENTILE,
                           batch_size: int = 64) -> PrototypeParts:
    """`explain.prototype_parts.PrototypeParts` of every active pushed prototype, from `method`'s map on
    its source image."""
    ids = _pushed(model)
    if len(ids) == 0:
        raise ValueError(f"{type(model).__name__} has no pushed active prototype: no source to look at")
    src = source_samples(recipe, model.prototype_source_index.cpu()[ids].tolist())
    loc = localise_sources(model, src["image"].to(model.device), ids, method, batch_size=batch_size)
    return source_parts(model, loc, src["regions"], src["part_variants"], src["class_variants"], REGION_NAMES,
                        len(PART_NAMES), evidence=evidence, percentile=percentile)


def _own_ids(own: Tensor) -> tuple[Tensor, Tensor]:
    """(B, k) the own prototypes of each image, padded with its first one, and (B, k) which are real."""
    k = max(int(own.sum(1).max()), 1)
    order = own.float().argsort(dim=1, descending=True, stable=True)[:, :k]
    real = own.gather(1, order)
    return torch.where(real, order, order[:, :1]), real


def _protocol_parts(model: nn.Module, images: Tensor, keypoints: Tensor, own: Tensor, method: str,
                    batch_size: int) -> Tensor:
    """(B, P, S) part vectors of the own prototypes of each image, the region on `method`'s map."""
    ids, real = _own_ids(own)
    hits = torch.zeros(*own.shape, keypoints.shape[1], dtype=torch.bool)
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        if method == "upsampling":  # the protocol's bicubic upsampling, inside part_vectors
            with torch.no_grad():
                sims = model.similarity_maps(images[sl].to(model.device))
            maps = sims.gather(1, ids[sl].to(sims.device)[:, :, None, None].expand(-1, -1, *sims.shape[-2:]))
        else:
            maps = localise_prototypes(model, images[sl], ids[sl], method, batch_size=batch_size).maps
        part = L.part_vectors(maps, keypoints[sl], size=tuple(images.shape[-2:])).cpu() & real[sl, :, None]
        rows = torch.arange(len(part))[:, None].expand_as(ids[sl])
        hits[start + rows[real[sl]], ids[sl][real[sl]]] = part[real[sl]]
    return hits


def _rows(name: str, method: str, metric: str, values: Tensor, keys: Sequence[int] | None = None) -> list[dict]:
    keys = range(len(values)) if keys is None else keys
    return [{"model": name, "method": method, "metric": metric, "image": int(k), "value": float(v)}
            for k, v in zip(keys, values.flatten().tolist())]


def evidence_rows(name: str, model: nn.Module, recipe: dict[str, Any], data: dict[str, Any],
                  methods: Sequence[str], *, top_k: int = 3, evidence: str = "top", seed: int = 0,
                  batch_size: int = 32) -> list[dict]:
    """The rows of the module docstring for one prototype model, per localisation method in `methods`,
    on the test data `data` ("image", "label", "part_masks", "keypoints" of `train.apps.load_synthetic`)."""
    images = data["image"].to(model.device)
    labels, keypoints = data["label"].cpu(), data["keypoints"].cpu()
    with torch.no_grad():
        top = model.top_prototypes(model.similarity_maps(images), top_k).cpu()
    sets = prototype_class_sets(model)
    active = model.prototype_active().cpu()
    own = sets[:, labels].T & active[None]  # (B, P)
    _, std = model_normalisation(model, images.shape[1], images)
    noisy = L.stability_noise(images, std.flatten(), seed=seed)
    rows: list[dict] = []
    for method in methods:
        label = f"prototypes/{method}"
        parts = prototype_source_parts(model, recipe, method, evidence=evidence, batch_size=batch_size)
        ids = parts.prototypes.tolist()
        rows += _rows(name, label, "class_part", parts.class_part.float(), ids)
        rows += _rows(name, label, "other_part", (parts.on_part & ~parts.class_part).float(), ids)
        for r in range(parts.num_parts, len(parts.names)):
            rows += _rows(name, label, parts.names[r], (parts.region == r).float(), ids)
        rows += _rows(name, label, "part_share", parts.shares[:, :parts.num_parts].sum(1), ids)
        loc = localise_prototypes(model, images, top.to(model.device), method, batch_size=batch_size)
        pointed = pointed_parts(loc.maps, data["part_masks"]).cpu()  # (B, k)
        represented = dict(zip(ids, parts.region.tolist()))
        same = torch.tensor([[represented.get(int(j), -2) for j in row] for row in top.tolist()])
        rows += _rows(name, label, "pointing", (pointed >= 0).float())
        rows += _rows(name, label, "pointing_same_part", (pointed == same).float())
        clean = _protocol_parts(model, images, keypoints, own, method, batch_size)
        perturbed = _protocol_parts(model, noisy, keypoints, own, method, batch_size)
        kept = active.nonzero().squeeze(1)
        rows += _rows(name, label, "consistency", L.consistency_from_parts(clean, own, keypoints)[kept], kept.tolist())
        rows += _rows(name, label, "stability", L.stability_from_parts(clean, perturbed, own)[kept], kept.tolist())
        print(f"[evidence] {name} / {method}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts_summary(parts).items()),
              flush=True)
    return rows
