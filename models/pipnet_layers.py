"""PIP-Net's parts: the official trunks, their parameter groups, the non-negative classifier and the
push distance of channel prototypes (official ``features/*.py``, ``pipnet/pipnet.py``, ``util/args.py``)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbones import Backbone
from .prototypes import PushDistance

__all__ = ["USED", "ChannelDistance", "NonNegLinear", "official_groups", "pipnet_trunk", "prefix_match"]

USED = 1e-3  # official: a weight above this makes a prototype "used" / "relevant"


# ------------------------------------------------------------------------------------------- trunks
def _stride_one(module: nn.Module) -> None:
    """Stride 1 in a ResNet stage: stride-2 convs get stride 1, a ResNet-D shortcut's avg-pool goes."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and child.stride == (2, 2):
            child.stride = (1, 1)
        elif isinstance(child, nn.AvgPool2d) and child.stride in (2, (2, 2)):
            setattr(module, name, nn.Identity())
        else:
            _stride_one(child)


def pipnet_trunk(name: str, stage: int | None = None, pretrained: bool | str = False, official_strides: bool = True) -> Backbone:
    """The official trunks (``features/*.py``) as zoo `Backbone`s.

    ``convnext_tiny_26`` / ``convnext_tiny_13``: torchvision's ConvNeXt-tiny features (no final norm: it sits
    in the head), with the stride of every stride-2 conv with more than 100 (26 x 26 maps at 224 px) or 300
    (13 x 13) input channels halved. Pretrained = torchvision's ImageNet weights (official: always).
    Any other name is a timm trunk (e.g. ``resnet50.tv_in1k`` = torchvision's ImageNet ResNet-50, ``resnet18``)
    with layer3 and layer4 at stride 1, as the official ResNet features (28 x 28 at 224 px for ResNet-50);
    ``resnet50_inat`` is ResNet-50 with BBN's iNaturalist-2017 weights (pass the file as `pretrained`).
    ``official_strides=False`` keeps the trunk's own strides (e.g. to compare with a plain classifier on it).
    """
    if name.startswith("convnext_tiny_"):
        threshold = {"convnext_tiny_26": 100, "convnext_tiny_13": 300}.get(name)
        if threshold is None or stage is not None:
            raise ValueError(f"unknown PIP-Net ConvNeXt {name!r} (stage {stage}); expected convnext_tiny_26 or convnext_tiny_13")
        trunk = Backbone("torchvision/convnext_tiny", pretrained=pretrained)
        for m in trunk.body.modules() if official_strides else ():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2) and m.in_channels > threshold:
                m.stride = (1, 1)
        return trunk
    trunk = Backbone("resnet50" if name == "resnet50_inat" else name, stage=stage, pretrained=pretrained)
    for layer in ("layer3", "layer4") if official_strides else ():
        if hasattr(trunk.body, layer):
            _stride_one(getattr(trunk.body, layer))
    return trunk


def official_groups(name: str, trunk: Backbone) -> tuple[list[str], list[str], list[str]]:
    """(to_train, to_freeze, backbone) module prefixes of the trunk (official ``get_optimizer_nn``).

    ConvNeXt: features.7.2 / features.6-7 / features.0-5. ResNet-50: layer4.2 / layer3-4 / layer2, and conv1,
    bn1, layer1 never train. Deviation: for other trunks the official code trains no trunk parameter at all
    (its lists stay empty); here the last block of the last stage is to_train, the last stage to_freeze and
    everything else the backbone group.
    """
    if name.startswith("convnext"):
        return ["7.2"], ["6", "7"], [str(i) for i in range(6)]
    if name.startswith("resnet50"):
        return ["layer4.2"], ["layer3", "layer4"], ["layer2"]
    stages = [n for n, _ in trunk.body.named_children() if n.startswith("layer")]
    if not stages:
        return [], [], [n for n, _ in trunk.body.named_children()]
    last = stages[-1]
    blocks = [n for n, _ in getattr(trunk.body, last).named_children()]
    return [f"{last}.{blocks[-1]}"], [last], [n for n, _ in trunk.body.named_children() if n != last]


def prefix_match(name: str, prefixes: list[str]) -> bool:
    """Whether a parameter name is one of `prefixes` or lies under one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# --------------------------------------------------------------------------------------- classifier
class NonNegLinear(nn.Module):
    """out = x relu(W)^T (+ b): W (C, P) initialised N(1, 0.1), b 0; the normalisation multiplier m = 2 is
    frozen (official ``NonNegLinear`` and ``main.py``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features).normal_(1.0, 0.1))
        self.normalization_multiplier = nn.Parameter(torch.full((1,), 2.0), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, torch.relu(self.weight), self.bias)


class ChannelDistance(PushDistance):
    """The push / nearest-patch distance of channel prototypes: minus the prototype's channel of the softmax map.

    Prototype j is the one-hot selector e_j (`PIPNet.prototype_tensor`): maps(z, e_J) = -z[:, J], so the
    "nearest" patch of j is the latent patch where channel j is largest (official ``visualize_topk``).
    """

    def maps(self, latent: Tensor, prototypes: Tensor) -> Tensor:
        return -latent.index_select(1, prototypes.argmax(dim=1))

    def paired(self, latents: Tensor, prototypes: Tensor) -> Tensor:
        ids = prototypes.argmax(dim=1)
        return -latents[torch.arange(len(ids), device=latents.device), ids]
