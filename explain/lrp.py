"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) through Zennit.

``attribute(model, images, target, method="lrp", composite=..., rules=...)`` seeds the target logit
(relevance = one-hot x logit) and propagates it to the pixels with a Zennit composite, one rule per
layer type:

=============================  ==============  ==============  =============
composite (Zennit's name)      first layer     convolutions    dense Linear
=============================  ==============  ==============  =============
``epsilon_plus_flat`` (default) flat           z+              epsilon
``epsilon_gamma_box``          z^B (a conv)    gamma (0.25)    epsilon
``epsilon_plus``               -               z+              epsilon
``epsilon_alpha2_beta1``       -               alpha2-beta1    epsilon
``epsilon_alpha2_beta1_flat``  flat            alpha2-beta1    epsilon
=============================  ==============  ==============  =============

Every composite also maps activations and batch norm to Pass and average pooling to Norm (Zennit's
``layer_map_base``); max pooling keeps its gradient (winner takes all). ``rules={"first": ...,
"conv": ..., "linear": ...}`` overrides a composite's rule per layer type with a rule of `RULES`.

Canonization (``canonize=True``, the default):

- Each BatchNorm whose input is the output of a convolution or linear layer is merged into it with
  Zennit's ``NamedMergeBatchNorm``. The pairs are found from the data flow of one forward pass, not from
  the registration order that Zennit's ``SequentialMergeBatchNorm`` uses, which pairs DenseNet's last
  convolution of a dense layer with the next layer's BatchNorm (on the concatenation) and fails. A
  BatchNorm after an activation (DenseNet's pre-activation layers) cannot be merged and keeps the
  Pass rule. The canonized model must give the same logits as the model (else an error).
- Zennit's torchvision ``ResNetBasicBlock/BottleneckCanonizer`` rewrite torchvision's residual sum as a
  ``Sum`` module (Norm rule). timm's blocks (``x += shortcut``) and any other sum of two
  input-dependent tensors, and functional means (``x.mean((2, 3))``, timm's fast pooling), get the
  same Norm / epsilon rule from the autograd rules of `explain.prp`, applied while the model runs
  forward (Zennit hooks modules only and would otherwise give them their gradient: both branches of a
  residual sum would receive the full relevance).

Bounds of the z^B rule: ``low`` / ``high`` are raw pixel values ([0, 1] images) mapped into the
network's input space through the model's `Normalize` layer, per channel; a model without one
(a plain timm classifier fed normalised images) is taken to use ImageNet statistics. The relevance
of the normalised input is returned at the raw pixels (the normalisation is an affine map per pixel,
so it does not move relevance), summed over channels: (B, H, W), signed.

Zennit has no rule for modules that own parameters but are not convolutions, linear or batch-norm
layers (a prototype layer, LayerNorm): such models get a one-line error.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from explain.hooks import forward_hooks
from explain.posthoc import register_method
from explain.prp import _SUMS, _Rule, _Sum, _epsilon, model_normalisation
from models.base import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["COMPOSITES", "RULES", "batchnorm_pairs", "lrp_composite", "lrp_relevance", "zoo_canonizers"]

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat")
_LAYER_KINDS = ("first", "conv", "linear")
_MEANS = {torch.mean, Tensor.mean}


def _rule_factories() -> dict[str, Callable[..., object]]:
    from zennit import rules as R

    return {
        "epsilon": lambda o: R.Epsilon(epsilon=o["epsilon"]),
        "zero": lambda o: R.Epsilon(epsilon=1e-12),  # LRP-0; 1e-12 only keeps 0 / 0 finite
        "gamma": lambda o: R.Gamma(gamma=o["gamma"], stabilizer=o["stabilizer"]),
        "zplus": lambda o: R.ZPlus(stabilizer=o["stabilizer"]),
        "alpha1beta0": lambda o: R.AlphaBeta(alpha=1.0, beta=0.0, stabilizer=o["stabilizer"]),
        "alpha2beta1": lambda o: R.AlphaBeta(alpha=2.0, beta=1.0, stabilizer=o["stabilizer"]),
        "flat": lambda o: R.Flat(stabilizer=o["stabilizer"]),
        "wsquare": lambda o: R.WSquare(stabilizer=o["stabilizer"]),
        "zbox": lambda o: R.ZBox(low=o["low"], high=o["high"], stabilizer=o["stabilizer"]),
        "pass": lambda o: R.Pass(),
    }


RULES = ("epsilon", "zero", "gamma", "zplus", "alpha1beta0", "alpha2beta1", "flat", "wsquare", "zbox", "pass")


def _input_bounds(model: nn.Module, images: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """(1, C, 1, 1) bounds of the network's input: raw pixel bounds through the model's `Normalize`
    (ImageNet statistics for a model without one)."""
    norm = getattr(model, "normalize", None)
    if isinstance(getattr(norm, "mean", None), Tensor):
        mean, std = model_normalisation(model, images.shape[1], images)
    else:
        mean = images.new_tensor(IMAGENET_MEAN).view(1, -1, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, -1, 1, 1)
    return (low - mean) / std, (high - mean) / std


def lrp_composite(
    composite: str = "epsilon_plus_flat", rules: dict[str, str] | None = None, *, canonizers: list | None = None,
    epsilon: float = 1e-6, gamma: float = 0.25, stabilizer: float = 1e-6, low: Tensor | float = 0.0,
    high: Tensor | float = 1.0,
):
    """A Zennit composite by name, with `rules` overriding its first-layer / conv / dense rule
    (Zennit prepends them to the composite's own map) and the given Zennit `canonizers`.
    `low` / `high` are the z^B bounds in the network's input space."""
    from zennit.composites import COMPOSITES as ZENNIT
    from zennit.types import Convolution, Linear

    if composite not in COMPOSITES:
        raise ValueError(f"unknown LRP composite {composite!r}; choose from {list(COMPOSITES)}")
    rules = dict(rules or {})
    bad = {k: v for k, v in rules.items() if k not in _LAYER_KINDS or v not in RULES}
    if bad:
        raise ValueError(f"LRP rules must map {list(_LAYER_KINDS)} to one of {list(RULES)}, got {bad}")
    options = {"epsilon": epsilon, "gamma": gamma, "stabilizer": stabilizer, "low": low, "high": high}
    make = _rule_factories()
    cls = ZENNIT[composite]
    accepted = set(inspect.signature(cls).parameters)
    if "first" in rules and "first_map" not in accepted:
        raise ValueError(f"composite {composite!r} has no first-layer rule to override; use a *_flat composite "
                         "or epsilon_gamma_box")
    kwargs = {k: v for k, v in options.items() if k in accepted}
    layer_map = [(types, make[rules[kind]](options)) for kind, types in (("conv", Convolution), ("linear", nn.Linear))
                 if kind in rules]
    if layer_map:
        kwargs["layer_map"] = layer_map
    if "first" in rules:
        kwargs["first_map"] = [(Linear, make[rules["first"]](options))]
    return cls(canonizers=list(canonizers or []), **kwargs)


def batchnorm_pairs(model: nn.Module, images: Tensor) -> list[tuple[tuple[str], str]]:
    """``[((linear_name,), batchnorm_name), ...]``: the BatchNorms whose input is the unmodified output
    of a convolution / linear module in a forward pass of `images` (Zennit's ``NamedMergeBatchNorm``
    map). A module called more than once is left out."""
    from zennit.types import BatchNorm, Linear

    produced: dict[int, tuple[str, Tensor, int]] = {}  # id(output) -> (name, output, version)
    pairs: dict[str, set[str]] = {}
    calls: dict[str, int] = {}

    def hook(name: str):
        def record(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(module, BatchNorm):
                source = produced.get(id(inputs[0]))
                if source is not None and source[1] is inputs[0] and source[2] == inputs[0]._version:
                    pairs.setdefault(name, set()).add(source[0])
            else:
                produced[id(output)] = (name, output, output._version)
        return record

    hooks = [(m, hook(n)) for n, m in model.named_modules() if isinstance(m, (Linear, BatchNorm))]
    with forward_hooks(hooks), torch.no_grad():
        model(images[:1])
    return [((next(iter(src)),), bn) for bn, src in pairs.items()
            if len(src) == 1 and calls[bn] == 1 and calls[next(iter(src))] == 1]


def zoo_canonizers(model: nn.Module, images: Tensor) -> list:
    """The canonizers of the module docstring: BatchNorm merging by data flow and Zennit's torchvision
    residual blocks (the functional sums are `_FunctionalRules`, active while the model runs)."""
    from zennit.canonizers import NamedMergeBatchNorm
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

    return [NamedMergeBatchNorm(batchnorm_pairs(model, images)), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]


class _FunctionalRules(TorchFunctionMode):
    """Norm / epsilon rule for the functional operations Zennit cannot hook: sums of two
    input-dependent tensors of one shape (residual connections) and means (global average pooling)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SUMS and len(args) == 2 and not kwargs and all(isinstance(t, Tensor) for t in args):
            a, b = args
            if a.shape == b.shape and a.grad_fn is not None and b.grad_fn is not None:
                return _Sum.apply(a, b)
        if func in _MEANS and args and isinstance(args[0], Tensor) and args[0].grad_fn is not None:
            mean = lambda t: func(t, *args[1:], **kwargs)  # noqa: E731
            return _Rule.apply(args[0], mean, _epsilon(mean))
        return func(*args, **kwargs)


def _check_supported(model: nn.Module) -> None:
    from zennit.types import BatchNorm, Linear

    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own and not isinstance(module, (Linear, BatchNorm)):
            where = name or "the model itself"
            raise ValueError(f"LRP (Zennit) has no rule for {type(module).__name__} at {where!r} (parameters {own}); "
                             "it runs on convolution / linear / batch-norm networks only")


def lrp_relevance(model: nn.Module, images: Tensor, target: Tensor, composite, canonize: bool = True) -> Tensor:
    """(B, C, H, W) input relevance of the target logits under a Zennit `composite` (see
    `lrp_composite`; its canonizers are applied), with the functional sum and mean rules when
    `canonize`; it sums to about the logit (exactly for bias-free networks and LRP-0/epsilon)."""
    _check_supported(model)
    _, std = model_normalisation(model, images.shape[1], images)
    with torch.no_grad():
        expected = model(images[:1]) if canonize else None  # a wrong merge changes every image's logits
    x = images.detach().clone().requires_grad_(True)
    with composite.context(model):
        with _FunctionalRules() if canonize else contextlib.nullcontext():
            logits = model(x)
        atol = 0.0 if expected is None else 1e-4 * float(expected.abs().max())
        if expected is not None and not torch.allclose(logits[:1], expected, rtol=1e-3, atol=atol):
            raise RuntimeError(f"canonizing {type(model).__name__} for LRP changed its output (max |diff| "
                               f"{float((logits[:1] - expected).abs().max()):.3g}); pass canonize=False")
        seed = torch.zeros_like(logits).scatter_(1, target[:, None], logits.gather(1, target[:, None]).detach())
        (grad,) = torch.autograd.grad(logits, x, seed)
    return grad * std  # the normalisation's backward divides by std: the relevance of x_norm, at x


@register_method("lrp", gradient=True)
def _lrp(
    model, images, target, layer, composite: str = "epsilon_plus_flat", rules: dict[str, str] | None = None,
    canonize: bool = True, epsilon: float = 1e-6, gamma: float = 0.25, stabilizer: float = 1e-6,
    low: float = 0.0, high: float = 1.0,
) -> Tensor:
    """LRP through Zennit (module docstring of `explain.lrp`): a composite by name, per-layer-type
    `rules`, BatchNorm merging and residual sum rules (`canonize`), z^B bounds `low` / `high` in raw
    pixel values; input relevance summed over channels."""
    lo, hi = _input_bounds(model, images, low, high)
    canonizers = zoo_canonizers(model, images) if canonize else []
    comp = lrp_composite(composite, rules, canonizers=canonizers, epsilon=epsilon, gamma=gamma, stabilizer=stabilizer,
                         low=lo, high=hi)
    return lrp_relevance(model, images, target, comp, canonize=canonize).sum(dim=1)
