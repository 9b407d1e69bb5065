"""B-cos networks (Böhle et al., CVPR 2022; B-cos v2, TPAMI 2024): dynamic linear classifiers whose
own linear summary W(x) is the explanation.

Every layer is a B-cos transform (ŵᵀx)·|cos(x, ŵ)|^(B−1) with unit-norm ŵ, no biases and no
activations, so the logit of class c is [W(x)]_c · x + b exactly, with W(x) the product of the
layers' dynamic weights and b the fixed logit bias. The input is encoded as [x, 1 − x] (6 channels,
raw [0, 1] pixels, no mean/std normalisation).

What comes from the ``bcos`` package (B-cos v2, Apache-2.0; checked with this torch): the layers
(`BcosConv2d`, `LogitLayer`, the bias-free uncentered/position norms), the trunks (`bcos.models`:
ResNet/ResNeXt family and DenseNet), `AddInverse`, the BCE losses, the warm-up + cosine schedule
(`LRSchedulerFactory`), `explanation_mode` and the colour coding `gradient_to_image`. What is written
here: the zoo's LightningModule around them, the batched explanation (the package's `explain` takes one
image), the logit bias bookkeeping, and adaptive gradient clipping wired into Lightning (timm's AGC, the
algorithm of ``bcos.training.agc``, whose package imports Lightning 1.x).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal

import torch
from bcos.common import explanation_mode, gradient_to_image
from bcos.data.transforms import AddInverse
from bcos.models import densenet as bcos_densenet
from bcos.models import resnet as bcos_resnet
from bcos.modules import BcosConv2d, norms
from bcos.modules.losses import BinaryCrossEntropyLoss, UniformOffLabelsBCEWithLogitsLoss
from bcos.optim import LRSchedulerFactory
from timm.utils.agc import adaptive_clip_grad
from torch import Tensor, nn

from .base import Explanation, InterpretableClassifier
from .pretrained import PretrainedEntry, register_pretrained
from .registry import register_model

__all__ = ["BcosNet", "BCOS_TRUNKS", "BCOS_NORMS", "explanation_smoothing"]

# B-cos versions of the zoo's trunks, as the package builds them: every conv a BcosConv2d, ReLUs
# removed, max pool -> AvgPool2d(3, 2, 1), the classifier a 1x1 B-cos conv before global average pooling.
BCOS_TRUNKS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": bcos_resnet.resnet18,
    "resnet34": bcos_resnet.resnet34,
    "resnet50": bcos_resnet.resnet50,
    "resnet101": bcos_resnet.resnet101,
    "resnet152": bcos_resnet.resnet152,
    "resnext50_32x4d": bcos_resnet.resnext50_32x4d,
    "densenet121": bcos_densenet.densenet121,
}

# Normalisation layers, all bias-free (a bias would break W(x)x = logit - b). "bnu": v2's ImageNet
# default, batch norm without centering; "pn": the package's default, a centered LayerNorm over channels
# (centering is linear); "none": v1, normalisation layers deleted.
BCOS_NORMS: dict[str, Callable[..., nn.Module]] = {
    "bnu": norms.NoBias(norms.BatchNormUncentered2d),
    "pn": norms.NoBias(norms.DetachablePositionNorm2d),
    "none": nn.Identity,
}

_LOSSES = ("bce", "uniform_off_bce", "ce")


def explanation_smoothing(width: int) -> int:
    """Kernel of the alpha smoothing of the colour coding: the paper's 15 at 224 px, scaled to the
    image and odd (so the map keeps its size)."""
    k = max(1, round(15 * width / 224))
    return k if k % 2 else k + 1


class BcosNet(InterpretableClassifier):
    """A B-cos network behind the zoo's contract; its explanation is the contribution map W(x) ⊙ x.

    Args:
        num_classes: number of classes K.
        architecture: a trunk of `BCOS_TRUNKS` (the package's B-cos ResNet/ResNeXt/DenseNet).
        model_args: extra arguments of the trunk's constructor, e.g. ``{"inplanes": 16}`` for a ResNet
            at a quarter of the width, ``{"small_inputs": True}`` for the CIFAR stem (3x3 conv, no pool).
        norm: ``"bnu"`` (v2 ImageNet), ``"pn"`` (the package's default) or ``"none"`` (v1); see `BCOS_NORMS`.
        b: the exponent B of every B-cos layer (2 in v1 ImageNet and all of v2; 1 is a unit-norm linear layer).
        max_out: max-out units per output channel (v2 ImageNet 1, v1 and v2 CIFAR 2).
        logit_temperature: the logits are divided by it (None = 1, as v2's CNNs).
        logit_bias: added to the logits (None = -log(K - 1), v2's choice: initial sigmoid ~ 1/K).
        loss: ``"bce"`` (one-hot BCE, v2 CIFAR and v1), ``"uniform_off_bce"`` (off targets 1/K, v2
            ImageNet) or ``"ce"``.
        agc_clip_factor: adaptive gradient clipping (unit-wise, eps 1e-3) as v2's CNN recipes; None = off.
        warmup_epochs: linear warm-up of the learning rate from `warmup_start_factor` x lr before the
            cosine schedule (scheduler ``"cosine"`` only).
        mean, std: must stay the identity (0, 1): the model takes raw [0, 1] pixels, with no mean/std
            normalisation; anything else is refused.
        **kwargs: optimisation arguments of `InterpretableClassifier` (default Adam, lr 1e-3, no weight
            decay, as v2).
    """

    def __init__(
        self,
        num_classes: int,
        architecture: str = "resnet18",
        model_args: dict | None = None,
        norm: Literal["bnu", "pn", "none"] = "bnu",
        b: float = 2.0,
        max_out: int = 1,
        logit_temperature: float | None = None,
        logit_bias: float | None = None,
        loss: Literal["bce", "uniform_off_bce", "ce"] = "bce",
        agc_clip_factor: float | None = None,
        warmup_epochs: int = 0,
        warmup_start_factor: float = 0.01,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        lr: float = 1e-3,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        **kwargs: Any,
    ) -> None:
        # Identity normalisation (the layer stays as the first one for channels_last); a checkpoint records it.
        # Declared here, not taken from **kwargs, so that LightningCLI's signature resolution offers these
        # identity defaults instead of the base class's ImageNet statistics.
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if mean != (0.0, 0.0, 0.0) or std != (1.0, 1.0, 1.0):
            raise ValueError("BcosNet takes raw [0, 1] pixels encoded as [x, 1 - x]: it has no mean/std normalisation")
        super().__init__(num_classes=num_classes, mean=mean, std=std, optimizer=optimizer, lr=lr, **kwargs)
        if architecture not in BCOS_TRUNKS:
            raise ValueError(f"unknown B-cos architecture {architecture!r}; choose from {sorted(BCOS_TRUNKS)}")
        if norm not in BCOS_NORMS:
            raise ValueError(f"unknown B-cos norm {norm!r}; choose from {sorted(BCOS_NORMS)}")
        if loss not in _LOSSES:
            raise ValueError(f"unknown B-cos loss {loss!r}; choose from {list(_LOSSES)}")
        if b < 1 or max_out < 1:
            raise ValueError(f"B-cos needs b >= 1 and max_out >= 1, got b={b}, max_out={max_out}")
        if num_classes < 2 and logit_bias is None:
            raise ValueError("the default logit bias -log(K - 1) needs num_classes >= 2; pass logit_bias")
        self.logit_bias = float(-math.log(num_classes - 1) if logit_bias is None else logit_bias)
        self.encode = AddInverse()
        self.net = BCOS_TRUNKS[architecture](
            num_classes=num_classes, in_chans=6, norm_layer=BCOS_NORMS[norm],
            conv_layer=functools.partial(BcosConv2d, b=b, max_out=max_out),
            # the package replaces a bias of 0 by its default (`bias or -log(K-1)`): pass a tiny one instead
            logit_bias=self.logit_bias if self.logit_bias != 0 else 1e-30, logit_temperature=logit_temperature,
            **(model_args or {}),
        )
        self.criterion = {"bce": BinaryCrossEntropyLoss(), "uniform_off_bce": UniformOffLabelsBCEWithLogitsLoss(),
                          "ce": nn.CrossEntropyLoss()}[loss]

    # ------------------------------------------------------------------ the network and its training
    def encoded(self, images: Tensor) -> Tensor:
        """The 6-channel input [x, 1 - x] (B, 6, H, W) of images in [0, 1]."""
        if not (isinstance(images, Tensor) and images.ndim == 4 and images.shape[1] == 3):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"BcosNet expects RGB images (B, 3, H, W) in [0, 1], got {got}")
        return self.encode(self.normalize(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.encoded(images))

    def compute_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self(images)
        loss = self.criterion(logits, labels)
        return logits, {"loss": loss, self.hparams.loss: loss}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        head = self.net.get_classifier()
        head_ids = {id(p) for p in head.parameters()}
        return {"backbone": [p for p in self.net.parameters() if id(p) not in head_ids], "head": list(head.parameters())}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if not (hp.warmup_epochs and hp.scheduler == "cosine"):
            return super().configure_optimizers()
        optimizer = super().configure_optimizers()["optimizer"]
        epochs = max(self.trainer.max_epochs or 1, hp.warmup_epochs + 1)
        scheduler = LRSchedulerFactory("cosineannealinglr", epochs=epochs, warmup_epochs=hp.warmup_epochs,
                                       warmup_method="linear", warmup_decay=hp.warmup_start_factor).create(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.hparams.agc_clip_factor:
            adaptive_clip_grad(self.parameters(), clip_factor=self.hparams.agc_clip_factor, eps=1e-3)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ the explanation
    def dynamic_linear_weights(self, images: Tensor, target: Tensor | int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(logits, target, x6, W): the encoded input (B, 6, H, W) and the dynamic linear weights W(x) of
        the target class (default: the prediction), so that logit_target = sum(W * x6) + logit_bias.

        W is the input gradient in explanation mode (the package detaches every dynamic scale and patch
        norm), computed in eval mode: the images of a batch do not interact.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError("BcosNet.explain needs gradients but torch.inference_mode is on; "
                               "leave the inference_mode block (in Lightning: Trainer(inference_mode=False))")
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad(), explanation_mode(self.net):
                x6 = self.encoded(images.detach()).detach().requires_grad_(True)
                logits = self.net(x6)
                target = self._target(logits, target)
                (weights,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x6)
        finally:
            self.train(was_training)
        return logits.detach(), target, x6.detach(), weights

    def explain(self, images: Tensor, target: Tensor | int | None = None, smooth: int | None = None,
                alpha_percentile: float = 99.5) -> Explanation:
        """The contribution map of the target class (default: the prediction): heatmap = sum over the 6
        input channels of W(x) ⊙ x, which sums to logit - logit_bias.

        evidence: ``dynamic_linear_weights`` W (B, 6, H, W); ``colour`` (B, H, W, 4) the paper's RGBA
        colour coding of W (positive evidence only; alpha smoothed with kernel `smooth`, default
        `explanation_smoothing`, and cut at the `alpha_percentile`); ``logit_bias``.
        """
        logits, target, x6, weights = self.dynamic_linear_weights(images, target)
        smooth = explanation_smoothing(images.shape[-1]) if smooth is None else smooth
        colour = torch.stack([torch.from_numpy(gradient_to_image(x, w, smooth, alpha_percentile))
                              for x, w in zip(x6, weights)]).to(images.device)
        return Explanation(logits=logits, target=target, heatmap=(x6 * weights).sum(1),
                           evidence={"dynamic_linear_weights": weights, "colour": colour, "logit_bias": self.logit_bias})


# ---------------------------------------------------------------------------------------- builders
def _bcos(architecture: str, **kwargs) -> BcosNet:
    kwargs.setdefault("num_classes", 1000)
    return BcosNet(architecture=architecture, **kwargs)


@register_model
def bcos_resnet18(**kwargs) -> BcosNet:
    """B-cos ResNet-18 (v2: B = 2, no max-out, uncentered bias-free batch norm, logit bias -log(K-1))."""
    return _bcos("resnet18", **kwargs)


@register_model
def bcos_resnet18_quarter(**kwargs) -> BcosNet:
    """B-cos ResNet-18 at a quarter of the width (channels 16-128, 0.7M parameters): for CPUs."""
    kwargs.setdefault("model_args", {"inplanes": 16})
    return _bcos("resnet18", **kwargs)


@register_model
def bcos_resnet34(**kwargs) -> BcosNet:
    """B-cos ResNet-34."""
    return _bcos("resnet34", **kwargs)


@register_model
def bcos_resnet50(**kwargs) -> BcosNet:
    """B-cos ResNet-50."""
    return _bcos("resnet50", **kwargs)


@register_model
def bcos_densenet121(**kwargs) -> BcosNet:
    """B-cos DenseNet-121."""
    return _bcos("densenet121", **kwargs)


register_pretrained(PretrainedEntry(
    name="bcos_resnet18_quarter.synthparts", class_path="models.bcos.BcosNet",
    dataset="SyntheticParts (10 classes, 64 px)", config="configs/bcos/synthetic.yaml",
    notes="B-cos ResNet-18 at a quarter width (0.7M parameters), B = 2, uncentered batch norm, BCE",
))


register_pretrained(PretrainedEntry(
    name="bcos_resnet18_quarter.synthparts128", class_path="models.bcos.BcosNet",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/bcos/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml",),
    notes="the synthparts recipe at 128 px, the CUB-like operating point of the comparison",
))
