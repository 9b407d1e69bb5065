"""The zoo's LightningDataModule base: train (shuffled, augmented, resumable), val, test and push loaders.

Batch contract (the models rely on it): every dataset item is a dict with
    "image": float32 (3, H, W) in [0, 1], not normalised (normalisation is the model's first layer),
    "label": int64 scalar, "index": int64 scalar (position in its split, so push can find the source);
datasets add their annotations (see `train.data` and `train.datasets`), in the returned image's pixel
coordinates. Keypoints follow torchvision's ``KeyPoints`` convention (pixel centres at integers; a flip
maps x to W - 1 - x), boxes its XYXY ``BoundingBoxes`` convention (pixel edges; a flip maps x to W - x).

Epoch size: ``epoch_repeats`` R makes one training epoch R passes over the training split, item
r * n + i being view r of image i (`RepeatedSplit`). A dataset with a ``view_item(i, view, views)``
method gives each view its own crop or augmentation pipeline (e.g. ProtoPNet's 30 offline
augmentations, ProtoTree's 5 corner crops), so that one epoch is one epoch of the official code.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .resume import EpochSeededDataset, EpochShuffleSampler
from .transforms import AUGMENTATIONS, Augmentation, train_augmentation

__all__ = ["RepeatedSplit", "ZooDataModule"]

_STAGE_SPLITS = {
    "fit": ("train", "val", "push"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test", "push"),
}


def _check_repeats(repeats: Any) -> int:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"epoch_repeats={repeats!r} must be an integer >= 1")
    return repeats


class RepeatedSplit(Dataset):
    """``repeats`` passes over a dataset of n items as one dataset: item r * n + i is view r of item i.

    The view goes to ``dataset.view_item(i, r, repeats)`` where the dataset has it, else item i is
    returned as it is. Items keep their "index" i (the position in the split).
    """

    def __init__(self, dataset: Dataset, repeats: int = 1) -> None:
        self.dataset, self.repeats = dataset, _check_repeats(repeats)
        self.num_items = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_items * self.repeats

    def __getattr__(self, name: str) -> Any:  # labels, paths ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.repeats} x {self.num_items} items")
        view, i = divmod(index, self.num_items)
        view_item = getattr(self.dataset, "view_item", None)
        return view_item(i, view, self.repeats) if view_item is not None else self.dataset[i]


class ZooDataModule(pl.LightningDataModule):
    """Shared loaders: train (shuffled, augmented), val, test, and push (train, unaugmented, in order).

    ``augment``: True (the zoo's mild default), False, or a recipe's augmentation by name
    (`train.transforms.AUGMENTATIONS`); ``epoch_repeats``: passes over the training split per epoch.
    Subclasses implement ``_build_dataset(split)`` for split in {'train', 'val', 'test', 'push'}, and
    ``num_classes`` / ``class_names``. Datasets are built lazily on first use, so the loaders work
    with or without a prior ``setup()``.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        augment: bool | str = True,
        epoch_repeats: int = 1,
    ) -> None:
        super().__init__()
        self.epoch_repeats = _check_repeats(epoch_repeats)
        if not isinstance(augment, bool) and augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}: expected true, false or one of {sorted(AUGMENTATIONS)}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.augment = augment if isinstance(augment, str) else bool(augment)
        self._datasets: dict[str, Dataset] = {}
        self._resume_at: tuple[int, int] | None = None  # (epoch, trained batches) of an interrupted epoch

    # -- to implement
    def _build_dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes K (a subclass provides it)."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        """Class names, one per class index (a subclass provides them)."""
        raise NotImplementedError

    @property
    def part_names(self) -> tuple[str, ...] | None:
        """Names of the annotated parts (keypoint / mask order), or None where there are none."""
        return None

    # -- shared
    def dataset(self, split: str) -> Dataset:
        """The dataset of a split ('train', 'val', 'test', 'push'), built once."""
        if split not in ("train", "val", "test", "push"):
            raise ValueError(f"unknown split {split!r}")
        if split not in self._datasets:
            self._datasets[split] = self._build_dataset(split)
        return self._datasets[split]

    @property
    def train_dataset(self) -> Dataset:
        """The training split."""
        return self.dataset("train")

    @property
    def val_dataset(self) -> Dataset:
        """The validation split."""
        return self.dataset("val")

    @property
    def test_dataset(self) -> Dataset:
        """The test split."""
        return self.dataset("test")

    @property
    def push_dataset(self) -> Dataset:
        """The push split: training images without augmentation."""
        return self.dataset("push")

    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage, _STAGE_SPLITS[None]):
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            generator=self._generator(),
        )

    def _generator(self) -> torch.Generator:
        # Each loader draws its worker seeds from its own generator: starting an epoch (or a
        # validation) then leaves the global random state alone, which exact resumption relies on.
        return torch.Generator().manual_seed(int(getattr(self, "seed", 0)))

    def train_dataloader(self) -> DataLoader:
        """``epoch_repeats`` passes, shuffled and augmented, every draw a function of (seed, epoch, index): resumable exactly."""
        seed = int(getattr(self, "seed", 0))
        dataset = RepeatedSplit(self.dataset("train"), self.epoch_repeats)
        sampler = EpochShuffleSampler(len(dataset), seed=seed, batch_size=self.batch_size)
        if self._resume_at is not None:
            sampler.set_epoch(self._resume_at[0])
            sampler.skip_batches = self._resume_at[1]
            self._resume_at = None
        return DataLoader(
            EpochSeededDataset(dataset, seed=seed),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
            generator=self._generator(),
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the training epoch stands, so that a resumed run skips the batches already trained on."""
        trainer = self.trainer
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "train_batches_done": int(progress.processed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_batches_done" in state_dict:
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["train_batches_done"]))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def push_dataloader(self) -> DataLoader:
        """The training split without augmentation, unshuffled: batch["index"] runs 0..N-1 in order."""
        return self._loader("push", False, self.eval_batch_size)

    def _train_transform(self, image_size: int) -> Augmentation | None:
        return train_augmentation(self.augment, image_size)
