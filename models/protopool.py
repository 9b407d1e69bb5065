"""ProtoPool, "Interpretable Image Classification with Differentiable Prototypes Assignment" (Rymarczyk et al.,
ECCV 2022), as a LightningModule following the official gmum/ProtoPool code.

trunk -> add-on (1x1 conv + sigmoid) -> squared L2 distance of every latent patch to a pool of P prototypes
(P x D x 1 x 1) -> min- and average-pooled distances (B, P) -> mixed by the slot assignment q (C, P, S) ->
focal similarity g = φ(D_min) - φ(D_avg) (B, C, S) -> linear layer C S -> C without bias (init 1 on the class's
own slots, 0 elsewhere). The maths are in `models.protopool_ops`.

Schedule (official ``main.py``; Lightning epoch L trains official epoch L + 1, since official epoch 0 only
evaluates): warm (official epochs < warmup_time: add-on, prototypes and slot logits) | joint (+ trunk, StepLR(5,
0.1) per epoch) | at the start of the first last-layer epoch, the push through the shared projection, each
prototype onto images of the classes whose slots select it | last_layer_epochs of the last layer alone. The
Gumbel scale of official epoch e is `gumbel_scale(e)`. Where the official code is followed or changed is marked
"Official:" in comments.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone
from .base import Explanation
from .phases import EpochPlan
from .pretrained import PretrainedEntry, register_pretrained
from .protopool_ops import cluster_separation, focal_similarity, gumbel_scale, log_similarity, orthogonality, slot_assignment
from .prototype_model import PrototypeModel
from .prototypes import PushResult, high_activation_boxes, l2_distances, upsample_maps
from .registry import register_model

__all__ = ["PHASES", "ProtoPool"]

PHASES = ("warm", "joint", "last")
_TRAINABLE = {"warm": {"add_on", "prototypes", "slots"}, "joint": {"backbone", "add_on", "prototypes", "slots"},
              "last": {"last_layer"}}


class ProtoPool(PrototypeModel):
    """Prototype pool with differentiable slot assignment.

    Args:
        num_classes: C.
        backbone, stage, pretrained_backbone: the trunk (see `Backbone`); official: the whole ResNet-50.
        num_prototypes: P, the pool (official CUB 202, Cars 195).
        slots_per_class: S (official 10).
        prototype_dim: D (official CUB 256, Cars 128).
        use_last_layer: the C S -> C linear layer (official ``--last_layer``); False = logits Σ_s g.
        gumbel: the Gumbel-softmax schedule (``--pp_gumbel``); False = softmax(Π) throughout.
        gumbel_time, gumbel_tau: T and tau of the schedule (official 30, 0.5).
        mixup_alpha: mixup with λ ~ Beta(α, α) in every training phase (``--mixup_data``: 0.5); 0 = off.
        cluster_weight, separation_weight, l1_weight, orthogonality_weight: loss coefficients
            (official 0.8, -0.08, 1e-4, 1 with ``--pp_ortho``).
        lr: the official ``--lr``: warm and joint add-on, prototypes and slots at 3 lr, joint trunk lr / 10,
            last layer lr / 10; weight decay 1e-3 on trunk, add-on and last layer.
        joint_lr_backbone: the joint trunk lr instead of lr / 10 (a trunk trained from scratch needs more).
        warmup_time: the official epoch at which the joint phase starts (``--warmup_time``).
        num_train_epochs: the official ``--epochs`` (epoch 0 only evaluates, so num_train_epochs - 1 train).
        joint_lr_step_size, joint_lr_gamma: StepLR of the joint optimiser (official 5, 0.1).
        plateau_patience, plateau_factor: ``--use_scheduler``: lrs x factor after every epoch with more than
            `patience` epochs without a lower validation loss or a higher validation accuracy; None = off.
        last_layer_epochs: fine-tuning epochs after the push (official 25), lr x last_layer_decay every
            last_layer_decay_every epochs (official 0.95, 5).
        freeze_bn_stats: keep trunk BatchNorm statistics fixed outside the joint phase (official: they move;
            then the fine-tuning shifts the latent maps away from the pushed prototypes).
        zero_unassigned: the push sets prototypes that no slot selects to zero (official).
        patch_size: side of the stored uint8 prototype patches.
        **kwargs: `InterpretableClassifier` arguments (mean, std, check_finite).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        stage: int | None = None,
        pretrained_backbone: bool | str = False,
        num_prototypes: int = 202,
        slots_per_class: int = 10,
        prototype_dim: int = 256,
        use_last_layer: bool = True,
        gumbel: bool = True,
        gumbel_time: int = 30,
        gumbel_tau: float = 0.5,
        mixup_alpha: float = 0.5,
        cluster_weight: float = 0.8,
        separation_weight: float = -0.08,
        l1_weight: float = 1e-4,
        orthogonality_weight: float = 1.0,
        lr: float = 1e-3,
        joint_lr_backbone: float | None = None,
        warmup_time: int = 10,
        num_train_epochs: int = 100,
        joint_lr_step_size: int = 5,
        joint_lr_gamma: float = 0.1,
        plateau_patience: int | None = 5,
        plateau_factor: float = 0.95,
        last_layer_epochs: int = 25,
        last_layer_decay: float = 0.95,
        last_layer_decay_every: int = 5,
        freeze_bn_stats: bool = False,
        zero_unassigned: bool = True,
        patch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, lr=lr, **kwargs)
        if num_classes < 2:
            raise ValueError(f"ProtoPool needs num_classes >= 2, got {num_classes}")
        if not 1 <= slots_per_class <= num_prototypes:
            raise ValueError(f"ProtoPool needs 1 <= slots_per_class <= num_prototypes, got {slots_per_class}, {num_prototypes}")
        if not 1 <= warmup_time < num_train_epochs:
            raise ValueError(f"ProtoPool schedule: need 1 <= warmup_time < num_train_epochs, got {warmup_time}, {num_train_epochs}")
        if last_layer_epochs < 1 or gumbel_time < 1 or joint_lr_step_size < 1 or last_layer_decay_every < 1:
            raise ValueError("ProtoPool schedule: last_layer_epochs, gumbel_time, joint_lr_step_size and "
                             "last_layer_decay_every must be >= 1")
        self.automatic_optimization = False
        self.backbone = Backbone(backbone, stage=stage, pretrained=pretrained_backbone)
        self.add_on = nn.Sequential(nn.Conv2d(self.backbone.out_channels, prototype_dim, 1), nn.Sigmoid())
        nn.init.kaiming_normal_(self.add_on[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.add_on[0].bias)
        self.prototype_vectors = nn.Parameter(torch.rand(num_prototypes, prototype_dim, 1, 1))
        self.slot_logits = nn.Parameter(nn.init.xavier_normal_(torch.empty(num_classes, num_prototypes, slots_per_class)))
        slots = num_classes * slots_per_class
        identity = torch.zeros(slots, num_classes)
        identity[torch.arange(slots), torch.arange(slots) // slots_per_class] = 1
        self.register_buffer("slot_class_identity", identity)  # official prototype_class_identity (C S, C)
        self.last_layer = nn.Linear(slots, num_classes, bias=False)
        with torch.no_grad():
            self.last_layer.weight.copy_(identity.T)  # official: 1 on the class's slots, 0 elsewhere
        self.register_buffer("current_gumbel_scale", torch.tensor(0.0))
        self.register_buffer("slots_hardened", torch.tensor(False))  # after the push: one-hot argmax Π
        # --use_scheduler state: [best val loss, best val acc, epochs without improvement] and the decays so far.
        self.register_buffer("plateau_state", torch.tensor([float("inf"), -1.0, 0.0]))
        self.register_buffer("plateau_decays", torch.zeros(2, dtype=torch.long))  # warm, joint
        self.register_prototype_records(num_prototypes, patch_size)
        self.phase = "warm"
        self._val_loss: list[Tensor] = []

    # ------------------------------------------------------------------------------ assignment
    @property
    def slots_per_class(self) -> int:
        """Number of prototype slots of each class."""
        return self.slot_logits.shape[2]

    def slot_map(self) -> Tensor:
        """(C, S) the prototype each slot selects: argmax_p Π (official: argmax of a Gumbel sample at scale 1e4)."""
        return self.slot_logits.argmax(dim=1)

    def assignment(self) -> Tensor:
        """q (C, P, S) of the current phase.

        Pushed models: the one-hot slot map (official fine-tuning: Gumbel at scale 1e4, one-hot up to noise on
        near-ties). Training: the Gumbel-softmax at the epoch's scale. Evaluation: the same without noise.
        """
        if bool(self.slots_hardened):
            return F.one_hot(self.slot_map(), self.num_prototypes).permute(0, 2, 1).to(self.slot_logits)
        scale = float(self.current_gumbel_scale) if self.hparams.gumbel else 0.0
        return slot_assignment(self.slot_logits, scale, self.hparams.gumbel_tau, noise=self.training)

    # --------------------------------------------------------------------------------- forward
    def latent(self, images: Tensor) -> Tensor:
        """z = add_on(trunk(normalise(images))): (B, D, h, w) in (0, 1)."""
        return self.add_on(self.backbone(self.normalize(images)))

    def distances(self, images: Tensor) -> Tensor:
        """(B, P, h, w) squared L2 distances (clamped at 0, as the official ReLU), in float32."""
        with self.push_latent() as latent:
            return l2_distances(latent(images), self.prototype_vectors)

    @contextlib.contextmanager
    def push_latent(self) -> Iterator[Callable[[Tensor], Tensor]]:
        """Latents in float32 (distances near 0 decide φ; autocast would round them)."""
        kind = self.device.type
        with torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else contextlib.nullcontext():
            yield lambda images: self.latent(images).float()

    def logits_from_pooled(self, min_distances: Tensor, avg_distances: Tensor, assignment: Tensor) -> Tensor:
        """Logits from pooled distances: focal similarity per slot, then the last layer (or the slot sum without one)."""
        g = focal_similarity(min_distances, avg_distances, assignment)  # (B, C, S)
        return self.last_layer(g.flatten(1)) if self.hparams.use_last_layer else g.sum(dim=-1)

    def forward_parts(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits (B, C), min distances (B, P), q (C, P, S)), the official forward's outputs."""
        maps = self.distances(images)
        min_distances, avg_distances = maps.amin(dim=(2, 3)), maps.mean(dim=(2, 3))  # flatten, not squeeze: B = 1 works
        q = self.assignment()
        return self.logits_from_pooled(min_distances, avg_distances, q), min_distances, q

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_parts(images)[0]

    # ---------------------------------------------------------------------------------- losses
    def l1(self) -> Tensor:
        """L1 norm of the last-layer weights that connect slots to classes other than their own."""
        return (self.last_layer.weight * (1 - self.slot_class_identity.T)).abs().sum()

    def losses_from_parts(self, logits: Tensor, min_distances: Tensor, q: Tensor, labels: Tensor,
                          mixed: tuple[Tensor, float] | None = None) -> dict[str, Tensor]:
        """The loss terms and their weighted total ("loss").

        `mixed` = (second labels, λ) of a mixup batch: cross-entropy λ CE(y) + (1 - λ) CE(y2); cluster and
        separation use the first labels (official). In the last-layer phase the total is CE + l1_weight L1.
        """
        hp = self.hparams
        ce = F.cross_entropy(logits, labels)
        if mixed is not None:
            ce = mixed[1] * ce + (1 - mixed[1]) * F.cross_entropy(logits, mixed[0])
        terms = {"cross_entropy": ce, "l1": self.l1()}
        total = ce + hp.l1_weight * terms["l1"]
        if self.phase != "last":
            terms["cluster"], terms["separation"] = cluster_separation(min_distances, q, labels)
            terms["orthogonality"] = orthogonality(self.slot_logits)
            total = (total + hp.cluster_weight * terms["cluster"] + hp.separation_weight * terms["separation"]
                     + hp.orthogonality_weight * terms["orthogonality"])
        return {"loss": total, **terms}

    def mixup(self, images: Tensor, labels: Tensor) -> tuple[Tensor, tuple[Tensor, float] | None]:
        """Official mixup: λ x + (1 - λ) x[perm], λ ~ Beta(α, α) (drawn from torch's generator, so seeded runs
        repeat; official: NumPy's)."""
        alpha = self.hparams.mixup_alpha
        if not alpha:
            return images, None
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(images.shape[0], device=images.device)
        return lam * images + (1 - lam) * images[perm], (labels[perm], lam)

    def compute_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mixed = None
        if self.training:
            images, mixed = self.mixup(images, labels)
        logits, min_distances, q = self.forward_parts(images)
        return logits, self.losses_from_parts(logits, min_distances, q, labels, mixed)

    # ---------------------------------------------------------------------------------- phases
    def schedule_length(self) -> int:
        """Lightning epochs of the whole schedule: num_train_epochs - 1 training + last_layer_epochs."""
        return self.hparams.num_train_epochs - 1 + self.hparams.last_layer_epochs

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """Lightning epoch L: official epoch e = L + 1, warm (e < warmup_time) or joint; from L = num_train_epochs
        - 1 on, last layer, the first of them starting with the push. `joint_epochs` counts joint epochs so far."""
        hp = self.hparams
        epoch = self.current_epoch if epoch is None else epoch
        if epoch < 0:
            raise ValueError(f"ProtoPool schedule: epoch {epoch} must be >= 0")
        official = epoch + 1
        joint = max(0, min(official, hp.num_train_epochs) - hp.warmup_time + 1)
        if official < hp.num_train_epochs:
            return EpochPlan("warm" if official < hp.warmup_time else "joint", official, (), joint)
        first = hp.num_train_epochs - 1
        return EpochPlan("last", epoch - first, ("push",) if epoch == first else (), joint - 1)

    def action_done(self, action: str, epoch: int) -> bool:
        return action == "push" and int(self.push_epoch) == epoch

    def run_action(self, action: str, loader: Iterable, epoch: int) -> Any:
        if action == "push":
            return self.push(loader, epoch=epoch)
        return super().run_action(action, loader, epoch)

    def phase_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """The named parts that the training phases freeze and unfreeze."""
        return {"backbone": self.backbone, "add_on": self.add_on, "prototypes": self.prototype_vectors,
                "slots": self.slot_logits, "last_layer": self.last_layer}

    def set_phase(self, phase: str) -> None:
        """requires_grad of the phase (`_TRAINABLE`). Official: the last layer keeps requires_grad in warm and
        joint but is in neither optimiser; it is frozen here, which trains identically."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        for name, part in self.phase_modules().items():
            for p in [part] if isinstance(part, nn.Parameter) else part.parameters():
                p.requires_grad_(name in _TRAINABLE[phase])
                p.grad = None
        self.phase = phase
        self.train(self.training)

    def train(self, mode: bool = True) -> "ProtoPool":
        super().train(mode)
        if mode and self.hparams.get("freeze_bn_stats") and getattr(self, "phase", "warm") != "joint":
            self.backbone.eval()
        return self

    def learning_rates(self, plan: EpochPlan) -> list[float]:
        """The lr of each group of the plan's optimiser (see `configure_optimizers`)."""
        hp = self.hparams
        if plan.phase == "last":  # official: x0.95 after every 5th fine-tuning epoch
            return [hp.lr / 10 * hp.last_layer_decay ** (plan.epoch // hp.last_layer_decay_every)]
        decay = hp.plateau_factor ** int(self.plateau_decays[PHASES.index(plan.phase)])
        if plan.phase == "warm":
            return [3 * hp.lr * decay] * 3
        step = hp.joint_lr_gamma ** ((plan.joint_epochs - 1) // hp.joint_lr_step_size)
        return [f * step * decay for f in (self._backbone_lr(), 3 * hp.lr, 3 * hp.lr, 3 * hp.lr)]

    def _backbone_lr(self) -> float:
        hp = self.hparams
        return hp.lr / 10 if hp.get("joint_lr_backbone") is None else hp.joint_lr_backbone

    def enter_phase(self, plan: EpochPlan) -> None:
        if plan.push and int(self.push_epoch) != self.current_epoch:
            raise RuntimeError(f"epoch {self.current_epoch} starts the last-layer phase, but no push ran: "
                               "add train.phases.Phases to trainer.callbacks")
        self.set_phase(plan.phase)
        if plan.phase != "last":
            self.current_gumbel_scale.fill_(gumbel_scale(plan.epoch, self.hparams.gumbel_time))
        if self._trainer is not None:
            optimizer = self.optimizers()[PHASES.index(plan.phase)]
            for group, lr in zip(optimizer.param_groups, self.learning_rates(plan)):
                group["lr"] = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        optimizer = self.optimizers()[PHASES.index(self.phase)]
        loss = self._shared_step(batch, "train")
        if loss is None:
            return None
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().validation_step(batch, batch_idx)
        self._val_loss.append(loss.detach())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_loss = []

    def on_validation_epoch_end(self) -> None:
        """Official ``--use_scheduler``: the phase's lrs x plateau_factor after each epoch with more than
        `plateau_patience` epochs without improvement (official: of the test loss or accuracy; here validation)."""
        hp, trainer = self.hparams, self._trainer
        if hp.plateau_patience is None or trainer is None or trainer.sanity_checking or self.phase == "last":
            return
        if not self._val_loss:
            return
        loss = float(torch.stack(self._val_loss).mean())  # official: the mean of the batch losses
        if self.plateau_step(loss, float(self.val_metrics["acc"].compute())):
            for group in self.optimizers()[PHASES.index(self.phase)].param_groups:
                group["lr"] *= hp.plateau_factor

    def plateau_step(self, loss: float, acc: float) -> bool:
        """Update the plateau counters with an epoch's validation loss and accuracy; True when the phase's lrs decay
        now (official: the counter resets on a lower loss or a higher accuracy, and lrs decay while it is > patience)."""
        best_loss, best_acc, waiting = self.plateau_state.tolist()
        if loss < best_loss or acc > best_acc:
            self.plateau_state.copy_(torch.tensor([min(loss, best_loss), max(acc, best_acc), 0.0]))
            return False
        self.plateau_state[2] = waiting + 1
        if waiting + 1 <= self.hparams.plateau_patience:
            return False
        self.plateau_decays[PHASES.index(self.phase)] += 1
        return True

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Official: warm Adam (add-on 3 lr wd 1e-3, Π 3 lr, prototypes 3 lr), joint Adam (trunk lr / 10 wd 1e-3,
        add-on 3 lr wd 1e-3, Π, prototypes 3 lr), last-layer Adam (lr / 10, wd 1e-3)."""
        hp = self.hparams
        add_on = list(self.add_on.parameters())
        warm = torch.optim.Adam([
            {"params": add_on, "lr": 3 * hp.lr, "weight_decay": 1e-3, "name": "add_on"},
            {"params": [self.slot_logits], "lr": 3 * hp.lr, "name": "slots"},
            {"params": [self.prototype_vectors], "lr": 3 * hp.lr, "name": "prototypes"},
        ])
        joint = torch.optim.Adam([
            {"params": list(self.backbone.parameters()), "lr": self._backbone_lr(), "weight_decay": 1e-3, "name": "backbone"},
            {"params": add_on, "lr": 3 * hp.lr, "weight_decay": 1e-3, "name": "add_on"},
            {"params": [self.slot_logits], "lr": 3 * hp.lr, "name": "slots"},
            {"params": [self.prototype_vectors], "lr": 3 * hp.lr, "name": "prototypes"},
        ])
        last = torch.optim.Adam([{"params": list(self.last_layer.parameters()), "lr": hp.lr / 10,
                                  "weight_decay": 1e-3, "name": "last_layer"}])
        return [warm, joint, last]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {name: [part] if isinstance(part, nn.Parameter) else list(part.parameters())
                for name, part in self.phase_modules().items()}

    # ----------------------------------------------------------------------- prototype interface
    def prototype_tensor(self) -> Tensor:
        return self.prototype_vectors.flatten(1)

    def assign_prototypes(self, ids: Tensor, vectors: Tensor) -> None:
        self.prototype_vectors.data[ids] = vectors.to(self.prototype_vectors).view(len(ids), -1, 1, 1)

    def similarity(self, distances: Tensor) -> Tensor:
        """The plain φ(d) = log((d + 1) / (d + 1e-4)), which the official code visualises (not the focal g)."""
        return log_similarity(distances)

    def prototype_slots(self) -> Tensor:
        """(P, C) how many slots of each class select each prototype (the slot map)."""
        counts = torch.zeros(self.num_classes, self.num_prototypes, device=self.slot_logits.device)
        counts.scatter_add_(1, self.slot_map(), torch.ones_like(self.slot_map(), dtype=counts.dtype))
        return counts.T

    def prototype_class_connection(self) -> Tensor:
        """(P, C): Σ over the slots (c, s) that select p of the last layer's weight from slot (c, s) to each class."""
        onehot = F.one_hot(self.slot_map().flatten(), self.num_prototypes).to(self.last_layer.weight)  # (C S, P)
        weight = self.last_layer.weight if self.hparams.use_last_layer else self.slot_class_identity.T
        return onehot.T @ weight.T

    def prototype_active(self) -> Tensor:
        """Prototypes some slot selects (the others are zeroed at the push and never used)."""
        return self.prototype_slots().sum(dim=1) > 0

    def push_classes(self) -> Tensor:
        """A prototype is pushed onto images of the classes whose slots select it (official slot map)."""
        return self.prototype_slots() > 0

    def on_push(self, result: PushResult) -> None:
        """Fix the slot map the push used, and (official) zero the prototypes that no slot selects."""
        self.slots_hardened.fill_(True)
        if self.hparams.zero_unassigned:
            self.prototype_vectors.data[~self.prototype_active()] = 0

    # ------------------------------------------------------------------------------ explanation
    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | int | None = None, top_k: int = 10,
                percentile: float = 95.0) -> Explanation:
        """The prototypes of the target class's slots, ranked by similarity x weight (then, up to `top_k`, the
        other active prototypes by similarity), and a heatmap.

        heatmap: Σ_p connection[p, target] x the upsampled φ map of p. evidence: the shared prototype evidence
        (`prototype_evidence`; weight = `prototype_class_connection` to the target) plus ``slot_prototypes``
        (B, S), the slot map of the target class, and ``slot_similarity`` (B, S), its focal similarities g.
        """
        size = tuple(images.shape[-2:])
        maps = self.distances(images)
        min_d, avg_d = maps.amin(dim=(2, 3)), maps.mean(dim=(2, 3))
        q = self.assignment()
        g = focal_similarity(min_d, avg_d, q)
        logits = self.last_layer(g.flatten(1)) if self.hparams.use_last_layer else g.sum(dim=-1)
        target = self._target(logits, target)
        sim_maps = self.similarity(maps)
        weights = self.prototype_class_connection()[:, target].T  # (B, P)
        active = self.prototype_active()
        sims = sim_maps.flatten(2).amax(dim=2)
        # The target's slot prototypes by contribution first, then the other active ones by similarity.
        score = torch.where(weights != 0, sims * weights, sims - 1e9).masked_fill(~active, float("-inf"))
        ids = score.topk(min(top_k, int(active.sum())), dim=1).indices
        heat = torch.einsum("bp,bphw->bhw", weights, sim_maps)
        evidence = self.prototype_evidence(sim_maps, weights, ids, size, percentile)
        evidence["boxes"] = high_activation_boxes(heat, size, percentile)[0]
        evidence["slot_prototypes"] = self.slot_map()[target]
        evidence["slot_similarity"] = g[torch.arange(len(target)), target]
        return Explanation(logits=logits, target=target, heatmap=upsample_maps(heat, size), evidence=evidence)


# ---------------------------------------------------------------------------------------- builders
def _protopool(backbone: str, **kwargs: Any) -> ProtoPool:
    kwargs.setdefault("num_classes", 200)
    return ProtoPool(backbone=backbone, **kwargs)


@register_model
def protopool_resnet50(**kwargs: Any) -> ProtoPool:
    """ResNet-50 trunk (the paper's CUB model with BBN's iNaturalist-2017 weights, Cars with ImageNet's),
    P = 202, S = 10, D = 256."""
    return _protopool("resnet50", **kwargs)


@register_model
def protopool_resnet34(**kwargs: Any) -> ProtoPool:
    """ResNet-34 trunk (the paper's ablation backbone), P = 202, S = 10, D = 256."""
    return _protopool("resnet34", **kwargs)


@register_model
def protopool_resnet18(**kwargs: Any) -> ProtoPool:
    """ResNet-18 trunk, P = 202, S = 10, D = 256 (on CPU: cut after layer3 at 64 px, see the synthetic recipe)."""
    return _protopool("resnet18", **kwargs)


@register_model
def protopool_test_resnet(**kwargs: Any) -> ProtoPool:
    """timm's tiny `test_resnet` trunk: 4 classes, P = 6, S = 2, D = 16; for tests."""
    kwargs.setdefault("num_classes", 4)
    kwargs.setdefault("num_prototypes", 6)
    kwargs.setdefault("slots_per_class", 2)
    kwargs.setdefault("prototype_dim", 16)
    return _protopool("test_resnet", **kwargs)


register_pretrained(PretrainedEntry(
    name="protopool_resnet18.synthparts", class_path="models.protopool.ProtoPool",
    dataset="SyntheticParts (10 classes, 64 px)", config="configs/protopool/synthetic.yaml",
    notes="ResNet-18 cut after layer3 (from the released CAM trunk), a pool of 30 prototypes with 5 slots per class "
          "(D = 64), the official "
          "warm / joint schedule with the Gumbel-softmax slot assignment, pushed onto the train split through the "
          "slot map, then the last layer fine-tuned; the file carries each prototype's patch, source index and boxes",
))


register_pretrained(PretrainedEntry(
    name="protopool_resnet18.synthparts128", class_path="models.protopool.ProtoPool",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/protopool/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml", "configs/protopool/synthetic_128_schedule.yaml"),
    notes="the synthparts recipe at 128 px (8 x 8 latent grid, the CUB-like operating point of the comparison) "
          "with twice the schedule (16 epochs)",
))
