"""PIP-Net's losses, phase schedule and learning rates (Nauta et al., CVPR 2023; official code M-Nauta/PIPNet).

Losses (``pipnet/train.py``): alignment of the two views' prototype maps with the official stop-gradient,
the tanh loss that makes every prototype present somewhere in a batch, and the classification loss on
log1p(out^m). The schedule and the learning rates are pure functions of the Lightning epoch and the
step in it, so a resumed run continues in the right phase with the right rates (no scheduler state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .phases import EpochPlan

__all__ = [
    "PHASES",
    "align",
    "alignment_loss",
    "classification_loss",
    "classifier_lr",
    "cosine_lr",
    "loss_weights",
    "pipnet_schedule",
    "tanh_loss",
]

PHASES = ("pretrain", "finetune", "frozen", "full")


def align(inputs: Tensor, targets: Tensor, eps: float = 1e-12) -> Tensor:
    """-mean_r log(<inputs_r, targets_r> + eps) over rows (N, P) (the official ``align_loss``)."""
    return -torch.log(torch.einsum("nc,nc->n", inputs, targets) + eps).mean()


def _rows(proto_features: Tensor) -> Tensor:
    """(B, P, h, w) -> (B h w, P): one row per latent patch, each on the simplex."""
    return proto_features.flatten(2).permute(0, 2, 1).flatten(0, 1)


def alignment_loss(features1: Tensor, features2: Tensor) -> Tensor:
    """L_A = (a(z1, sg z2) + a(z2, sg z1)) / 2 on the two views' (B, P, h, w) softmax maps.

    Official: each direction's target is detached, so each view is pulled towards the other as it is.
    """
    z1, z2 = _rows(features1), _rows(features2)
    return (align(z1, z2.detach()) + align(z2, z1.detach())) / 2


def tanh_loss(pooled1: Tensor, pooled2: Tensor, eps: float = 1e-8) -> Tensor:
    """L_T = -(mean_p log(tanh(sum_b pooled1[b, p]) + eps) + the same for pooled2) / 2 (official eps 1e-8)."""
    term = lambda pooled: torch.log(torch.tanh(pooled.sum(dim=0)) + eps).mean()  # noqa: E731
    return -(term(pooled1) + term(pooled2)) / 2


def classification_loss(out: Tensor, labels: Tensor, multiplier: Tensor) -> Tensor:
    """NLL of log_softmax(log1p(out^m)) (official m = 2, frozen)."""
    return F.nll_loss(F.log_softmax(torch.log1p(out ** multiplier), dim=1), labels)


def loss_weights(plan: EpochPlan, epochs_pretrain: int) -> tuple[float, float, float]:
    """(alignment, tanh, classification) weights of a phase: pretraining e/E_pre, 5, 0 (e = 1..E_pre);
    fine-tuning 0, 0, 2 (classification only); the rest of phase 2 5, 2, 2."""
    if plan.phase == "pretrain":
        return plan.epoch / max(epochs_pretrain, 1), 5.0, 0.0
    if plan.phase == "finetune":
        return 0.0, 0.0, 2.0
    return 5.0, 2.0, 2.0


def pipnet_schedule(epoch: int, epochs_pretrain: int = 10, epochs: int = 60, finetune_epochs: int = 3,
                    freeze_epochs: int = 10, pretrained: bool = False) -> EpochPlan:
    """The plan of Lightning epoch `epoch` under the official schedule (``main.py``).

    Epochs 0 .. E_pre - 1 pretrain (plan.epoch = the official 1-based pretraining epoch); then phase 2 with
    its official 1-based epoch e: "finetune" (classifier only) for e <= `finetune_epochs` when there was a
    pretraining or a loaded checkpoint (`pretrained`), "frozen" (early trunk frozen) for e <= `freeze_epochs`,
    then "full". Epochs past E_pre + `epochs` stay "full". ``joint_epochs`` holds the number of phase-2
    fine-tuning epochs before this one (the net scheduler does not step in them).
    """
    if epoch < 0:
        raise ValueError(f"PIP-Net schedule: epoch={epoch} must be >= 0")
    if epoch < epochs_pretrain:
        return EpochPlan("pretrain", epoch + 1)
    e = epoch - epochs_pretrain + 1
    finetune = finetune_epochs if (epochs_pretrain > 0 or pretrained) else 0
    done = min(finetune, e - 1)
    if e <= finetune:
        return EpochPlan("finetune", e, (), done)
    return EpochPlan("frozen" if e <= freeze_epochs else "full", e, (), done)


def cosine_lr(base: float, eta_min: float, step: int, total: int) -> float:
    """CosineAnnealingLR's rate after `step` steps over T_max = `total` (its closed form)."""
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * step / max(total, 1))) / 2


def classifier_lr(base: float, global_step: int, iterations: int, epochs: int, eta_min: float = 1e-3) -> float:
    """The classifier's rate at phase-2 step `global_step` (0-based over all phase-2 epochs).

    Official: CosineAnnealingWarmRestarts(T_0 = 5 if epochs <= 30 else 10, T_mult 1, eta_min 1e-3), stepped
    *after* each optimiser step with the fractional epoch (e - 1) + i / iterations; so step g runs at the
    rate of the fractional epoch (g - 1) / iterations (the base rate at g = 0).
    """
    t0 = 5 if epochs <= 30 else 10
    x = max(global_step - 1, 0) / max(iterations, 1)
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * (x % t0) / t0)) / 2
