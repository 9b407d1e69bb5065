"""CUB-200-2011's 312 binary attribute annotations as the concepts of Koh et al. (ICML 2020).

Read from ``attributes/image_attribute_labels.txt`` (``<image id> <attribute id> <is_present>
<certainty id> <time>``; certainty 1 = not visible ... 4 = definitely) and the names file
``attributes.txt`` (``<attribute id> <name>``, found in ``attributes/``, the CUB folder or its parent,
where the official archive puts it). Following the official ``get_class_attributes_data``:

1. per (class, attribute), count the 0 and 1 labels over the training images, skipping 0-labels of
   certainty 1 ("not visible");
2. the class's label is the majority, ties (including no votes) -> 1;
3. keep the attributes that are 1 for at least `min_class_count` (10) classes;
4. every image (train, val, test) takes its class's vector.

Recomputed on another split, step 3 keeps a slightly different set (109 attributes in the official
repository's issues #18 and #29), so ``"published"`` uses the paper's fixed list of 112 (0-based
indices into the 312). Concept groups are runs of consecutive attributes whose names share their first
10 characters (official ``tti.py``; 28 groups over the 112).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import DataFormatError, _parse, _read_rows

__all__ = ["NUM_ATTRIBUTES", "PUBLISHED_ATTRIBUTES", "ConceptItems", "attribute_groups", "class_attribute_labels", "concept_table",
           "read_attribute_names", "read_image_attributes", "select_attributes"]

NUM_ATTRIBUTES = 312
PUBLISHED_ATTRIBUTES = (
    1, 4, 6, 7, 10, 14, 15, 20, 21, 23, 25, 29, 30, 35, 36, 38, 40, 44, 45, 50, 51, 53, 54, 56, 57, 59, 63, 64, 69,
    70, 72, 75, 80, 84, 90, 91, 93, 99, 101, 106, 110, 111, 116, 117, 119, 125, 126, 131, 132, 134, 145, 149, 151,
    152, 153, 157, 158, 163, 164, 168, 172, 178, 179, 181, 183, 187, 188, 193, 194, 196, 198, 202, 203, 208, 209,
    211, 212, 213, 218, 220, 221, 225, 235, 236, 238, 239, 240, 242, 243, 244, 249, 253, 254, 259, 260, 262, 268,
    274, 277, 283, 289, 292, 293, 294, 298, 299, 304, 305, 308, 309, 310, 311,
)
GROUP_PREFIX = 10


def read_attribute_names(root: str | Path) -> list[str]:
    """The 312 attribute names, in id order."""
    root = Path(root)
    candidates = [root / "attributes" / "attributes.txt", root / "attributes.txt", root.parent / "attributes.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataFormatError(f"{root}: no attributes.txt (looked in {', '.join(str(p) for p in candidates)})")
    names: dict[int, str] = {}
    for lineno, fields in _read_rows(path, 2, max_split=1):
        names[_parse(path, lineno, fields[0], int)] = fields[1]
    if sorted(names) != list(range(1, NUM_ATTRIBUTES + 1)):
        raise DataFormatError(f"{path}: expected attribute ids 1..{NUM_ATTRIBUTES}, got {len(names)} ids")
    return [names[i] for i in range(1, NUM_ATTRIBUTES + 1)]


def read_image_attributes(root: str | Path, image_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, certainties), each (N, 312) uint8, of the given image ids (rows in that order).

    Lines may carry extra fields after the certainty (some lines of the official file do); an (image,
    attribute) pair that is missing or repeated is an error.
    """
    path = Path(root) / "attributes" / "image_attribute_labels.txt"
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    labels = np.zeros((len(row_of), NUM_ATTRIBUTES), dtype=np.uint8)
    certainties = np.zeros_like(labels)
    seen = np.zeros(labels.shape, dtype=bool)
    for lineno, fields in _read_rows(path, 4, max_split=4):
        image, attribute, present, certainty = (_parse(path, lineno, v, int) for v in fields[:4])
        if image not in row_of:
            continue
        if not 1 <= attribute <= NUM_ATTRIBUTES or present not in (0, 1) or not 1 <= certainty <= 4:
            raise DataFormatError(f"{path}:{lineno}: expected attribute 1..{NUM_ATTRIBUTES}, is_present 0/1 and "
                                  f"certainty 1..4, got {' '.join(fields[:4])!r}")
        r, a = row_of[image], attribute - 1
        if seen[r, a]:
            raise DataFormatError(f"{path}:{lineno}: duplicate entry for image {image}, attribute {attribute}")
        seen[r, a] = True
        labels[r, a], certainties[r, a] = present, certainty
    if not seen.all():
        r, a = np.argwhere(~seen)[0]
        raise DataFormatError(f"{path}: no entry for image {list(row_of)[r]}, attribute {a + 1} "
                              f"({int((~seen).sum())} missing)")
    return labels, certainties


def class_attribute_labels(labels: np.ndarray, certainties: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, A) int64: each class's majority label per attribute over the given images (steps 1-2 above)."""
    counts = np.zeros((num_classes, labels.shape[1], 2), dtype=np.int64)
    counted = ~((labels == 0) & (certainties == 1))
    for value in (0, 1):
        np.add.at(counts[:, :, value], classes, ((labels == value) & counted).astype(np.int64))
    return (counts[:, :, 1] >= counts[:, :, 0]).astype(np.int64)


def select_attributes(class_labels: np.ndarray, min_class_count: int = 10) -> np.ndarray:
    """0-based indices of the attributes that are 1 for at least `min_class_count` classes (step 3)."""
    return np.flatnonzero(class_labels.sum(0) >= min_class_count)


def attribute_groups(names: Sequence[str], selected: Sequence[int]) -> list[int]:
    """Group id (0, 1, ...) of each selected attribute: runs of consecutive attributes (over all 312) sharing
    the first 10 characters of their name, numbered in order among the groups that keep an attribute."""
    run, runs = -1, []
    for j, name in enumerate(names):
        run += j == 0 or name[:GROUP_PREFIX] != names[j - 1][:GROUP_PREFIX]
        runs.append(run)
    order = list(dict.fromkeys(runs[a] for a in selected))
    return [order.index(runs[a]) for a in selected]


def concept_table(root: str | Path, image_ids: Sequence[int], labels: np.ndarray, num_classes: int,
                  selection: str = "published", min_class_count: int = 10) -> dict[str, Any]:
    """Class-level concepts from the given (training) images: ``class_concepts`` (K, k) int64,
    ``indices`` (0-based into the 312), ``names``, ``groups``, ``positives`` per concept over the images and
    their ``count``.

    `selection`: ``"published"`` (the paper's 112) or ``"recomputed"`` (step 3 on these images).
    """
    if selection not in ("published", "recomputed"):
        raise ValueError(f"selection must be 'published' or 'recomputed', got {selection!r}")
    image_labels, certainties = read_image_attributes(root, image_ids)
    per_class = class_attribute_labels(image_labels, certainties, np.asarray(labels), num_classes)
    indices = np.array(PUBLISHED_ATTRIBUTES) if selection == "published" else select_attributes(per_class, min_class_count)
    names = read_attribute_names(root)
    table = per_class[:, indices]
    return {"class_concepts": table, "indices": indices, "names": [names[i] for i in indices],
            "groups": attribute_groups(names, indices), "positives": table[np.asarray(labels)].sum(0), "count": len(labels)}


class ConceptItems(Dataset):
    """A dataset whose items also carry ``"concepts"`` float32 (k,): the class-level vector of their label."""

    def __init__(self, dataset: Any, class_concepts: np.ndarray) -> None:
        self.dataset = dataset
        self.class_concepts = torch.as_tensor(class_concepts, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.dataset)

    def _with_concepts(self, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        item["concepts"] = self.class_concepts[int(item["label"])]
        return item

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self._with_concepts(self.dataset[index])

    def view_item(self, index: int, view: int, views: int) -> dict[str, torch.Tensor]:
        """Item `index` as augmentation view `view` of `views`, with its concept labels."""
        return self._with_concepts(self.dataset.view_item(index, view, views))

    def __getattr__(self, name: str) -> Any:  # paths, labels, boxes, ... of the wrapped split
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
