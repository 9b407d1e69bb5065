"""Ground truth for prototypes: which part of its source image a prototype's evidence lies on.

A prototype is a latent patch of a source image (the push records ``prototype_source_index`` and
``prototype_position``). On data with part masks (SyntheticParts), its localisation map on that image
(any method of `explain.prototype_localisation`) tells which part it shows:

- `region_shares`: the share of a map's evidence on each region (the parts, then e.g. the body and the
  distractors; the last column is the background, every pixel in no region). The evidence is one of
  ``"top"`` (the pixels at or above the map's `percentile`, by default its top 1%, `EVIDENCE_PERCENTILE`),
  ``"box"`` (the pixels of a given box, e.g. the localisation's 95th-percentile box) or ``"energy"``
  (the map's values, clipped at 0).
- `source_parts`: per prototype, those shares on its source image, the region it represents (the largest
  share) and whether that region is a part whose variant belongs to one of the prototype's classes
  (`prototype_class_sets`); `parts_summary` turns them into the model's shares of prototypes on class
  parts, on other parts and on each non-part region.
- `pointed_parts`: per test image and prototype, the part under the map's maximum (-1: none), the
  pointing game of one prototype.

Only the prototype interface (`models.prototype_model`) is used, so every family gets these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .prototype_localisation import Localisation

__all__ = ["EVIDENCE_PERCENTILE", "PrototypeParts", "prototype_class_sets", "top_pixels", "box_pixels", "region_shares", "source_parts",
           "parts_summary", "part_labels", "pointed_parts"]

EVIDENCE = ("top", "box", "energy")
# The top 1% of a map's pixels: less than one part (a SyntheticParts part covers 0.9-1.8% of the image, the
# background about 89%), so a map that sits on a part can put all its evidence there, and within the
# areas 0.1-2% of Xu-Darme et al.'s relevance. The 95th percentile of the box rule (5% of the image, four
# parts' worth) would give the background the largest share of even a well-placed map.
EVIDENCE_PERCENTILE = 99.0


def prototype_class_sets(model: nn.Module) -> Tensor:
    """(P, K) bool: the classes each prototype stands for: its `prototype_classes` entry where it has one,
    else every class it votes for with a positive connection (a ProtoTree node: the classes of its leaves)."""
    connection = model.prototype_class_connection().detach()
    classes = model.prototype_classes.to(connection.device)
    own = torch.nn.functional.one_hot(classes.clamp(min=0), connection.shape[1]).bool()
    return torch.where((classes >= 0)[:, None], own, connection > 0).cpu()


def top_pixels(maps: Tensor, percentile: float = 95.0) -> Tensor:
    """(..., H, W) bool: the pixels at or above the `percentile` of each map (those `percentile_boxes` boxes)."""
    flat = maps.flatten(-2).float()
    threshold = torch.quantile(flat, percentile / 100, dim=-1)
    return maps >= threshold[..., None, None].to(maps.dtype)


def box_pixels(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., 4) boxes (x0, y0, x1, y1), x1/y1 exclusive -> (..., H, W) bool masks."""
    ys = torch.arange(size[0], device=boxes.device)
    xs = torch.arange(size[1], device=boxes.device)
    b = boxes[..., None, None]
    inside_y = (ys[:, None] >= b[..., 1, :, :]) & (ys[:, None] < b[..., 3, :, :])
    inside_x = (xs[None, :] >= b[..., 0, :, :]) & (xs[None, :] < b[..., 2, :, :])
    return inside_y & inside_x


def region_shares(maps: Tensor, regions: Tensor, *, evidence: str = "top", boxes: Tensor | None = None,
                  percentile: float = EVIDENCE_PERCENTILE) -> Tensor:
    """(N, R + 1) share of each map's evidence on each region, the last column on the background.

    Args:
        maps: (N, H, W) localisation maps.
        regions: (N, R, H, W) bool, disjoint regions of each map's image (the background is the rest).
        evidence: "top" (pixels at or above `percentile`), "box" (the pixels of `boxes` (N, 4)) or
            "energy" (the map clipped at 0; a map without positive value shares nothing: NaN).
    """
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence must be one of {EVIDENCE}, got {evidence!r}")
    if maps.ndim != 3 or regions.ndim != 4 or regions.shape[0] != maps.shape[0] or regions.shape[2:] != maps.shape[1:]:
        raise ValueError(f"need maps (N, H, W) and regions (N, R, H, W) of the same N, H, W; got {tuple(maps.shape)} "
                         f"and {tuple(regions.shape)}")
    regions = regions.bool().to(maps.device)
    if bool((regions.sum(1) > 1).any()):
        raise ValueError("regions overlap: every pixel may belong to one region at most")
    if evidence == "energy":
        weight = maps.float().clamp_min(0)
    elif evidence == "box":
        if boxes is None:
            raise ValueError("evidence='box' needs the boxes (N, 4)")
        weight = box_pixels(boxes.to(maps.device), tuple(maps.shape[-2:])).float()
    else:
        weight = top_pixels(maps, percentile).float()
    with_background = torch.cat([regions, ~regions.any(1, keepdim=True)], dim=1).float()
    inside = (with_background * weight[:, None]).flatten(2).sum(2)
    total = weight.flatten(1).sum(1, keepdim=True)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), float("nan"))


@dataclass
class PrototypeParts:
    """What each prototype shows on its source image.

    Attributes:
        prototypes: (P,) prototype ids.
        shares: (P, R + 1) `region_shares` on the source image (columns: `names`).
        region: (P,) index of the largest share (R = background).
        on_part: (P,) bool, the region is one of the first `num_parts` (a part).
        class_part: (P,) bool, on a part whose variant belongs to one of the prototype's classes.
        names: the R + 1 region names, the parts first and "background" last.
        num_parts: how many regions are parts.
        method: the localisation method of the maps.
    """

    prototypes: Tensor
    shares: Tensor
    region: Tensor
    on_part: Tensor
    class_part: Tensor
    names: list[str]
    num_parts: int
    method: str

    def label(self, i: int) -> str:
        """The region prototype number `i` (of `prototypes`) represents, e.g. "wing" or "background"."""
        return self.names[int(self.region[i])]


def source_parts(model: nn.Module, localisation: Localisation, regions: Tensor, part_variants: Tensor,
                 class_variants: Tensor, region_names: Sequence[str], num_parts: int, *, evidence: str = "top",
                 percentile: float = EVIDENCE_PERCENTILE) -> PrototypeParts:
    """`PrototypeParts` of prototypes from their maps on their source images.

    Args:
        model: the prototype model (its `prototype_class_sets`).
        localisation: from `localise_sources` (maps (P, 1, H, W) on the source images).
        regions: (P, R, H, W) bool regions of each source image, the `num_parts` parts first.
        part_variants: (P, num_parts) the variant of each part on each source image.
        class_variants: (K, num_parts) the variant of each part in each class.
        region_names: the R names of `regions` ("background" is appended).
    """
    if len(region_names) != regions.shape[1]:
        raise ValueError(f"{regions.shape[1]} regions but {len(region_names)} names")
    ids = localisation.prototypes[:, 0].cpu()
    maps = localisation.maps[:, 0]
    shares = region_shares(maps, regions, evidence=evidence, boxes=localisation.boxes[:, 0], percentile=percentile).cpu()
    region = torch.nan_to_num(shares, nan=-1.0).argmax(1)
    region = torch.where(torch.isnan(shares).all(1), regions.shape[1], region)  # nothing to share: background
    on_part = region < num_parts
    slot = region.clamp(max=num_parts - 1)
    variant = part_variants.cpu().long().gather(1, slot[:, None])[:, 0]  # (P,) the variant shown
    classes = prototype_class_sets(model)[ids]  # (P, K)
    class_has = class_variants.cpu().long()[:, slot].T == variant[:, None]  # (P, K): class k has that variant
    class_part = on_part & (classes & class_has).any(1)
    return PrototypeParts(ids, shares, region, on_part, class_part, [*region_names, "background"], num_parts,
                          localisation.method)


def parts_summary(parts: PrototypeParts) -> dict[str, float]:
    """The model's shares of prototypes: on a part of their class ("class parts"), on another part
    ("other parts"), and on each non-part region (e.g. "body", "distractors", "background")."""
    n = max(len(parts.prototypes), 1)
    out = {"class parts": float(parts.class_part.sum()) / n,
           "other parts": float((parts.on_part & ~parts.class_part).sum()) / n}
    for r in range(parts.num_parts, len(parts.names)):
        out[parts.names[r]] = float((parts.region == r).sum()) / n
    return out


def part_labels(parts: PrototypeParts) -> dict[int, str]:
    """Prototype id -> the region it represents ("wing", "background", ...), for views."""
    return {int(j): parts.label(i) for i, j in enumerate(parts.prototypes.tolist())}


def pointed_parts(maps: Tensor, part_masks: Tensor) -> Tensor:
    """(B, P) the part under each map's first maximum (-1 where no part is there).

    `maps` (B, P, H, W) are prototypes' maps on test images, `part_masks` (B, S, H, W) the disjoint part
    masks of the images: the pointing game of each prototype (hit = the result is >= 0).
    """
    if maps.ndim != 4 or part_masks.ndim != 4 or maps.shape[0] != part_masks.shape[0] or maps.shape[2:] != part_masks.shape[2:]:
        raise ValueError(f"need maps (B, P, H, W) and part_masks (B, S, H, W) of the same B, H, W; got "
                         f"{tuple(maps.shape)} and {tuple(part_masks.shape)}")
    b, p, _, w = maps.shape
    peak = maps.flatten(2).argmax(2)  # (B, P), first maximum in row-major order
    masks = part_masks.bool().to(maps.device).flatten(2)  # (B, S, H W)
    at_peak = masks.gather(2, peak[:, None, :].expand(-1, masks.shape[1], -1))  # (B, S, P)
    hit = at_peak.any(1)
    return torch.where(hit, at_peak.int().argmax(1), -1)
