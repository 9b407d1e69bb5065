"""Prototypical relevance propagation (PRP, Gautam et al., Pattern Recognition 2022) through any trunk.

The relevance of a prototype's similarity at one latent cell is sent back to the pixels with LRP rules
(the "gradient trick": each rule is an autograd function whose backward maps the relevance of its
output to the relevance of its input, R_in = x * grad(z'; R_out / z')). The rules are those of the
official code's ``lrp_params_def1`` (spec `explanations_next.md` A.4):

==============================  ========================================================================
operation                       rule
==============================  ========================================================================
similarity layer                R_c = q_c / (sum_c' q_c' + 1e-12), q_c = 1 / ((f_c - p_c)^2 + 1e-12), seed 1
first convolution               z^B with the scalar bounds l = min_c (0 - mu_c) / sigma_c, h = max_c (1 - mu_c) / sigma_c
other convolutions              z+ (alpha 1, beta 0): z = conv(x+, W+) + conv(x-, W-), bias ignored
BatchNorm after a convolution   merged into it (W' = W gamma / sqrt(var + eps)); else passed unchanged
linear, average pooling         epsilon (1e-6)
max pooling                     gradient (winner takes all)
activations (ReLU, sigmoid...)  identity
residual sum a + b              epsilon (1e-6): R_a = a R / (a + b), R_b = b R / (a + b)
==============================  ========================================================================

Safe division everywhere: z + 1e-12 [z == 0] + 1e-6 sign(z).

The rules are applied while ``model.latent`` runs, by a `TorchFunctionMode` that intercepts the
functional calls (``conv2d``, ``batch_norm``, ``linear``, pooling, activations and the sums of two
tensors that both depend on the input), so any trunk built from these operations gets them without
knowing its module classes: timm and torchvision ResNets, VGG, DenseNet (a concatenation is a plain
gradient, which conserves relevance). Operations without a rule (LayerNorm, attention, ...) pass the
relevance by their gradient. The model's `normalize` layer is undone at the end (the relevance of a
normalised pixel is that of the raw pixel), so the relevance lives on the [0, 1] image.

Deviation from the official code: it canonises with the model's module classes (its own ResNet
blocks) and applies the residual epsilon rule to a stacked sum; here the sum of any two
input-dependent tensors of one shape inside the trunk gets that rule.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["model_normalisation", "prp_relevance", "stabilise"]

EPSILON = 1e-6
EPSILON_ZERO = 1e-12

_ACTIVATIONS = {
    F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.gelu,
    F.silu, F.mish, F.softplus, F.hardswish, F.hardsigmoid, torch.sigmoid, Tensor.sigmoid, torch.tanh, Tensor.tanh,
    F.sigmoid, F.tanh,
}
_SUMS = {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__iadd__, Tensor.__radd__}
_POOLS = {F.avg_pool2d, F.adaptive_avg_pool2d, torch._C._nn.avg_pool2d, torch._C._nn.adaptive_avg_pool2d}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def stabilise(z: Tensor, eps: float = EPSILON) -> Tensor:
    """The official code's safe denominator: z + 1e-12 [z == 0] + eps sign(z)."""
    return z + EPSILON_ZERO * (z == 0) + eps * z.sign()


class _Rule(torch.autograd.Function):
    """Forward: `value(x)`; backward: `relevance(x, R_out)` (a rule in the gradient-trick form)."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Callable[[Tensor], Tensor], relevance: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.relevance = relevance
        return value(x)

    @staticmethod
    def backward(ctx, r: Tensor):
        (x,) = ctx.saved_tensors
        return ctx.relevance(x, r), None, None


class _Sum(torch.autograd.Function):
    """a + b; relevance split in proportion to each term (epsilon rule)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, r: Tensor):
        a, b = ctx.saved_tensors
        s = r / stabilise(a + b)
        return a * s, b * s


def _gradient_rule(z_fn: Callable[..., Tensor], inputs: list[Tensor], r: Tensor, eps: float = EPSILON) -> list[Tensor]:
    """sum over `inputs` of input * grad(z; R / z) for z = z_fn(*inputs): the generic LRP step."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        z = z_fn(*leaves)
        grads = torch.autograd.grad(z, leaves, r / stabilise(z.detach(), eps))
    return [t * g for t, g in zip(leaves, grads)]


def _zplus(weight: Tensor, conv: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)

    def relevance(x: Tensor, r: Tensor) -> Tensor:
        rp, rn = _gradient_rule(lambda xp, xn: conv(xp, wp) + conv(xn, wn), [x.clamp(min=0), x.clamp(max=0)], r)
        return rp + rn

    return relevance


def _zbox(weight: Tensor, conv: Callable[[Tensor, Tensor], Tensor], low: float, high: float) -> Callable[[Tensor, Tensor], Tensor]:
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)

    def relevance(x: Tensor, r: Tensor) -> Tensor:
        lo, hi = torch.full_like(x, low), torch.full_like(x, high)
        rx, rl, rh = _gradient_rule(lambda x_, l_, h_: conv(x_, weight) - conv(l_, wp) - conv(h_, wn), [x, lo, hi], r)
        return rx + rl + rh

    return relevance


def _epsilon(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, r: _gradient_rule(fn, [x], r)[0]


def _bound(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class _PRPMode(TorchFunctionMode):
    """Applies the rules of the module docstring to the functional calls made while it is active."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        self.low, self.high = low, high
        self.first_conv = True
        self.conv_outputs: dict[int, tuple[Tensor, Tensor, dict]] = {}  # id(output) -> (output, input, conv args)

    def _conv(self, a: dict) -> Callable[[Tensor, Tensor], Tensor]:
        opts = {k: a[k] for k in ("stride", "padding", "dilation", "groups") if k in a}
        return lambda x, w: F.conv2d(x, w, None, **opts)

    def _conv_rule(self, x: Tensor, weight: Tensor, a: dict, first: bool, value: Callable[[Tensor], Tensor]) -> Tensor:
        conv = self._conv(a)
        rule = _zbox(weight, conv, self.low, self.high) if first else _zplus(weight, conv)
        return _Rule.apply(x, value, rule)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            a = _bound(_CONV_ARGS, args, kwargs)
            x, weight = a["input"], a["weight"]
            first, self.first_conv = self.first_conv, False
            out = self._conv_rule(x, weight.detach(), a, first, lambda t: func(t, *args[1:], **kwargs))
            self.conv_outputs[id(out)] = (out, x, a, first)
            return out
        if func is F.batch_norm:
            a = _bound(_BN_ARGS, args, kwargs)
            x = a["input"]
            value = lambda t: func(t, *args[1:], **kwargs)  # noqa: E731
            source = self.conv_outputs.get(id(x))
            if source is not None and source[0] is x:  # Conv -> BN: the rule sees the merged weights
                _, conv_in, ca, first = source
                scale = (a["weight"] if a.get("weight") is not None else torch.ones_like(a["running_var"]))
                scale = (scale / torch.sqrt(a["running_var"] + a.get("eps", 1e-5))).detach()
                merged = ca["weight"].detach() * scale.view(-1, *[1] * (ca["weight"].ndim - 1))
                conv_value = lambda t: func(torch.conv2d(t, *_conv_args(ca)), *args[1:], **kwargs)  # noqa: E731
                return self._conv_rule(conv_in, merged, ca, first, conv_value)
            return _Rule.apply(x, value, lambda _, r: r)
        if func is F.linear:
            a = _bound(("input", "weight", "bias"), args, kwargs)
            return _Rule.apply(a["input"], lambda t: func(t, *args[1:], **kwargs), _epsilon(lambda t: func(t, *args[1:], **kwargs)))
        if func in _POOLS:
            fn = lambda t: func(t, *args[1:], **kwargs)  # noqa: E731
            return _Rule.apply(args[0], fn, _epsilon(fn))
        if func in _ACTIVATIONS:
            extra = {k: v for k, v in kwargs.items() if k != "inplace"}
            out_of_place = {torch.relu_: torch.relu, Tensor.relu_: torch.relu}.get(func, func)
            rest = [v for v in args[1:] if not isinstance(v, bool)]  # a positional `inplace`
            return _Rule.apply(args[0], lambda t: out_of_place(t, *rest, **extra), lambda _, r: r)
        if func in _SUMS and len(args) == 2 and not kwargs and all(isinstance(t, Tensor) for t in args):
            a, b = args
            if a.shape == b.shape and a.grad_fn is not None and b.grad_fn is not None:
                return _Sum.apply(a, b)
        return func(*args, **kwargs)


def _conv_args(ca: dict) -> tuple:
    """Positional arguments of torch.conv2d after the input, from bound arguments."""
    return (ca["weight"], ca.get("bias"), ca.get("stride", 1), ca.get("padding", 0), ca.get("dilation", 1), ca.get("groups", 1))


def model_normalisation(model: nn.Module, channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) (1, C, 1, 1) of the model's `normalize` layer (0 and 1 without one)."""
    norm = getattr(model, "normalize", None)
    mean, std = getattr(norm, "mean", None), getattr(norm, "std", None)
    if not (isinstance(mean, Tensor) and isinstance(std, Tensor) and mean.numel() == std.numel() == channels):
        return like.new_zeros(1, channels, 1, 1), like.new_ones(1, channels, 1, 1)
    return mean.reshape(1, -1, 1, 1).to(like), std.reshape(1, -1, 1, 1).to(like)


def prp_relevance(model: nn.Module, images: Tensor, prototype_ids: Tensor, cells: Tensor) -> Tensor:
    """(N, C, H, W) PRP relevance of prototype ``prototype_ids[i]``'s similarity at latent cell
    ``cells[i]`` (row, col) on ``images[i]`` ([0, 1] pixels), through ``model.latent`` (a prototype
    model's interface: `latent` and `prototype_tensor`). Relevance 1 is seeded at the cell, as the
    official ``.backward()`` on the pooled similarity; signed, not yet post-processed."""
    mean, std = model_normalisation(model, images.shape[1], images)
    low = float(((0 - mean) / std).min())
    high = float(((1 - mean) / std).max())
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        with _PRPMode(low, high):
            latent = model.latent(x)
        rows, cols = cells[:, 0].to(latent.device), cells[:, 1].to(latent.device)
        n = torch.arange(len(x), device=latent.device)
        f = latent[n, :, rows, cols].detach().float()  # (N, D)
        p = model.prototype_tensor().detach().float()[prototype_ids.to(latent.device)]  # (N, D)
        q = 1.0 / ((f - p) ** 2 + EPSILON_ZERO)
        seed = torch.zeros_like(latent)
        seed[n, :, rows, cols] = (q / (q.sum(dim=1, keepdim=True) + EPSILON_ZERO)).to(seed)
        (grad,) = torch.autograd.grad(latent, x, seed)
    return grad * std  # the normalisation's backward divides by std; the relevance of x_norm is that of x
