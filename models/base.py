"""The shared LightningModule of the zoo and the common `Explanation` form.

Every model takes float images in [0, 1] (normalisation is its first layer), returns logits, and
explains its own decision with `explain()`. Batches are dicts with at least ``"image"`` and
``"label"`` (a plain ``(images, labels)`` tuple works too).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .phases import EpochPlan

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Explanation",
    "InterpretableClassifier",
    "Normalize",
    "NonFiniteLossError",
    "compile_with_fallback",
    "unpack_batch",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the term and the step."""


@dataclass
class Explanation:
    """What every model's `explain()` returns.

    Attributes:
        logits: (B, K) class scores.
        target: (B,) the explained class of each image.
        heatmap: (B, H, W) evidence for the target class at input resolution (higher = more evidence).
        evidence: family-specific details (prototype ids and patches, decision paths, part maps, ...).
    """

    logits: Tensor
    target: Tensor
    heatmap: Tensor
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction(self) -> Tensor:
        """(B,) the predicted class of each image (argmax of the logits)."""
        return self.logits.argmax(dim=1)


class Normalize(nn.Module):
    """Per-channel normalisation as a layer, so the model sees images in [0, 1]."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.channels_last = False  # set by InterpretableClassifier.apply_speed_options

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / self.std
        # The first layer of every model: converting here makes the whole network run channels_last.
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(images, labels) from a dict batch or a (images, labels, ...) tuple."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


def rng_states() -> dict[str, Any]:
    """torch, CUDA, Python and NumPy random states as tensors and plain values (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `rng_states`."""
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuples(states["python"]))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value: Any) -> Any:
    # Checkpoint round trips may turn tuples into lists; random.setstate insists on tuples.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def compile_with_fallback(module: nn.Module, **compile_kwargs: Any) -> bool:
    """`torch.compile` a module in place (as `nn.Module.compile`: parameters and state-dict keys are
    unchanged), falling back to eager execution with a warning where compiling fails.

    Compilation happens at the first call (and at recompiles), so a failure can only be seen there:
    the wrapper catches it, warns once, uncompiles the module and runs the call eagerly (a genuine
    error in the inputs then surfaces from the eager call). Returns False when torch.compile is not
    available here at all.
    """
    dynamo = getattr(torch, "_dynamo", None)
    if not hasattr(torch, "compile") or (dynamo is not None and not dynamo.is_dynamo_supported()):
        rank_zero_warn(f"torch.compile is not supported here; {type(module).__name__} runs eagerly")
        return False
    compiled = torch.compile(module._call_impl, **compile_kwargs)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any backend failure: no compiler, unsupported op, ...
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            rank_zero_warn(f"torch.compile of {type(module).__name__} failed ({type(error).__name__}: {first[:200]}); "
                           "running it eagerly")
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)

    # nn.Module.__call__ runs _compiled_call_impl when set (this is what nn.Module.compile does).
    module._compiled_call_impl = call
    return True


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class InterpretableClassifier(pl.LightningModule):
    """Base class: metrics, parameter groups with their own learning rates, and the `explain` contract.

    Args:
        num_classes: number of classes K.
        mean, std: normalisation applied inside the model.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (plain names keep checkpoints weights-only safe).
        lr: learning rate of every parameter group not named in `group_lr`.
        group_lr: learning rate per parameter group name (see `parameter_groups`).
        weight_decay: weight decay of every group.
        momentum: for SGD.
        scheduler: ``"none"``, ``"cosine"`` (over `trainer.max_epochs`) or ``"step"``.
        step_size, gamma: of the step scheduler.
        check_finite: stop with a clear message when a loss term is NaN or inf.
        skip_nonfinite: instead of stopping, skip training batches whose loss is not finite (they
            are counted in `skipped_batches` and logged as ``train/skipped_batches``).
        channels_last: run the network in the channels_last memory format (faster convolutions
            with cuDNN/oneDNN, above all under mixed precision); same results up to float rounding.
        compile_backbone: `torch.compile` the trunk (`speed_module`) in place: state-dict keys
            and checkpoints stay the same; where it fails, a warning and eager execution.

    `channels_last` and `compile_backbone` are applied by `apply_speed_options` (called by every Trainer
    entry point).
    """

    def __init__(
        self,
        num_classes: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        optimizer: Literal["adam", "adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        group_lr: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: Literal["none", "cosine", "step"] = "none",
        step_size: int = 10,
        gamma: float = 0.1,
        check_finite: bool = True,
        skip_nonfinite: bool = False,
        channels_last: bool = False,
        compile_backbone: bool = False,
    ) -> None:
        super().__init__()
        # Collects the init arguments of the whole subclass chain (plain YAML types only, so a
        # Lightning checkpoint loads with torch.load(weights_only=True)).
        self.save_hyperparameters()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.skipped_batches = 0
        self.normalize = Normalize(mean, std)
        metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1)}
        if num_classes >= 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5)
        # No compute groups: torchmetrics merges metrics whose states are equal after the first update,
        # and top-1 and top-5 agree whenever a first batch is all right or all wrong; merged, top-5 would
        # report top-1 for the rest of the epoch.
        collection = MetricCollection(metrics, compute_groups=False)
        self.train_metrics = collection.clone(prefix="train/")
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")

    # ----------------------------------------------------------------- to be provided by a family
    def forward(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def explain(self, images: Tensor, target: Tensor | None = None) -> Explanation:  # pragma: no cover
        """The model's own explanation of `target` (default: the prediction) for images (B, 3, H, W) in [0, 1]:
        logits, target, a (B, H, W) heatmap at input resolution and the family's evidence."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups; each can get its own learning rate through `group_lr`."""
        return {"all": [p for p in self.parameters() if p.requires_grad]}

    # ----------------------------------------------------------------- phases (see models.phases)
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The plan of a Lightning epoch (default: the current one); one phase unless a family declares more."""
        return EpochPlan("train", self.current_epoch if epoch is None else epoch)

    def enter_phase(self, plan: EpochPlan) -> None:
        """Set trainable parameters, learning rates and modes for the epoch's plan (called by the phase callback)."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Without the phase callback (a plain Trainer), a plan without data actions is still entered.
        if getattr(self, "_phase_epoch", None) != self.current_epoch:
            self.enter_phase(self.plan())
            self._phase_epoch = self.current_epoch

    def action_done(self, action: str, epoch: int) -> bool:
        """Whether the data action of `epoch` already ran (a resumed run does not repeat it)."""
        return False

    def final_actions(self) -> tuple[str, ...]:
        """Data actions after the last epoch, in order (ProtoTree: prune, then project)."""
        return ()

    def run_action(self, action: str, loader: Any, epoch: int) -> Any:
        """Run a data action of the plan (e.g. "push") over `loader`; returns what the action returns."""
        raise ValueError(f"{type(self).__name__} has no training action {action!r}")

    def compute_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the named loss terms; ``"loss"`` is the total that is minimised."""
        logits = self(images)
        ce = F.cross_entropy(logits, labels)
        return logits, {"loss": ce, "cross_entropy": ce}

    # ----------------------------------------------------------------- shared machinery
    def _target(self, logits: Tensor, target: Tensor | int | None) -> Tensor:
        if target is None:
            return logits.argmax(dim=1)
        if isinstance(target, int):
            return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
        return target.to(logits.device).long()

    def _check_finite(self, losses: dict[str, Tensor], stage: str) -> bool:
        """True when every loss term is finite; otherwise raise, or return False to skip the batch."""
        if not self.hparams.get("check_finite", True):
            return True
        bad = [name for name, value in losses.items() if not torch.isfinite(value).all()]
        if bad and stage == "train" and self.hparams.get("skip_nonfinite", False):
            self.skipped_batches += 1
            rank_zero_warn(f"skipping training batch at global step {self.global_step}: non-finite {', '.join(bad)}")
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
            return False
        if bad:
            raise NonFiniteLossError(
                f"non-finite {stage} loss term(s) {', '.join(bad)} at global step {self.global_step} "
                f"(epoch {self.current_epoch}): " + ", ".join(f"{n}={losses[n].item()}" for n in bad)
            )
        return True

    def batch_losses(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(logits, labels, losses) of one batch; a family may override it to skip work (ProtoPNet's
        cached last-layer epochs read the batch's sample indices instead of running the network)."""
        images, labels = unpack_batch(batch)
        logits, losses = self.compute_losses(images, labels)
        return logits, labels, losses

    def _shared_step(self, batch: Any, stage: str) -> Tensor | None:
        """Losses, metrics and logging of one batch; None when a non-finite batch is skipped."""
        # A skipped batch must leave no trace: its forward pass also moved BatchNorm statistics.
        saved = [b.detach().clone() for b in self.buffers()] if stage == "train" and self.hparams.get("skip_nonfinite") else None
        logits, labels, losses = self.batch_losses(batch, stage)
        if not self._check_finite(losses, stage):
            with torch.no_grad():
                for buffer, value in zip(self.buffers(), saved):
                    buffer.copy_(value)
            return None
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        on_step = stage == "train"
        self.log_dict(
            {f"{stage}/{name}": value.detach() for name, value in losses.items()},
            on_step=on_step, on_epoch=True, batch_size=labels.shape[0], sync_dist=not on_step,
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return losses["loss"]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images, _ = unpack_batch(batch)
        logits = self(images)
        return {"logits": logits, "prediction": logits.argmax(dim=1)}

    # ----------------------------------------------------------------- speed options
    def speed_module(self) -> nn.Module | None:
        """The trunk that `compile_backbone` compiles: ``backbone``, or a plain classifier's ``net``."""
        for name in ("backbone", "net"):
            module = getattr(self, name, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def apply_speed_options(self) -> None:
        """Apply `channels_last` and `compile_backbone` from the hyperparameters (idempotent).

        Call it yourself when using a model outside a Trainer; the Trainer calls it through
        `configure_model` (fit, validate, test and predict; families may override `setup`).
        """
        hp = self.hparams
        if hp.get("channels_last") and not self.normalize.channels_last:
            self.to(memory_format=torch.channels_last)  # 4-D parameters and buffers
            self.normalize.channels_last = True
        module = self.speed_module()
        if hp.get("compile_backbone") and module is not None and getattr(module, "_zoo_compiled", None) is None:
            module._zoo_compiled = compile_with_fallback(module)  # tried once, whatever the outcome
        elif hp.get("compile_backbone") and module is None:
            rank_zero_warn(f"compile_backbone: {type(self).__name__} has no 'backbone' or 'net' module; nothing compiled")

    def configure_model(self) -> None:
        self.apply_speed_options()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the model has num_classes={self.num_classes} but the data "
                f"({type(datamodule).__name__}) has {data_classes} classes"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets `models.load_pretrained` rebuild the model from a Lightning checkpoint without the CLI.
        checkpoint["zoo_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        # The random state (dropout, ...) at this step, so a resumed run draws what this one would have.
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and "rng_states" in checkpoint:  # resuming, not merely loading weights
            set_rng_states(checkpoint["rng_states"])

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        group_lr = dict(hp.get("group_lr") or {})
        groups = self.parameter_groups()
        unknown = set(group_lr) - set(groups)
        if unknown:
            raise ValueError(f"group_lr names unknown parameter group(s) {sorted(unknown)}; groups are {sorted(groups)}")
        param_groups = [
            {"params": params, "lr": group_lr.get(name, hp.lr), "name": name}
            for name, params in groups.items()
            if params
        ]
        kwargs: dict[str, Any] = {"weight_decay": hp.weight_decay}
        if hp.optimizer == "sgd":
            kwargs["momentum"] = hp.momentum
        optimizer = _OPTIMIZERS[hp.optimizer](param_groups, lr=hp.lr, **kwargs)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.trainer.max_epochs or 1, 1))
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
