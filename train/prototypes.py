"""Callbacks of the prototype networks: push (with its figures) and pruning.

ProtoPNet's phases (warm, joint, last layer) are a pure function of the epoch computed by the model
itself (`ProtoPNet.plan`), so a resumed run is in the right phase with no callback state; the
callbacks here only do what needs data: the push and the pruning, over the datamodule's
un-augmented, unshuffled `push_dataloader()`.

Hook order (Lightning 2.6): validation runs inside the training epoch, before `on_train_epoch_end`,
and ModelCheckpoint saves after the other callbacks' `on_train_epoch_end`. A push there would be
saved with the pre-push `val/acc`. So the push runs at the *start* of the epoch after the official
push epoch (`on_train_epoch_start`, before the model's own hook): every checkpoint then holds weights
and metrics of the same model, and `val/acc_pushed` (logged by the model, -1 before a push) lets
ModelCheckpoint select only pushed models.
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler

from explain.viz import log_figure, prototype_gallery, save_figure

__all__ = ["PrototypePush", "PrunePrototypes", "push_loader"]


def push_loader(trainer: pl.Trainer) -> DataLoader:
    """The datamodule's push loader, sharded over ranks (in order) under distributed training."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "push_dataloader"):
        raise RuntimeError("prototype push/pruning needs a datamodule with push_dataloader() (train split, un-augmented)")
    loader = dm.push_dataloader()
    if trainer.world_size > 1:
        sampler = DistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    return loader


class PrototypePush(pl.Callback):
    """Push the prototypes when the model's schedule says so; save a gallery of the new patches.

    The figure goes to ``<run>/figures/prototypes_epoch<e>.png`` (e = the official push epoch).

    Args:
        figures: save the gallery after each push.
        max_prototypes: tiles in the gallery.
        dirname: sub-folder of the run folder.
    """

    def __init__(self, figures: bool = True, max_prototypes: int = 200, dirname: str = "figures") -> None:
        self.figures = figures
        self.max_prototypes = max_prototypes
        self.dirname = dirname
        self.saved: list[Path] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = pl_module.plan()
        if not plan.push or int(pl_module.push_epoch) == trainer.current_epoch:
            return  # nothing due, or already pushed (resumed after the push)
        loader = push_loader(trainer)
        result = pl_module.push(loader, epoch=trainer.current_epoch)
        found = result.found & pl_module.prototype_mask
        pl_module.log("push/mean_distance", result.distance[found].mean(), on_epoch=True, on_step=False)
        if self.figures and trainer.is_global_zero:
            names = getattr(trainer.datamodule, "class_names", None)
            fig = prototype_gallery(pl_module, self.max_prototypes, class_names=names, source=loader.dataset)
            # Loggers that take images (wandb) get the gallery too; the PNG next to the checkpoints is always written.
            log_figure(fig, "push/prototypes", trainer.loggers, step=trainer.global_step, close=False)
            path = Path(trainer.default_root_dir) / self.dirname / f"prototypes_epoch{plan.epoch}.png"
            self.saved.append(save_figure(fig, path))


class PrunePrototypes(pl.Callback):
    """At the start of Lightning epoch `epoch`, prune prototypes whose `k` nearest push patches hold
    fewer than `threshold` of their own class (official: k = 6, threshold = 3).

    Put it on a last-layer epoch after the schedule's final push (ProtoPNet's `num_train_epochs`
    then keeps training the last layer only), and raise `trainer.max_epochs` by the fine-tuning
    passes (official: 100).
    """

    def __init__(self, epoch: int, k: int = 6, threshold: int = 3) -> None:
        if k < 1 or not 0 <= threshold <= k:
            raise ValueError(f"need k >= 1 and 0 <= threshold <= k, got k={k}, threshold={threshold}")
        self.epoch, self.k, self.threshold = epoch, k, threshold
        self.pruned: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        if pl_module.plan().phase != "last" or int(pl_module.push_epoch) < 0:
            raise ValueError(f"PrunePrototypes(epoch={self.epoch}): prune a pushed model in a last-layer epoch, "
                             f"but epoch {self.epoch} is {pl_module.plan().phase!r}")
        self.pruned = pl_module.prune(push_loader(trainer), k=self.k, threshold=self.threshold).tolist()
        pl_module.log("prune/num_pruned", float(len(self.pruned)), on_epoch=True, on_step=False)
