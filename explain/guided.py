"""Guided Grad-CAM (Selvaraju et al. 2017) and Deconvnet (Zeiler & Fergus 2014), through captum.

- Deconvnet: the gradient of the target logit with every ReLU's backward replaced by relu(upstream
  gradient), ignoring the forward mask (captum ``Deconvolution``); max pooling keeps its switches.
- Guided Grad-CAM: guided backpropagation (ReLU backward = relu(upstream) where the forward input > 0,
  captum ``GuidedBackprop``) times Grad-CAM of `layer` upsampled to the input, per input channel (captum
  ``GuidedGradCam``), bilinearly as the paper (captum's default is nearest).

Maps are summed over colour channels, as ``guided_backprop`` in `explain.posthoc` (signed). captum
changes the backward of ``nn.ReLU`` modules only (in-place ones and a module called twice included);
a model without any gets an error, since functional relus would silently give plain gradients.
"""
from __future__ import annotations

from torch import Tensor, nn

from explain.posthoc import register_method

__all__: list[str] = []


def _require_relu_modules(model: nn.Module, method: str) -> None:
    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise ValueError(f"{method} (captum) modifies nn.ReLU modules only and {type(model).__name__} has none; "
                         "functional relus would give the plain gradient")


@register_method("deconvnet", gradient=True)
def _deconvnet(model, images, target, layer) -> Tensor:
    """Deconvnet (captum ``Deconvolution``), summed over channels."""
    from captum.attr import Deconvolution

    _require_relu_modules(model, "deconvnet")
    return Deconvolution(model).attribute(images, target=target).sum(dim=1)


@register_method("guided_gradcam", gradient=True, layer=True)
def _guided_gradcam(model, images, target, layer, interpolate_mode: str = "bilinear") -> Tensor:
    """Guided Grad-CAM (captum ``GuidedGradCam`` on `layer`, Grad-CAM upsampled with `interpolate_mode`),
    summed over channels."""
    from captum.attr import GuidedGradCam

    _require_relu_modules(model, "guided Grad-CAM")
    out = GuidedGradCam(model, layer).attribute(images, target=target, interpolate_mode=interpolate_mode)
    return out.sum(dim=1)
