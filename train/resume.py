"""Exact resumption of interrupted runs and crash-safe checkpoint files.

An interrupted run resumed with ``--ckpt_path last`` ends exactly where an uninterrupted run ends if
every random choice is a function of what the checkpoint holds:

* the order of the training samples is a permutation drawn from (seed, epoch) (`EpochShuffleSampler`),
  and the sampler skips the batches of the interrupted epoch that were already trained on;
* the augmentation of a sample is drawn from (seed, epoch, index) (`EpochSeededDataset`), so it does
  not depend on what ran before, nor on the number of workers;
* the model's own random state (dropout) is saved in the checkpoint by `InterpretableClassifier`.

`AtomicCheckpointIO` writes every checkpoint to a temporary file and renames it, so a crash while
writing never leaves a half file where ``last.ckpt`` should be.
The epoch-start work that Lightning skips on some resumes (a restart mid-epoch, or a checkpoint saved
after an epoch's last batch) is redone before the epoch's first batch by `train.phases.Phases`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import Dataset, Sampler

__all__ = ["AtomicCheckpointIO", "EpochSeededDataset", "EpochShuffleSampler"]


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across machines and Python runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation drawn from (seed, epoch) and yields ``epoch * n + i``.

    Encoding the epoch in the index lets `EpochSeededDataset` seed each sample's augmentation
    from (seed, epoch, i) even inside DataLoader workers. `skip_batches` drops the first batches of
    the current epoch once (set when resuming mid-epoch); moving to another epoch cancels it.
    """

    def __init__(self, num_samples: int, seed: int = 0, batch_size: int = 1) -> None:
        self.num_samples, self.seed, self.batch_size = int(num_samples), int(seed), int(batch_size)
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order the sampler draws (and where a resumed epoch continues)."""
        # A checkpoint saved after the last batch of epoch e says "e, all batches done"; Lightning
        # resumes it straight into epoch e + 1, whose batches must not be skipped.
        if int(epoch) != self.epoch:
            self.skip_batches = 0
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        start, self.skip_batches = self.skip_batches * self.batch_size, 0
        base = self.epoch * self.num_samples
        return iter((base + order[start:]).tolist())


class EpochSeededDataset(Dataset):
    """Wraps a dataset so that item ``epoch * n + i`` is item i with its random draws seeded by (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, int(seed)
        self.num_samples = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_samples

    def __getattr__(self, name: str) -> Any:  # recipe(), sample(), labels ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        epoch, i = divmod(int(index), self.num_samples)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, i))
            return self.dataset[i]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to ``<name>.tmp`` in the same folder, then renames: the old file stays whole until then."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        fs = get_filesystem(path)
        if fs.protocol not in ("file", ("file", "local")) and "file" not in fs.protocol:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
