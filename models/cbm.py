"""Concept bottleneck models (Koh et al., ICML 2020): trunk -> concept layer g -> label predictor f.

g maps the trunk's globally average-pooled features (after dropout) to one logit per concept, l = g(x);
the concept probability is sigmoid(l). f is one linear layer (the paper's logistic regression) on the
concept logits or, with ``use_sigmoid``, on the probabilities. The three training modes of the paper:

* ``joint``: min CE(f(g(x)), y) + lambda * sum_j w_j BCE(l_j, c_j), divided by (1 + lambda k) as the
  official code's ``-normalize_loss`` does (lambda per concept, summed over the k concepts);
* ``sequential``: g on the concept loss (mean over concepts) for `concept_epochs`, then g frozen and f
  on the *predicted* concept logits;
* ``independent``: g as above, then f on the *true* 0/1 concepts; at test time f reads sigmoid(l).

w_j are the concept weights (``weighted_loss``: N / N_pos,j - 1 on the training concepts, passed as
BCE's ``weight``, not ``pos_weight``, as the official ``find_class_imbalance``). Batches carry
``"concepts"`` (B, k) in {0, 1}. Test-time intervention replaces the predicted concepts of chosen
concept groups by the truth: 0/1 where f reads probabilities, else the 5th / 95th percentile of that
concept's predicted logits (the official code takes them over the evaluated set).
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MultilabelAccuracy

from .backbones import Backbone
from .base import Explanation, InterpretableClassifier, unpack_batch
from .phases import EpochPlan
from .pretrained import PretrainedEntry, register_pretrained
from .registry import register_model

__all__ = ["ConceptBottleneck", "MODES"]

MODES = ("joint", "sequential", "independent")
# (model, images, target) -> (B, H, W), e.g. functools.partial(explain.posthoc.attribute, method="gradcam")
ConceptAttribution = Callable[[nn.Module, Tensor, Tensor], Tensor]


class ConceptLogits(nn.Module):
    """A view of a concept bottleneck model whose "classes" are its concepts: images -> concept logits (B, k),
    so that any post-hoc method explains a concept logit (made on demand; holds no weights of its own)."""

    def __init__(self, model: "ConceptBottleneck") -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.concept_logits(images)


class ConceptBottleneck(InterpretableClassifier):
    """Concept bottleneck model on any zoo trunk.

    Args:
        num_classes: number of classes K.
        num_concepts: number of binary concepts k.
        concept_groups: group id of each concept (length k); test-time intervention replaces whole groups
            (CUB: attributes sharing the first 10 characters of their name; SyntheticParts: one part slot).
            None = every concept is its own group.
        concept_names: display names (length k); None = ``c0``, ``c1``, ...
        backbone, stage, pretrained_backbone: the trunk (`models.backbones.Backbone`).
        dropout: before the concept layer (the paper's Inception-v3: 0.5).
        mode: ``"joint"``, ``"sequential"`` or ``"independent"``.
        concept_loss_weight: the joint lambda (per concept, summed over concepts, as the official code).
        normalize_loss: divide the joint loss by (1 + lambda k) (official ``-normalize_loss``).
        use_sigmoid: f reads sigmoid(l) instead of l. None = the mode's default (independent: True,
            sequential and joint: False); independent requires True.
        weighted_loss: weight each concept's BCE by N / N_pos - 1 from the training concepts (computed at the
            start of fit from the datamodule's ``concept_positive_counts()``, stored as a buffer).
        concept_epochs: sequential / independent: epochs of the x -> c stage (g alone); f alone trains afterwards.
        **kwargs: optimisation arguments of `InterpretableClassifier` (`group_lr` names ``concepts``
            (trunk and concept layer) and ``predictor``).
    """

    def __init__(
        self,
        num_classes: int,
        num_concepts: int,
        concept_groups: Sequence[int] | None = None,
        concept_names: Sequence[str] | None = None,
        backbone: str = "resnet18",
        stage: int | None = None,
        pretrained_backbone: bool | str = False,
        dropout: float = 0.0,
        mode: Literal["joint", "sequential", "independent"] = "joint",
        concept_loss_weight: float = 0.01,
        normalize_loss: bool = True,
        use_sigmoid: bool | None = None,
        weighted_loss: bool = False,
        concept_epochs: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        if num_concepts < 1:
            raise ValueError(f"num_concepts must be >= 1, got {num_concepts}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if use_sigmoid is None:
            use_sigmoid = mode == "independent"
        if mode == "independent" and not use_sigmoid:
            raise ValueError("mode 'independent' trains f on 0/1 concepts, so f must read probabilities (use_sigmoid: true)")
        if mode != "joint" and concept_epochs < 1:
            raise ValueError(f"mode {mode!r} needs concept_epochs >= 1 (epochs of the x -> c stage), got {concept_epochs}")
        groups = list(range(num_concepts)) if concept_groups is None else [int(g) for g in concept_groups]
        if len(groups) != num_concepts or min(groups) < 0:
            raise ValueError(f"concept_groups must hold one group id >= 0 per concept ({num_concepts}), got {len(groups)}")
        names = [f"c{j}" for j in range(num_concepts)] if concept_names is None else [str(n) for n in concept_names]
        if len(names) != num_concepts:
            raise ValueError(f"concept_names must name each of the {num_concepts} concepts, got {len(names)}")
        self.mode, self.use_sigmoid, self.concept_names = mode, bool(use_sigmoid), names
        self.num_concepts = num_concepts
        self.backbone = Backbone(backbone, stage=stage, pretrained=pretrained_backbone)
        self.dropout = nn.Dropout(dropout)
        self.concept_layer = nn.Linear(self.backbone.out_channels, num_concepts)
        self.predictor = nn.Linear(num_concepts, num_classes)
        # Group ids renumbered 0..G-1 in order of first appearance.
        order = list(dict.fromkeys(groups))
        self.register_buffer("concept_group", torch.tensor([order.index(g) for g in groups], dtype=torch.long))
        self.register_buffer("concept_weight", torch.ones(num_concepts))
        for stage in ("train", "val", "test"):  # accuracy per concept, sigmoid(l) thresholded at 0.5
            setattr(self, f"{stage}_concept_metrics", MultilabelAccuracy(num_concepts, threshold=0.5, average="none"))

    @property
    def num_groups(self) -> int:
        """Number of concept groups (interventions replace a whole group)."""
        return int(self.concept_group.max()) + 1

    # ----------------------------------------------------------------------------- the network
    def features(self, images: Tensor) -> Tensor:
        """Trunk feature maps (B, C, h, w) for images in [0, 1]."""
        return self.backbone(self.normalize(images))

    def concept_logits(self, images: Tensor) -> Tensor:
        """Concept logits l = g(x), (B, k)."""
        return self.concept_layer(self.dropout(self.features(images).mean(dim=(2, 3))))

    def predictor_input(self, concept_logits: Tensor) -> Tensor:
        """What f reads: sigmoid(l) or l."""
        return torch.sigmoid(concept_logits) if self.use_sigmoid else concept_logits

    def predict_from_concepts(self, concept_logits: Tensor) -> Tensor:
        """Class logits f(.) of concept logits (B, k)."""
        return self.predictor(self.predictor_input(concept_logits))

    def forward(self, images: Tensor) -> Tensor:
        return self.predict_from_concepts(self.concept_logits(images))

    def concept_logit_model(self) -> ConceptLogits:
        """images -> concept logits, for post-hoc methods (target = concept index)."""
        return ConceptLogits(self)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        concepts = list(self.backbone.parameters()) + list(self.concept_layer.parameters())
        return {"concepts": concepts, "predictor": list(self.predictor.parameters())}

    # ----------------------------------------------------------------------------- training
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """``"joint"``; or ``"concepts"`` (x -> c) for `concept_epochs`, then ``"predictor"`` (c -> y, g frozen)."""
        epoch = self.current_epoch if epoch is None else epoch
        if self.mode == "joint":
            return EpochPlan("joint", epoch)
        return EpochPlan("concepts" if epoch < self.hparams.concept_epochs else "predictor", epoch)

    def enter_phase(self, plan: EpochPlan) -> None:
        trains_g = plan.phase in ("joint", "concepts")
        trains_f = plan.phase in ("joint", "predictor")
        for group, on in (("concepts", trains_g), ("predictor", trains_f)):
            for p in self.parameter_groups()[group]:
                p.requires_grad_(on)
                p.grad = None
        self._frozen_concepts = not trains_g
        self.train(self.training)

    def train(self, mode: bool = True) -> "ConceptBottleneck":
        super().train(mode)
        # A frozen g is the extracted x -> c model: BatchNorm statistics held, no dropout (official
        # sequential training reads concepts that g computed in eval mode).
        if mode and getattr(self, "_frozen_concepts", False):
            self.backbone.eval()
            self.dropout.eval()
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        groups = getattr(datamodule, "concept_groups", None)
        if groups is None:
            return
        if len(groups) != self.num_concepts:
            raise ValueError(f"the model has {self.num_concepts} concepts but the data ({type(datamodule).__name__}) has {len(groups)}")
        order = list(dict.fromkeys(groups))
        if [order.index(g) for g in groups] != self.concept_group.tolist():
            raise ValueError(f"the model's concept_groups differ from the data's ({type(datamodule).__name__}): "
                             f"pass concept_groups: {list(groups)}")

    def on_fit_start(self) -> None:
        if not self.hparams.get("weighted_loss"):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        counts = getattr(datamodule, "concept_positive_counts", None)
        if counts is None:
            raise ValueError("weighted_loss needs a datamodule with concept_positive_counts() (SyntheticParts, CUB200 "
                             "with attributes)")
        positives, total = counts()
        if len(positives) != self.num_concepts:
            raise ValueError(f"the data has {len(positives)} concepts but the model has {self.num_concepts}")
        positives = torch.as_tensor(positives, dtype=torch.float32).clamp_min(1.0)
        self.concept_weight.copy_(float(total) / positives - 1.0)

    def concept_loss(self, concept_logits: Tensor, concepts: Tensor) -> Tensor:
        """sum_j w_j BCE(l_j, c_j), each BCE a mean over the batch."""
        per_concept = F.binary_cross_entropy_with_logits(concept_logits, concepts.float(), reduction="none").mean(0)
        return (self.concept_weight * per_concept).sum()

    def losses(self, images: Tensor, labels: Tensor, concepts: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(class logits of the test-time path, concept logits, named loss terms) for the current phase."""
        if concepts.shape != (images.shape[0], self.num_concepts):
            raise ValueError(f"concepts must be (B, {self.num_concepts}) for {images.shape[0]} images, "
                             f"got {tuple(concepts.shape)}")
        phase = self.plan().phase
        k = self.num_concepts
        if phase == "predictor":
            with torch.no_grad():
                concept_logits = self.concept_logits(images)
        else:
            concept_logits = self.concept_logits(images)
        logits = self.predict_from_concepts(concept_logits)
        concept_term = self.concept_loss(concept_logits, concepts)
        if phase == "joint":
            ce = F.cross_entropy(logits, labels)
            total = ce + self.hparams.concept_loss_weight * concept_term
            if self.hparams.normalize_loss:
                total = total / (1 + self.hparams.concept_loss_weight * k)
            return logits, concept_logits, {"loss": total, "cross_entropy": ce, "concept_loss": concept_term}
        if phase == "concepts":  # x -> c alone: the official bottleneck loss, the mean over concepts
            ce = F.cross_entropy(logits.detach(), labels)
            return logits, concept_logits, {"loss": concept_term / k, "cross_entropy": ce, "concept_loss": concept_term}
        # c -> y with g frozen: on the true concepts (independent) or on g's logits, computed without gradient
        ce = F.cross_entropy(self.predictor(concepts.float()) if self.mode == "independent" else logits, labels)
        return logits, concept_logits, {"loss": ce, "cross_entropy": ce, "concept_loss": concept_term.detach()}

    def compute_losses(self, images: Tensor, labels: Tensor, concepts: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if concepts is None:
            raise ValueError("ConceptBottleneck needs the true concepts (B, k) of each batch: batches with 'concepts' "
                             "(SyntheticParts; CUB200 with attributes=true)")
        logits, _, losses = self.losses(images, labels, concepts)
        return logits, losses

    def batch_losses(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        images, labels = unpack_batch(batch)
        concepts = batch.get("concepts") if isinstance(batch, dict) else (batch[2] if len(batch) > 2 else None)
        if concepts is None:
            raise ValueError("ConceptBottleneck needs 'concepts' (B, k) in each batch (SyntheticParts yields them; "
                             "CUB200 with attributes=true)")
        logits, concept_logits, losses = self.losses(images, labels, concepts)
        getattr(self, f"{stage}_concept_metrics").update(torch.sigmoid(concept_logits.detach()), concepts.long())
        return logits, labels, losses

    def _log_concept_accuracy(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_concept_metrics")
        if not metric.update_called:
            return
        per_concept = metric.compute()
        metric.reset()
        self.log(f"{stage}/concept_acc", per_concept.mean(), sync_dist=stage != "train")
        for name, value in zip(self.concept_names, per_concept):
            self.log(f"{stage}/concept_acc/{name}", value, sync_dist=stage != "train")

    def on_train_epoch_end(self) -> None:
        self._log_concept_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        self._log_concept_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_concept_accuracy("test")

    # ----------------------------------------------------------------------------- intervention
    def intervention_values(self, concepts: Tensor, concept_logits: Tensor, percentiles: tuple[float, float] = (5, 95)) -> Tensor:
        """What replaces a predicted concept by its true value in f's input: 0/1 where f reads probabilities;
        else the `percentiles` of each concept's logits over `concept_logits` (the evaluated set)."""
        if self.use_sigmoid:
            return concepts.float()
        q = torch.tensor([percentiles[0] / 100, percentiles[1] / 100], device=concept_logits.device, dtype=concept_logits.dtype)
        low, high = torch.quantile(concept_logits, q, dim=0)  # linear interpolation, as np.percentile
        return torch.where(concepts > 0.5, high, low)

    def intervene(self, concept_logits: Tensor, concepts: Tensor, groups: Tensor,
                  reference_logits: Tensor | None = None) -> Tensor:
        """Class logits with the concepts of the intervened groups replaced by the truth.

        Args:
            concept_logits: predicted concept logits (B, k).
            concepts: true concepts (B, k) in {0, 1}.
            groups: (B, G) bool, the concept groups replaced per image.
            reference_logits: the set whose logit percentiles stand for 0 / 1 when f reads logits
                (default: `concept_logits`).
        """
        if groups.shape != (concept_logits.shape[0], self.num_groups):
            raise ValueError(f"groups must be (B, {self.num_groups}) bool, got {tuple(groups.shape)}")
        reference = concept_logits if reference_logits is None else reference_logits
        values = self.intervention_values(concepts, reference)
        replaced = groups[:, self.concept_group]
        return self.predictor(torch.where(replaced, values, self.predictor_input(concept_logits)))

    # ----------------------------------------------------------------------------- explanation
    @torch.no_grad()
    def _concept_maps(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        # g is linear after global average pooling, so the gradient of l_j w.r.t. the last feature maps is
        # g_j / (h w) everywhere: Grad-CAM of each concept logit at the trunk's last layer is its CAM.
        cams = torch.einsum("kc,bchw->bkhw", self.concept_layer.weight, features)
        return F.interpolate(cams, size=size, mode="bilinear", align_corners=False)

    def explain(self, images: Tensor, target: Tensor | int | None = None,
                attribution: ConceptAttribution | None = None) -> Explanation:
        """The predicted concepts, their contribution to the target class and a heatmap per concept.

        ``heatmap`` (B, H, W) is the chain rule through f: sum_j d logit_target / d l_j x map_j (with the
        default maps, Grad-CAM of the target class at the trunk's last layer before its ReLU, times h w). `attribution`
        computes the concept maps with a post-hoc method on the concept logit, e.g.
        ``functools.partial(explain.posthoc.attribute, method="integrated_gradients")``; None = CAM.

        evidence: ``concepts`` sigmoid(l) (B, k), ``concept_logits`` (B, k), ``contributions`` (B, k) =
        f's weight of the target x f's input (they sum to the target logit minus f's bias),
        ``concept_maps`` (B, k, H, W), ``concept_names`` and ``concept_group`` (k,).
        """
        with torch.no_grad():
            features = self.features(images)
            concept_logits = self.concept_layer(self.dropout(features.mean(dim=(2, 3))))
            inputs = self.predictor_input(concept_logits)
            logits = self.predictor(inputs)
        target = self._target(logits, target)
        weights = self.predictor.weight.detach()[target]  # (B, k)
        slope = inputs * (1 - inputs) if self.use_sigmoid else torch.ones_like(inputs)
        if attribution is None:
            maps = self._concept_maps(features, tuple(images.shape[-2:]))
        else:
            view = self.concept_logit_model()
            maps = torch.stack([attribution(view, images, torch.full_like(target, j)).to(images.device)
                                for j in range(self.num_concepts)], dim=1)
        heatmap = torch.einsum("bk,bkhw->bhw", weights * slope, maps)
        evidence = {"concepts": torch.sigmoid(concept_logits), "concept_logits": concept_logits,
                    "contributions": weights * inputs, "concept_maps": maps,
                    "concept_names": list(self.concept_names), "concept_group": self.concept_group.clone()}
        return Explanation(logits=logits, target=target, heatmap=heatmap, evidence=evidence)


# --------------------------------------------------------------------------------- builders
def _cbm(backbone: str, **kwargs: Any) -> ConceptBottleneck:
    kwargs.setdefault("num_classes", 200)
    kwargs.setdefault("num_concepts", 112)
    return ConceptBottleneck(backbone=backbone, **kwargs)


@register_model
def cbm_inception_v3(**kwargs: Any) -> ConceptBottleneck:
    """The paper's CUB model: Inception-v3 -> GAP -> dropout 0.5 -> 112 concepts -> linear -> 200 classes
    (no auxiliary head)."""
    kwargs.setdefault("dropout", 0.5)
    return _cbm("inception_v3", **kwargs)


@register_model
def cbm_resnet18(**kwargs: Any) -> ConceptBottleneck:
    """ResNet-18 trunk -> GAP -> concepts -> linear."""
    return _cbm("resnet18", **kwargs)


@register_model
def cbm_test_resnet(**kwargs: Any) -> ConceptBottleneck:
    """timm's tiny `test_resnet` trunk: for tests and quick CPU experiments."""
    return _cbm("test_resnet", **kwargs)


register_pretrained(PretrainedEntry(
    name="cbm_resnet18.synthparts", class_path="models.cbm.ConceptBottleneck", dataset="SyntheticParts (10 classes, 48 px)",
    config="configs/cbm/synthetic.yaml",
    notes="joint CBM, ResNet-18 cut after layer2, 20 concepts (the variant of each of the 4 part slots)",
))


register_pretrained(PretrainedEntry(
    name="cbm_resnet18.synthparts128", class_path="models.cbm.ConceptBottleneck",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/cbm/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml",),
    notes="the synthparts recipe at 128 px, the CUB-like operating point of the comparison",
))
