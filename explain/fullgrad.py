"""FullGrad (Srinivas & Fleuret, NeurIPS 2019), as the official code ``idiap/fullgrad-saliency``.

Full-gradient decomposition, exact for piecewise-linear networks in eval mode (ReLU, max pooling):

    f_c(x) = <d f_c / d x, x> + sum over layers l with a bias, units u: (d f_c / d z_u) b_u

with z the layer's output and a convolution's bias broadcast over its positions. The biases are those of
``nn.Conv2d`` and ``nn.Linear`` and the implicit bias of ``nn.BatchNorm2d`` from its running statistics,
beta - mu gamma / sqrt(var + eps) (in ResNets every bias term comes from batch norm).

Saliency map: psi(x ⊙ d f / d x) summed over channels plus, for every conv-shaped (4-D) bias term,
bilinear-upsample(psi(G ⊙ b)) (``align_corners=True``) summed over channels; dense-layer terms are left
out of the map. psi = abs, then minus the per-image minimum, then divided by (the per-image maximum +
1e-6), the minimum and maximum taken jointly over the channels and positions of one layer.
FullGrad-simple aggregates the raw output gradients G of the same layers in the same way.

The input term is taken in the network's input space, as the official code feeds normalised images:
x_norm ⊙ d f / d x_norm = (x - mean) ⊙ d f / d x for zoo models (their `Normalize` layer), so the
decomposition holds without counting the normalisation's own offset.

Deviations from the official code: gradients are taken at each module's output tensor through forward
hooks, so a module called twice contributes a term per call (the official backward hooks re-index
gradients in reverse module order and assume each module runs once, in definition order); a
BatchNorm2d without affine parameters counts with gamma = 1, beta = 0 (the official code fails on it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain.hooks import forward_hooks
from explain.posthoc import register_method
from explain.prp import model_normalisation

__all__ = ["fullgrad_decomposition", "fullgrad_map"]


def _bias(module: nn.Module) -> Tensor | None:
    """The (implicit) bias of a Conv2d, Linear or BatchNorm2d, else None."""
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None:
            raise ValueError("FullGrad needs BatchNorm2d layers with running statistics (track_running_stats=True); "
                             f"{module} normalises with batch statistics")
        weight = module.weight if module.weight is not None else torch.ones_like(module.running_var)
        beta = module.bias if module.bias is not None else torch.zeros_like(module.running_mean)
        return (beta - module.running_mean * weight / torch.sqrt(module.running_var + module.eps)).detach()
    if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
        return module.bias.detach()
    return None


def _gradients(model: nn.Module, images: Tensor, target: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor, nn.Module]]]:
    """The input term x_norm ⊙ d f_target / d x_norm and, for each call of a module with a bias,
    (d f_target / d output, bias, module)."""
    calls: list[tuple[Tensor, Tensor, nn.Module]] = []

    def keep(bias: Tensor):
        def hook(module, inputs, output):
            calls.append((output, bias, module))
            return output.clone()  # in-place ops downstream (x += shortcut, ReLU(inplace)) leave it intact
        return hook

    hooks = [(m, keep(b)) for m in model.modules() if (b := _bias(m)) is not None]
    x = images.detach().clone().requires_grad_(True)
    with forward_hooks(hooks):
        logits = model(x)
    score = logits.gather(1, target[:, None]).sum()  # images are independent in eval mode
    grads = torch.autograd.grad(score, [x] + [out for out, _, _ in calls], allow_unused=True)
    layers = [(g if g is not None else torch.zeros_like(out), b, m) for g, (out, b, m) in zip(grads[1:], calls)]
    mean, _ = model_normalisation(model, images.shape[1], images)
    return grads[0] * (images - mean), layers


def fullgrad_decomposition(model: nn.Module, images: Tensor, target: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(input term (B, C, H, W), bias terms [(B, C_l, h_l, w_l) or (B, K_l), ...]) of the target logits:
    their sums add up to f_target(x) for a piecewise-linear network in eval mode."""
    input_term, layers = _gradients(model, images, target)
    terms = []
    for g, b, module in layers:
        shape = (1, -1, 1, 1) if not isinstance(module, nn.Linear) else (-1,)  # Linear: bias on the last dim
        terms.append(g * b.view(shape).to(g))
    return input_term, terms


def _psi(t: Tensor, eps: float = 1e-6) -> Tensor:
    """abs, minus the per-image minimum, divided by the per-image maximum + eps (over all but dim 0)."""
    t = t.abs()
    t = t - t.flatten(1).amin(1).view(-1, *[1] * (t.ndim - 1))
    return t / (t.flatten(1).amax(1).view(-1, *[1] * (t.ndim - 1)) + eps)


def fullgrad_map(input_term: Tensor, layer_terms: list[Tensor]) -> Tensor:
    """(B, H, W): psi(input term) summed over channels plus the upsampled psi of every 4-D layer term."""
    size = input_term.shape[-2:]
    cam = _psi(input_term).sum(1)
    for term in layer_terms:
        if term.ndim == 4:  # channel sum before the (linear) upsampling: the same map, C times cheaper
            cam = cam + F.interpolate(_psi(term).sum(1, keepdim=True), size=size, mode="bilinear", align_corners=True)[:, 0]
    return cam


@register_method("fullgrad", gradient=True)
def _fullgrad(model, images, target, layer) -> Tensor:
    """FullGrad (`explain.fullgrad`): input-gradient and bias-gradient terms, post-processed and summed."""
    return fullgrad_map(*fullgrad_decomposition(model, images, target))


@register_method("fullgrad_simple", gradient=True)
def _fullgrad_simple(model, images, target, layer) -> Tensor:
    """FullGrad-simple: as FullGrad with the raw output gradients of the bias layers (not times the bias)."""
    input_term, layers = _gradients(model, images, target)
    return fullgrad_map(input_term, [g for g, _, _ in layers])
