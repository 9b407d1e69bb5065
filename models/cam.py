"""CAM-architecture networks (Zhou et al., CVPR 2016): trunk -> optional conv -> GAP -> linear.

The class activation map of class c is M_c(x, y) = sum_k w_ck f_k(x, y), with f the last feature
maps and w the linear layer (the bias is a constant offset and is left out, as in the paper).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from .backbones import Backbone
from .base import Explanation, InterpretableClassifier
from .pretrained import PretrainedEntry, register_pretrained
from .registry import register_model

__all__ = ["CAMNet", "cam_bounding_boxes"]


class CAMNet(InterpretableClassifier):
    """A GAP + linear classifier whose decision is explained by class activation maps.

    Args:
        num_classes: number of classes.
        backbone: timm name or ``"torchvision/<name>"``.
        stage: feature stage to cut the trunk at (None = last).
        pretrained_backbone: False, True (ImageNet weights, needs network) or a weights file.
        extra_conv: channels of the extra 3x3 conv + ReLU the paper adds before GAP (None = none;
            the paper's VGG-16 uses 1024).
        dropout: dropout before the linear layer.
        **kwargs: optimisation arguments of `InterpretableClassifier`.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        stage: int | None = None,
        pretrained_backbone: bool | str = False,
        extra_conv: int | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.backbone = Backbone(backbone, stage=stage, pretrained=pretrained_backbone)
        channels = self.backbone.out_channels
        if extra_conv:
            self.extra = nn.Sequential(nn.Conv2d(channels, extra_conv, 3, padding=1), nn.ReLU(inplace=True))
            channels = extra_conv
        else:
            self.extra = nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def features(self, images: Tensor) -> Tensor:
        """Last feature maps f (B, C, h, w) for images in [0, 1]."""
        return self.extra(self.backbone(self.normalize(images)))

    def forward(self, images: Tensor) -> Tensor:
        pooled = self.features(images).mean(dim=(2, 3))
        return self.classifier(self.dropout(pooled))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        head = list(self.extra.parameters()) + list(self.classifier.parameters())
        return {"backbone": list(self.backbone.parameters()), "head": head}

    def class_activation_maps(self, features: Tensor) -> Tensor:
        """All classes' maps (B, K, h, w) from the feature maps."""
        return torch.einsum("kc,bchw->bkhw", self.classifier.weight, features)

    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | int | None = None, box_threshold: float = 0.2) -> Explanation:
        """CAM of the target class (default: the prediction), bilinearly upsampled to the input size.

        evidence: ``cam`` (B, h, w) at feature resolution, ``boxes`` (B, 4) as (x0, y0, x1, y1) by the
        paper's rule (threshold at `box_threshold` of the max, largest connected component).
        """
        features = self.features(images)
        logits = self.classifier(features.mean(dim=(2, 3)))
        target = self._target(logits, target)
        weights = self.classifier.weight[target]  # (B, C)
        cam = torch.einsum("bc,bchw->bhw", weights, features)
        heatmap = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        boxes = cam_bounding_boxes(heatmap, box_threshold)
        return Explanation(logits=logits, target=target, heatmap=heatmap, evidence={"cam": cam, "boxes": boxes})


def cam_bounding_boxes(heatmaps: Tensor, threshold: float = 0.2) -> Tensor:
    """Tight (x0, y0, x1, y1) box of the largest connected region above `threshold` x max, per map.

    Pixel coordinates are inclusive-exclusive (x1 = last column + 1). A map with no positive value
    gets the whole image.
    """
    boxes = []
    for hm in heatmaps.detach().float().cpu().numpy():
        h, w = hm.shape
        peak = hm.max()
        if not np.isfinite(peak) or peak <= 0:
            boxes.append((0, 0, w, h))
            continue
        labels, n = ndimage.label(hm >= threshold * peak)
        sizes = ndimage.sum_labels(np.ones_like(hm), labels, index=np.arange(1, n + 1))
        ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return torch.tensor(boxes, dtype=torch.long, device=heatmaps.device)


def _cam(backbone: str, extra_conv: int | None = None, **kwargs) -> CAMNet:
    kwargs.setdefault("num_classes", 1000)
    return CAMNet(backbone=backbone, extra_conv=extra_conv, **kwargs)


@register_model
def cam_resnet18(**kwargs) -> CAMNet:
    """ResNet-18 trunk, GAP, linear."""
    return _cam("resnet18", **kwargs)


@register_model
def cam_resnet50(**kwargs) -> CAMNet:
    """ResNet-50 trunk, GAP, linear."""
    return _cam("resnet50", **kwargs)


@register_model
def cam_vgg16(**kwargs) -> CAMNet:
    """The paper's VGG16-CAM: VGG-16 to relu5_3 (no pool5), a 3x3 conv of 1024 channels, GAP, linear."""
    kwargs.setdefault("stage", 4)  # timm's vgg16 feature stage 4 = relu5_3, 14x14 at 224 px
    return _cam("vgg16", extra_conv=kwargs.pop("extra_conv", 1024), **kwargs)


@register_model
def cam_test_resnet(**kwargs) -> CAMNet:
    """timm's tiny `test_resnet` trunk: for tests and quick CPU experiments."""
    return _cam("test_resnet", **kwargs)


register_pretrained(PretrainedEntry(
    name="cam_resnet18.synthparts", class_path="models.cam.CAMNet", dataset="SyntheticParts (10 classes, 64 px)",
    config="configs/cam/synthetic.yaml", notes="ResNet-18 cut after layer3, GAP, linear",
))


register_pretrained(PretrainedEntry(
    name="cam_resnet18.synthparts128", class_path="models.cam.CAMNet",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/cam/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml",),
    notes="the synthparts recipe at 128 px, the CUB-like operating point of the comparison",
))
