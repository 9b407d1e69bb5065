"""ProtoPNet, "This Looks Like That" (Chen et al., NeurIPS 2019), as a LightningModule.

trunk -> add-on (1x1 convs ending in a sigmoid) -> squared L2 distance of every latent patch to P
prototypes (P x D x 1 x 1) -> global min pooling -> similarity log((d + 1) / (d + 1e-4)) -> linear
layer without bias (the official cfchen-duke/ProtoPNet settings).

Training follows the official schedule with manual optimisation and three optimisers (warm, joint,
last layer); the phase of every Lightning epoch is a pure function of the epoch
(`protopnet_schedule`), so a resumed run is in the right phase. Where the official code is
followed or corrected is marked "Official:" in comments.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .backbones import Backbone, ReceptiveField
from .base import Explanation
from .prototypes import PushResult, high_activation_boxes, l2_distances, similarity, upsample_maps
from .protopnet_cache import SimilarityCacheMixin
from .prototype_model import PrototypeModel
from .protopnet_schedule import PHASES, EpochPlan, check_schedule, protopnet_schedule
from .pretrained import PretrainedEntry, register_pretrained
from .registry import register_model

__all__ = ["EpochPlan", "PHASES", "ProtoPNet", "ProtoPNetEnsemble", "check_schedule", "protopnet_schedule"]


def _at_least_fp32(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32 and float64 (a double-precision model) stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ------------------------------------------------------------------------------------------- model
def _add_on_layers(kind: str, in_channels: int, dim: int) -> nn.Sequential:
    """``regular``: conv1x1 C->D, ReLU, conv1x1 D->D, sigmoid. ``bottleneck``: halving pairs down to D."""
    if kind == "regular":
        layers: list[nn.Module] = [nn.Conv2d(in_channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid()]
    elif kind == "bottleneck":
        layers, c = [], in_channels
        while c > dim or not layers:
            out = max(dim, c // 2)
            layers += [nn.Conv2d(c, out, 1), nn.ReLU(), nn.Conv2d(out, out, 1), nn.ReLU() if out > dim else nn.Sigmoid()]
            c //= 2
    else:
        raise ValueError(f"unknown add_on {kind!r}; expected 'regular' or 'bottleneck'")
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class ProtoPNet(SimilarityCacheMixin, PrototypeModel):
    """Prototypical part network.

    Args:
        num_classes: K.
        backbone, stage, pretrained_backbone: the trunk (see `Backbone`).
        prototypes_per_class: prototypes of each class (P = K x this, ordered by class).
        prototype_dim: D.
        add_on: ``"regular"`` (the official settings) or ``"bottleneck"``.
        similarity: ``"log"`` (log((d + 1) / (d + 1e-4))) or ``"linear"`` (-d). Deviation: the official
            main.py skips the last-layer passes after a push when the similarity is linear; here the schedule
            is the same for both (set last_layer_epochs to 1 and a zero last_layer_lr to skip them).
        cross_entropy_weight, cluster_weight, separation_weight, l1_weight: loss coefficients
            (1, 0.8, -0.08, 1e-4).
        num_warm_epochs, push_start, push_every, last_layer_epochs, num_train_epochs: the schedule
            (see `protopnet_schedule`); num_train_epochs None = repeat warm/joint/push forever.
        warm_lr_add_on, warm_lr_prototypes: warm Adam.
        joint_lr_backbone, joint_lr_add_on, joint_lr_prototypes, joint_lr_step_size, joint_lr_gamma:
            joint Adam with step decay.
        official_lr_offset: step the joint decay before each joint epoch as the official code does
            (x0.1 from the 5th joint epoch on); False = after (from the 6th).
        last_layer_lr: last-layer Adam.
        conv_weight_decay: of the backbone and add-on (prototypes and last layer: none).
        freeze_bn_stats: keep BatchNorm statistics of a frozen backbone fixed (official: they move).
        patch_size: side of the stored uint8 prototype patches.
        cache_last_layer: in last-layer epochs, train the last layer on the min distances of every
            training image computed once (after each push, or when a run resumes there) instead of
            running the network every pass; see `similarity_cache`.
        prune_epoch: Lightning epoch at whose start the prototypes are pruned (`prune`; a last-layer epoch
            after a push, e.g. the first epoch after the schedule's last push and its last-layer passes:
            extend trainer.max_epochs by the fine-tuning passes, officially 100 iterations); None = never.
        prune_k, prune_threshold: pruning's k nearest patches and own-class threshold (official 6, 3).
        **kwargs: `InterpretableClassifier` arguments (mean, std, check_finite); its optimiser
            arguments do not apply (the phases have their own).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet34",
        stage: int | None = None,
        pretrained_backbone: bool | str = False,
        prototypes_per_class: int = 10,
        prototype_dim: int = 128,
        add_on: Literal["regular", "bottleneck"] = "regular",
        similarity: Literal["log", "linear"] = "log",
        cross_entropy_weight: float = 1.0,
        cluster_weight: float = 0.8,
        separation_weight: float = -0.08,
        l1_weight: float = 1e-4,
        num_warm_epochs: int = 5,
        push_start: int = 10,
        push_every: int = 10,
        last_layer_epochs: int = 20,
        num_train_epochs: int | None = None,
        warm_lr_add_on: float = 3e-3,
        warm_lr_prototypes: float = 3e-3,
        joint_lr_backbone: float = 1e-4,
        joint_lr_add_on: float = 3e-3,
        joint_lr_prototypes: float = 3e-3,
        joint_lr_step_size: int = 5,
        joint_lr_gamma: float = 0.1,
        official_lr_offset: bool = True,
        last_layer_lr: float = 1e-4,
        conv_weight_decay: float = 1e-3,
        freeze_bn_stats: bool = False,
        patch_size: int = 32,
        cache_last_layer: bool = False,
        prune_epoch: int | None = None,
        prune_k: int = 6,
        prune_threshold: int = 3,
        **kwargs: Any,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"ProtoPNet needs num_classes >= 2 (separation needs other classes), got {num_classes}")
        super().__init__(num_classes=num_classes, **kwargs)
        if prototypes_per_class < 1 or prototype_dim < 1:
            raise ValueError(f"prototypes_per_class and prototype_dim must be >= 1, got {prototypes_per_class}, {prototype_dim}")
        if similarity not in ("log", "linear"):
            raise ValueError(f"unknown similarity {similarity!r}; expected 'log' or 'linear'")
        check_schedule(num_warm_epochs, push_start, push_every, last_layer_epochs, num_train_epochs)
        if prune_k < 1 or not 0 <= prune_threshold <= prune_k:
            raise ValueError(f"ProtoPNet pruning: need prune_k >= 1 and 0 <= prune_threshold <= prune_k, "
                             f"got prune_k={prune_k}, prune_threshold={prune_threshold}")
        self.automatic_optimization = False
        self.similarity_kind = similarity

        self.backbone = Backbone(backbone, stage=stage, pretrained=pretrained_backbone)
        self.add_on = _add_on_layers(add_on, self.backbone.out_channels, prototype_dim)
        num_prototypes = num_classes * prototypes_per_class
        self.prototype_vectors = nn.Parameter(torch.rand(num_prototypes, prototype_dim, 1, 1))
        identity = torch.zeros(num_prototypes, num_classes)
        identity[torch.arange(num_prototypes), torch.arange(num_prototypes) // prototypes_per_class] = 1
        self.register_buffer("prototype_class_identity", identity)
        self.last_layer = nn.Linear(num_prototypes, num_classes, bias=False)
        with torch.no_grad():  # 1 to the prototype's own class, -0.5 to the others
            self.last_layer.weight.copy_(identity.T - 0.5 * (1 - identity.T))

        # Push records, pre-registered with fixed shapes so that load_state_dict works.
        p = num_prototypes
        self.register_buffer("prototype_mask", torch.ones(p, dtype=torch.bool))  # False = pruned
        self.register_prototype_records(p, patch_size)  # push_epoch, source index, boxes, patches, ...
        self.phase = "warm"
        # Last-layer cache: (N, P) min distances by training sample index; not saved in checkpoints
        # (a resumed run rebuilds it), keyed by the tensors it depends on (models/protopnet_cache.py).
        self.similarity_cache: Tensor | None = None
        self._cache_key: tuple | None = None
        self._use_cache = False

    # ------------------------------------------------------------------------------ properties
    @property
    def num_prototypes(self) -> int:
        """P, pruned prototypes included."""
        return self.prototype_vectors.shape[0]

    @property
    def prototype_classes(self) -> Tensor:
        """(P,) class of each prototype."""
        return self.prototype_class_identity.argmax(dim=1)

    def receptive_field(self, image_size: int) -> ReceptiveField:
        """Of one latent cell (the add-on is 1x1, so the trunk's)."""
        return self.backbone.receptive_field(image_size)

    # --------------------------------------------------------------------------------- forward
    def latent(self, images: Tensor) -> Tensor:
        """z = add_on(trunk(normalise(images))): (B, D, h, w) in (0, 1)."""
        return self.add_on(self.backbone(self.normalize(images)))

    def distances(self, images: Tensor) -> Tensor:
        """Squared L2 distance of every latent patch to every prototype: (B, P, h, w), in float32.

        Under mixed precision the trunk runs in bf16/fp16 but the distances do not: a squared
        distance up to D in bf16 (8-bit mantissa) is off by ~D/256, which would move the
        log-similarities near 0, the cluster/separation minima and the push's nearest patch.
        """
        with self._fp32_distances() as latent:
            return l2_distances(latent(images), self.prototype_vectors)

    @contextlib.contextmanager
    def _fp32_distances(self) -> Iterator[Callable[[Tensor], Tensor]]:
        """Autocast off for what follows; yields a latent function that runs the trunk under the
        caller's autocast (the fast part) and returns float32 maps."""
        kind = self.device.type
        if not torch.is_autocast_enabled(kind):
            yield lambda images: _at_least_fp32(self.latent(images))
            return
        dtype = torch.get_autocast_dtype(kind)

        def latent(images: Tensor) -> Tensor:
            with torch.autocast(kind, dtype=dtype):
                return _at_least_fp32(self.latent(images))

        with torch.autocast(kind, enabled=False):
            yield latent

    def logits_from_distances(self, min_distances: Tensor) -> Tensor:
        """(B, K) logits from min distances (B, P): similarity, pruned prototypes masked, last layer."""
        sims = similarity(min_distances, self.similarity_kind)
        return self.last_layer(sims * self.prototype_mask)  # pruned prototypes contribute nothing

    def forward_with_distances(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (B, K), min_distances (B, P)) with global min pooling over the latent map."""
        min_distances = self.distances(images).amin(dim=(2, 3))
        return self.logits_from_distances(min_distances), min_distances

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_with_distances(images)[0]

    # ---------------------------------------------------------------------------------- losses
    def prototype_losses(self, min_distances: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Cluster, separation, average separation (logged only) and L1 terms.

        Masked minima (masked_fill(+inf).amin) instead of the official `max_dist - ...` trick,
        which is only exact while every distance is <= D.
        """
        identity = self.prototype_class_identity.bool()
        own = identity[:, labels].T & self.prototype_mask  # (B, P)
        wrong = ~identity[:, labels].T & self.prototype_mask
        inf = torch.full_like(min_distances, float("inf"))
        cluster = torch.where(own, min_distances, inf).amin(dim=1)
        # A class whose prototypes were all pruned has nothing to pull: its term is 0, not inf.
        cluster = torch.where(own.any(dim=1), cluster, torch.zeros_like(cluster))
        separation = torch.where(wrong, min_distances, inf).amin(dim=1)
        avg_separation = (min_distances * wrong).sum(dim=1) / wrong.sum(dim=1).clamp_min(1)
        l1 = (self.last_layer.weight * (1 - self.prototype_class_identity.T)).abs().sum()
        return {
            "cluster": cluster.mean(),
            "separation": separation.mean(),
            "avg_separation": avg_separation.mean(),
            "l1": l1,
        }

    def compute_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, min_distances = self.forward_with_distances(images)
        return logits, self.losses_from_distances(logits, min_distances, labels)

    def losses_from_distances(self, logits: Tensor, min_distances: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The loss terms and their weighted total ("loss") from logits and min distances (B, P)."""
        hp = self.hparams
        terms = {"cross_entropy": F.cross_entropy(logits, labels), **self.prototype_losses(min_distances, labels)}
        total = (
            hp.cross_entropy_weight * terms["cross_entropy"]
            + hp.cluster_weight * terms["cluster"]
            + hp.separation_weight * terms["separation"]
            + hp.l1_weight * terms["l1"]
        )
        if self.training:  # the official "p dist pair": mean pairwise squared distance of the prototypes
            terms["prototype_pair_distance"] = self._prototype_pair_distance()
        return {"loss": total, **terms}

    def _prototype_pair_distance(self) -> Tensor:
        # O(P^2 D) per step, more than a cached last-layer step itself (P = 2000): recomputed only
        # when the prototypes changed (an in-place update bumps the tensor's version).
        protos = self.prototype_vectors
        key = (protos.data_ptr(), protos._version)
        if getattr(self, "_pair_distance", (None,))[0] != key:
            flat = protos.detach().flatten(1)
            self._pair_distance = (key, torch.cdist(flat, flat).pow(2).mean())
        return self._pair_distance[1]

    # ---------------------------------------------------------------------------------- phases
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The schedule's plan for a Lightning epoch (default: the current one), with the pruning at
        `prune_epoch`."""
        hp = self.hparams
        epoch = self.current_epoch if epoch is None else epoch
        plan = protopnet_schedule(epoch, hp.num_warm_epochs, hp.push_start, hp.push_every, hp.last_layer_epochs,
                                  hp.num_train_epochs)
        if hp.get("prune_epoch") is not None and epoch == hp.prune_epoch:
            # A last-layer epoch always follows a push: those of a push epoch, and those after a bounded
            # schedule, which ends on a push epoch (check_schedule).
            if plan.phase != "last":
                raise ValueError(f"ProtoPNet schedule: prune_epoch={epoch} must be a last-layer epoch after a push "
                                 f"(epoch {epoch} is {plan.phase!r})")
            plan = EpochPlan(plan.phase, plan.epoch, (*plan.actions, "prune"), plan.joint_epochs)
        return plan

    def action_done(self, action: str, epoch: int) -> bool:
        # A pruning can run again on resume: the same nearest patches prune nothing more.
        return action == "push" and int(self.push_epoch) == epoch

    def run_action(self, action: str, loader: Iterable, epoch: int) -> Any:
        if action == "push":
            return self.push(loader, epoch=epoch)
        if action == "prune":
            return self.prune(loader, k=self.hparams.prune_k, threshold=self.hparams.prune_threshold)
        return super().run_action(action, loader, epoch)

    def schedule_length(self) -> int | None:
        """Lightning epochs needed to finish `num_train_epochs` (None when unbounded)."""
        hp = self.hparams
        if hp.num_train_epochs is None:
            return None
        pushes = sum(e >= hp.push_start and e % hp.push_every == 0 for e in range(hp.num_train_epochs))
        return hp.num_train_epochs + pushes * hp.last_layer_epochs

    def phase_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """The parts the training phases freeze and unfreeze, by name."""
        return {"backbone": self.backbone, "add_on": self.add_on, "prototypes": self.prototype_vectors,
                "last_layer": self.last_layer}

    def set_phase(self, phase: str) -> None:
        """Switch `requires_grad` to the phase.

        warm: add-on + prototypes; joint: backbone + add-on + prototypes; last: last layer.
        Official: the last layer keeps requires_grad=True in warm and joint but is in neither
        optimiser, so it never changes there; we freeze it instead, which trains identically and
        skips its gradient.
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        trainable = {"warm": {"add_on", "prototypes"}, "joint": {"backbone", "add_on", "prototypes"},
                     "last": {"last_layer"}}[phase]
        for name, part in self.phase_modules().items():
            params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            for p in params:
                p.requires_grad_(name in trainable)
                p.grad = None
        self.phase = phase
        self.train(self.training)  # re-applies freeze_bn_stats

    def train(self, mode: bool = True) -> "ProtoPNet":
        super().train(mode)
        # Official: BN statistics of the frozen trunk keep moving in warm and last-layer phases
        # (model.train() throughout). freeze_bn_stats=True holds them instead.
        if mode and self.hparams.get("freeze_bn_stats") and getattr(self, "phase", "warm") != "joint":
            self.backbone.eval()
        return self

    def _lr_factor(self, joint_epochs: int) -> float:
        hp = self.hparams
        # Official: joint_lr_scheduler.step() runs *before* each joint epoch's training (the
        # pre-1.1 PyTorch idiom), so the k-th joint epoch runs at gamma^floor(k / step_size).
        steps = joint_epochs if hp.official_lr_offset else joint_epochs - 1
        return hp.joint_lr_gamma ** (max(steps, 0) // hp.joint_lr_step_size)

    def on_fit_start(self) -> None:
        total = self.schedule_length()
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if total is not None and max_epochs is not None and 0 <= max_epochs < total:
            warnings.warn(f"the ProtoPNet schedule needs {total} epochs but trainer.max_epochs={max_epochs}", stacklevel=2)
        batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
        if (self.hparams.get("cache_last_layer") and not self.hparams.freeze_bn_stats
                and any(isinstance(m, batch_norms) for m in self.backbone.modules())):
            rank_zero_warn("cache_last_layer: last-layer epochs train on the eval-mode network, so the trunk's "
                           "BatchNorm statistics stay fixed there (as with freeze_bn_stats=True; officially they move)")

    def enter_phase(self, plan: EpochPlan) -> None:
        if plan.push and int(self.push_epoch) != self.current_epoch:
            raise RuntimeError(
                f"epoch {self.current_epoch} starts the last-layer phase after the push of official epoch "
                f"{plan.epoch}, but no push ran: add train.phases.Phases to trainer.callbacks"
            )
        self.set_phase(plan.phase)
        if plan.phase == "joint":
            # The lr is a function of the epoch (no scheduler state to drift on resume).
            joint = self.optimizers()[PHASES.index("joint")].optimizer
            for group in joint.param_groups:
                group["lr"] = group["initial_lr"] * self._lr_factor(plan.joint_epochs)
        self._use_cache = plan.phase == "last" and bool(self.hparams.get("cache_last_layer")) and self._prepare_cache()
        if not self._use_cache:
            self.invalidate_similarity_cache()  # outside the cached phase it is stale or unused: free it

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.invalidate_similarity_cache()  # a resumed run in a last-layer epoch rebuilds it

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        optimizer = self.optimizers()[PHASES.index(self.phase)]
        loss = self._shared_step(batch, "train")
        if loss is None:  # a non-finite batch skipped by the base class (skip_nonfinite)
            return None
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        if self.phase == "last" and not self.prototype_mask.all():
            # Official: pruned prototypes are removed with their columns. Adam's moments would move the
            # masked columns away from 0, so they are held at exactly 0 after every step.
            with torch.no_grad():
                self.last_layer.weight[:, ~self.prototype_mask] = 0
        return loss.detach()

    def on_validation_epoch_end(self) -> None:
        # val/acc_pushed: validation accuracy of a pushed model, -1 while the prototypes are not the
        # pushed ones, so that ModelCheckpoint(monitor="val/acc_pushed") only selects interpretable models.
        pushed = self.plan().phase == "last" and int(self.push_epoch) >= 0
        acc = self.val_metrics["acc"].compute() if pushed else torch.full((), -1.0, device=self.device)
        self.log("val/acc_pushed", acc, sync_dist=False)  # compute() already syncs across ranks

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        if hp.get("group_lr"):
            raise ValueError("ProtoPNet's learning rates are per phase (warm_lr_*, joint_lr_*, last_layer_lr), not group_lr")
        wd = hp.conv_weight_decay
        add_on, backbone = list(self.add_on.parameters()), list(self.backbone.parameters())
        warm = torch.optim.Adam([
            {"params": add_on, "lr": hp.warm_lr_add_on, "weight_decay": wd, "name": "add_on"},
            {"params": [self.prototype_vectors], "lr": hp.warm_lr_prototypes, "name": "prototypes"},
        ])
        joint = torch.optim.Adam([
            {"params": backbone, "lr": hp.joint_lr_backbone, "weight_decay": wd, "name": "backbone"},
            {"params": add_on, "lr": hp.joint_lr_add_on, "weight_decay": wd, "name": "add_on"},
            {"params": [self.prototype_vectors], "lr": hp.joint_lr_prototypes, "name": "prototypes"},
        ])
        for group in joint.param_groups:
            group["initial_lr"] = group["lr"]
        last = torch.optim.Adam([{"params": self.last_layer.parameters(), "lr": hp.last_layer_lr, "name": "last_layer"}])
        return [warm, joint, last]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()), "add_on": list(self.add_on.parameters()),
                "prototypes": [self.prototype_vectors], "last_layer": list(self.last_layer.parameters())}

    # ----------------------------------------------------------------------- prototype interface
    def prototype_tensor(self) -> Tensor:
        return self.prototype_vectors.flatten(1)

    def assign_prototypes(self, ids: Tensor, vectors: Tensor) -> None:
        self.prototype_vectors.data[ids] = vectors.to(self.prototype_vectors).view(len(ids), -1, 1, 1)

    def similarity(self, distances: Tensor) -> Tensor:
        """log((d + 1) / (d + 1e-4)) or -d, by the model's `similarity` argument."""
        return similarity(distances, self.similarity_kind)

    def prototype_class_connection(self) -> Tensor:
        """(P, K) the last layer's weights (pruned prototypes' columns are zero)."""
        return self.last_layer.weight.T

    def prototype_active(self) -> Tensor:
        return self.prototype_mask

    def push_classes(self) -> Tensor:
        """A prototype is pushed onto images of its own class."""
        return self.prototype_class_identity.bool()

    def push_latent(self):
        return self._fp32_distances()

    def on_push(self, result: PushResult) -> None:
        self.invalidate_similarity_cache()

    # --------------------------------------------------------------------- pruning and analysis
    @torch.no_grad()
    def prune(self, loader: Iterable, k: int = 6, threshold: int = 3) -> Tensor:
        """Prune prototypes with fewer than `threshold` of their `k` nearest patches from their own class.

        Deviation: the official code slices the prototypes out; we mask them (prototype_mask, and
        their last-layer columns are zeroed), which gives the same logits and keeps parameter
        shapes, optimiser state and checkpoints valid. Returns the ids pruned now.
        """
        nearest = self.nearest_patches(loader, k)
        own = (nearest.label == self.prototype_classes[:, None]).sum(dim=1)
        pruned = (own < threshold) & self.prototype_mask
        self.prototype_mask &= ~pruned
        self.last_layer.weight[:, pruned] = 0
        self.invalidate_similarity_cache()  # its min distances still hold, but keep the rule simple: pushes and prunings rebuild it
        return pruned.nonzero().squeeze(1)

    # ------------------------------------------------------------------------------ explanation
    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | int | None = None, top_k: int = 10,
                percentile: float = 95.0) -> Explanation:
        """The top-k most activated prototypes of each image, and a heatmap for the target class.

        heatmap: sum over the target class's prototypes j of w[target, j] x the bicubically
        upsampled similarity map of j (bicubic is linear, so summing before upsampling is exact).

        evidence (k = top_k, per image): ``prototype_ids`` (B, k), ``similarity``, ``weight`` (last-layer
        weight to the target), ``contribution`` (similarity x weight), ``prototype_class``,
        ``prototype_patch`` (B, k, 3, S, S) uint8, ``prototype_box`` and ``prototype_rf_box`` (boxes in
        the source image, x0, y0, x1, y1), ``prototype_source_index``, ``activation_map`` (B, k, H, W)
        on the test image, ``box`` (B, k, 4) its `percentile` box, and ``boxes`` (B, 4) the box of the heatmap.
        """
        size = tuple(images.shape[-2:])
        maps = self.distances(images)  # (B, P, h, w)
        min_distances = maps.amin(dim=(2, 3))
        logits = self.logits_from_distances(min_distances)
        target = self._target(logits, target)
        sim_maps = self.similarity(maps)
        weights = self.last_layer.weight[target]  # (B, P)
        ids = self.top_prototypes(sim_maps, top_k)
        of_target = self.prototype_class_identity.bool()[:, target].T & self.prototype_mask
        heat = torch.einsum("bp,bphw->bhw", weights * of_target, sim_maps)
        heatmap = upsample_maps(heat, size)
        evidence = self.prototype_evidence(sim_maps, weights, ids, size, percentile)
        evidence["boxes"] = high_activation_boxes(heat, size, percentile)[0]
        return Explanation(logits=logits, target=target, heatmap=heatmap, evidence=evidence)


# ---------------------------------------------------------------------------------------- ensemble
class ProtoPNetEnsemble(nn.Module):
    """Sum of the logits of several ProtoPNets (the paper's ensembles of VGG19, ResNet34 and DenseNet121)."""

    def __init__(self, models: Sequence[ProtoPNet]) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        classes = {m.num_classes for m in models}
        if len(classes) != 1:
            raise ValueError(f"ensemble members disagree on num_classes: {sorted(classes)}")
        self.models = nn.ModuleList(models)
        self.num_classes = classes.pop()

    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], map_location: str | torch.device = "cpu") -> "ProtoPNetEnsemble":
        """Load each Lightning checkpoint with `ProtoPNet.load_from_checkpoint`."""
        return cls([ProtoPNet.load_from_checkpoint(p, map_location=map_location) for p in paths])

    def forward(self, images: Tensor) -> Tensor:
        return torch.stack([m(images) for m in self.models]).sum(dim=0)


# ---------------------------------------------------------------------------------------- builders
def _protopnet(backbone: str, default_dim: int, **kwargs: Any) -> ProtoPNet:
    kwargs.setdefault("num_classes", 200)
    kwargs.setdefault("prototype_dim", default_dim)
    return ProtoPNet(backbone=backbone, **kwargs)


@register_model
def protopnet_vgg19(**kwargs: Any) -> ProtoPNet:
    """VGG-19 trunk, D = 128 (the official notebook's choice), 10 prototypes per class."""
    return _protopnet("vgg19", 128, **kwargs)


@register_model
def protopnet_resnet34(**kwargs: Any) -> ProtoPNet:
    """ResNet-34 trunk, D = 256."""
    return _protopnet("resnet34", 256, **kwargs)


@register_model
def protopnet_densenet121(**kwargs: Any) -> ProtoPNet:
    """DenseNet-121 trunk, D = 128."""
    return _protopnet("densenet121", 128, **kwargs)


@register_model
def protopnet_resnet18(**kwargs: Any) -> ProtoPNet:
    """ResNet-18 trunk, D = 128."""
    return _protopnet("resnet18", 128, **kwargs)


@register_model
def protopnet_test_resnet(**kwargs: Any) -> ProtoPNet:
    """timm's tiny `test_resnet` trunk, D = 16, 2 prototypes per class: for tests."""
    kwargs.setdefault("num_classes", 4)
    kwargs.setdefault("prototypes_per_class", 2)
    return _protopnet("test_resnet", 16, **kwargs)


register_pretrained(PretrainedEntry(
    name="protopnet_resnet18.synthparts", class_path="models.protopnet.ProtoPNet",
    dataset="SyntheticParts (10 classes, 64 px)", config="configs/protopnet/synthetic.yaml",
    notes="ResNet-18 cut after layer3, 4 prototypes per class (D = 64), pushed onto the train split, last layer "
          "optimised, pruned (k = 6, threshold 3: 40 -> 32 prototypes), last layer optimised again; the file "
          "carries each prototype's patch, source index and boxes",
))


register_pretrained(PretrainedEntry(
    name="protopnet_resnet18.synthparts128", class_path="models.protopnet.ProtoPNet",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/protopnet/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml",),
    notes="the synthparts recipe at 128 px (8 x 8 latent grid, the CUB-like operating point of the comparison)",
))
