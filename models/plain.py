"""A plain (not interpretable by design) timm classifier: the baseline that post-hoc methods explain."""
from __future__ import annotations

import timm
from torch import Tensor, nn

from .backbones import UnknownBackboneError
from .base import Explanation, InterpretableClassifier
from .pretrained import PretrainedEntry, register_pretrained
from .registry import register_model

__all__ = ["PlainClassifier"]


class PlainClassifier(InterpretableClassifier):
    """Any timm classifier behind the zoo's contract (images in [0, 1], metrics, checkpoints).

    It has no explanation of its own: use `explain.posthoc.attribute(model, images, method=...)`.

    Args:
        num_classes: number of classes.
        architecture: a timm model name (``"resnet18"``, ``"vgg16"``, ...).
        pretrained_backbone: ImageNet weights from timm (needs network) or a weights file.
        model_args: extra keyword arguments of the timm constructor, e.g. ``{"channels": [32, 64, 128, 256]}``
            for a half-width ResNet.
        **kwargs: optimisation arguments of `InterpretableClassifier`.
    """

    def __init__(self, num_classes: int, architecture: str = "resnet18", pretrained_backbone: bool | str = False,
                 model_args: dict | None = None, **kwargs) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        if not timm.is_model(architecture):
            raise UnknownBackboneError(f"unknown architecture {architecture!r}: timm does not know it")
        overlay = {"pretrained_cfg_overlay": {"file": pretrained_backbone}} if isinstance(pretrained_backbone, str) else {}
        self.net = timm.create_model(architecture, num_classes=num_classes, pretrained=bool(pretrained_backbone),
                                     **overlay, **(model_args or {}))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.normalize(images))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        head = self.net.get_classifier()
        head_ids = {id(p) for p in head.parameters()}
        return {"backbone": [p for p in self.net.parameters() if id(p) not in head_ids], "head": list(head.parameters())}

    def explain(self, images: Tensor, target: Tensor | int | None = None) -> Explanation:
        """A plain classifier explains nothing by itself: raises NotImplementedError (use
        `explain.posthoc.attribute`)."""
        raise NotImplementedError(
            "a plain classifier has no explanation of its own; use explain.posthoc.attribute(model, images, method=...)"
        )


@register_model
def plain_resnet18(**kwargs) -> PlainClassifier:
    """A standard ResNet-18 classifier (the post-hoc baseline)."""
    kwargs.setdefault("num_classes", 1000)
    return PlainClassifier(architecture="resnet18", **kwargs)


@register_model
def plain_resnet18_half(**kwargs) -> PlainClassifier:
    """ResNet-18 at half width (channels 32, 64, 128, 256; 2.8M parameters at 10 classes)."""
    kwargs.setdefault("model_args", {"channels": [32, 64, 128, 256]})
    return plain_resnet18(**kwargs)


register_pretrained(PretrainedEntry(
    name="plain_resnet18_half.synthparts", class_path="models.plain.PlainClassifier",
    dataset="SyntheticParts (10 classes, 64 px)", config="configs/plain/synthetic.yaml",
    notes="ResNet-18 at half width (2.8M parameters, so the file stays under 15 MB): the non-interpretable "
          "baseline that post-hoc methods explain",
))


register_pretrained(PretrainedEntry(
    name="plain_resnet18_half.synthparts128", class_path="models.plain.PlainClassifier",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/plain/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml",),
    notes="the synthparts recipe at 128 px, the CUB-like operating point of the comparison",
))
