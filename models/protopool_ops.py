"""ProtoPool's maths as plain functions (Rymarczyk et al., ECCV 2022; official code gmum/ProtoPool).

The slot assignment q (C, P, S): each of the S slots of a class is a distribution over the P prototypes of
the pool, a Gumbel-softmax of the slot logits Π scaled by the epoch's `gumbel_scale`; slot distances mix the
min- and average-pooled squared distances with q before the focal similarity
φ(D_min) - φ(D_avg), φ(d) = log((d + 1) / (d + 1e-4)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cluster_separation", "focal_similarity", "gumbel_scale", "log_similarity", "orthogonality",
           "slot_assignment", "slot_distances"]


def gumbel_scale(epoch: int, gumbel_time: int = 30, start: float = 1.3, end: float = 1000.0) -> float:
    """The official scale of the slot logits in official epoch `epoch`: start * sqrt(alpha * epoch) with
    alpha = (end / start)^2 / gumbel_time before `gumbel_time`, `end` afterwards (= end * sqrt(epoch / T))."""
    if epoch < 0 or gumbel_time < 1:
        raise ValueError(f"gumbel_scale: need epoch >= 0 and gumbel_time >= 1, got {epoch}, {gumbel_time}")
    alpha = (end / start) ** 2 / gumbel_time
    return start * math.sqrt(alpha * epoch) if epoch < gumbel_time else end


def slot_assignment(slot_logits: Tensor, scale: float, tau: float = 0.5, noise: bool = True) -> Tensor:
    """q (C, P, S), a distribution over the P prototypes per slot.

    scale 0: softmax(Π) over P (the official forward at scale 0). Otherwise the official soft
    ``gumbel_softmax(Π * scale, tau)`` over P; ``noise=False`` drops the Gumbel noise (softmax(Π * scale / tau)),
    which is what the zoo evaluates with (the official evaluation draws noise, so its accuracy is random).
    """
    if scale == 0:
        return torch.softmax(slot_logits, dim=1)
    if noise:
        return F.gumbel_softmax(slot_logits * scale, tau=tau, dim=1)
    return torch.softmax(slot_logits * (scale / tau), dim=1)


def log_similarity(distances: Tensor, eps: float = 1e-4) -> Tensor:
    """φ(d) = log((d + 1) / (d + eps))."""
    return torch.log((distances + 1) / (distances + eps))


def slot_distances(pooled: Tensor, assignment: Tensor) -> Tensor:
    """(B, C, S) = Σ_p pooled[b, p] q[c, p, s]: per-slot mixtures of pooled distances (B, P)."""
    return torch.einsum("bp,cps->bcs", pooled, assignment)


def focal_similarity(min_distances: Tensor, avg_distances: Tensor, assignment: Tensor) -> Tensor:
    """g (B, C, S) = φ(mix(d_min)) - φ(mix(d_avg)): distances are mixed before the activation."""
    return log_similarity(slot_distances(min_distances, assignment)) - log_similarity(slot_distances(avg_distances, assignment))


def cluster_separation(min_distances: Tensor, assignment: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The official cluster and separation costs (both means over the batch).

    cluster: over the S prototypes most assigned to the label's slots (r[b, p] = Σ_s q[y_b, p, s], detached),
    the smallest min distance; separation: the same over the P - S prototypes ranked by Σ_s (1 - q), i.e. the
    least assigned ones. Masked minima instead of the official ``max_dist - max((max_dist - d) * mask)``,
    which equals them while every distance is <= D.
    """
    p, s = assignment.shape[1], assignment.shape[2]
    own = assignment[labels].detach()  # (B, P, S)
    inf = torch.full_like(min_distances, float("inf"))

    def top_min(ranking: Tensor, k: int) -> Tensor:
        mask = torch.zeros_like(ranking, dtype=torch.bool).scatter_(1, ranking.topk(k, dim=1).indices, True)
        return torch.where(mask, min_distances, inf).amin(dim=1).mean()

    cluster = top_min(own.sum(dim=-1), s)
    separation = top_min((1 - own).sum(dim=-1), p - s) if p > s else min_distances.new_zeros(())
    return cluster, separation


def orthogonality(slot_logits: Tensor) -> Tensor:
    """The official slot orthogonality on the raw logits Π (C, P, S): Σ_c Σ_{s, s'} cos(Π[c, :, s], Π[c, :, s'])
    / (S C) - 1 (the -1 removes the diagonal; no abs(), so negative cosines are rewarded, as officially)."""
    c, _, s = slot_logits.shape
    cos = F.cosine_similarity(slot_logits.unsqueeze(2), slot_logits.unsqueeze(3), dim=1)  # (C, S, S)
    return cos.sum() / (s * c) - 1
