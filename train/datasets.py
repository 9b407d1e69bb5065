"""File-based datasets: CUB-200-2011 from its official folder and any folder of class sub-folders.

Items follow the batch contract of `train.datamodule`; CUB200 adds "keypoints" float32 (15, 3) and
"bbox" float32 (4,), both in the returned image's pixel coordinates (invisible keypoints are (0, 0, 0)).
Bad files raise `DataFormatError` naming the file and line; unreadable images raise `ImageLoadError`
naming the image (or are skipped with ``skip_corrupt``). Nothing here downloads anything.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datamodule import ZooDataModule
from .transforms import Augmentation, apply_transform, pick_view, pil_to_tensor, to_float

__all__ = [
    "CUB200",
    "DataFormatError",
    "IMG_EXTENSIONS",
    "ImageFolderData",
    "ImageLoadError",
    "ImageRecordDataset",
    "corner_regions",
    "load_image",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataFormatError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line)."""


class ImageLoadError(OSError):
    """An image file cannot be read or decoded; the message names the file."""


# ---------------------------------------------------------------------------------------------- images
def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16/32-bit greyscale is rescaled, not clipped (PIL clips)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0  # 65535 -> 255
        elif mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "P":
        # Palette images may carry transparency; go through RGBA so PIL does not warn, then drop alpha.
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")  # L, LA, RGBA, CMYK, YCbCr, 1, ...: alpha is dropped, as torchvision does


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; any failure raises :class:`ImageLoadError` naming the file."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            rgb = _to_rgb(im)
            return rgb if rgb is not im else im.copy()
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise ImageLoadError(f"cannot read image '{path}': {one_line(exc)}") from exc


# ------------------------------------------------------------------------------- file-based datasets
def corner_regions(box: Sequence[float], width: int, height: int) -> list[tuple[float, float, float, float]]:
    """ProtoTree's ``train_corners`` views of an image: upper-left, lower-left, upper-right and
    lower-right crops that each reach past the XYXY bounding box by a margin of int(10%) of its
    size, then the whole image (official ``preprocess_data/cub.py``)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    wm, hm = int(0.1 * (x1 - x0)), int(0.1 * (y1 - y0))
    left, top = max(x0 - wm, 0.0), max(y0 - hm, 0.0)
    right, bottom = min(x1 + wm, float(width)), min(y1 + hm, float(height))
    return [(0.0, 0.0, right, bottom), (0.0, top, right, float(height)), (left, 0.0, float(width), bottom),
            (left, top, float(width), float(height)), (0.0, 0.0, float(width), float(height))]


class ImageRecordDataset(Dataset):
    """Images listed by path, with optional per-image keypoints and box in original pixel coordinates.

    Each item is cropped to its box (``crop_to_bbox``, grown by ``bbox_margin`` x box size per side and
    clipped to the image) or, with ``corners``, to one of ProtoTree's five `corner_regions` (view r of
    a repeated epoch takes region r % 5 when the repeats are a multiple of 5, else a random one), resized
    to (image_size, image_size) without keeping the aspect (as ProtoPNet and ProtoTree), then augmented
    by ``transform`` if given (an `Augmentation` picks its pipeline by view, and may resize to its own
    side first). Keypoints map as x' = (x - x0) * S / (x1 - x0); those outside the crop become
    invisible, stored as (0, 0, 0).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int],
        image_size: int,
        keypoints: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        crop_to_bbox: bool = False,
        bbox_margin: float = 0.0,
        transform: Callable | None = None,
        corners: bool = False,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = int(image_size)
        self.keypoints = None if keypoints is None else np.asarray(keypoints, dtype=np.float32)
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float32)  # XYXY
        if (crop_to_bbox or corners) and self.boxes is None:
            raise ValueError("crop_to_bbox and corners need boxes")
        if crop_to_bbox and corners:
            raise ValueError("crop_to_bbox and corners exclude each other (corners reach past the box)")
        self.crop_to_bbox = bool(crop_to_bbox)
        self.corners = bool(corners)
        self.bbox_margin = float(bbox_margin)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def crop_box(self, index: int, width: int, height: int, view: int = 4) -> tuple[float, float, float, float]:
        """The source region (x0, y0, x1, y1) that becomes the returned image (``view``: the corner region)."""
        if self.corners:
            return corner_regions(self.boxes[index], width, height)[view]
        if not self.crop_to_bbox:
            return 0.0, 0.0, float(width), float(height)
        x0, y0, x1, y1 = (float(v) for v in self.boxes[index])
        mx, my = self.bbox_margin * (x1 - x0), self.bbox_margin * (y1 - y0)
        x0, y0 = max(0.0, x0 - mx), max(0.0, y0 - my)
        x1, y1 = min(float(width), x1 + mx), min(float(height), y1 + my)
        if x1 - x0 < 1.0 or y1 - y0 < 1.0:  # a degenerate box: fall back to the whole image
            return 0.0, 0.0, float(width), float(height)
        return x0, y0, x1, y1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.view_item(index, 0, 1)

    def view_item(self, index: int, view: int, views: int) -> dict[str, torch.Tensor]:
        """Item ``index`` as view ``view`` of ``views`` per epoch (its corner region and pipeline)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)}")
        im = load_image(self.paths[index])
        region = pick_view(view, views, 5) if self.corners else 4
        x0, y0, x1, y1 = self.crop_box(index, *im.size, view=region)
        transform = self.transform
        second = getattr(transform, "view_transform", None)  # two views (PIP-Net): annotations follow view 1
        size = self.image_size
        if isinstance(transform, Augmentation):
            size = transform.resize or size
            transform = transform.for_view(view, views)
        im = im.resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1))
        sx, sy = size / (x1 - x0), size / (y1 - y0)
        item: dict[str, torch.Tensor] = {}
        kp = box = None
        if self.keypoints is not None:
            k = self.keypoints[index]
            x, y = (k[:, 0] - x0) * sx, (k[:, 1] - y0) * sy
            vis = (k[:, 2] > 0) & (x >= 0) & (x <= size) & (y >= 0) & (y <= size)
            kp = torch.from_numpy(np.stack([x, y, vis.astype(np.float32)], axis=1).astype(np.float32))
        if self.boxes is not None:
            bx0, by0, bx1, by1 = self.boxes[index]
            b = np.array([(bx0 - x0) * sx, (by0 - y0) * sy, (bx1 - x0) * sx, (by1 - y0) * sy])
            box = torch.from_numpy(np.clip(b, 0, size).astype(np.float32))
        image, _, kp, box = apply_transform(transform, pil_to_tensor(im), None, kp, box)
        if second is not None:
            item["image2"] = to_float(apply_transform(second, image)[0])
            image, _, kp, box = apply_transform(second, image, None, kp, box)
        item["image"] = to_float(image)
        item["label"] = torch.tensor(int(self.labels[index]), dtype=torch.int64)
        item["index"] = torch.tensor(index, dtype=torch.int64)
        if kp is not None:
            kp = kp * kp[:, 2:3]  # invisible -> (0, 0, 0), as in CUB's own files
            item["keypoints"] = kp
        if box is not None:
            item["bbox"] = box
        return item


def _verify_images(paths: Sequence[str]) -> list[int]:
    """Indices of the paths that cannot be fully decoded."""
    bad = []
    for i, p in enumerate(paths):
        try:
            load_image(p)
        except ImageLoadError:
            bad.append(i)
    return bad


def _check_exist(paths: Sequence[str]) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise ImageLoadError(f"cannot read image '{p}': file not found")


def _stratified_split(labels: np.ndarray, fraction: float, seed: int, salt: int) -> np.ndarray:
    """Boolean mask of a per-class random `fraction` (at least one per class left on the other side)."""
    picked = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return picked
    rng = np.random.default_rng([seed, salt])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        k = min(k, len(idx) - 1) if len(idx) > 1 else 0
        picked[rng.permutation(idx)[:k]] = True
    return picked


class _FileDataModule(ZooDataModule):
    """Shared: corrupt-file handling and record storage for CUB200 and ImageFolderData."""

    skip_corrupt: bool

    def _records(self) -> dict[str, dict[str, Any]]:
        """split -> {"paths", "labels", optionally "keypoints", "boxes"} (push = train)."""
        raise NotImplementedError

    def _filtered_records(self) -> dict[str, dict[str, Any]]:
        if getattr(self, "_filtered", None) is None:
            records = self._records()
            self.num_skipped = 0
            if self.skip_corrupt:
                seen: dict[str, bool] = {}  # val may equal test: verify each file once
                for split, rec in records.items():
                    todo = [p for p in rec["paths"] if p not in seen]
                    bad = set(_verify_images(todo))
                    seen.update({p: i not in bad for i, p in enumerate(todo)})
                    keep = np.array([seen[p] for p in rec["paths"]], dtype=bool)
                    records[split] = {k: (np.asarray(v)[keep] if k != "paths" else
                                          [p for p, ok in zip(v, keep) if ok]) for k, v in rec.items()}
                skipped = sorted(p for p, ok in seen.items() if not ok)
                self.num_skipped = len(skipped)
                if skipped:
                    log.warning("skipped %d unreadable image(s) under %s, first: %s",
                                len(skipped), getattr(self, "root", "?"), skipped[0])
            else:
                for rec in records.values():
                    _check_exist(rec["paths"])
            self._filtered = records
        return self._filtered


# ------------------------------------------------------------------------------------------- CUB-200
def _read_rows(path: Path, min_fields: int, max_split: int = -1) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the non-blank lines; too few fields raises DataFormatError."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (expected the CUB-200-2011 layout)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            fields = text.split(None, max_split) if max_split > 0 else text.split()
            if len(fields) < min_fields or (max_split <= 0 and len(fields) != min_fields):
                raise DataFormatError(
                    f"{path}:{lineno}: expected {min_fields} fields, got {len(fields)}: {text!r}"
                )
            rows.append((lineno, fields))
    return rows


def _parse(path: Path, lineno: int, value: str, kind: type) -> Any:
    try:
        out = kind(value)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: cannot parse {value!r} as {kind.__name__}") from None
    if kind is float and not math.isfinite(out):
        raise DataFormatError(f"{path}:{lineno}: non-finite number {value!r}")
    return out


def _id_table(path: Path, rows: list[tuple[int, list[str]]], known: dict[int, Any] | None) -> dict[int, tuple[int, list[str]]]:
    """id -> (line, remaining fields); duplicate or unknown ids, and ids missing here, are errors."""
    table: dict[int, tuple[int, list[str]]] = {}
    for lineno, fields in rows:
        i = _parse(path, lineno, fields[0], int)
        if i in table:
            raise DataFormatError(f"{path}:{lineno}: duplicate id {i} (first on line {table[i][0]})")
        if known is not None and i not in known:
            raise DataFormatError(f"{path}:{lineno}: image id {i} is not in images.txt")
        table[i] = (lineno, fields[1:])
    if known is not None:
        missing = [i for i in known if i not in table]
        if missing:
            raise DataFormatError(f"{path}: no entry for image id(s) {missing[:5]} listed in images.txt")
    return table


def _numbered_names(path: Path, what: str) -> list[str]:
    """The names of a CUB ``<id> <name>`` file (classes.txt, parts/parts.txt), ids 1..N, in id order."""
    rows = _read_rows(path, 2, max_split=1)
    ids = [_parse(path, ln, f[0], int) for ln, f in rows]
    if sorted(ids) != list(range(1, len(ids) + 1)):
        raise DataFormatError(f"{path}: {what} ids must be 1..{len(ids)}, got {sorted(ids)[:5]}...")
    names = dict(zip(ids, (f[1] for _, f in rows)))
    return [names[i] for i in range(1, len(ids) + 1)]


class CUB200(_FileDataModule):
    """CUB-200-2011 from its official folder (``images/``, ``images.txt``, ``parts/`` ...).

    Splits: train / test from ``train_test_split.txt``; val is a per-class ``val_fraction`` of train
    (seeded), or the test split when ``val_fraction`` is 0; push = train, unaugmented.
    Crops: ``crop_to_bbox`` for train and push, ``test_crop_to_bbox`` (None = the same) for val and
    test; ``train_corners`` trains on ProtoTree's five corner views instead (`corner_regions`; set
    ``epoch_repeats`` to 5 for one official epoch, each view once).
    Labels are 0-based. ``num_classes``, ``class_names`` and ``part_names`` read only ``classes.txt``
    and ``parts/parts.txt``, so they are available right after construction.
    ``attributes``: items also carry ``"concepts"``, class-level attribute labels (majority vote over the
    train split, `train.cub_attributes`): ``"published"`` = the 112 attributes of Koh et al., ``"recomputed"``
    = those 1 for at least ``min_class_count`` classes of this split; None = no concepts.
    ``loader_args``: those of `ZooDataModule` (batch sizes, workers, augment, epoch_repeats).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        crop_to_bbox: bool = True,
        bbox_margin: float = 0.0,
        test_crop_to_bbox: bool | None = None,
        train_corners: bool = False,
        val_fraction: float = 0.0,
        seed: int = 0,
        skip_corrupt: bool = False,
        attributes: str | None = None,
        min_class_count: int = 10,
        **loader_args: Any,
    ) -> None:
        super().__init__(**loader_args)
        self.save_hyperparameters()
        if attributes not in (None, "published", "recomputed"):
            raise ValueError(f"attributes must be None, 'published' or 'recomputed', got {attributes!r}")
        self.attributes, self.min_class_count, self._concepts = attributes, int(min_class_count), None
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.root = Path(root)
        self.image_size = int(image_size)
        self.crop_to_bbox = bool(crop_to_bbox)
        self.bbox_margin = float(bbox_margin)
        self.test_crop_to_bbox = self.crop_to_bbox if test_crop_to_bbox is None else bool(test_crop_to_bbox)
        self.train_corners = bool(train_corners)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.skip_corrupt = bool(skip_corrupt)
        self.num_skipped = 0
        self._classes: list[str] | None = None
        self._parts: list[str] | None = None
        self._filtered = None

    def _class_table(self) -> list[str]:
        if self._classes is None:
            self._classes = _numbered_names(self.root / "classes.txt", "class")
        return self._classes

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self._class_table())

    @property
    def class_names(self) -> list[str]:
        """Class names, one per class index."""
        return list(self._class_table())

    @property
    def part_names(self) -> tuple[str, ...]:
        if self._parts is None:
            self._parts = _numbered_names(self.root / "parts" / "parts.txt", "part")
        return tuple(self._parts)

    def _records(self) -> dict[str, dict[str, Any]]:
        root = self.root
        num_classes, num_parts = self.num_classes, len(self.part_names)
        path = root / "images.txt"
        images = _id_table(path, _read_rows(path, 2, max_split=1), None)
        ids = sorted(images)

        path = root / "train_test_split.txt"
        split_tab = _id_table(path, _read_rows(path, 2), images)
        is_train = {}
        for i, (ln, f) in split_tab.items():
            flag = _parse(path, ln, f[0], int)
            if flag not in (0, 1):
                raise DataFormatError(f"{path}:{ln}: split flag must be 0 or 1, got {f[0]!r}")
            is_train[i] = flag == 1

        path = root / "image_class_labels.txt"
        labels = {}
        for i, (ln, f) in _id_table(path, _read_rows(path, 2), images).items():
            c = _parse(path, ln, f[0], int)
            if not 1 <= c <= num_classes:
                raise DataFormatError(f"{path}:{ln}: class {c} not in classes.txt (1..{num_classes})")
            labels[i] = c - 1

        path = root / "bounding_boxes.txt"
        boxes = {}
        for i, (ln, f) in _id_table(path, _read_rows(path, 5), images).items():
            x, y, w, h = (_parse(path, ln, v, float) for v in f)
            if w <= 0 or h <= 0:
                raise DataFormatError(f"{path}:{ln}: box width and height must be > 0, got {w} x {h}")
            boxes[i] = (x, y, x + w, y + h)

        # Parts: missing (image, part) rows are taken as invisible rather than an error.
        path = root / "parts" / "part_locs.txt"
        index_of = {i: k for k, i in enumerate(ids)}
        kps = np.zeros((len(ids), num_parts, 3), dtype=np.float32)
        seen = set()
        for ln, f in _read_rows(path, 5):
            i, p = _parse(path, ln, f[0], int), _parse(path, ln, f[1], int)
            if i not in images:
                raise DataFormatError(f"{path}:{ln}: image id {i} is not in images.txt")
            if not 1 <= p <= num_parts:
                raise DataFormatError(f"{path}:{ln}: part id {p} not in parts.txt (1..{num_parts})")
            if (i, p) in seen:
                raise DataFormatError(f"{path}:{ln}: duplicate entry for image {i}, part {p}")
            seen.add((i, p))
            x, y, v = (_parse(path, ln, s, float) for s in f[2:])
            if v not in (0.0, 1.0):
                raise DataFormatError(f"{path}:{ln}: visible flag must be 0 or 1, got {f[4]!r}")
            kps[index_of[i], p - 1] = (x, y, v) if v else (0.0, 0.0, 0.0)

        def pack(sel: list[int]) -> dict[str, Any]:
            rows = [index_of[i] for i in sel]
            return {
                "paths": [str(root / "images" / images[i][1][0]) for i in sel],
                "labels": np.array([labels[i] for i in sel], dtype=np.int64),
                "keypoints": kps[rows] if rows else np.zeros((0, num_parts, 3), np.float32),
                "boxes": np.array([boxes[i] for i in sel], dtype=np.float32).reshape(-1, 4),
                "ids": np.array(sel, dtype=np.int64),
            }

        train_ids = [i for i in ids if is_train[i]]
        test_ids = [i for i in ids if not is_train[i]]
        train_labels = np.array([labels[i] for i in train_ids], dtype=np.int64)
        in_val = _stratified_split(train_labels, self.val_fraction, self.seed, salt=1)
        records = {
            "train": pack([i for i, v in zip(train_ids, in_val) if not v]),
            "test": pack(test_ids),
        }
        records["val"] = pack([i for i, v in zip(train_ids, in_val) if v]) if in_val.any() else records["test"]
        return records

    def split_ids(self, split: str) -> np.ndarray:
        """Official CUB image ids of a split, in item order (after any skipped files)."""
        rec = self._filtered_records()["train" if split == "push" else split]
        return np.asarray(rec["ids"])

    def concept_table(self) -> dict[str, Any]:
        """The concepts (`train.cub_attributes.concept_table`) from the train split's annotations."""
        if self.attributes is None:
            raise ValueError("CUB200 was built without attributes; pass attributes='published' or 'recomputed'")
        if self._concepts is None:
            from .cub_attributes import concept_table
            train = self._filtered_records()["train"]
            self._concepts = concept_table(self.root, train["ids"], train["labels"], self.num_classes,
                                           self.attributes, self.min_class_count)
        return self._concepts

    @property
    def concept_names(self) -> list[str]:
        """Names of the kept attributes (concepts)."""
        return list(self.concept_table()["names"])

    @property
    def concept_groups(self) -> list[int]:
        """Group (CUB attribute group) of each concept."""
        return list(self.concept_table()["groups"])

    def concept_positive_counts(self) -> tuple[np.ndarray, int]:
        """(positives per concept, number of images) over the train split (concept loss weights)."""
        return self.concept_table()["positives"], self.concept_table()["count"]

    def _build_dataset(self, split: str) -> ImageRecordDataset:
        from .cub_attributes import ConceptItems
        dataset = self._image_dataset(split)
        return dataset if self.attributes is None else ConceptItems(dataset, self.concept_table()["class_concepts"])

    def _image_dataset(self, split: str) -> ImageRecordDataset:
        rec = self._filtered_records()["train" if split == "push" else split]
        corners = self.train_corners and split == "train"
        crop = self.crop_to_bbox if split in ("train", "push") else self.test_crop_to_bbox
        return ImageRecordDataset(
            rec["paths"],
            rec["labels"],
            self.image_size,
            keypoints=rec["keypoints"],
            boxes=rec["boxes"],
            crop_to_bbox=crop and not corners,
            bbox_margin=self.bbox_margin,
            transform=self._train_transform(self.image_size) if split == "train" else None,
            corners=corners,
        )


# ------------------------------------------------------------------------------------- image folders
def _list_class_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: not a directory")
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_images(folder: Path, class_to_idx: dict[str, int], extensions: Sequence[str]) -> tuple[list[str], list[int]]:
    exts = tuple(e.lower() for e in extensions)
    paths, labels = [], []
    for name in _list_class_dirs(folder):
        if name not in class_to_idx:
            raise DataFormatError(f"{folder / name}: class folder not present in the training folder")
        for dirpath, dirnames, filenames in os.walk(folder / name):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(exts) and not fn.startswith("."):
                    paths.append(os.path.join(dirpath, fn))
                    labels.append(class_to_idx[name])
    return paths, labels


class ImageFolderData(_FileDataModule):
    """Any folder of class sub-folders.

    Layouts: ``root/train/<class>/...`` with optional ``root/val`` and ``root/test`` (a missing val is
    carved from train by ``val_fraction``, else it is the test split, and vice versa); or
    ``root/<class>/...``, split per class by ``test_fraction`` and ``val_fraction`` with ``seed``.
    Images are resized to (image_size, image_size). Class names are the sorted training sub-folders,
    available right after construction.
    ``loader_args``: those of `ZooDataModule` (batch sizes, workers, augment, epoch_repeats).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        **loader_args: Any,
    ) -> None:
        super().__init__(**loader_args)
        self.save_hyperparameters()
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise ValueError("need val_fraction, test_fraction >= 0 and val_fraction + test_fraction < 1")
        self.root = Path(root)
        self.image_size = int(image_size)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.skip_corrupt = bool(skip_corrupt)
        self.extensions = tuple(extensions)
        self.num_skipped = 0
        self._filtered = None

    @property
    def split_layout(self) -> bool:
        """True when root holds train/ (and val/, test/) rather than class folders directly."""
        return (self.root / "train").is_dir()

    @property
    def class_names(self) -> list[str]:
        """Class names, one per class index."""
        names = _list_class_dirs(self.root / "train" if self.split_layout else self.root)
        if not names:
            raise DataFormatError(f"{self.root}: no class sub-folders found")
        return names

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    def _records(self) -> dict[str, dict[str, Any]]:
        class_to_idx = {n: i for i, n in enumerate(self.class_names)}

        def rec(paths: list[str], labels: Sequence[int]) -> dict[str, Any]:
            return {"paths": list(paths), "labels": np.asarray(labels, dtype=np.int64)}

        def take(r: dict[str, Any], mask: np.ndarray) -> dict[str, Any]:
            return rec([p for p, m in zip(r["paths"], mask) if m], r["labels"][mask])

        records: dict[str, dict[str, Any] | None] = {}
        if self.split_layout:
            train = rec(*_list_images(self.root / "train", class_to_idx, self.extensions))
            for split in ("val", "test"):
                folder = self.root / split
                records[split] = rec(*_list_images(folder, class_to_idx, self.extensions)) if folder.is_dir() else None
            if records["val"] is None and self.val_fraction > 0:
                in_val = _stratified_split(train["labels"], self.val_fraction, self.seed, salt=2)
                records["val"], train = take(train, in_val), take(train, ~in_val)
        else:
            everything = rec(*_list_images(self.root, class_to_idx, self.extensions))
            in_test = _stratified_split(everything["labels"], self.test_fraction, self.seed, salt=3)
            rest = take(everything, ~in_test)
            in_val = _stratified_split(rest["labels"], self.val_fraction, self.seed, salt=4)
            train = take(rest, ~in_val)
            records["test"] = take(everything, in_test) if in_test.any() else None
            records["val"] = take(rest, in_val) if in_val.any() else None
        if records["val"] is None and records["test"] is None:
            raise DataFormatError(
                f"{self.root}: no val/test folder and nothing carved out (val_fraction/test_fraction are 0)"
            )
        records["val"] = records["val"] or records["test"]
        records["test"] = records["test"] or records["val"]
        records["train"] = train
        if len(train["paths"]) == 0:
            raise DataFormatError(f"{self.root}: no training images with extensions {self.extensions}")
        return records  # type: ignore[return-value]

    def _build_dataset(self, split: str) -> ImageRecordDataset:
        rec = self._filtered_records()["train" if split == "push" else split]
        return ImageRecordDataset(
            rec["paths"],
            rec["labels"],
            self.image_size,
            transform=self._train_transform(self.image_size) if split == "train" else None,
        )
