"""ProtoPNet's cached last-layer phase (measured by benchmarks/last_layer.py).

In last-layer epochs the trunk, add-on and prototypes are frozen, so the min distances of each
training image do not change: they are computed once (one pass over the un-augmented training
images after each push, or when a run resumes in that phase) and the last layer trains on rows of
that (N, P) table, looked up by the batch's ``"index"``, for all its passes. Lightning still runs
every epoch (validation, checkpoints, epoch accounting); the network's forward is skipped and the
batch's images are not copied to the device (the loader still reads them).

When the cache is rebuilt: whenever a tensor it depends on changed (trunk and add-on parameters and
buffers, prototypes, pruning mask; tracked by tensor versions) and explicitly after a push, a
pruning or a checkpoint load. When it is not used: outside last-layer epochs, and when the
datamodule augments online (``augment=True``): then the network runs every pass as without cache.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .prototypes import _unpack_indexed, l2_distances

__all__ = ["SimilarityCacheMixin"]


class SimilarityCacheMixin:
    """The cache half of `ProtoPNet` (needs its backbone, add_on, prototype_vectors, prototype_mask,
    `_fp32_distances`, `_eval_mode`, `logits_from_distances` and `losses_from_distances`)."""

    similarity_cache: Tensor | None = None
    _cache_key: tuple | None = None
    _use_cache: bool = False

    def _prepare_cache(self) -> bool:
        """Make the cache valid for this last-layer epoch; False when it must not be used.

        Runs after the callbacks' epoch-start hooks, so after any push or pruning of this epoch.
        Data augmented online (datamodule ``augment=True``) gives other pixels every pass, which a
        cache of the un-augmented images would not reproduce: then the network runs every pass.
        A datamodule without an ``augment`` attribute is taken to be un-augmented.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "augment", False):
            rank_zero_warn("cache_last_layer: the training data is augmented online, so the last layer is trained "
                           "on the network's output every pass (no cache); set data augment: false to cache")
            return False
        if datamodule is None or not hasattr(datamodule, "push_dataloader"):
            raise ValueError("cache_last_layer=True needs a datamodule with push_dataloader() "
                             "(the training split, un-augmented, batches with 'index')")
        if not self.similarity_cache_valid:
            self.build_similarity_cache(datamodule.push_dataloader())
        return True

    def _current_cache_key(self) -> tuple:
        # Everything the min distances depend on. An optimiser step, a push, a pruning or
        # load_state_dict writes in place (bumping the tensor's version); .to() replaces the storage.
        tensors = [*self.backbone.parameters(), *self.backbone.buffers(), *self.add_on.parameters(),
                   self.prototype_vectors, self.prototype_mask]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    @property
    def similarity_cache_valid(self) -> bool:
        """True while `similarity_cache` matches the current trunk, add-on, prototypes and mask."""
        return self.similarity_cache is not None and self._cache_key == self._current_cache_key()

    def invalidate_similarity_cache(self) -> None:
        """Drop the cached similarities (they no longer match the network)."""
        self.similarity_cache, self._cache_key = None, None

    @torch.no_grad()
    def build_similarity_cache(self, loader: Iterable) -> Tensor:
        """Min distances (N, P) of every image of `loader`, row i = sample index i, on the model's device.

        Eval mode, distances in float32: what the last layer sees in a last-layer epoch when the
        trunk's BatchNorm statistics are fixed. Batches are push batches: dicts with "image", "label", "index" (or
        (image, label, index) tuples). Under DDP every rank builds the whole cache (one inference
        pass, no communication), so any shard of the training data can read it.
        """
        modes = self._eval_mode()
        rows, indices = [], []
        try:
            with self._fp32_distances() as latent:
                for batch in loader:
                    images, _, index = _unpack_indexed(batch)
                    maps = l2_distances(latent(images.to(self.device, non_blocking=True)), self.prototype_vectors)
                    rows.append(maps.amin(dim=(2, 3)))
                    indices.append(index.to(self.device).long())
        finally:
            self._restore_mode(modes)
        if not rows:
            raise ValueError("build_similarity_cache got an empty loader")
        index = torch.cat(indices)
        cache = torch.full((int(index.max()) + 1, self.num_prototypes), float("nan"), device=self.device)
        cache[index] = torch.cat(rows)  # rows never seen stay NaN: a loss on them fails check_finite
        self.similarity_cache, self._cache_key = cache, self._current_cache_key()
        return cache

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Leave the images on the host in a cached last-layer epoch (it reads only labels and indices)."""
        # A cached epoch reads only labels and indices: do not copy the images to the device.
        if self._use_cache and self.training and isinstance(batch, dict) and "index" in batch:
            return {key: value for key, value in batch.items() if key != "image"}
        return batch

    def batch_losses(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """In a cached last-layer epoch: the losses from the cached min distances of the batch's indices."""
        if stage != "train" or not self._use_cache:
            return super().batch_losses(batch, stage)
        if isinstance(batch, dict):  # its images may have been dropped (on_before_batch_transfer)
            index, labels = batch.get("index"), batch["label"]
            if index is None:
                raise ValueError("the last-layer cache needs batches with the sample index ('index')")
        else:
            _, labels, index = _unpack_indexed(batch)
        min_distances = self.similarity_cache[index.to(self.similarity_cache.device)]
        logits = self.logits_from_distances(min_distances)
        return logits, labels, self.losses_from_distances(logits, min_distances, labels)

