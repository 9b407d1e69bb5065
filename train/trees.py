"""ProtoTree's evaluation around its after-training pruning and projection, and its figures.

Nauta et al. (CVPR 2021), section 3.3 and the official prune and project scripts. The pruning threshold and the
projection are the model's (``prune_threshold``, ``project``); the evaluation is declared in a config's
``trainer.callbacks`` list::

    - class_path: train.trees.ProtoTreePipeline
      init_args: {eval_split: test}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from explain.viz import render_tree, save_figure, tree_path_figure
from models.base import unpack_batch
from models.prototree import ProtoTree

__all__ = ["ProtoTreePipeline", "check_tree_schedule", "evaluate_tree", "tree_depth"]


def tree_depth(model: ProtoTree) -> int:
    """Depth of the pruned tree: the most decision nodes on a root-to-leaf path."""
    leaves = torch.nonzero(model.kept_leaves())[:, 0]
    nodes = model.leaf_nodes_path(leaves)
    return int((model.forced_route[nodes] < 0).sum(dim=1).max())


@torch.no_grad()
def evaluate_tree(model: ProtoTree, loader: Any, device: torch.device | str | None = None) -> dict[str, float]:
    """Accuracy of the distributed, sample_max and greedy routings, their fidelity to the distributed
    prediction (fraction of images with the same class) and their mean path length, over `loader`."""
    device = device or model.device
    correct = {"distributed": 0, "sample_max": 0, "greedy": 0}
    agree = {"sample_max": 0, "greedy": 0}
    length = {"sample_max": 0, "greedy": 0}
    total = 0
    for batch in loader:
        images, labels = unpack_batch(batch)
        images, labels = images.to(device), labels.to(device)
        modes = model.predict_modes(images)
        total += len(labels)
        for mode in correct:
            correct[mode] += int((modes[mode] == labels).sum())
        for mode in agree:
            agree[mode] += int((modes[mode] == modes["distributed"]).sum())
            length[mode] += int(modes[f"{mode}_path_length"].sum())
    if total == 0:
        raise ValueError("evaluate_tree got an empty loader")
    result = {f"acc_{m}": c / total for m, c in correct.items()}
    result.update({f"fidelity_{m}": a / total for m, a in agree.items()})
    result.update({f"path_length_{m}": n / total for m, n in length.items()})
    result.update(num_prototypes=float(len(model.structure().internal)), num_leaves=float(int(model.kept_leaves().sum())),
                  depth=float(tree_depth(model)))
    return result


def check_tree_schedule(freeze_epochs: int, milestones: list[int], max_epochs: int | None = None) -> None:
    """Raise a one-line ValueError naming the keys and values of an impossible ProtoTree schedule:
    negative freeze_epochs, milestones that are not increasing integers >= 1 (MultiStepLR would
    silently ignore or merge them). Warns when the trunk group stays frozen for the whole run."""
    if isinstance(freeze_epochs, bool) or not isinstance(freeze_epochs, int) or freeze_epochs < 0:
        raise ValueError(f"ProtoTree schedule: freeze_epochs={freeze_epochs!r} must be an integer >= 0")
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones):
        raise ValueError(f"ProtoTree schedule: milestones={milestones} must be integers >= 1")
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"ProtoTree schedule: milestones={milestones} must be strictly increasing")
    if max_epochs is not None and freeze_epochs >= max_epochs > 0:  # legitimate for smoke runs: warn only
        rank_zero_warn(f"ProtoTree schedule: freeze_epochs={freeze_epochs} >= trainer.max_epochs={max_epochs}: "
                       "the frozen trunk group never trains in this run")


class ProtoTreePipeline(pl.Callback):
    """Evaluates a ProtoTree around its after-training actions (pruning, projection; declared by the model,
    `ProtoTree.final_actions`, run by `train.phases.Phases`), then renders it.

    The routing modes are evaluated on the trained tree, after the pruning and after the projection. Results go
    to ``<run>/prototree.json`` and the loggers (``tree/<stage>/<metric>``); the final tree is saved as
    ``<run>/checkpoints/pruned_and_projected.ckpt``; the rendered tree and local explanations of the first test
    images go to ``<run>/<dirname>/``.

    Args:
        eval_split: ``"test"`` (as the paper) or ``"val"``.
        source: ``"current"`` (the model at the end of training, as the official script) or ``"best"``
            (load the best checkpoint of the first ModelCheckpoint first).
        render: write the tree (SVG with Graphviz, else DOT) and local explanation figures.
        num_local_explanations: test images explained by their decision path.
        dirname: sub-folder of the run folder for figures.
        test_final_tree: point the ModelCheckpoint's best path at the saved final tree, so that the CLI's
            test after fit (``ckpt_path="best"``) tests the pruned and projected tree.
    """

    def __init__(
        self,
        eval_split: Literal["test", "val"] = "test",
        source: Literal["current", "best"] = "current",
        render: bool = True,
        num_local_explanations: int = 4,
        dirname: str = "figures",
        test_final_tree: bool = True,
    ) -> None:
        if eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
        if source not in ("current", "best"):
            raise ValueError(f"source must be 'current' or 'best', got {source!r}")
        if num_local_explanations < 0:
            raise ValueError(f"num_local_explanations must be >= 0, got {num_local_explanations}")
        self.eval_split, self.source, self.render = eval_split, source, render
        self.num_local_explanations, self.dirname, self.test_final_tree = num_local_explanations, dirname, test_final_tree
        self.results: dict[str, Any] = {}
        self.checkpoint: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Config faults fail here, before training, not after it."""
        if stage != "fit":
            return
        if not isinstance(pl_module, ProtoTree):
            raise TypeError(f"ProtoTreePipeline needs a ProtoTree model, got {type(pl_module).__name__}")
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("ProtoTreePipeline needs a datamodule (for the push and evaluation loaders)")
        if "push" in pl_module.final_actions() and not hasattr(datamodule, "push_dataloader"):
            raise ValueError(f"the ProtoTree projects after training and needs a datamodule with push_dataloader(); "
                             f"{type(datamodule).__name__} has none")
        check_tree_schedule(pl_module.hparams.get("freeze_epochs", 0), list(pl_module.hparams.get("milestones") or []),
                            trainer.max_epochs)

    def _loader(self, trainer: pl.Trainer) -> Any:
        return getattr(trainer.datamodule, f"{self.eval_split}_dataloader")()

    def on_final_actions_start(self, trainer: pl.Trainer, pl_module: ProtoTree) -> None:
        """Evaluate the trained tree (the best checkpoint's with ``source='best'``) before pruning and projection."""
        self._was_training = pl_module.training
        pl_module.eval()
        if self.source == "best" and trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
            state = torch.load(trainer.checkpoint_callback.best_model_path, map_location=pl_module.device, weights_only=True)
            pl_module.load_state_dict(state["state_dict"])
        self.results = {"trained": evaluate_tree(pl_module, self._loader(trainer))}

    def on_phase_action_end(self, trainer: pl.Trainer, pl_module: ProtoTree, action: str, result: Any) -> None:
        """Evaluate the tree after each action (prune, push)."""
        pl_module.eval()
        if action == "prune":
            self.results["removed_nodes"] = result
            self.results["pruned"] = evaluate_tree(pl_module, self._loader(trainer))
        elif action == "push":
            self.results["projected_prototypes"] = int(result.found.sum())
            stage = "pruned_and_projected" if "pruned" in self.results else "projected"
            self.results[stage] = evaluate_tree(pl_module, self._loader(trainer))

    def on_final_actions_end(self, trainer: pl.Trainer, pl_module: ProtoTree) -> None:
        """Write ``prototree.json`` and the figures of the final tree into the run folder."""
        run_dir = Path(trainer.default_root_dir)
        if trainer.is_global_zero:
            self._write(trainer, pl_module, run_dir, self.results)
        self.checkpoint = run_dir / "checkpoints" / "pruned_and_projected.ckpt"
        trainer.save_checkpoint(self.checkpoint)
        if self.test_final_tree:
            for callback in trainer.checkpoint_callbacks:
                callback.best_model_path = str(self.checkpoint)
        pl_module.train(self._was_training)

    def _write(self, trainer: pl.Trainer, model: ProtoTree, run_dir: Path, results: dict[str, Any]) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "prototree.json").write_text(json.dumps(results, indent=2))
        metrics = {f"tree/{stage}/{k}": v for stage, r in results.items() if isinstance(r, dict) for k, v in r.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if not self.render:
            return
        class_names = getattr(trainer.datamodule, "class_names", None)
        figures = run_dir / self.dirname
        render_tree(model, figures / "tree.svg", class_names=class_names)
        if self.num_local_explanations <= 0:
            return
        images, _ = unpack_batch(next(iter(trainer.datamodule.test_dataloader())))
        images = images[: self.num_local_explanations].to(model.device)
        explanation = model.explain(images)
        for i in range(len(images)):
            fig = tree_path_figure(model, images[i].cpu(), explanation, index=i, class_names=class_names)
            save_figure(fig, figures / "local_explanations" / f"test_{i}.png")
