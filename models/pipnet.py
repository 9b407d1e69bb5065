"""PIP-Net, "Patch-based Intuitive Prototypes" (Nauta et al., CVPR 2023), as a LightningModule.

trunk (ConvNeXt-tiny with halved late strides, or a ResNet with stride-1 late stages) -> softmax over the
channels at every latent patch (each channel is a prototype) -> global max pooling -> non-negative sparse
linear layer. The official code (M-Nauta/PIPNet, ``pipnet/pipnet.py``, ``pipnet/train.py``, ``main.py``) is
followed; "Official:" comments say where and how, "Deviation:" where not.

Official evaluation-time behaviours:
- the inference clamp (pooled < 0.1 -> 0 before the classifier) is applied whenever the module is in eval
  mode, as the official evaluation and visualisation call ``forward(inference=True)``; training uses the raw
  pooled scores. OOD thresholds use the unclamped scores (official ``get_thresholds``).
- Deviation (optional): the official evaluation also shrinks the classifier weights by 1e-3 per test batch
  (``eval_pipnet``), which makes evaluating a model change it (issue #3). It is off by default
  (``shrink_on_eval=False``, as CaBRNet); True reproduces it in validation and test.
- the post-hoc zeroing of prototypes whose top-k scores on the push data are all <= 0.1 runs after training
  ("prune", as the official ``main.py``), after the top-k search ("push").

PIP-Net has no projection: its prototype records (source image, position, boxes, patch) come from a top-k
patch search over the push loader (`PrototypeModel.nearest_patches` under `ChannelDistance`), as the
official ``visualize_topk``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .base import Explanation, unpack_batch
from .phases import EpochPlan
from .pipnet_loss import (PHASES, alignment_loss, classification_loss, classifier_lr, cosine_lr, loss_weights,
                          pipnet_schedule, tanh_loss)
from .pipnet_layers import USED, ChannelDistance, NonNegLinear, official_groups, pipnet_trunk, prefix_match
from .pretrained import PretrainedEntry, register_pretrained
from .prototype_model import PrototypeModel
from .prototypes import PushResult, crop_patches, fetch_images, receptive_field_boxes, upsample_maps
from .registry import register_model

__all__ = ["ChannelDistance", "NonNegLinear", "PHASES", "PIPNet", "pipnet_trunk"]


# -------------------------------------------------------------------------------------------- model
class PIPNet(PrototypeModel):
    """PIP-Net.

    Args:
        num_classes: K.
        backbone, stage, pretrained_backbone: the trunk (`pipnet_trunk`); P = its output channels.
        num_features: 0 (official default) = the trunk's channels are the prototypes; > 0 inserts a 1x1 conv
            with bias to that many channels before the softmax (official: "not recommended").
        bias: a non-negative classifier bias (official ``--bias``; default none).
        epochs_pretrain, epochs, finetune_epochs, freeze_epochs: the schedule (`pipnet_schedule`; official
            10, 60, 3, 10). ``pretrained_classifier_start``: the finetune epochs run even without pretraining
            (official: when a checkpoint was loaded).
        lr, lr_block, lr_net: classifier, last blocks (add-on x10) and early trunk (official 0.05, 5e-4, 5e-4).
        weight_decay: of both AdamW optimisers (official 0).
        pretrain_backbone: train the backbone group in pretraining too (official: frozen; its comment
            suggests it for data far from ImageNet, e.g. a trunk trained from scratch).
        weight_shrink: subtracted from every classifier weight (then clamped at 0) after every phase-2 step
            and at the start of phase-2 epochs e = epochs or e % 30 == 0 (official 1e-3).
        inference_threshold: pooled scores below it are 0 in eval mode (official 0.1).
        shrink_on_eval: also shrink per validation / test batch (official evaluation; see the module docstring).
        zero_unused: after training, zero the weights of prototypes whose top-k scores are all <= 0.1.
        topk: images kept per prototype by the top-k search (official 10).
        patch_size: side of the stored uint8 patch images.
        official_strides: the official trunk strides (`pipnet_trunk`); False keeps the trunk's own.
        **kwargs: `InterpretableClassifier` arguments (mean, std, check_finite).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "convnext_tiny_26",
        stage: int | None = None,
        pretrained_backbone: bool | str = False,
        num_features: int = 0,
        bias: bool = False,
        epochs_pretrain: int = 10,
        epochs: int = 60,
        finetune_epochs: int = 3,
        freeze_epochs: int = 10,
        pretrained_classifier_start: bool = False,
        lr: float = 0.05,
        lr_block: float = 5e-4,
        lr_net: float = 5e-4,
        weight_decay: float = 0.0,
        pretrain_backbone: bool = False,
        weight_shrink: float = 1e-3,
        inference_threshold: float = 0.1,
        shrink_on_eval: bool = False,
        zero_unused: bool = True,
        topk: int = 10,
        patch_size: int = 32,
        official_strides: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, lr=lr, weight_decay=weight_decay, **kwargs)
        for key, value in {"epochs_pretrain": epochs_pretrain, "epochs": epochs, "finetune_epochs": finetune_epochs,
                           "freeze_epochs": freeze_epochs, "num_features": num_features}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PIP-Net: {key}={value!r} must be an integer >= 0")
        if topk < 1:
            raise ValueError(f"PIP-Net: topk={topk} must be >= 1")
        self.automatic_optimization = False
        self.backbone = pipnet_trunk(backbone, stage, pretrained_backbone, official_strides)
        self.groups = official_groups(backbone, self.backbone)
        channels = self.backbone.out_channels
        if num_features:
            conv = nn.Conv2d(channels, num_features, 1, bias=True)
            nn.init.xavier_uniform_(conv.weight, gain=nn.init.calculate_gain("sigmoid"))  # official init_weights_xavier
            self.add_on = nn.Sequential(conv, nn.Softmax(dim=1))
        else:
            self.add_on = nn.Sequential(nn.Softmax(dim=1))
        p = num_features or channels
        self.classifier = NonNegLinear(p, num_classes, bias=bias)
        self.register_prototype_records(p, patch_size)
        self.register_buffer("topk_source_index", torch.full((p, topk), -1))
        self.register_buffer("topk_similarity", torch.zeros(p, topk))
        self.register_buffer("shrunk_epoch", torch.tensor(-1))  # Lightning epoch of the last epoch-start shrink
        self.phase = "pretrain"

    push_distance = ChannelDistance()

    # ------------------------------------------------------------------------------ forward
    def latent(self, images: Tensor) -> Tensor:
        """(B, P, h, w) prototype maps: the softmax over channels of the trunk's features (images in [0, 1])."""
        return self.add_on(self.backbone(self.normalize(images)))

    def features(self, images: Tensor, inference: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(proto_features (B, P, h, w), pooled (B, P), out (B, K)) as the official forward;
        `inference` (default: eval mode) sets pooled < `inference_threshold` to 0 first."""
        proto_features = self.latent(images)
        pooled = proto_features.amax(dim=(2, 3))
        if not self.training if inference is None else inference:
            pooled = torch.where(pooled < self.hparams.inference_threshold, torch.zeros_like(pooled), pooled)
        return proto_features, pooled, self.classifier(pooled)

    def forward(self, images: Tensor) -> Tensor:
        """The class scores out = pooled relu(W)^T (+ b) (B, K): the logits of the zoo (argmax = prediction)."""
        return self.features(images)[2]

    # ------------------------------------------------------------------------------ losses
    def compute_losses(self, images: Tensor, labels: Tensor, plan: EpochPlan | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Scores and loss terms of one batch of two views.

        `images` (2B, 3, H, W) are the two views stacked (view 1 of every image, then view 2) with `labels`
        (B,); or one view (B images with B labels), which serves as both views (the official loader without
        augmentation gives two identical views). The weights of the terms are the phase's (`loss_weights`).
        Returns the scores of all 2B (or B) images.
        """
        two = len(images) == 2 * len(labels)
        if not two and len(images) != len(labels):
            raise ValueError(f"PIP-Net: {len(images)} images for {len(labels)} labels (expected B or 2B images)")
        plan = plan or self.plan()
        proto_features, pooled, out = self.features(images)
        f1, f2 = proto_features.chunk(2) if two else (proto_features, proto_features)
        p1, p2 = pooled.chunk(2) if two else (pooled, pooled)
        ys = torch.cat([labels, labels]) if two else labels
        terms = {"alignment": alignment_loss(f1, f2), "tanh": tanh_loss(p1, p2),
                 "classification": classification_loss(out, ys, self.classifier.normalization_multiplier)}
        wa, wt, wc = loss_weights(plan, self.hparams.epochs_pretrain)
        total = wc * terms["classification"] if plan.phase == "finetune" else wa * terms["alignment"] + wt * terms["tanh"] + wc * terms["classification"]
        return out, {"loss": total, **terms}

    def batch_losses(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Training: the losses of the batch's two views ("image", "image2"; one view serves as both without
        "image2"). Validation and test: the classification loss of the clamped scores and the sparsity figures."""
        images, labels = unpack_batch(batch)
        if stage != "train":
            _, pooled, out = self.features(images)
            loss = classification_loss(out, labels, self.classifier.normalization_multiplier)
            return out, labels, {"loss": loss, "classification": loss, **self.sparsity_figures(pooled, out)}
        if isinstance(batch, dict) and "image2" in batch:
            images = torch.cat([images, batch["image2"]])
        out, losses = self.compute_losses(images, labels)
        return out, torch.cat([labels, labels]) if len(out) == 2 * len(labels) else labels, losses

    # ------------------------------------------------------------------------------ phases
    def plan(self, epoch: int | None = None) -> EpochPlan:
        hp = self.hparams
        epoch = self.current_epoch if epoch is None else epoch
        return pipnet_schedule(epoch, hp.epochs_pretrain, hp.epochs, hp.finetune_epochs, hp.freeze_epochs,
                               hp.pretrained_classifier_start)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """backbone / to_freeze / to_train (official names), add_on, classifier; untrained trunk parts: "never"."""
        to_train, to_freeze, backbone = self.groups
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "to_freeze": [], "to_train": [], "never": []}
        for name, param in self.backbone.body.named_parameters():
            key = ("to_train" if prefix_match(name, to_train) else "to_freeze" if prefix_match(name, to_freeze)
                   else "backbone" if prefix_match(name, backbone) else "never")
            groups[key].append(param)
        groups["add_on"] = list(self.add_on.parameters())
        groups["classifier"] = [self.classifier.weight] + ([self.classifier.bias] if self.classifier.bias is not None else [])
        return groups

    def trainable_groups(self, phase: str) -> set[str]:
        """Official ``main.py``: pretraining trains to_train, to_freeze and the add-on (and the backbone group with
        `pretrain_backbone`); fine-tuning the classifier; "frozen" adds the classifier to pretraining's; "full"
        adds the backbone group. The multiplier and the "never" group never train."""
        if phase not in PHASES:
            raise ValueError(f"unknown PIP-Net phase {phase!r}; expected one of {PHASES}")
        base = {"to_train", "to_freeze", "add_on"}
        return {"pretrain": base | ({"backbone"} if self.hparams.pretrain_backbone else set()),
                "finetune": {"classifier"}, "frozen": base | {"classifier"},
                "full": base | {"classifier", "backbone"}}[phase]

    def set_phase(self, phase: str) -> None:
        """Make exactly the parameter groups of `phase` trainable (the others frozen)."""
        trainable = self.trainable_groups(phase)
        for name, params in self.parameter_groups().items():
            for p in params:
                p.requires_grad_(name in trainable)
                p.grad = None
        self.classifier.normalization_multiplier.requires_grad_(False)
        self.phase = phase

    def enter_phase(self, plan: EpochPlan) -> None:
        self.set_phase(plan.phase)
        hp = self.hparams
        # Official: W <- max(W - 1e-3, 0) at the start of phase-2 epochs e = epochs or e % 30 == 0 (once, also on resume).
        if (plan.phase != "pretrain" and hp.epochs > 1 and (plan.epoch == hp.epochs or plan.epoch % 30 == 0)
                and int(self.shrunk_epoch) != self.current_epoch):
            self.shrink_weights()
            self.shrunk_epoch.fill_(self.current_epoch)

    @torch.no_grad()
    def shrink_weights(self) -> None:
        """W <- max(W - weight_shrink, 0) (every weight, not only the small ones), m <- max(m, 1), b <- max(b, 0)."""
        c = self.classifier
        c.weight.copy_(torch.clamp(c.weight - self.hparams.weight_shrink, min=0.0))
        c.normalization_multiplier.clamp_(min=1.0)
        if c.bias is not None:
            c.bias.clamp_(min=0.0)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW for the net in pretraining, AdamW for the net in phase 2 (official: re-created for phase 2),
        AdamW for the classifier; groups and rates of the official ``get_optimizer_nn``."""
        hp = self.hparams
        if hp.get("group_lr"):
            raise ValueError("PIP-Net's learning rates are lr (classifier), lr_block and lr_net, not group_lr")
        groups = self.parameter_groups()

        def net() -> torch.optim.Optimizer:
            return torch.optim.AdamW([
                {"params": groups["backbone"], "lr": hp.lr_net, "name": "backbone"},
                {"params": groups["to_freeze"], "lr": hp.lr_block, "name": "to_freeze"},
                {"params": groups["to_train"], "lr": hp.lr_block, "name": "to_train"},
                {"params": groups["add_on"], "lr": hp.lr_block * 10, "name": "add_on"},
            ], lr=hp.lr, weight_decay=hp.weight_decay)

        classifier = torch.optim.AdamW([{"params": groups["classifier"], "lr": hp.lr, "name": "classifier"}],
                                       lr=hp.lr, weight_decay=hp.weight_decay)
        optimizers = [net(), net(), classifier]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def _set_learning_rates(self, plan: EpochPlan, batch_idx: int, optimizers: list) -> None:
        """Rates of this step as the official per-iteration schedulers would have them (closed forms)."""
        hp, iters = self.hparams, int(self.trainer.num_training_batches)
        pre, net, cls = (o.optimizer if hasattr(o, "optimizer") else o for o in optimizers)
        if plan.phase == "pretrain":  # CosineAnnealingLR(T_max = iters x E_pre, eta_min = lr_block / 100)
            step, total, eta, opt = (plan.epoch - 1) * iters + batch_idx, iters * hp.epochs_pretrain, hp.lr_block / 100, pre
        else:  # CosineAnnealingLR(T_max = iters x epochs, eta_min = lr_net / 100), not stepped in finetune epochs
            step, total, eta, opt = (plan.epoch - 1 - plan.joint_epochs) * iters + batch_idx, iters * hp.epochs, hp.lr_net / 100, net
            g = (plan.epoch - 1) * iters + batch_idx
            for group in cls.param_groups:
                group["lr"] = classifier_lr(group["initial_lr"], g, iters, hp.epochs)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(group["initial_lr"], eta, max(step, 0), total)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        plan = self.plan()
        optimizers = self.optimizers()
        self._set_learning_rates(plan, batch_idx, optimizers)
        pre, net, cls = optimizers
        stepped = {"pretrain": [pre], "finetune": [cls]}.get(plan.phase, [net, cls])
        loss = self._shared_step(batch, "train")
        if loss is None:
            return None
        for opt in (pre, net, cls):
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in stepped:
            opt.step()
        if plan.phase != "pretrain":  # official: after every phase-2 step
            self.shrink_weights()
        return loss.detach()

    def _eval_step(self, batch: Any, stage: str) -> Tensor:
        if self.hparams.shrink_on_eval:  # official eval_pipnet: per test batch, before its forward
            with torch.no_grad():
                self.classifier.weight.copy_(torch.clamp(self.classifier.weight - self.hparams.weight_shrink, min=0.0))
        return self._shared_step(batch, stage)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def final_actions(self) -> tuple[str, ...]:
        """After training: the top-k search that fills the prototype records ("push"), then (official) zeroing the
        prototypes it never finds with a score above 0.1 ("prune")."""
        return ("push", "prune") if self.hparams.zero_unused else ("push",)

    def run_action(self, action: str, loader: Any, epoch: int) -> Any:
        if action == "push":
            return self.push(loader, epoch=epoch)
        if action == "prune":
            return self.zero_unused_prototypes()
        return super().run_action(action, loader, epoch)

    def action_done(self, action: str, epoch: int) -> bool:
        return action == "push" and int(self.push_epoch) == epoch

    # ------------------------------------------------------------------------------ prototype interface
    def prototype_tensor(self) -> Tensor:
        """(P, P) one-hot selectors: prototype j is channel j of the latent softmax map (`ChannelDistance`)."""
        return torch.eye(self.num_prototypes, device=self.classifier.weight.device)

    def assign_prototypes(self, ids: Tensor, vectors: Tensor) -> None:
        raise ValueError("PIP-Net's prototypes are channels of the trunk: there are no prototype vectors to overwrite")

    def prototype_layers(self) -> list[nn.Module]:
        """The layer whose output channels are the prototypes: the add-on 1x1 conv, else the trunk's last conv
        (re-drawing it is PIP-Net's "randomise the prototypes" step of the sanity checks)."""
        convs = [m for m in self.add_on if isinstance(m, nn.Conv2d)] or [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)][-1:]
        return convs

    def distances(self, images: Tensor) -> Tensor:
        """(B, P, h, w) minus the prototype maps (the interface's distance: lower = more similar)."""
        return -self.latent(images)

    def similarity(self, distances: Tensor) -> Tensor:
        """The softmax probability of the prototype at a patch (in [0, 1])."""
        return -distances

    def prototype_class_connection(self) -> Tensor:
        """(P, K) the non-negative weights relu(W)^T."""
        return torch.relu(self.classifier.weight).T

    def prototype_active(self) -> Tensor:
        """(P,) prototypes with a weight > 1e-3 to some class (official "used" / relevant)."""
        return torch.relu(self.classifier.weight).amax(dim=0) > USED

    def push_boxes(self, similarity_maps: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(n, 4) the official patch of the argmax cell of each map (`patch_box`)."""
        h, w = similarity_maps.shape[-2:]
        flat = similarity_maps.flatten(1).argmax(dim=1)
        return self.patch_box(torch.stack([flat // w, flat % w], dim=1), (h, w), image_size)

    @staticmethod
    def patch_box(positions: Tensor, map_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        """(n, 4) x0, y0, x1, y1 of latent cells (n, 2) = (row, col): the official heuristic (``get_patch_size``,
        ``get_img_coordinates``): a patch of 32 px at 224 px (scaled: round(32 H / 224)) from row x skip with
        skip = round((H - patch) / (h - 1)), moved inside the image at the last row / column.
        Official at 26 x 26 maps its visualisation passes the map's shape with the batch axis, so this rule applies there too."""
        out = []
        for axis in (1, 0):  # x from columns, y from rows
            size, cells = image_size[axis], map_size[axis]
            patch = max(1, round(32 * size / 224))
            skip = round((size - patch) / max(cells - 1, 1))
            idx = positions[:, axis]
            lo = idx * skip
            hi = torch.clamp(lo + patch, max=size)
            hi = torch.where(idx == cells - 1, torch.full_like(hi, size), hi)
            lo = torch.where(hi == size, torch.full_like(lo, size - patch), lo)
            out.append((lo, hi))
        (x0, x1), (y0, y1) = out
        return torch.stack([x0, y0, x1, y1], dim=1).long()

    @torch.no_grad()
    def push(self, loader: Iterable, epoch: int | None = None) -> PushResult:
        """The top-k search that replaces a push: each prototype's `topk` images of the push loader with the largest
        pooled score (official ``visualize_topk``; one pass, all prototypes at once), stored in ``topk_source_index``
        and ``topk_similarity``; the records (source index, position, boxes, patch) are those of the top image.
        The prototypes themselves do not change."""
        modes = self._eval_mode()
        try:
            return self._top_k_records(loader, epoch)
        finally:
            self._restore_mode(modes)

    def _top_k_records(self, loader: Iterable, epoch: int | None) -> PushResult:
        near = self.nearest_patches(loader, k=self.hparams.topk)
        found = near.sample_index[:, 0] >= 0
        size = None
        sources = near.sample_index[:, 0].clamp_min(0)
        unique, inverse = torch.unique(sources[found], return_inverse=True)
        boxes = torch.full_like(self.prototype_box, -1)
        patches = self.prototype_patch.clone()
        if len(unique):
            images = fetch_images(loader, unique)
            size = tuple(images.shape[-2:])
            h, w = self.receptive_field(size[0]).size, self.receptive_field(size[1]).size  # the map's size
            ids = found.nonzero().squeeze(1)
            boxes[ids] = self.patch_box(near.position[ids, 0].cpu(), (h, w), size).to(boxes)
            patches[ids] = crop_patches(images, inverse.cpu(), boxes[ids].cpu(), self.patch_size).to(patches)
        size = size or tuple(self.prototype_image_size.tolist())
        position = torch.where(found[:, None], near.position[:, 0], torch.full_like(near.position[:, 0], -1))
        rf = receptive_field_boxes(self.receptive_field(size[0]), self.receptive_field(size[1]), position.cpu())
        self.prototype_source_index.copy_(torch.where(found, near.sample_index[:, 0], torch.full_like(sources, -1)))
        self.prototype_position.copy_(position)
        self.prototype_distance.copy_(near.distance[:, 0])
        self.prototype_rf_box.copy_(rf)
        self.prototype_box.copy_(boxes)
        self.prototype_patch.copy_(patches)
        self.prototype_image_size.copy_(torch.tensor(size))
        self.topk_source_index.copy_(near.sample_index)
        self.topk_similarity.copy_(torch.where(near.sample_index >= 0, -near.distance, torch.zeros_like(near.distance)))
        self.push_epoch.fill_(self.current_epoch if epoch is None else epoch)
        return PushResult(vectors=self.prototype_tensor(), distance=near.distance[:, 0], sample_index=self.prototype_source_index.clone(),
                          position=position, found=found, records={"box": boxes, "patch": patches})

    @torch.no_grad()
    def zero_unused_prototypes(self) -> Tensor:
        """Zero the weights of prototypes whose top-k scores (after the inference clamp) are all <= 0.1 (official);
        returns their ids. Needs a top-k search first (`push`)."""
        if int(self.push_epoch) < 0:
            raise RuntimeError("PIP-Net: zero_unused_prototypes needs the top-k search first (push)")
        scores = torch.where(self.topk_similarity < self.hparams.inference_threshold, torch.zeros_like(self.topk_similarity),
                             self.topk_similarity)
        unused = (scores <= 0.1).all(dim=1) & self.prototype_active()
        self.classifier.weight[:, unused] = 0
        return unused.nonzero().squeeze(1)

    # ------------------------------------------------------------------------------ explanations
    def scoring_sheet(self, threshold: float = 0.0) -> list[list[tuple[int, float]]]:
        """Per class, its prototypes with weight > `threshold` and their weights, by weight (the official sheet
        prints weight > 1e-3; with the default 0 every prototype that can add to the score is listed, so
        pooled x weight summed over a class's sheet (+ bias) is its score)."""
        weights = torch.relu(self.classifier.weight.detach()).cpu()
        sheet = []
        for row in weights:
            ids = (row > threshold).nonzero().squeeze(1)
            ids = ids[row[ids].argsort(descending=True)]
            sheet.append([(int(j), float(row[j])) for j in ids])
        return sheet

    def sparsity_figures(self, pooled: Tensor | None = None, out: Tensor | None = None) -> dict[str, Tensor]:
        """The official figures: global size (prototypes with a weight > 1e-3), sparsity (share of weights
        <= 1e-3); with clamped `pooled` (B, P) and scores `out`: local size (mean number of prototypes with
        pooled x w > 1e-3 for some class), local size of the predicted class, and the abstention rate."""
        w = torch.relu(self.classifier.weight.detach())
        figures = {"global_size": (w > USED).any(dim=0).sum().float(), "sparsity": (w <= USED).float().mean()}
        if pooled is not None:
            contrib = pooled.detach()[:, None, :] * w[None]  # (B, K, P)
            figures["local_size"] = (contrib > USED).any(dim=1).sum(dim=1).float().mean()
            pred = out.detach().argmax(dim=1)
            figures["local_size_predicted"] = (contrib[torch.arange(len(pred)), pred] > USED).sum(dim=1).float().mean()
            figures["abstained"] = (out.detach().amax(dim=1) == 0).float().mean()
        return figures

    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | int | None = None, top_k: int = 10,
                top_classes: int = 3) -> Explanation:
        """The scores (with the inference clamp) and the local explanation of each image.

        heatmap: sum over the target's prototypes of w x the upsampled prototype map, for the prototypes present
        (pooled >= 0.1). evidence: the shared prototype evidence of the `top_k` prototypes with the largest
        pooled x weight towards the target; ``pooled`` (B, P) clamped scores; ``scores`` (B, K); ``scoring_sheet``
        per image, for its `top_classes` best classes, the prototypes present with (prototype, pooled, weight,
        pooled x weight) where |pooled x weight| > 0.01 (official ``vis_pred``); ``abstained`` (B,) bool (no
        prototype of a positive weight reaches 0.1: every score 0); and the sparsity figures (`sparsity_figures`).
        """
        was_training = self.training
        self.eval()
        try:
            proto_features, pooled, out = self.features(images, inference=True)
        finally:
            self.train(was_training)
        target = self._target(out, target)
        w = torch.relu(self.classifier.weight)
        weights = w[target]  # (B, P)
        contribution = pooled * weights
        k = min(top_k, self.num_prototypes)
        ids = contribution.topk(k, dim=1).indices
        size = tuple(images.shape[-2:])
        present = (pooled > 0).float()
        heatmap = upsample_maps(torch.einsum("bp,bphw->bhw", weights * present, proto_features), size)
        evidence = self.prototype_evidence(proto_features, weights, ids, size)
        classes = out.topk(min(top_classes, self.num_classes), dim=1).indices
        sheets = []
        for b in range(len(images)):
            sheet = {}
            for c in classes[b].tolist():
                row = pooled[b] * w[c]
                js = (row.abs() > 0.01).nonzero().squeeze(1)
                js = js[row[js].argsort(descending=True)]
                sheet[c] = [(int(j), float(pooled[b, j]), float(w[c, j]), float(row[j])) for j in js]
            sheets.append(sheet)
        evidence.update({**self.sparsity_figures(pooled, out), "pooled": pooled, "scores": out, "scoring_sheet": sheets,
                         "abstained": out.amax(dim=1) == 0})
        return Explanation(logits=out, target=target, heatmap=heatmap, evidence=evidence)

    # ------------------------------------------------------------------------------ OOD detection
    @torch.no_grad()
    def ood_thresholds(self, loader: Iterable, percent: float = 95.0) -> Tensor:
        """(K,) per predicted class the score above which an image is in-distribution (official ``get_thresholds``):
        the (100 - percent)th percentile of max(out) (unclamped) of the images predicted as that class on
        in-distribution data (classes never predicted: the mean), then x 0.999 until >= percent % of them pass
        (computed in float64; float32 thresholds are returned)."""
        modes = self._eval_mode()
        try:
            scores, preds = [], []
            for batch in loader:
                images, _ = unpack_batch(batch)
                out = self.features(images.to(self.device), inference=False)[2]
                best, pred = out.max(dim=1)
                scores.append(best.cpu())
                preds.append(pred.cpu())
        finally:
            self._restore_mode(modes)
        scores, preds = torch.cat(scores).double(), torch.cat(preds)
        thresholds = torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        for c in preds.unique().tolist():
            thresholds[c] = torch.quantile(scores[preds == c], 1 - percent / 100)  # numpy's linear percentile
        thresholds = torch.where(thresholds.isnan(), thresholds[~thresholds.isnan()].mean(), thresholds)
        # Official: the first check counts scores above the thresholds, the loop's checks those at or above.
        passed = (scores > thresholds[preds]).double().mean()
        while percent < 100 and passed < percent / 100:
            thresholds = thresholds * 0.999
            passed = (scores >= thresholds[preds]).double().mean()
        return thresholds.float()

    @torch.no_grad()
    def in_distribution(self, images: Tensor, thresholds: Tensor) -> Tensor:
        """(B,) bool: max(out) (unclamped) >= the threshold of the predicted class (official ``eval_ood``)."""
        out = self.features(images, inference=False)[2]
        best, pred = out.max(dim=1)
        return best >= thresholds.to(out.device)[pred]


# ---------------------------------------------------------------------------------------- builders
def _pipnet(backbone: str, **kwargs: Any) -> PIPNet:
    kwargs.setdefault("num_classes", 200)
    return PIPNet(backbone=backbone, **kwargs)


@register_model
def pipnet_convnext_tiny_26(**kwargs: Any) -> PIPNet:
    """The paper's default: ConvNeXt-tiny with halved strides in stages 3 and 4 (26 x 26 maps, 768 prototypes)."""
    return _pipnet("convnext_tiny_26", **kwargs)


@register_model
def pipnet_convnext_tiny_13(**kwargs: Any) -> PIPNet:
    """ConvNeXt-tiny with a halved stride in stage 4 only (13 x 13 maps, 768 prototypes)."""
    return _pipnet("convnext_tiny_13", **kwargs)


@register_model
def pipnet_resnet50(**kwargs: Any) -> PIPNet:
    """torchvision's ImageNet ResNet-50 (timm ``resnet50.tv_in1k``) with stride-1 layer3 and layer4 (28 x 28, 2048)."""
    return _pipnet("resnet50.tv_in1k", **kwargs)


@register_model
def pipnet_resnet50_inat(**kwargs: Any) -> PIPNet:
    """ResNet-50 for BBN's iNaturalist-2017 weights (give the file as pretrained_backbone)."""
    return _pipnet("resnet50_inat", **kwargs)


@register_model
def pipnet_resnet18(**kwargs: Any) -> PIPNet:
    """timm's ResNet-18 cut after layer2 (stride 8, as the official ResNets' stride-1 late stages: 8 x 8 maps at
    64 px, 128 prototypes): CPU-sized. With stage 3 or 4 those layers run at stride 1."""
    kwargs.setdefault("stage", 2)
    return _pipnet("resnet18", **kwargs)


@register_model
def pipnet_test_resnet(**kwargs: Any) -> PIPNet:
    """timm's tiny `test_resnet` trunk cut after layer2 (for tests)."""
    kwargs.setdefault("num_classes", 4)
    kwargs.setdefault("stage", 2)
    return _pipnet("test_resnet", **kwargs)


register_pretrained(PretrainedEntry(
    name="pipnet_resnet18.synthparts", class_path="models.pipnet.PIPNet",
    dataset="SyntheticParts (10 classes, 64 px)", config="configs/pipnet/synthetic.yaml",
    notes="ResNet-18 cut after layer2 (stride 8: 8 x 8 maps, 128 channel prototypes), self-supervised "
          "pretraining then the second phase, top-k search on the train split (records = each prototype's top "
          "patch), unused prototypes zeroed",
))


register_pretrained(PretrainedEntry(
    name="pipnet_resnet18.synthparts128", class_path="models.pipnet.PIPNet",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/pipnet/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml",),
    notes="the synthparts recipe at 128 px (16 x 16 latent grid, the CUB-like operating point of the comparison)",
))
