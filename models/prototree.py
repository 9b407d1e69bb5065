"""Neural Prototype Trees (Nauta, van Bree, Seifert, CVPR 2021), fully vectorised over the tree.

A complete binary tree of depth h has 2^h - 1 internal
(decision) nodes and 2^h leaves. Nodes are numbered breadth-first: node n has children 2n + 1
(left, "absent") and 2n + 2 (right, "present"); internal nodes are 0 .. P-1 (P = 2^h - 1), leaves are
P .. 2P, and leaf l is node P + l. Prototype i belongs to internal node i (a fixed buffer
`node_prototype`); the official code zips its prototypes with a Python ``set`` of modules hashed by
``id()``, so its node -> prototype mapping is not deterministic across runs.

A pruned tree keeps the same tensors: each internal node has a `forced_route` (-1 = decides with its
prototype, 0 = always left, 1 = always right). Removing a node's parent and promoting its sibling
(the paper's pruning) is exactly "force the parent towards the sibling", so forward, the leaf update
and the deterministic modes stay one vectorised computation over the complete tree; removed leaves get
path probability 0.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone
from .base import Explanation
from .phases import EpochPlan
from .prototype_model import PrototypeModel
from .prototree_ops import (
    DISTANCE_EPS,
    Mode,
    TreeOutput,
    TreeStructure,
    _descendant_leaves,
    cell_boxes,
    greedy_route,
    leaf_update,
    log1mexp,
)
from .prototypes import upsample_maps
from .pretrained import PretrainedEntry, register_pretrained
from .registry import register_model

__all__ = [
    "ProtoTree",
    "ProtoTreeEnsemble",
    "TreeOutput",
    "TreeStructure",
    "log1mexp",
    "leaf_update",
    "greedy_route",
]

class ProtoTree(PrototypeModel):
    """Soft binary decision tree whose internal nodes are prototypes, trained end to end.

    Args:
        num_classes: number of classes K.
        depth: tree depth h (2^h - 1 prototypes, 2^h leaves). Paper: 9 (CUB), 11 (Cars).
        num_features: latent dimension D of the add-on (paper: 256).
        backbone, stage, pretrained_backbone: the trunk (see `Backbone`).
        last_block: sub-module of the trunk trained with `lr_block` from epoch 1 (paper: ``"layer4.2"``
            of ResNet-50); ``"auto"`` = ``"layer4.2"`` for ResNet-50 trunks, none for others (the whole
            trunk is then the `lr_net` group, as in the official code since 789be85); None = none.
        log_probabilities: compute in log space (default, stable) or with plain probabilities.
        derivative_free: leaves are count buffers updated without gradients (paper); False = leaves are
            parameters initialised with randn and trained by gradient with `lr_leaves`.
        lr: learning rate of the prototypes (paper 1e-3).
        lr_block: of `last_block` and the add-on (paper 1e-3).
        lr_net: of the rest of the trunk (paper 1e-5).
        lr_leaves: of gradient-trained leaves (paper's lr_pi 1e-3).
        freeze_epochs: the `lr_net` group has requires_grad False for the first `freeze_epochs` epochs.
            The spec counts epochs from 1 (frozen in 1..freeze_epochs, unfrozen at freeze_epochs + 1);
            Lightning's `current_epoch` counts from 0, so the group is frozen while current_epoch < freeze_epochs.
        milestones: MultiStepLR milestones in epochs, stepped after each epoch (so milestone 60 halves
            the rates from the 61st epoch on, as in the official 1-based loop). Empty = constant rates.
        gamma: MultiStepLR factor (paper 0.5).
        adam_eps: eps of Adam/AdamW (paper 1e-7).
        patch_size: side of the stored prototype patch images (drawn by the tree rendering).
        upsample_threshold: box of a latent cell = where its bicubically upsampled one-hot mask
            exceeds 1 - upsample_threshold (official 0.98).
        prune_threshold: after training, prune leaves whose max class probability is <= this (the paper's
            0.01; it prunes only with more than 100 classes, since max >= 1/K); None = no pruning.
        project: after training (and pruning), the class-constrained projection on the push data.
        **kwargs: `InterpretableClassifier` arguments (mean, std, optimizer="adamw", weight_decay, ...).
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 9,
        num_features: int = 256,
        backbone: str = "resnet50",
        stage: int | None = None,
        pretrained_backbone: bool | str = False,
        last_block: str | None = "auto",
        log_probabilities: bool = True,
        derivative_free: bool = True,
        lr: float = 1e-3,
        lr_block: float = 1e-3,
        lr_net: float = 1e-5,
        lr_leaves: float = 1e-3,
        freeze_epochs: int = 30,
        milestones: list[int] | tuple[int, ...] = (60, 70, 80, 90, 100),
        gamma: float = 0.5,
        adam_eps: float = 1e-7,
        weight_decay: float = 0.0,
        patch_size: int = 32,
        upsample_threshold: float = 0.98,
        prune_threshold: float | None = 0.01,
        project: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("optimizer", "adamw")
        super().__init__(num_classes=num_classes, lr=lr, gamma=gamma, weight_decay=weight_decay, **kwargs)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if freeze_epochs < 0:
            raise ValueError(f"freeze_epochs must be >= 0, got {freeze_epochs}")
        if prune_threshold is not None and not 0 <= prune_threshold < 1:
            raise ValueError(f"prune_threshold must be in [0, 1) (a leaf's max class probability) or None, got {prune_threshold}")
        if not 0.0 < upsample_threshold < 1.0:
            raise ValueError(f"upsample_threshold must be in (0, 1), got {upsample_threshold}")
        self.depth = depth
        self.num_internal = 2**depth - 1
        self.num_leaves = 2**depth
        self.log_probabilities = log_probabilities
        self.derivative_free = derivative_free

        self.backbone = Backbone(backbone, stage=stage, pretrained=pretrained_backbone)
        self.last_block_name = self._resolve_last_block(backbone, last_block)
        self.add_on = nn.Conv2d(self.backbone.out_channels, num_features, kernel_size=1, bias=False)
        nn.init.xavier_normal_(self.add_on.weight, gain=nn.init.calculate_gain("sigmoid"))
        self.prototype_vectors = nn.Parameter(torch.randn(self.num_internal, num_features) * 0.1 + 0.5)  # N(0.5, 0.1)
        if derivative_free:  # raw class counts, softmax-ed; changed only by `leaf_update`
            self.register_buffer("leaves", torch.zeros(self.num_leaves, num_classes))
            # The counts at the start of the epoch `leaves_epoch` (buffers, so a run resumed mid-epoch
            # keeps subtracting the same counts).
            self.register_buffer("leaves_epoch_start", torch.zeros(self.num_leaves, num_classes))
            self.register_buffer("leaves_epoch", torch.tensor(-1))
        else:
            self.leaves = nn.Parameter(torch.randn(self.num_leaves, num_classes))
        self.register_buffer("node_prototype", torch.arange(self.num_internal))
        self.register_buffer("forced_route", torch.full((self.num_internal,), -1, dtype=torch.long))
        # Written by `push` (the class-constrained projection), so that a checkpoint alone can draw its
        # prototypes; indexed by decision node (the interface's prototype j is node j).
        self.register_prototype_records(self.num_internal, patch_size)
        self._pending_update: tuple[Tensor, Tensor, Tensor] | None = None
        self._last_output: TreeOutput | None = None

    # ------------------------------------------------------------------ construction helpers
    def _resolve_last_block(self, backbone: str, last_block: str | None) -> str | None:
        if last_block == "auto":
            last_block = "layer4.2" if backbone.split("/")[-1].startswith("resnet50") else None
        if last_block is None:
            return None
        modules = dict(self.backbone.body.named_modules())
        name = last_block
        if name not in modules and name.startswith("layer") and isinstance(self.backbone.body, nn.Sequential):
            head, _, rest = name.partition(".")  # torchvision trunks are Sequential: layerN is index N + 3
            name = ".".join([str(int(head[5:]) + 3)] + ([rest] if rest else []))
        if name not in modules:
            raise ValueError(f"last_block {last_block!r} is not a sub-module of backbone {backbone!r}")
        return name

    # ------------------------------------------------------------------ the model
    def latent(self, images: Tensor) -> Tensor:
        """Add-on output z = sigmoid(conv1x1(trunk(x))) of shape (B, D, h, w) for images in [0, 1]."""
        return torch.sigmoid(self.add_on(self.backbone(self.normalize(images))))

    def distance_maps(self, z: Tensor) -> Tensor:
        """(B, P, h, w) Euclidean distances sqrt(|z^2 - 2 z.p + p^2| + 1e-14), P in node order."""
        protos = self.prototype_tensor()
        z2 = (z**2).sum(dim=1, keepdim=True)
        zp = torch.einsum("bdhw,pd->bphw", z, protos)
        p2 = (protos**2).sum(dim=1)[None, :, None, None]
        return torch.sqrt((z2 - 2 * zp + p2).abs() + DISTANCE_EPS)

    def _branch_terms(self, min_d: Tensor) -> tuple[Tensor, Tensor]:
        """Per node (B, P): log(p), log(1 - p) in log mode, or p, 1 - p in plain mode; forced nodes are 0/1."""
        forced = self.forced_route[None]
        if self.log_probabilities:
            right, left = -min_d, log1mexp(min_d)
            zero, neg_inf = torch.zeros_like(right), torch.full_like(right, -math.inf)
            right = torch.where(forced == 1, zero, torch.where(forced == 0, neg_inf, right))
            left = torch.where(forced == 0, zero, torch.where(forced == 1, neg_inf, left))
            return right, left
        p = torch.where(forced >= 0, forced.to(min_d.dtype), torch.exp(-min_d))
        return p, 1 - p

    def leaf_path(self, min_d: Tensor) -> Tensor:
        """(B, L) leaf path probabilities (logs in log mode), doubling level by level.

        The children of the level-l nodes are the level-(l+1) nodes in interleaved order
        [left(0), right(0), left(1), ...], so one stack + reshape per level builds the next level.
        """
        right, left = self._branch_terms(min_d)
        # Log mode: the root's log path probability is 0; the official code starts from 1 (branch.py),
        # which shifts every log pi by +1 and scales the derivative-free update by e.
        path = min_d.new_zeros(min_d.shape[0], 1) if self.log_probabilities else min_d.new_ones(min_d.shape[0], 1)
        for level in range(self.depth):
            first, count = 2**level - 1, 2**level
            r, l = right[:, first:first + count], left[:, first:first + count]
            if self.log_probabilities:
                path = torch.stack((path + l, path + r), dim=2).flatten(1)
            else:
                path = torch.stack((path * l, path * r), dim=2).flatten(1)
        return path

    def leaf_log_distributions(self) -> Tensor:
        """(L, K) log softmax of the leaf parameters."""
        return torch.log_softmax(self.leaves, dim=1)

    def leaf_distributions(self) -> Tensor:
        """(L, K) softmax of the leaf parameters (the leaves' class distributions)."""
        return torch.softmax(self.leaves, dim=1)

    def tree_forward(self, images: Tensor) -> TreeOutput:
        """The distributed prediction y_hat = sum_l pi_l softmax(c_l), with all intermediate tensors."""
        return self.tree_from_distances(self.distance_maps(self.latent(images)))

    def tree_from_distances(self, maps: Tensor) -> TreeOutput:
        """The tree part of the forward pass, from the (B, P, h, w) distance maps (min-pooled here)."""
        min_d = maps.flatten(2).amin(dim=2)
        path = self.leaf_path(min_d)
        if self.log_probabilities:
            y = torch.logsumexp(path[:, :, None] + self.leaf_log_distributions()[None], dim=1)
            logits = y
        else:
            y = path @ self.leaf_distributions()
            logits = torch.log(y)
        return TreeOutput(logits, path, y, min_d, maps, self.log_probabilities)

    def forward(self, images: Tensor) -> Tensor:
        """log y_hat (B, K) of the distributed routing."""
        return self.tree_forward(images).logits

    # ------------------------------------------------------------------ deterministic routing
    def _decision_counts(self, nodes: Tensor) -> Tensor:
        return (self.forced_route[nodes] < 0).sum(dim=1)

    def leaf_nodes_path(self, leaf: Tensor) -> Tensor:
        """(B, depth) ancestors of each leaf index, root first."""
        levels = torch.arange(self.depth, device=leaf.device)
        return (2**levels - 1)[None] + (leaf[:, None] >> (self.depth - levels)[None])

    def route(self, out: TreeOutput, mode: Mode) -> tuple[Tensor, Tensor, Tensor]:
        """(log-probabilities (B, K), leaf index (B,), path length (B,)) of a deterministic routing.

        Path length counts the decision nodes on the way (forced nodes of a pruned tree are not decisions).
        """
        if mode == "sample_max":
            leaf = out.path.argmax(dim=1)
            nodes = self.leaf_nodes_path(leaf)
        elif mode == "greedy":
            nodes, _, leaf = greedy_route(torch.exp(-out.min_distances), self.forced_route, self.depth)
        else:
            raise ValueError(f"unknown routing mode {mode!r}; use 'sample_max' or 'greedy' (or forward for 'distributed')")
        return self.leaf_log_distributions()[leaf], leaf, self._decision_counts(nodes)

    @torch.no_grad()
    def predict_modes(self, images: Tensor) -> dict[str, Tensor]:
        """Predictions of the three modes, their leaves and path lengths, for evaluation and fidelity."""
        out = self.tree_forward(images)
        return self._modes_from_output(out)

    def _modes_from_output(self, out: TreeOutput) -> dict[str, Tensor]:
        result = {"distributed": out.logits.argmax(dim=1)}
        for mode in ("sample_max", "greedy"):
            log_probs, leaf, length = self.route(out, mode)
            result[mode] = log_probs.argmax(dim=1)
            result[f"{mode}_leaf"] = leaf
            result[f"{mode}_path_length"] = length
        return result

    # ------------------------------------------------------------------ training
    def compute_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """NLL of log y_hat (the official loss); remembers pi and y_hat for the leaf update."""
        out = self.tree_forward(images)
        loss = F.nll_loss(out.logits, labels)
        if self.training and self.derivative_free:
            self._pending_update = (out.path.detach(), out.y.detach(), labels.detach())
        if not self.training:  # for the deterministic modes of `test_step`
            self._last_output = TreeOutput(out.logits.detach(), out.path.detach(), out.y.detach(),
                                           out.min_distances.detach(), out.distance_maps.detach(), out.log_space)
        return out.logits, {"loss": loss, "nll": loss}

    @torch.no_grad()
    def update_leaves(self, path: Tensor, y: Tensor, labels: Tensor, num_batches: int) -> None:
        """Apply the derivative-free update of one batch to the leaf counts (see `leaf_update`)."""
        if not self.derivative_free:
            raise RuntimeError("update_leaves is for derivative_free=True; gradient-trained leaves use the optimiser")
        self.leaves.copy_(leaf_update(self.leaves, self.leaves_epoch_start, num_batches, path, y, labels,
                                      self.log_probabilities))

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """``"warm"`` (the `lr_net` group frozen) while epoch < `freeze_epochs`, then ``"joint"``."""
        epoch = self.current_epoch if epoch is None else epoch
        return EpochPlan("warm" if epoch < self.hparams.freeze_epochs else "joint", epoch)

    def final_actions(self) -> tuple[str, ...]:
        """After training: "prune" (with `prune_threshold`), then "push" (the projection), as the paper."""
        hp = self.hparams
        return (("prune",) if hp.get("prune_threshold", 0.01) is not None else ()) + (("push",) if hp.get("project", True) else ())

    def run_action(self, action: str, loader: Any, epoch: int) -> Any:
        if action == "prune":
            return self.prune(self.hparams.get("prune_threshold", 0.01))
        if action == "push":
            return self.push(loader, epoch=epoch)
        return super().run_action(action, loader, epoch)

    def enter_phase(self, plan: EpochPlan) -> None:
        frozen = plan.phase == "warm"
        for param in self.parameter_groups()["backbone"]:
            param.requires_grad_(not frozen)
        if self.derivative_free and int(self.leaves_epoch) != self.current_epoch:
            self.leaves_epoch_start.copy_(self.leaves)
            self.leaves_epoch.fill_(self.current_epoch)

    def on_after_backward(self) -> None:
        # pi and y_hat of this batch's forward, as in the official loop (which updates after the optimiser
        # step; the step does not read the leaf counts, so the result is the same). Here, before the
        # batch-end hooks, so that a checkpoint written at the batch's end (ModelCheckpoint's
        # every_n_train_steps) holds the updated leaves. A skipped non-finite batch has no backward.
        pending, self._pending_update = self._pending_update, None
        if pending is None:
            return
        num_batches = self.trainer.num_training_batches
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"the derivative-free leaf update needs a finite number of batches per epoch, got {num_batches}")
        self.update_leaves(*pending, num_batches=num_batches)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().test_step(batch, batch_idx)
        out = self._last_output
        labels = batch["label"] if isinstance(batch, dict) else batch[1]
        modes = self._modes_from_output(out)
        values = {}
        for mode in ("sample_max", "greedy"):
            values[f"test/acc_{mode}"] = (modes[mode] == labels).float().mean()
            values[f"test/fidelity_{mode}"] = (modes[mode] == modes["distributed"]).float().mean()
            values[f"test/path_length_{mode}"] = modes[f"{mode}_path_length"].float().mean()
        self.log_dict(values, on_step=False, on_epoch=True, batch_size=labels.shape[0], sync_dist=True)
        return loss

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The paper's groups: trunk (lr_net), last block (lr_block), add-on (lr_block), prototypes (lr)."""
        block = set()
        if self.last_block_name is not None:
            block = {id(p) for p in self.backbone.body.get_submodule(self.last_block_name).parameters()}
        trunk = list(self.backbone.parameters())
        groups = {
            "backbone": [p for p in trunk if id(p) not in block],
            "last_block": [p for p in trunk if id(p) in block],
            "add_on": list(self.add_on.parameters()),
            "prototypes": [self.prototype_vectors],
        }
        if not self.derivative_free:
            groups["leaves"] = [self.leaves]
        return groups

    def configure_optimizers(self) -> Any:
        """AdamW (eps 1e-7) over the four groups; MultiStepLR(milestones, gamma) stepped every epoch.

        Frozen parameters stay in the optimiser; without gradients Adam(W) skips them (also their decay).
        The official groups carry a 'weight_decay_rate' key PyTorch ignores, so one weight_decay applies to all.
        """
        hp = self.hparams
        lrs = {"backbone": hp.lr_net, "last_block": hp.lr_block, "add_on": hp.lr_block, "prototypes": hp.lr,
               "leaves": hp.lr_leaves}
        lrs.update(hp.get("group_lr") or {})
        groups = self.parameter_groups()
        unknown = set(hp.get("group_lr") or {}) - set(groups)
        if unknown:
            raise ValueError(f"group_lr names unknown parameter group(s) {sorted(unknown)}; groups are {sorted(groups)}")
        param_groups = [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(param_groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = cls(param_groups, lr=hp.lr, eps=hp.adam_eps, weight_decay=hp.weight_decay)
        if not hp.milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ structure, pruning, projection
    def kept_mask(self) -> Tensor:
        """(2P + 1,) bool over all node ids: the nodes of the pruned tree (reachable and not bypassed)."""
        forced = self.forced_route
        reach = torch.zeros(2 * self.num_internal + 1, dtype=torch.bool, device=forced.device)
        reach[0] = True
        for level in range(self.depth):
            nodes = torch.arange(2**level - 1, 2 ** (level + 1) - 1, device=forced.device)
            f = forced[nodes]
            reach[2 * nodes + 1] = reach[nodes] & (f != 1)
            reach[2 * nodes + 2] = reach[nodes] & (f != 0)
        reach[: self.num_internal] &= forced < 0
        return reach

    def kept_leaves(self) -> Tensor:
        """(L,) bool: leaves still in the pruned tree."""
        return self.kept_mask()[self.num_internal:]

    def structure(self) -> TreeStructure:
        """Kept nodes and the children table of the pruned tree (forced chains skipped)."""
        kept = self.kept_mask().cpu()
        forced = self.forced_route.cpu()
        internal = torch.nonzero(kept[: self.num_internal])[:, 0]
        children = torch.stack((2 * internal + 1, 2 * internal + 2), dim=1)
        for _ in range(self.depth):  # follow forced nodes down to the kept node that replaced them
            inner = children < self.num_internal
            f = forced[children.clamp(max=self.num_internal - 1)]
            step = inner & (f >= 0)
            children = torch.where(step, 2 * children + 1 + f.clamp(min=0), children)
        return TreeStructure(
            internal=internal.tolist(),
            leaves=(torch.nonzero(kept[self.num_internal:])[:, 0] + self.num_internal).tolist(),
            children={int(n): (int(l), int(r)) for n, (l, r) in zip(internal, children)},
            depth=self.depth,
        )

    @torch.no_grad()
    def prune(self, threshold: float = 0.01) -> list[int]:
        """Remove every subtree whose kept leaves all have max_k softmax(c_l)_k <= threshold.

        The removed subtree's parent is removed too and its sibling takes the parent's place (the parent
        is forced towards the sibling). The root is never removed. Returns the removed node ids.
        Note that max_k softmax >= 1/K, so a threshold below 1/K (0.01 with K <= 100) prunes nothing.
        """
        before = self.kept_mask()
        below = _descendant_leaves(self.depth, before.device)
        kept_leaf = before[self.num_internal:]
        high = self.leaf_distributions().amax(dim=1) > threshold
        has_kept = (below & kept_leaf[None]).any(dim=1)
        prunable = has_kept & ~(below & (kept_leaf & high)[None]).any(dim=1)
        if prunable[0]:
            warnings.warn(f"every leaf is below the pruning threshold {threshold}; the tree is left unpruned")
            return []
        for parent, (left, right) in self.structure().children.items():
            # Only maximal prunable subtrees go (their parent is not prunable), so at most one side of a
            # parent. As in the official prune.py a child of the root is kept: removing it removes the root.
            if parent == 0 or prunable[parent]:
                continue
            if prunable[left] or prunable[right]:
                self.forced_route[parent] = 0 if prunable[right] else 1
        after = self.kept_mask()
        return torch.nonzero(before & ~after)[:, 0].tolist()

    def projection_classes(self) -> Tensor:
        """(P, K) bool: classes a node may project onto = argmax classes of the kept leaves below it.

        Bypassed and removed nodes get no class (their prototypes are left unchanged).
        """
        kept = self.kept_mask()
        below = _descendant_leaves(self.depth, kept.device)[: self.num_internal]
        leaf_class = F.one_hot(self.leaves.argmax(dim=1), self.num_classes).float()
        leaf_class = leaf_class * kept[self.num_internal:, None].float()
        allowed = (below.float() @ leaf_class) > 0
        return allowed & kept[: self.num_internal, None]

    # ------------------------------------------------------------------ prototype interface
    def prototype_tensor(self) -> Tensor:
        """(P, D) the prototypes of the decision nodes, in node order."""
        return self.prototype_vectors[self.node_prototype]

    def assign_prototypes(self, ids: Tensor, vectors: Tensor) -> None:
        self.prototype_vectors.data[self.node_prototype[ids]] = vectors.to(self.prototype_vectors)

    def distances(self, images: Tensor) -> Tensor:
        """(B, P, h, w) Euclidean distances of every latent patch to every node's prototype."""
        return self.distance_maps(self.latent(images))

    def similarity(self, distances: Tensor) -> Tensor:
        """The routing probability exp(-d) of going right ("present")."""
        return torch.exp(-distances)

    def prototype_class_connection(self) -> Tensor:
        """(P, K) 1 where a class is the argmax of a kept leaf below the node (`projection_classes`)."""
        return self.projection_classes().float()

    @property
    def prototype_classes(self) -> Tensor:
        """(P,) -1: a decision node serves every class of the leaves below it, none in particular."""
        return torch.full((self.num_internal,), -1, dtype=torch.long, device=self.forced_route.device)

    def prototype_name(self, j: int) -> str:
        return f"node {j}"

    def prototype_active(self) -> Tensor:
        """(P,) the decision nodes of the pruned tree."""
        return self.kept_mask()[: self.num_internal]

    def push_classes(self) -> Tensor:
        """The class constraint of the projection (`projection_classes`)."""
        return self.projection_classes()

    def push_boxes(self, similarity_maps: Tensor, image_size: tuple[int, int]) -> Tensor:
        """The box of the best cell: where its upsampled one-hot mask exceeds 1 - `upsample_threshold`
        (the official upsample.py)."""
        h, w = similarity_maps.shape[-2:]
        cells = cell_boxes((h, w), image_size, self.hparams.upsample_threshold).to(similarity_maps.device)
        return cells[similarity_maps.flatten(1).argmax(dim=1)]

    # ------------------------------------------------------------------ explanation
    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | int | None = None, top_k: int | None = None) -> Explanation:
        """Greedy decision path of each image, its leaf distribution, and the path's similarity heatmap.

        logits are the greedy leaf's log distribution (the prediction the path explains); the heatmap is
        the max over the path's decision nodes of their bicubically upsampled similarity maps exp(-d).
        evidence: ``path`` (per image, a list of dicts: node, prototype, similarity, present, box as
        (x0, y0, x1, y1)), ``leaf`` (B,), ``leaf_distribution`` (B, K), ``path_nodes`` (B, depth),
        ``path_decision`` (B, depth) bool (False for forced nodes), ``path_present`` (B, depth),
        ``path_similarity`` (B, depth), ``path_boxes`` (B, depth, 4), ``distributed_logits`` (B, K), and the
        prototype evidence of every prototype family (`PrototypeModel.prototype_evidence`) for the `top_k`
        (default: depth) most similar kept nodes, weighted by their connection to the target class.
        """
        out = self.tree_forward(images)
        similarity = torch.exp(-out.min_distances)
        nodes, present, leaf = greedy_route(similarity, self.forced_route, self.depth)
        decision = self.forced_route[nodes] < 0
        logits = self.leaf_log_distributions()[leaf]
        target = self._target(logits, target)
        maps = torch.exp(-out.distance_maps)  # (B, P, h, w)
        h, w = maps.shape[-2:]
        path_maps = maps.gather(1, nodes[:, :, None, None].expand(-1, -1, h, w))
        size = tuple(images.shape[-2:])
        up = upsample_maps(path_maps.flatten(0, 1), size).view(*nodes.shape, *size).clamp(0, 1)
        heatmap = up.masked_fill(~decision[:, :, None, None], 0.0).amax(dim=1)  # the root always decides
        position = path_maps.flatten(2).argmax(dim=2)  # best-matching latent cell of each path node
        boxes = cell_boxes((h, w), tuple(images.shape[-2:]), self.hparams.upsample_threshold).to(images.device)[position]
        path_sim = similarity.gather(1, nodes)
        paths = [
            [
                {"node": int(n), "prototype": int(self.node_prototype[n]), "similarity": float(s),
                 "present": bool(p), "box": tuple(int(v) for v in box)}
                for n, s, p, box, d in zip(nodes[b], path_sim[b], present[b], boxes[b], decision[b]) if d
            ]
            for b in range(images.shape[0])
        ]
        evidence = {
            "path": paths, "leaf": leaf, "leaf_distribution": self.leaf_distributions()[leaf],
            "path_nodes": nodes, "path_decision": decision, "path_present": present,
            "path_similarity": path_sim, "path_boxes": boxes, "distributed_logits": out.logits,
        }
        ids = self.top_prototypes(maps, self.depth if top_k is None else top_k)
        weights = self.prototype_class_connection()[:, target].T
        evidence.update(self.prototype_evidence(maps, weights, ids, size))
        return Explanation(logits=logits, target=target, heatmap=heatmap, evidence=evidence)


class ProtoTreeEnsemble(nn.Module):
    """Several trees whose predicted distributions y_hat are averaged (the paper's ensembles).

    The spec's ensemble averages y_hat; in log mode the official script averages the trees' outputs,
    which are then log y_hat (a geometric mean); here probabilities are averaged in every mode.
    """

    def __init__(self, trees: list[ProtoTree]) -> None:
        super().__init__()
        if not trees:
            raise ValueError("an ensemble needs at least one tree")
        classes = {t.num_classes for t in trees}
        if len(classes) != 1:
            raise ValueError(f"all trees of an ensemble must have the same num_classes, got {sorted(classes)}")
        self.trees = nn.ModuleList(trees)

    @classmethod
    def from_checkpoints(cls, paths: list[str], map_location: str = "cpu") -> "ProtoTreeEnsemble":
        """An ensemble of the trees in Lightning checkpoints (weights only)."""
        return cls([ProtoTree.load_from_checkpoint(p, map_location=map_location, weights_only=True) for p in paths])

    def forward(self, images: Tensor, mode: Mode = "distributed") -> Tensor:
        """log of the mean of the trees' y_hat (B, K) under a routing mode."""
        outs = [tree.tree_forward(images) for tree in self.trees]
        logs = [out.logits if mode == "distributed" else tree.route(out, mode)[0] for tree, out in zip(self.trees, outs)]
        return torch.logsumexp(torch.stack(logs), dim=0) - math.log(len(self.trees))


# ---------------------------------------------------------------------- registered builders
def _prototree(default_backbone: str, **kwargs) -> ProtoTree:
    kwargs.setdefault("num_classes", 200)
    kwargs.setdefault("backbone", default_backbone)
    return ProtoTree(**kwargs)


@register_model
def prototree_resnet50(**kwargs) -> ProtoTree:
    """The paper's CUB tree: ResNet-50 trunk (layer4.2 trained with lr_block), depth 9, D 256."""
    return _prototree("resnet50", **kwargs)


@register_model
def prototree_resnet50_cars(**kwargs) -> ProtoTree:
    """The paper's Cars tree: ResNet-50 trunk, depth 11, 196 classes."""
    kwargs.setdefault("depth", 11)
    kwargs.setdefault("num_classes", 196)
    return _prototree("resnet50", **kwargs)


@register_model
def prototree_resnet18(**kwargs) -> ProtoTree:
    """ResNet-18 trunk (the whole trunk is the lr_net group)."""
    return _prototree("resnet18", **kwargs)


@register_model
def prototree_resnet10t(**kwargs) -> ProtoTree:
    """timm's ResNet-10-T trunk cut after layer3 (256 channels, stride 16), depth 5, D 64: a CPU-sized tree."""
    return _prototree("resnet10t", **{"stage": 3, "depth": 5, "num_features": 64, **kwargs})


@register_model
def prototree_test_resnet(**kwargs) -> ProtoTree:
    """timm's tiny `test_resnet` trunk, depth 3, D 16: for tests and quick CPU experiments."""
    kwargs.setdefault("depth", 3)
    kwargs.setdefault("num_features", 16)
    kwargs.setdefault("freeze_epochs", 0)
    return _prototree("test_resnet", **kwargs)


register_pretrained(PretrainedEntry(
    name="prototree_resnet10t.synthparts", class_path="models.prototree.ProtoTree",
    dataset="SyntheticParts (10 classes, 64 px)", config="configs/prototree/synthetic.yaml",
    notes="depth-5 tree on timm's ResNet-10-T cut after layer3, pruned and projected; push set = train split",
))


register_pretrained(PretrainedEntry(
    name="prototree_resnet10t.synthparts128", class_path="models.prototree.ProtoTree",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/prototree/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml",),
    notes="the synthparts recipe at 128 px (8 x 8 latent grid, the CUB-like operating point of the comparison)",
))
