"""Filter-loss maths of the Interpretable CNN (Zhang, Wu, Zhu, CVPR 2018): templates, template centres,
filter categories and the two gradient rules, as plain functions of tensors (`models.icnn` builds the
layer and the model on them).

- The paper's rule: `filter_loss_surrogate`, whose gradient is Eq. 4 (one template per image and filter).
- The released code's rule (``conv_mask`` backward of the official MatConvNet code, ported line for line
  to PyTorch in ada-shen/ICNN): `released_code_coefficients`, the per-(image, filter) weights of the
  gradient that code injects, dL/dx = -c * T_hat (T_hat = the mask M on positive images, T- = -1 on the
  others). It differs from Eq. 4 in five ways:
  1. Z+ is estimated from the masks flipped across images and channels (each map against another
     image's and channel's template), Z- from -x, both over the batch only (no running estimate);
  2. the bracket is (S - a log Z + a) with S = mean_ij(x T) and a = 0.5: +a where Eq. 4 has -log p(x);
     the exponent S / a is tr(x . T) with tau = 2 / n^2 (`template_tau(h, w, "code")`), four times the
     paper rule's default 0.5 / n^2;
  3. each filter's coefficients are divided by their mean over its positive images, and those of its
     negative images by theirs, separately;
  4. a hard-coded factor 1e-5 and class weights 0.5 / density (`released_code_class_weights`);
  5. a decay mag / epoch (mag = 0.1, or 0.02 / 0.002 for softmax with <= 10 / > 10 classes), 1 / (10
     epoch) in the single-category runs.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "part_templates",
    "negative_template",
    "normalised_l1_distances",
    "template_tau",
    "argmax_mu",
    "centroid_mu",
    "balanced_categories",
    "filter_loss_surrogate",
    "released_code_class_weights",
    "released_code_decay",
    "released_code_coefficients",
]


# ----------------------------------------------------------------------------------------- templates
def part_templates(h: int, w: int, beta: float = 4.0, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The h*w positive templates without tau, (h*w, h, w), mu = i0 * w + j0 (row-major).

    t[mu, i, j] = max(1 - beta * (|i - i0| / h + |j - j0| / w), -1), i.e. the paper's
    max(1 - beta * ||[i, j] - mu||_1 / n, -1) for square n x n maps (each axis over its own length when
    the map is not square).
    """
    if h < 1 or w < 1:
        raise ValueError(f"template size must be positive, got {h}x{w}")
    i = torch.arange(h, device=device, dtype=dtype)
    j = torch.arange(w, device=device, dtype=dtype)
    mu_i, mu_j = i.repeat_interleave(w), j.repeat(h)
    dist = (i[None, :, None] - mu_i[:, None, None]).abs() / h + (j[None, None, :] - mu_j[:, None, None]).abs() / w
    return (1 - beta * dist).clamp(min=-1.0)


def negative_template(h: int, w: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """T- without tau: -1 everywhere, (h, w)."""
    return torch.full((h, w), -1.0, device=device, dtype=dtype)


def normalised_l1_distances(h: int, w: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """|Y - Y_mu| + |X - X_mu| on linspace(-1, 1) grids (the released code's coordinates), (h*w, h, w)."""
    y = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    x = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    return (y[None, :, None] - y.repeat_interleave(w)[:, None, None]).abs() + (
        x[None, None, :] - x.repeat(h)[:, None, None]
    ).abs()


def template_tau(h: int, w: int, rule: str | float = "n2") -> float:
    """tau of the loss templates (n^2 = h * w): ``"n2"`` -> 0.5 / n^2 (the paper rule's default),
    ``"code"`` -> 2 / n^2 (the released code: exponent mean_ij(x T) / 0.5), ``"n"`` -> 0.5 / n, or a number."""
    if rule == "n2":
        return 0.5 / (h * w)
    if rule == "code":
        return 2.0 / (h * w)
    if rule == "n":
        return 0.5 / math.sqrt(h * w)
    if isinstance(rule, (int, float)) and not isinstance(rule, bool) and rule > 0:
        return float(rule)
    raise ValueError(f"tau must be 'n2', 'code', 'n' or a positive number, got {rule!r}")


def argmax_mu(x: Tensor) -> Tensor:
    """Flat index of the peak of each map (B, C, h, w) -> (B, C) (paper)."""
    return x.flatten(2).argmax(dim=2)


def centroid_mu(x: Tensor) -> Tensor:
    """Flat index of the rounded activation-weighted centroid (B, C) (released code, `IsUseMax=false`).

    An all-zero map gets index 0, as the code does (it divides by max(sum x, 1e-9)).
    """
    _, _, h, w = x.shape
    mass = x.sum(dim=(2, 3)).clamp(min=1e-9)
    rows = torch.arange(h, device=x.device, dtype=x.dtype)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)
    i = ((x.sum(dim=3) * rows).sum(dim=2) / mass).round().clamp(0, h - 1)
    j = ((x.sum(dim=2) * cols).sum(dim=2) / mass).round().clamp(0, w - 1)
    return (i * w + j).long()


def balanced_categories(class_activation: Tensor) -> Tensor:
    """(C,) categories with floor(C/K) or ceil(C/K) filters per class (the first C mod K classes get
    one more), maximising the sum over filters of their share of activation on their class
    (activation / the filter's total over classes), by linear assignment (scipy)."""
    from scipy.optimize import linear_sum_assignment

    act = class_activation.detach().float().clamp(min=0).cpu()
    share = act / act.sum(dim=1, keepdim=True).clamp(min=1e-12)
    channels, classes = share.shape
    slots = torch.arange(channels) % classes  # the class of each of the C slots
    rows, cols = linear_sum_assignment(share[:, slots].numpy(), maximize=True)
    categories = torch.empty(channels, dtype=torch.long)
    categories[torch.as_tensor(rows)] = slots[torch.as_tensor(cols)]
    return categories.to(class_activation.device)


def filter_loss_surrogate(s: Tensor, log_z: Tensor, log_px: Tensor, log_prior: Tensor) -> Tensor:
    """Per-(image, filter) surrogate of -MI whose gradient is the paper's Eq. 4 (negated, see module doc).

    With s = tr(x . T_hat) (T_hat includes tau) and Z, p(x), p(T_hat) constants:

        L = -p(T_hat) e^s / Z * (s - log Z - log p(x) - 1)
        dL/ds = -p(T_hat) e^s / Z * (s - log Z - log p(x)),   dL/dx_ij = dL/ds * t_hat_ij.

    L is the single-template term of -MI plus p(T) p(x|T); summed over all x and T that addition is the
    constant 1, so with exact Z the full sum equals -MI + 1.
    """
    log_ratio = s - log_z - log_px
    return -torch.exp(log_prior + s - log_z) * (log_ratio - 1)


# ----------------------------------------------------------------------------------------- released code
RELEASED_TEMPERATURE = 0.5  # the code's `alpha`: exponent mean_ij(x T) / 0.5 (not the prior alpha)
RELEASED_FACTOR = 1e-5  # the code's hard-coded scale of the injected gradient


def released_code_class_weights(categories: Tensor, num_classes: int, single_category: bool,
                                density: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(w_pos, w_neg), each (C,), of the filters of categories (C,): 1 and 1 for a single category;
    0.5 / d_c and 0.5 / (1 - d_c) otherwise, d_c = 1 / K for K > 10 classes, else the class density
    (the share of training images of class c; None = 1 / K, exact for class-balanced data)."""
    if single_category:
        ones = torch.ones(categories.shape, device=categories.device, dtype=torch.float64)
        return ones, ones
    if density is None or num_classes > 10:
        density = torch.full((num_classes,), 1.0 / num_classes, device=categories.device, dtype=torch.float64)
    if density.shape != (num_classes,) or not bool(((density > 0) & (density < 1)).all()):
        raise ValueError(f"density must hold {num_classes} values in (0, 1), got {density.tolist()}")
    d = density.to(categories.device, torch.float64)[categories]
    return 0.5 / d, 0.5 / (1 - d)


def released_code_decay(epoch: int, num_classes: int, single_category: bool) -> float:
    """mag / epoch (epoch counted from 1): the code divides its injected gradient by epoch / mag, with
    mag = 0.1 (logistic), 0.1 * 0.2 (softmax, <= 10 classes) or 0.1 / 50 (softmax, > 10 classes)."""
    if epoch < 1:
        raise ValueError(f"epoch counts from 1, got {epoch}")
    mag = 0.1 if single_category else (0.1 * 0.2 if num_classes <= 10 else 0.1 / 50)
    return mag / epoch


def _normalised_strength(exponent: Tensor, bracket: Tensor, group: Tensor) -> Tensor:
    """e^exponent * bracket divided, per filter, by its mean over the images of `group` (B, C); zero
    outside the group. The exponent is shifted by its maximum over the group first, which leaves the
    ratio unchanged and cannot overflow (the code clips overflowed terms to the largest finite one)."""
    shifted = exponent.masked_fill(~group, float("-inf"))
    top = shifted.amax(dim=0, keepdim=True).clamp(min=torch.finfo(exponent.dtype).min)
    strength = torch.where(group, torch.exp(shifted - top) * bracket, torch.zeros_like(bracket))
    mean = strength.sum(dim=0, keepdim=True) / group.sum(dim=0, keepdim=True).clamp(min=1)
    ratio = torch.where(group, strength / mean, torch.zeros_like(strength)).nan_to_num(nan=0.0)
    finite = ratio[torch.isfinite(ratio) & group]  # a zero mean: inf becomes the largest finite value, as in the code
    return torch.where(torch.isinf(ratio), finite.max() if finite.numel() else 0.0, ratio)


@torch.no_grad()
def released_code_coefficients(x: Tensor, mask: Tensor, positive: Tensor, w_pos: Tensor, w_neg: Tensor,
                               decay: float) -> Tensor:
    """(B, C) coefficients c of the released code's filter gradient dL/dx = -c * T_hat.

    Args:
        x: (B, C, h, w) maps the loss acts on (after ReLU, before the mask).
        mask: (B, C, h, w) the forward masks M (no tau).
        positive: (B, C) bool, the image is of the filter's category.
        w_pos, w_neg: (C,) class weights (`released_code_class_weights`).
        decay: `released_code_decay`.

    With a = 0.5, S = mean_ij(x M), S- = mean_ij(x), over all B images of the batch
    a log Z+ = a log mean_b exp(mean_ij(x M~) / a), M~ the masks flipped across images and channels,
    a log Z- = a log mean_b exp(-S- / a); then e^{S/a} (S - a log Z+ + a) on positive images and
    e^{-S-/a} (-S- - a log Z- + a) on the others, each divided by its filter's mean over those images,
    times 1e-5, the class weight and `decay`. After the division NaN (0 / 0) becomes 0 and an infinite
    value the largest finite one of its group (the code: of its class's block of filters and images).
    """
    a, b = RELEASED_TEMPERATURE, x.shape[0]
    s_pos = (x * mask).mean(dim=(2, 3))
    s_neg = x.mean(dim=(2, 3))
    a_log_z_pos = a * (torch.logsumexp((x * mask.flip(0, 1)).mean(dim=(2, 3)) / a, dim=0) - math.log(b))
    a_log_z_neg = a * (torch.logsumexp(-s_neg / a, dim=0) - math.log(b))
    c = _normalised_strength(s_pos / a, s_pos - a_log_z_pos + a, positive) * w_pos
    c = c + _normalised_strength(-s_neg / a, -s_neg - a_log_z_neg + a, ~positive) * w_neg
    return c * (RELEASED_FACTOR * decay)
