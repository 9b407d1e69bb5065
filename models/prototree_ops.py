"""The tree maths of ProtoTree (`models.prototree`), as functions of tensors: stable log(1 - exp(-d)), the
derivative-free leaf update, greedy routing, the descendant-leaf table and the box of a latent cell.

Nodes are numbered breadth-first: node n has children 2n + 1 (left, "absent") and 2n + 2 (right,
"present"); internal nodes are 0 .. P-1 (P = 2^h - 1), leaves are P .. 2P, and leaf l is node P + l.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation_boxes import upsample_maps

__all__ = ["DISTANCE_EPS", "LOG1MEXP_EPS", "Mode", "TreeOutput", "TreeStructure", "cell_boxes", "greedy_route",
           "leaf_update", "log1mexp"]

DISTANCE_EPS = 1e-14  # inside the square root of the Euclidean distance (official L2Conv2D)
LOG1MEXP_EPS = 1e-7  # added to |log p| before log(1 - p) (official branch.py)
Mode = Literal["distributed", "sample_max", "greedy"]


def log1mexp(d: Tensor) -> Tensor:
    """log(1 - exp(-d)) for d >= 0, stable: x = |d| + 1e-7, log(-expm1(-x)) if x < ln 2 else log1p(-exp(-x))."""
    x = d.abs() + LOG1MEXP_EPS
    return torch.where(x < math.log(2.0), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))


@dataclass
class TreeOutput:
    """Everything one forward pass computes.

    Attributes:
        logits: (B, K) log y_hat (the model's output; NLL of it is the loss).
        path: (B, L) log pi (log mode) or pi (plain mode) of every leaf of the complete tree.
        y: (B, K) log y_hat (log mode) or y_hat (plain mode).
        min_distances: (B, P) min over positions of the Euclidean distance, per internal node.
        distance_maps: (B, P, h, w) the distances at every latent position.
        log_space: whether `path` and `y` are logarithms.
    """

    logits: Tensor
    path: Tensor
    y: Tensor
    min_distances: Tensor
    distance_maps: Tensor
    log_space: bool


@dataclass
class TreeStructure:
    """The (pruned) tree as plain Python values, for rendering and inspection.

    Attributes:
        internal: kept decision nodes (BFS ids), in BFS order.
        leaves: kept leaves as node ids (leaf index = node id - num_internal).
        children: kept internal node -> (left child, right child) in the pruned tree.
        depth: depth of the complete tree.
    """

    internal: list[int]
    leaves: list[int]
    children: dict[int, tuple[int, int]]
    depth: int

    @property
    def num_internal(self) -> int:
        """Number of internal (decision) nodes, 2^depth - 1."""
        return 2**self.depth - 1


def _descendant_leaves(depth: int, device: torch.device | None = None) -> Tensor:
    """(N, L) bool over all N = 2L - 1 node ids: leaf l lies below node n (a leaf lies below itself)."""
    num_leaves = 2**depth
    below = torch.zeros(2 * num_leaves - 1, num_leaves, dtype=torch.bool, device=device)
    leaves = torch.arange(num_leaves, device=device)
    for level in range(depth + 1):  # the level-`level` ancestor of leaf l is node 2^level - 1 + (l >> (depth - level))
        below[2**level - 1 + (leaves >> (depth - level)), leaves] = True
    return below


def leaf_update(
    counts: Tensor, epoch_start: Tensor, num_batches: int, path: Tensor, y: Tensor, labels: Tensor, log_space: bool
) -> Tensor:
    """The derivative-free leaf update of one batch: ReLU(c - c0 / N_B) + U, vectorised over all leaves.

    U[l, k] = sum_x pi_l(x) softmax(c_l)_k Y(x)_k / y_hat(x)_k, i.e. U = softmax(C) * (Pi^T (Y / Y_hat)).
    It is computed as one matrix product W^T Y with W[x, l] = pi_l(x) softmax(c_l)_{y(x)} / y_hat(x)_{y(x)}
    (the same sum, since Y is one-hot); in log mode W is formed from logs, where every term is <= 1,
    which is the official exp(logsumexp(log pi + log sigma + log Y - log y_hat)) without the (B, L, K) tensor.
    `path` and `y` come from the forward pass before the optimiser step (`TreeOutput`).
    """
    onehot = F.one_hot(labels, counts.shape[1]).to(counts.dtype)
    if log_space:
        log_sigma_y = torch.log_softmax(counts, dim=1)[:, labels].T  # (B, L)
        weights = torch.exp(path + log_sigma_y - y.gather(1, labels[:, None]))
        update = weights.T @ onehot
    else:
        # Deviation: y_hat is clamped away from 0; the official code divides by 0 and gets NaN when it underflows.
        update = torch.softmax(counts, dim=1) * (path.T @ (onehot / y.clamp_min(torch.finfo(y.dtype).tiny)))
    return F.relu(counts - epoch_start / num_batches) + update


def greedy_route(similarity: Tensor, forced_route: Tensor, depth: int) -> tuple[Tensor, Tensor, Tensor]:
    """Route each image from the root: right ("present") iff p_n > 0.5, forced nodes follow their route.

    Args:
        similarity: (B, P) p_n = exp(-min_d_n).
        forced_route: (P,) -1 / 0 / 1.
    Returns:
        nodes (B, depth): the node visited at each level; right (B, depth) bool: the branch taken;
        leaf (B,): the leaf index reached.
    """
    batch = similarity.shape[0]
    node = torch.zeros(batch, dtype=torch.long, device=similarity.device)
    nodes, rights = [], []
    for _ in range(depth):  # a loop over levels; every image moves one level per step
        forced = forced_route[node]
        p = similarity.gather(1, node[:, None])[:, 0]
        right = torch.where(forced >= 0, forced == 1, p > 0.5)
        nodes.append(node)
        rights.append(right)
        node = 2 * node + 1 + right.long()
    return torch.stack(nodes, 1), torch.stack(rights, 1), node - (2**depth - 1)


def cell_boxes(latent_hw: tuple[int, int], image_hw: tuple[int, int], upsample_threshold: float = 0.98) -> Tensor:
    """(h*w, 4) image box (x0, y0, x1, y1), x1 exclusive, of every latent cell (row-major).

    As the official upsample.py: a one-hot mask at the cell is upsampled bicubically to the image and the
    box covers every row and column where it exceeds 1 - upsample_threshold.
    """
    h, w = latent_hw
    up = upsample_maps(torch.eye(h * w).view(h * w, h, w), tuple(image_hw))
    rows = (up.amax(dim=2) > 1 - upsample_threshold).float()  # (N, H); argmax = first True
    cols = (up.amax(dim=1) > 1 - upsample_threshold).float()  # (N, W)
    y0, y1 = rows.argmax(dim=1), rows.shape[1] - rows.flip(1).argmax(dim=1)
    x0, x1 = cols.argmax(dim=1), cols.shape[1] - cols.flip(1).argmax(dim=1)
    return torch.stack((x0, y0, x1, y1), dim=1)
