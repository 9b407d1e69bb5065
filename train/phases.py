"""The one callback that drives every family's declared training phases (see `models.phases`).

Hook order (Lightning 2.6): validation runs inside the training epoch, before `on_train_epoch_end`, and
ModelCheckpoint saves after the other callbacks' `on_train_epoch_end`. A push there would be saved with the
pre-push `val/acc`. So the actions of a plan (ProtoPNet's push after an official push epoch) run at the
*start* of the next Lightning epoch, before the model enters its phase: every checkpoint then holds weights
and metrics of the same model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from explain.viz import log_figure, prototype_gallery, save_figure

__all__ = ["Phases", "push_loader"]


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


class Phases(pl.Callback):
    """Runs the model's plan each epoch (`model.plan`, `run_action`, `enter_phase`), its `final_actions` after
    training, and writes ``final.ckpt``.

    Added to every run by the CLI. After a push it logs ``push/mean_distance`` and saves a gallery of the new
    patches as ``<run>/figures/prototypes_epoch<e>.png`` (e = the family's epoch of the push); after a
    pruning it logs ``prune/num_pruned``. `results` maps (Lightning epoch, action) to what the action returned.

    Args:
        figures: save the gallery after each push.
        max_prototypes: tiles in the gallery.
        dirname: sub-folder of the run folder for figures.
        final_checkpoint: at the end of fit, save ``final.ckpt`` beside the ModelCheckpoint's files (``<run>/
            checkpoints/`` in a CLI run; after every other callback's end-of-training work, e.g. a ProtoTree's
            pruning and projection). Runs without a ModelCheckpoint write none.
    """

    def __init__(self, figures: bool = True, max_prototypes: int = 200, dirname: str = "figures",
                 final_checkpoint: bool = True) -> None:
        self.figures, self.max_prototypes, self.dirname = figures, max_prototypes, dirname
        self.final_checkpoint = final_checkpoint
        self.saved: list[Path] = []
        self.results: dict[tuple[int, str], Any] = {}
        self.final: Path | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning keeps module modes at fit; a loaded model comes in eval mode. enter_phase then freezes.
        pl_module.train()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Lightning skips the epoch-start hooks when it restarts mid-epoch, or resumes a checkpoint saved
        # after an epoch's last batch straight into the next epoch: enter the epoch before its first batch.
        if getattr(pl_module, "_phase_epoch", None) != trainer.current_epoch:
            self._enter(trainer, pl_module)

    def _enter(self, trainer: pl.Trainer, model: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        plan = model.plan(epoch)
        for action in plan.actions:
            if model.action_done(action, epoch):
                continue
            loader = push_loader(trainer)
            result = self.results[(epoch, action)] = model.run_action(action, loader, epoch)
            if action == "push":
                self._after_push(trainer, model, plan, result, loader)
            elif action == "prune":
                model.log("prune/num_pruned", float(len(result)), on_epoch=True, on_step=False)
        model.enter_phase(plan)
        model._phase_epoch = epoch

    def _after_push(self, trainer: pl.Trainer, model: pl.LightningModule, plan: Any, result: Any, loader: DataLoader) -> None:
        found = result.found & model.prototype_active()
        model.log("push/mean_distance", result.distance[found].mean(), on_epoch=True, on_step=False)
        if not (self.figures and trainer.is_global_zero):
            return
        names = getattr(trainer.datamodule, "class_names", None)
        fig = prototype_gallery(model, self.max_prototypes, class_names=names, source=loader.dataset)
        # Loggers that take images (wandb) get the gallery too; the PNG next to the checkpoints is always written.
        log_figure(fig, "push/prototypes", trainer.loggers, step=trainer.global_step, close=False)
        path = Path(trainer.default_root_dir) / self.dirname / f"prototypes_epoch{plan.epoch}.png"
        self.saved.append(save_figure(fig, path))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        watchers = [c for c in trainer.callbacks if c is not self]

        def tell(hook: str, *args: Any) -> None:
            for callback in watchers:
                if callable(getattr(callback, hook, None)):
                    getattr(callback, hook)(trainer, pl_module, *args)

        actions = pl_module.final_actions()
        loader = None
        if "push" in actions:
            if hasattr(trainer.datamodule, "push_dataloader"):
                loader = push_loader(trainer)
            else:  # fit on bare loaders: nothing to project onto
                rank_zero_warn(f"{type(pl_module).__name__}: no datamodule with push_dataloader(), so the push after "
                               "training is skipped")
                actions = tuple(a for a in actions if a != "push")
        tell("on_final_actions_start")
        for action in actions:
            result = self.results[(trainer.current_epoch, action)] = pl_module.run_action(action, loader, trainer.current_epoch)
            tell("on_phase_action_end", action, result)
        tell("on_final_actions_end")
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if self.final_checkpoint and folder:
            self.final = Path(folder) / "final.ckpt"
            trainer.save_checkpoint(self.final)
