"""LightningDataModules of the zoo: SyntheticParts (default), CUB-200-2011 and any image folder.

This module holds SyntheticParts and re-exports the rest, so configs name every datamodule as
``train.data.<Name>``: the base class and the epoch size in `train.datamodule`, the file-based
datasets in `train.datasets`, the augmentations in `train.transforms`.

SyntheticParts items add "part_masks" bool (S, H, W), "keypoints" float32 (S, 3) = (x, y, visible) and
"body_box" float32 (4,) = (x0, y0, x1, y1) to the batch contract of `train.datamodule`, in the returned
image's pixel coordinates, and "concepts" float32 (S * V,), the class's one-hot part variants
(`train.synthetic_concepts`). Augmentation moves images, masks, boxes and keypoints together; a keypoint
that leaves the canvas becomes invisible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .datamodule import RepeatedSplit, ZooDataModule
from .datasets import (
    CUB200,
    IMG_EXTENSIONS,
    DataFormatError,
    ImageFolderData,
    ImageLoadError,
    ImageRecordDataset,
    corner_regions,
    load_image,
    one_line,
)
from .synthetic import PART_NAMES, SyntheticPartsGenerator
from .synthetic_concepts import class_concepts, concept_groups, concept_names
from .transforms import AUGMENTATIONS, Augmentation, apply_transform, build_train_transform, to_float, train_augmentation

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "CUB200",
    "DataFormatError",
    "IMG_EXTENSIONS",
    "ImageFolderData",
    "ImageLoadError",
    "ImageRecordDataset",
    "RepeatedSplit",
    "SyntheticParts",
    "SyntheticPartsDataset",
    "ZooDataModule",
    "build_train_transform",
    "corner_regions",
    "load_image",
    "train_augmentation",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ SyntheticParts
def _render_arrays(generator: SyntheticPartsGenerator, split: str, size: int) -> dict[str, np.ndarray]:
    """Render a whole split into compact arrays (part masks as one int8 map: they never overlap)."""
    n, s = generator.image_size, len(PART_NAMES)
    arrays = {
        "images": np.empty((size, n, n, 3), dtype=np.uint8),
        "part_maps": np.empty((size, n, n), dtype=np.int8),
        "keypoints": np.empty((size, s, 3), dtype=np.float32),
        "body_boxes": np.empty((size, 4), dtype=np.float32),
        "labels": np.empty((size,), dtype=np.int64),
    }
    for i in range(size):
        sample = generator.sample(i, split)
        arrays["images"][i] = sample.image
        arrays["part_maps"][i] = sample.part_map
        arrays["keypoints"][i] = sample.keypoints
        arrays["body_boxes"][i] = sample.body_box
        arrays["labels"][i] = sample.label
    return arrays


def _cache_file(directory: Path, generator: SyntheticPartsGenerator, split: str, size: int) -> Path:
    key = json.dumps({**generator.params, "split": split, "size": size}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return directory / f"synthetic_parts_{split}_{size}_{digest}.npz"


def _load_or_render(
    generator: SyntheticPartsGenerator, split: str, size: int, directory: Path | None
) -> dict[str, np.ndarray]:
    if directory is None:
        return _render_arrays(generator, split, size)
    path = _cache_file(directory, generator, split, size)
    if path.exists():
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except Exception as exc:  # a damaged cache is rebuilt, not fatal
            log.warning("rebuilding damaged SyntheticParts cache %s (%s)", path, one_line(exc))
    arrays = _render_arrays(generator, split, size)
    directory.mkdir(parents=True, exist_ok=True)
    # Write then rename: concurrent ranks / processes never read a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return arrays


class SyntheticPartsDataset(Dataset):
    """One split of SyntheticParts; renders on the fly or serves pre-rendered arrays.

    ``split`` is the generator split ('train', 'val', 'test'); the push dataset is the train split
    with ``transform=None``.
    """

    def __init__(
        self,
        generator: SyntheticPartsGenerator,
        split: str,
        size: int,
        transform: Callable | None = None,
        arrays: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.generator = generator
        self.split = split
        self.size = int(size)
        self.transform = transform
        self.arrays = arrays
        self.class_concepts = torch.from_numpy(class_concepts(generator))

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a split of {self.size}")
        return index

    def recipe(self, index: int):
        """The scene recipe of item ``index`` (re-render it with ``self.generator.render``)."""
        return self.generator.recipe(self._check(index), self.split)

    def sample(self, index: int):
        """The un-augmented :class:`~train.synthetic.RenderedSample` of item ``index``."""
        return self.generator.sample(self._check(index), self.split)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class of every sample, without rendering the images."""
        return np.array([self.generator.label_of(i) for i in range(self.size)], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = self._check(index)
        if self.arrays is not None:
            image = self.arrays["images"][index]
            part_map = self.arrays["part_maps"][index]
            keypoints = self.arrays["keypoints"][index]
            box = self.arrays["body_boxes"][index]
            label = int(self.arrays["labels"][index])
        else:
            s = self.generator.sample(index, self.split)
            image, part_map, keypoints, box, label = s.image, s.part_map, s.keypoints, s.body_box, s.label
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
        # uint8 with 0 = no part, so that transforms can fill with 0 and nearest-resample it.
        pmap = torch.from_numpy((part_map.astype(np.int16) + 1).astype(np.uint8))
        kp = torch.from_numpy(np.array(keypoints, dtype=np.float32))
        bx = torch.from_numpy(np.array(box, dtype=np.float32))
        image_t, pmap, kp, bx = apply_transform(self.transform, image_t, pmap, kp, bx)
        second = getattr(self.transform, "view_transform", None)  # two views (PIP-Net): annotations follow view 1
        if second is not None:
            image2 = apply_transform(second, image_t)[0]
            image_t, pmap, kp, bx = apply_transform(second, image_t, pmap, kp, bx)
        num_parts = kp.shape[0]
        masks = pmap[None].long() == torch.arange(1, num_parts + 1)[:, None, None]
        if self.transform is not None:  # visible = some pixel of the part is still in the image
            kp[:, 2] *= masks.flatten(1).any(dim=1).float()
        item = {
            "image": to_float(image_t),
            "label": torch.tensor(label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "part_masks": masks,
            "keypoints": kp,
            "body_box": bx,
            "concepts": self.class_concepts[label],
        }
        if second is not None:
            item["image2"] = to_float(image2)
        return item


class SyntheticParts(ZooDataModule):
    """The built-in dataset with ground-truth parts (see :mod:`train.synthetic`).

    ``num_classes``, ``class_names``, ``part_names`` and ``generator`` are available right after
    construction. ``cache``: False = render every item on the fly (works with any number of workers);
    True = render each split once into uint8 arrays in memory; a path = a directory where those arrays
    are also stored as .npz files keyed by the generator parameters, split and size.
    ``loader_args``: those of `ZooDataModule` (batch sizes, workers, augment, epoch_repeats).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 128,
        train_size: int = 2000,
        val_size: int = 500,
        test_size: int = 500,
        seed: int = 0,
        clutter: int = 3,
        occlusion: float = 0.0,
        color_jitter: float = 0.0,
        shortcut: float = 0.0,
        cache: bool | str = True,
        **loader_args: Any,
    ) -> None:
        super().__init__(**loader_args)
        self.save_hyperparameters()
        self.image_size = int(image_size)
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.cache = cache
        self.generator = SyntheticPartsGenerator(
            num_classes=num_classes,
            image_size=image_size,
            seed=seed,
            clutter=clutter,
            occlusion=occlusion,
            color_jitter=color_jitter,
            shortcut=shortcut,
        )
        self._arrays: dict[str, dict[str, np.ndarray]] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes K of the generator."""
        return self.generator.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names, one per class index."""
        return self.generator.class_names

    @property
    def part_names(self) -> tuple[str, ...]:
        return PART_NAMES

    @property
    def concept_names(self) -> list[str]:
        """Concepts of a concept bottleneck model: one per (part slot, variant) (`train.synthetic_concepts`)."""
        return concept_names()

    @property
    def concept_groups(self) -> list[int]:
        """Group (part slot) of each concept."""
        return concept_groups()

    def concept_positive_counts(self) -> tuple[np.ndarray, int]:
        """(positives per concept, number of images) over the train split (concept loss weights)."""
        labels = np.array([self.generator.label_of(i) for i in range(self.sizes["train"])], dtype=np.int64)
        return class_concepts(self.generator)[labels].sum(0), len(labels)

    def _split_arrays(self, split: str) -> dict[str, np.ndarray] | None:
        if self.cache is False or self.cache is None:
            return None
        if split not in self._arrays:
            directory = None if self.cache is True else Path(self.cache)
            self._arrays[split] = _load_or_render(self.generator, split, self.sizes[split], directory)
        return self._arrays[split]

    def _build_dataset(self, split: str) -> SyntheticPartsDataset:
        source = "train" if split == "push" else split
        transform = self._train_transform(self.image_size) if split == "train" else None
        return SyntheticPartsDataset(
            self.generator, source, self.sizes[source], transform, self._split_arrays(source)
        )
