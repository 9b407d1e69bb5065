"""Concept datasets for Network Dissection: SyntheticParts' part masks and Broden-layout folders.

Dissection reads concepts from dict batches in one of two forms:

- ``"part_masks"`` bool (B, S, H, W), as SyntheticParts yields them: concept k is part k, and every
  image is annotated for every part (an absent part is an empty mask, which counts in the union).
- ``"concept_maps"`` int64 (B, L, H, W): L label layers, value k + 1 where concept k is present and 0
  where a layer has nothing (so a pixel can carry several concepts, one per layer, e.g. an object and
  its part); optionally ``"annotated"`` bool (B, K): the image is annotated for concept k's category.
  NetDissect counts a unit's activation in the union of concept k only on images annotated for k's
  category; without ``"annotated"`` every image counts for every concept.

Broden layout (the folder format of Bau et al.'s Broden dataset, read by `BrodenConcepts`)::

    root/
      index.csv    header: image,split,ih,iw,sh,sw,<category>,<category>,...  (split/ih/iw/sh/sw optional)
      label.csv    header: number,name,category[,...]
      images/      the images and segmentation PNGs; paths in index.csv are relative to images/

- index.csv, one row per image: ``image`` the image path; ``split`` (e.g. train / val) to filter on;
  ``ih, iw`` the image size and ``sh, sw`` the segmentation size. Every other column is a concept
  category (Broden: color, object, part, material, scene, texture). A category cell is empty or a
  ``;``-separated list of items, each either a PNG path, a segmentation whose pixel value
  R + 256 * G is the concept number there (0 = unlabelled), or an integer, an image-level concept that
  covers the whole image (Broden's scene and texture labels).
- label.csv, one row per concept: ``number`` (>= 1, as used in the PNGs and cells), ``name``, and
  ``category``: a category name, or Broden's ``object(120);part(3)`` form (the category with the
  largest count is taken). Without a category column every concept is in category ``"concept"`` and
  an image with any annotation is annotated for all of them.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ConceptSet", "BrodenConcepts", "concept_batch", "concept_maps_from_masks"]

_META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")


@dataclass(frozen=True)
class ConceptSet:
    """Names of the K concepts and the category of each (concept k is value k + 1 in concept maps)."""

    names: tuple[str, ...]
    categories: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.categories):
            raise ValueError(f"ConceptSet has {len(self.names)} names but {len(self.categories)} categories")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_parts(cls, part_names: Sequence[str], category: str = "part") -> "ConceptSet":
        """The parts of SyntheticParts (``datamodule.part_names``), all in one category."""
        return cls(tuple(part_names), (category,) * len(part_names))


def concept_maps_from_masks(masks: Tensor) -> Tensor:
    """(B, K, H, W) bool masks -> (B, L, H, W) int64 concept maps: one layer when no two masks overlap
    (SyntheticParts' parts never do), else one layer per concept."""
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, K, H, W), got shape {tuple(masks.shape)}")
    masks = masks.bool()
    values = torch.arange(1, masks.shape[1] + 1, device=masks.device)[None, :, None, None]
    layered = masks.long() * values
    if masks.sum(dim=1).max() <= 1:
        return layered.sum(dim=1, keepdim=True)
    return layered


def concept_batch(batch: Any, num_concepts: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """(images, concept maps (B, L, H, W) int64, annotated (B, K) bool or None) of a dict batch."""
    if not isinstance(batch, dict) or "image" not in batch:
        raise KeyError(f"dissection needs dict batches with 'image'; got {type(batch).__name__}")
    if "concept_maps" in batch:
        maps, annotated = batch["concept_maps"].long(), batch.get("annotated")
    elif "part_masks" in batch:
        maps, annotated = concept_maps_from_masks(batch["part_masks"]), None
    else:
        raise KeyError(f"dissection needs 'concept_maps' or 'part_masks' in each batch; got keys {sorted(batch)}")
    if maps.dim() != 4:
        raise ValueError(f"concept_maps must be (B, L, H, W), got shape {tuple(maps.shape)}")
    if maps.numel() and (maps.min() < 0 or maps.max() > num_concepts):
        raise ValueError(f"concept map values must be in 0..{num_concepts} (0 = none), got {int(maps.min())}..{int(maps.max())}")
    if annotated is not None and annotated.shape != (maps.shape[0], num_concepts):
        raise ValueError(f"annotated must be (B, K) = ({maps.shape[0]}, {num_concepts}), got {tuple(annotated.shape)}")
    return batch["image"], maps, None if annotated is None else annotated.bool()


# ------------------------------------------------------------------------------------ Broden layout
def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"Broden layout: {path} not found")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _main_category(field: str) -> str:
    """'object(120);part(3)' -> 'object' (largest count); a plain name is returned as it is."""
    counted = re.findall(r"([^;()\s]+)\((\d+)\)", field)
    if counted:
        return max(counted, key=lambda nc: int(nc[1]))[0]
    return field.strip() or "concept"


def _items(cell: str | None) -> list[str]:
    return [item.strip() for item in (cell or "").split(";") if item.strip()]


class BrodenConcepts(Dataset):
    """A Broden-layout folder (see the module docstring) as dict items for `explain.dissect`.

    Items: ``"image"`` float (3, H, W) in [0, 1], ``"concept_maps"`` int64 (L, h, w) at mask resolution,
    ``"annotated"`` bool (K,), ``"index"`` int64.

    Args:
        root: the folder holding index.csv, label.csv and images/.
        split: keep only rows whose ``split`` column equals this (None = all rows).
        categories: category columns to read (None = every category column).
        image_size: side to resize images to (None = each image's own size; then all must agree).
        mask_size: side of the concept maps (None = ``sh, sw`` of the first row, else the image size).
        max_images: keep the first this many rows (quick runs).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        categories: Sequence[str] | None = None,
        image_size: int | None = None,
        mask_size: int | None = None,
        max_images: int | None = None,
    ) -> None:
        self.root = Path(root)
        rows = _read_csv(self.root / "index.csv")
        if not rows or "image" not in rows[0]:
            raise ValueError(f"Broden layout: {self.root / 'index.csv'} needs a header with an 'image' column and rows")
        columns = [c for c in rows[0] if c not in _META_COLUMNS]
        if categories is not None:
            unknown = sorted(set(categories) - set(columns))
            if unknown:
                raise ValueError(f"Broden layout: categories {unknown} are not columns of index.csv ({columns})")
            columns = list(categories)
        if split is not None:
            if "split" not in rows[0]:
                raise ValueError(f"Broden layout: split={split!r} given but index.csv has no 'split' column")
            rows = [r for r in rows if r["split"] == split]
        self.rows = rows[:max_images] if max_images is not None else rows
        if not self.rows:
            raise ValueError(f"Broden layout: no rows in {self.root / 'index.csv'} (split={split!r})")
        self.columns = columns

        labels = _read_csv(self.root / "label.csv")
        if not labels or "number" not in labels[0] or "name" not in labels[0]:
            raise ValueError(f"Broden layout: {self.root / 'label.csv'} needs 'number' and 'name' columns")
        numbers = [int(r["number"]) for r in labels]
        if min(numbers) < 1 or len(set(numbers)) != len(numbers):
            raise ValueError("Broden layout: label.csv numbers must be unique and >= 1 (0 means unlabelled)")
        cats = [_main_category(r.get("category") or "") for r in labels]
        self.concepts = ConceptSet(tuple(r["name"] for r in labels), tuple(cats))
        # Broden number -> concept value k + 1 (0 for numbers label.csv does not list).
        self._lookup = np.zeros(max(numbers) + 1, dtype=np.int64)
        self._lookup[numbers] = np.arange(1, len(numbers) + 1)
        self._concept_column = np.array([columns.index(c) if c in columns else -1 for c in cats])
        self.num_layers = max(1, max(sum(len(_items(r.get(c))) for c in columns) for r in self.rows))
        self.image_size = image_size
        if image_size is None and self.rows[0].get("ih"):
            sizes = {(r["ih"], r["iw"]) for r in self.rows}
            if len(sizes) > 1:
                raise ValueError(f"Broden layout: images have {len(sizes)} different sizes; pass image_size to resize them")
        first = self.rows[0]
        if mask_size is not None:
            self.mask_hw: tuple[int, int] | None = (mask_size, mask_size)
        elif first.get("sh"):
            self.mask_hw = (int(first["sh"]), int(first.get("sw") or first["sh"]))
        else:
            self.mask_hw = None  # the image's size

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, rel: str) -> Tensor:
        path = self.root / "images" / rel
        if not path.is_file():
            raise FileNotFoundError(f"Broden layout: image {path} not found")
        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.image_size is not None:
                im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
            return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0

    def _segmentation(self, rel: str, size: tuple[int, int]) -> Tensor:
        path = self.root / "images" / rel
        if not path.is_file():
            raise FileNotFoundError(f"Broden layout: segmentation {path} not found")
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"), dtype=np.int64)
        number = rgb[..., 0] + 256 * rgb[..., 1]
        values = self._lookup[np.minimum(number, len(self._lookup) - 1)] * (number < len(self._lookup))
        seg = torch.from_numpy(values)
        if tuple(seg.shape) != size:
            seg = F.interpolate(seg[None, None].float(), size=size, mode="nearest")[0, 0].long()
        return seg

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = self.rows[index]
        image = self._image(row["image"])
        size = self.mask_hw or tuple(image.shape[-2:])
        layers, present = [], np.zeros(len(self.columns), dtype=bool)
        for ci, column in enumerate(self.columns):
            for item in _items(row.get(column)):
                present[ci] = True
                if item.isdigit():  # image-level concept: the whole image
                    number = int(item)
                    value = int(self._lookup[number]) if number < len(self._lookup) else 0
                    layers.append(torch.full(size, value, dtype=torch.long))
                else:
                    layers.append(self._segmentation(item, size))
        layers += [torch.zeros(size, dtype=torch.long)] * (self.num_layers - len(layers))
        column = self._concept_column
        annotated = np.where(column >= 0, present[np.maximum(column, 0)], present.any())
        return {
            "image": image,
            "concept_maps": torch.stack(layers),
            "annotated": torch.from_numpy(annotated),
            "index": torch.tensor(index, dtype=torch.long),
        }
