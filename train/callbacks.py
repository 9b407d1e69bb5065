"""Callbacks shared by all families."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from explain.viz import explanation_grid, save_figure

__all__ = ["ExplanationFigures"]


class ExplanationFigures(pl.Callback):
    """At the end of fit, explain the first `num_images` test images and save a PNG grid.

    The figure goes to ``<run>/figures/explanations.png`` (and to the logger when it takes images).

    Args:
        num_images: how many test images to explain.
        dirname: sub-folder of the run folder.
    """

    def __init__(self, num_images: int = 8, dirname: str = "figures") -> None:
        self.num_images = num_images
        self.dirname = dirname
        self.saved: list[Path] = []

    def _images(self, trainer: pl.Trainer) -> dict | None:
        dm = trainer.datamodule
        if dm is None:
            return None
        loader = dm.test_dataloader()
        batch = next(iter(loader))
        return {k: v[: self.num_images] for k, v in batch.items()} if isinstance(batch, dict) else {
            "image": batch[0][: self.num_images], "label": batch[1][: self.num_images]}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "explain"):
            return
        batch = self._images(trainer)
        if batch is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        images = batch["image"].to(pl_module.device)
        with torch.inference_mode(False), torch.enable_grad():
            explanation = pl_module.explain(images)
        pl_module.train(was_training)
        class_names = getattr(trainer.datamodule, "class_names", None)
        fig = explanation_grid(
            images.cpu(), explanation.heatmap.cpu(), labels=batch["label"], predictions=explanation.prediction.cpu(),
            class_names=class_names, boxes=explanation.evidence.get("boxes"),
            title=f"{type(pl_module).__name__}: explanation of the predicted class",
        )
        path = save_figure(fig, Path(trainer.default_root_dir) / self.dirname / "explanations.png")
        self.saved.append(path)
