"""Interpretable CNN (Zhang, Wu, Zhu, CVPR 2018, arXiv 1710.00935): the layer and the model.

Each filter of the interpretable layers should fire on one part of one category. After ReLU, the map x
(n x n) of every filter passes through the positive template centred on its peak, ``max(x * T_mu, 0)``,
in training and inference, and a filter loss (negative mutual information between maps and templates)
pulls each filter towards one category and one location. The maths of the templates and of the two
gradient rules are in `models.icnn_loss`.

Choices between the paper and the released code (zqs1022/interpretableCNN, MatConvNet, and its PyTorch
port ada-shen/ICNN):
- Placement: the trunk is cut at its top conv layer (VGG-16 at relu5_3, ResNet after layer3 as in the
  PyTorch port, any timm trunk); its output is masked (``mask_backbone``, the paper's first
  interpretable layer) and `num_layers` new 3x3 convs (same channels, bias, zero padding) follow, each
  output masked after ReLU, as in the paper. The released code masks the *input* of the next layer and,
  for the second layer, after pool5; for ResNets it continues into layer4 - we stop at the head.
- Head: ``"gap"`` (global average pool + linear; the default, so the maps the metrics read feed the
  decision directly) or ``"fc"`` (paper-like: max-pool, fc6, fc7, fc8 with dropout).
- Mask: ``variant="paper"`` uses mu = argmax and a fixed beta (4); ``variant="released_code"`` uses the
  rounded activation-weighted centroid on a linspace(-1, 1) grid and a per-channel beta that tracks
  clip(3 / sigma, 1.5, 3) (its official "gradient"), starting at 2.0. tau is never applied in forward
  (as in every public implementation), only inside exp(tr(x . T)) of the loss. In both, the task
  gradient treats the mask as constant (dL/dx = grad * T where x * T > 0), as the released backward.
- Filter loss rule: ``filter_loss="paper"`` (Eq. 4, below) or ``"released_code"`` (the gradient the
  released ``conv_mask`` backward injects; its five differences from Eq. 4 are listed in
  `models.icnn_loss`). The mask variant and the rule are independent choices.
- tau (paper rule): default 0.5 / n^2 (``tau="n2"``), with alpha = n^2 / (1 + n^2) (uniform prior over
  the n^2 + 1 templates), a reading of arXiv v4 shared by an independent re-implementation; ``tau="n"``
  gives 0.5 / n. The released code's exponent is mean_ij(x M) / 0.5 = tr(x . M) * 2 / n^2, i.e.
  tau = 2 / n^2, four times that default; the released rule always uses it, and ``tau="code"`` gives it
  to the paper rule.
- Paper rule: Eq. 4 keeps only the template T_hat of each (image, filter): T_mu_hat if the image is of
  the filter's category, else T-. Z_T is a running (EMA) estimate per filter and template, and p(x) =
  sum_T p(T) e^{tr(x.T)} / Z_T over all n^2 + 1 templates with those Z_T; both detached. The sign:
  Eq. 4 as printed equals dMI/dx (the +1 terms of the two entropy derivatives cancel); the loss is
  -MI, so we use the negative, which raises x inside the template (as the released code's injected
  gradient does).
- Filter category: argmax_c of an EMA (momentum 0.9, as the code's `sliceMag`) of the per-class mean of
  mean_ij x (the paper's sum_ij x up to the constant n^2; `sliceMag` averages max_ij x instead). In
  ``mode="logistic"`` (single category, label `positive_class` against negatives) every filter belongs
  to the positive class.
- Training from scratch (our SyntheticParts runs; the paper fine-tunes ImageNet CNNs) needs guards on
  the paper rule, all switchable (False / 0 = the paper's Eq. 4 as printed, up to the sign):
  * `clip_log_ratio` (default on): Eq. 4 keeps one template because e^{tr(x.T')} << e^{tr(x.T_hat)}
    "after the first epochs". Where log[p(x|T_hat) / p(x)] < 0 that does not hold, and the printed
    gradient pushes x *away* from T_hat: it raised the activations of images outside a filter's
    category until most filters fired on one class (accuracy fell to 0.6-0.8 in our runs). We apply
    Eq. 4 only where the ratio is >= 0 (implemented by clamping tr(x.T_hat) from below at
    log Z + log p(x), so the surrogate is continuous and its gradient there is zero).
  * `normalize_filter_gradient` (default on): the raw loss is unbounded below in the activation
    scale (e^s / Z favours ever larger peaks), so each filter's Eq. 4 coefficients are divided by their
    mean magnitude over all images of the batch. What follows the released code is the idea of a
    per-filter, per-batch normalisation of the injected gradient; the code differs in dividing by the
    signed mean, over positive and negative images apart, and then scaling by 1e-5, class weights
    and 1 / epoch (the ``"released_code"`` rule does all of that).
  * `filter_loss_warmup` epochs without the loss let filters acquire class preferences first.
  * `category_assignment`: ``"ema"`` (paper and code: argmax of the EMA at every step), ``"frozen"``
    (that argmax, fixed when the loss switches on) or ``"balanced"`` (fixed then too, each class
    getting C/K filters by a linear assignment on the filters' shares of activation per class). With
    filters trained from scratch the argmax left several classes without any filter, and the loss
    then silenced every filter on their images (test accuracy 0.70 instead of 0.98).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone, ReceptiveField
from .base import Explanation, InterpretableClassifier
from .phases import EpochPlan
from .icnn_loss import (
    argmax_mu,
    balanced_categories,
    centroid_mu,
    filter_loss_surrogate,
    negative_template,
    normalised_l1_distances,
    part_templates,
    released_code_class_weights,
    released_code_coefficients,
    released_code_decay,
    template_tau,
)
from .pretrained import PretrainedEntry, register_pretrained
from .registry import register_model

__all__ = [
    "InterpretableCNN",
    "InterpretableLayer",
    "LayerMaps",
    "part_templates",
    "negative_template",
    "normalised_l1_distances",
    "template_tau",
    "argmax_mu",
    "centroid_mu",
    "filter_loss_surrogate",
    "balanced_categories",
]


# ----------------------------------------------------------------------------------------- the layer
@dataclass
class LayerMaps:
    """What one interpretable layer computed for a batch."""

    features: Tensor  # x after ReLU, before the mask (B, C, h, w); the filter loss acts on it
    mu: Tensor  # (B, C) flat index of the template centre
    mask: Tensor  # (B, C, h, w) template values in [-1, 1] (no tau)
    masked: Tensor  # max(x * mask, 0), what the next layer sees


class InterpretableLayer(nn.Module):
    """[3x3 conv ->] ReLU -> template mask, with the running statistics of the filter loss.

    Args:
        channels: number of filters C (input and output).
        num_classes: K, for the class-wise activation that assigns each filter a category.
        conv: add a new 3x3 conv (False: mask the incoming map, e.g. the trunk's top conv layer).
        variant: ``"paper"`` or ``"released_code"`` mask (see the module docstring).
        loss_rule: ``"paper"`` (Eq. 4) or ``"released_code"`` (the released backward) filter gradient.
        beta: the paper's fixed beta (``"paper"`` mask only).
        tau: ``"n2"``, ``"code"``, ``"n"`` or a number (see `template_tau`; paper rule only).
        prior_alpha: p(T_mu) = alpha / n^2, p(T-) = 1 - alpha; None = n^2 / (1 + n^2).
        momentum: of the running estimates (Z_T and the class-wise activation).
        beta_rate: per-step rate at which the released code's beta tracks clip(3 / sigma, 1.5, 3).
        single_category: every filter belongs to class 1 (logistic mode).
        clip_log_ratio: apply Eq. 4 only where log[p(x|T_hat) / p(x)] >= 0 (module docstring).
        normalize_gradient: divide each filter's Eq. 4 coefficients by their mean magnitude over the
            batch (detached; the loss value stays the surrogate's, only the gradient is rescaled).
            Without it the loss is unbounded in the activation scale: from scratch, activations grow and
            the categories collapse onto one class (see the note in the module docstring).

    The output of `out` (an identity) is the masked map: hook it to read the layer (it fires in every
    forward); `forward` returns all of `LayerMaps`.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        conv: bool = True,
        variant: str = "paper",
        loss_rule: str = "paper",
        beta: float = 4.0,
        tau: str | float = "n2",
        prior_alpha: float | None = None,
        momentum: float = 0.9,
        beta_rate: float = 0.05,
        single_category: bool = False,
        normalize_gradient: bool = True,
        clip_log_ratio: bool = True,
    ) -> None:
        super().__init__()
        if variant not in ("paper", "released_code"):
            raise ValueError(f"variant must be 'paper' or 'released_code', got {variant!r}")
        if loss_rule not in ("paper", "released_code"):
            raise ValueError(f"filter_loss must be 'paper' or 'released_code', got {loss_rule!r}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if prior_alpha is not None and not 0 < prior_alpha < 1:
            raise ValueError(f"prior_alpha must be in (0, 1), got {prior_alpha}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        template_tau(1, 1, tau)  # validates
        self.variant, self.loss_rule, self.beta, self.tau, self.prior_alpha = variant, loss_rule, float(beta), tau, prior_alpha
        self.momentum, self.beta_rate, self.single_category = float(momentum), float(beta_rate), single_category
        self.normalize_gradient, self.clip_log_ratio = normalize_gradient, clip_log_ratio
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if conv else None
        self.out = nn.Identity()
        self.register_buffer("class_activation", torch.zeros(channels, num_classes))
        self.register_buffer("class_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("fixed_categories", torch.full((channels,), -1, dtype=torch.long))  # -1: follow the EMA
        if variant == "released_code":
            self.register_buffer("channel_beta", torch.full((channels,), 2.0))  # the code's alphaInit

    # ------------------------------------------------------------------ cached templates, per map size
    def _cached(self, kind: str, h: int, w: int, like: Tensor) -> Tensor:
        """Template banks are built once per map size and kept as non-persistent buffers."""
        name = f"_{kind}_{h}x{w}"
        bank = getattr(self, name, None)
        if bank is None or bank.device != like.device or bank.dtype != like.dtype:
            make = part_templates if kind == "templates" else normalised_l1_distances
            args = (h, w, self.beta) if kind == "templates" else (h, w)
            bank = make(*args, device=like.device, dtype=like.dtype)
            self.register_buffer(name, bank, persistent=False)
        return bank

    def _all_positive_templates(self, h: int, w: int, like: Tensor) -> Tensor:
        """(hw, hw) shared bank ("paper") or (C, hw, hw) per-channel bank ("released_code"), flattened."""
        if self.variant == "paper":
            return self._cached("templates", h, w, like).flatten(1)
        dist = self._cached("distances", h, w, like).flatten(1)
        return (1 - self.channel_beta.to(like)[:, None, None] * dist).clamp(min=-1.0)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> LayerMaps:
        x = F.relu(self.conv(x) if self.conv is not None else x)
        _, c, h, w = x.shape
        if self.variant == "paper":
            mu = argmax_mu(x)
            mask = self._cached("templates", h, w, x)[mu]
        else:
            mu = centroid_mu(x.detach())
            dist = self._cached("distances", h, w, x)[mu]
            mask = (1 - self.channel_beta.to(x)[None, :, None, None] * dist).clamp(min=-1.0)
        # mu and the template are constants for autograd: the task gradient is grad * T where x * T > 0,
        # as in the released backward (dL/dx = conv_grad * max(M, 0)).
        masked = self.out(F.relu(x * mask))
        return LayerMaps(features=x, mu=mu, mask=mask, masked=masked)

    # ------------------------------------------------------------------ filter categories
    def filter_categories(self) -> Tensor:
        """(C,) category of each filter: argmax of its class-wise activation EMA (class 0 before any
        update; 1 in logistic mode), or the categories fixed by `freeze_categories`."""
        if self.fixed_categories[0] >= 0:
            return self.fixed_categories.clone()
        if self.single_category:
            return torch.ones(self.class_activation.shape[0], dtype=torch.long, device=self.class_activation.device)
        seen = self.class_activation.masked_fill(~self.class_seen[None, :], float("-inf"))
        return seen.argmax(dim=1)

    @torch.no_grad()
    def freeze_categories(self, balanced: bool = False) -> None:
        """Fix the categories (the EMA keeps running but no longer moves them): the current argmax, or
        with `balanced` a `balanced_categories` assignment of the class-wise activations."""
        if balanced and not self.single_category:
            self.fixed_categories.copy_(balanced_categories(self.class_activation))
        else:
            self.fixed_categories.copy_(self.filter_categories())

    @torch.no_grad()
    def update_statistics(self, maps: LayerMaps, labels: Tensor) -> None:
        """Class-wise activation EMA (per class present in the batch) and, for the released code, beta."""
        num_classes = self.class_activation.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
        per_image = maps.features.mean(dim=(2, 3))  # (B, C)
        onehot = F.one_hot(labels, num_classes).to(per_image.dtype)
        counts = onehot.sum(dim=0)
        class_mean = per_image.T @ onehot / counts.clamp(min=1)  # (C, K)
        present = counts > 0
        ema = self.momentum * self.class_activation + (1 - self.momentum) * class_mean
        updated = torch.where(self.class_seen[None, :], ema, class_mean)
        self.class_activation.copy_(torch.where(present[None, :], updated, self.class_activation))
        self.class_seen |= present
        if self.variant == "released_code":
            self._update_beta(maps, labels)

    def _update_beta(self, maps: LayerMaps, labels: Tensor) -> None:
        """beta_d -> clip(3 / sigma_d, 1.5, 3): sigma_d is the strength-weighted spatial std over positives.

        Deviation: strength is mean_ij max(x * M, 0) (the code uses mean_ij x * M, which can be negative
        and would make the weighted mean meaningless).
        """
        x = maps.features
        _, _, h, w = x.shape
        rows = torch.arange(h, device=x.device, dtype=x.dtype)[:, None]
        cols = torch.arange(w, device=x.device, dtype=x.dtype)[None, :]
        mi, mj = (maps.mu // w).to(x.dtype)[..., None, None], (maps.mu % w).to(x.dtype)[..., None, None]
        sq = (rows - mi) ** 2 + (cols - mj) ** 2
        sigma = ((sq * x).sum(dim=(2, 3)) / x.sum(dim=(2, 3)).clamp(min=1e-9)).sqrt()  # (B, C)
        positive = (labels[:, None] == self.filter_categories()[None, :]).to(x.dtype)
        strength = maps.masked.mean(dim=(2, 3)) * positive
        den = strength.sum(dim=0)
        mean_sigma = (strength * sigma).sum(dim=0) / den.clamp(min=1e-12)
        target = (3.0 / mean_sigma.clamp(min=1e-6)).clamp(1.5, 3.0)
        step = torch.where(den > 0, self.beta_rate * (target - self.channel_beta), torch.zeros_like(target))
        self.channel_beta.add_(step)

    # ------------------------------------------------------------------ filter loss
    def _log_priors(self, hw: int, like: Tensor) -> Tensor:
        """log p(T) for the hw positive templates then T-, (hw + 1,)."""
        alpha = hw / (1 + hw) if self.prior_alpha is None else self.prior_alpha
        log_p = torch.full((hw + 1,), math.log(alpha / hw), device=like.device, dtype=like.dtype)
        log_p[hw] = math.log(1 - alpha)
        return log_p

    def _running_log_z(self, batch_log_z: Tensor, h: int, w: int, update: bool) -> Tensor:
        """EMA of Z_T / N in log space, including this batch (so e^s / Z stays bounded by B / (1 - m))."""
        name = f"_log_z_{h}x{w}"
        old = getattr(self, name, None)
        if old is None or old.shape != batch_log_z.shape:
            new = batch_log_z
        else:
            m = self.momentum
            new = torch.logaddexp(old.to(batch_log_z) + math.log(m), batch_log_z + math.log(1 - m)) if m > 0 else batch_log_z
        if update:
            # Non-persistent: a training statistic re-estimated within a few steps after loading.
            self.register_buffer(name, new.detach().clone(), persistent=False)
        return new

    def filter_loss(self, maps: LayerMaps, labels: Tensor, update: bool = True, epoch: int = 1) -> Tensor:
        """Sum over filters of the batch mean of the per-(image, filter) loss of the layer's rule.

        Args:
            maps: this layer's output for the batch.
            labels: (B,) class of each image (0/1 in logistic mode).
            update: store the running Z_T estimates (training; paper rule).
            epoch: the training epoch counted from 1 (the released rule's 1 / epoch decay).
        """
        if self.loss_rule == "released_code":
            return self._released_code_loss(maps, labels, epoch)
        x = maps.features
        b, c, h, w = x.shape
        hw = h * w
        tau = template_tau(h, w, self.tau)
        log_prior = self._log_priors(hw, x)
        with torch.no_grad():
            flat = x.detach().flatten(2)  # (B, C, hw)
            bank = self._all_positive_templates(h, w, flat)
            traces = flat @ bank.T if bank.dim() == 2 else torch.einsum("bcp,cqp->bcq", flat, bank)
            s_all = tau * torch.cat([traces, -flat.sum(dim=2, keepdim=True)], dim=2)  # (B, C, hw + 1)
            log_z = self._running_log_z(torch.logsumexp(s_all, dim=0) - math.log(b), h, w, update)  # (C, hw + 1)
            log_px = torch.logsumexp(log_prior + s_all - log_z, dim=2)  # (B, C)
            positive = labels[:, None] == self.filter_categories()[None, :]
            index = torch.where(positive, maps.mu, torch.full_like(maps.mu, hw))
            log_z_hat = log_z.expand(b, -1, -1).gather(2, index[..., None])[..., 0]
            log_prior_hat = log_prior[index]
        template_hat = torch.where(positive[..., None, None], maps.mask, torch.full_like(maps.mask, -1.0))
        s_hat = tau * (x * template_hat).sum(dim=(2, 3))
        if self.clip_log_ratio:  # no gradient where the single-template approximation fails
            s_hat = torch.maximum(s_hat, log_z_hat + log_px)
        per_image = filter_loss_surrogate(s_hat, log_z_hat, log_px, log_prior_hat)  # (B, C)
        if self.normalize_gradient:
            with torch.no_grad():  # |dL/ds| per (image, filter), Eq. 4 without t_ij
                coef = torch.exp(log_prior_hat + s_hat - log_z_hat) * (s_hat - log_z_hat - log_px)
            # same value (the Eq. 4 surrogate, for logging), gradient divided by the filter's scale
            scaled = per_image / coef.abs().mean(dim=0).clamp(min=1e-12)
            per_image = scaled - scaled.detach() + per_image.detach()
        return per_image.sum(dim=1).mean()

    def _released_code_loss(self, maps: LayerMaps, labels: Tensor, epoch: int) -> Tensor:
        """Surrogate -c * tr(x . T_hat) with c = `released_code_coefficients` (detached), so that its
        gradient is the released code's injected one. MatConvNet sums the loss over the batch and
        divides the update by the batch size; the batch mean here keeps the same ratio to the mean
        cross-entropy. Its value is not a loss to read, only its gradient counts."""
        x = maps.features
        categories = self.filter_categories()
        num_classes = self.class_activation.shape[1]
        positive = labels[:, None] == categories[None, :]
        w_pos, w_neg = released_code_class_weights(categories, num_classes, self.single_category)
        decay = released_code_decay(epoch, num_classes, self.single_category)
        coef = released_code_coefficients(x.detach(), maps.mask, positive, w_pos.to(x), w_neg.to(x), decay)
        template_hat = torch.where(positive[..., None, None], maps.mask, torch.full_like(maps.mask, -1.0))
        per_image = -coef * (x * template_hat).sum(dim=(2, 3))
        return per_image.sum(dim=1).mean()


# ----------------------------------------------------------------------------------------- the model
class InterpretableCNN(InterpretableClassifier):
    """Trunk cut at its top conv layer -> interpretable (masked) layers -> classifier head.

    Args:
        num_classes: K (2 in logistic mode: the outputs are the logits [0, z] of "negative", "positive").
        backbone: timm name or ``"torchvision/<name>"``.
        stage: feature stage to cut at (VGG-16: 4 = relu5_3; ResNet: 3 = layer3).
        pretrained_backbone: False, True (ImageNet weights, needs network) or a weights file.
        mode: ``"softmax"`` (multi-category) or ``"logistic"`` (label `positive_class` against the rest).
        positive_class: the object class in logistic mode; any data labels are mapped to (label == it).
        num_layers: new 3x3 interpretable conv layers after the trunk.
        mask_backbone: also mask (and apply the filter loss to) the trunk's top conv output.
        variant: ``"paper"`` or ``"released_code"`` mask (see the module docstring).
        filter_loss: ``"paper"`` (Eq. 4) or ``"released_code"`` (the released backward's gradient; its
            own scale is the code's, so lambda = 1 reproduces it).
        beta, tau, prior_alpha, momentum, beta_rate: of the templates and the loss (`InterpretableLayer`).
        filter_loss_weight: lambda; the total is cross_entropy + lambda * filter_loss.
        filter_loss_warmup: epochs trained with lambda = 0 first (the filter loss is still logged and the
            categories are tracked). The paper fine-tunes a pretrained CNN, whose filters already prefer
            classes; from scratch, categories read off random filters lock in a skewed assignment.
        normalize_filter_gradient: per-filter normalisation of the Eq. 4 coefficients (released code;
            see `InterpretableLayer`).
        clip_log_ratio: Eq. 4 only where log[p(x|T_hat) / p(x)] >= 0 (see the module docstring).
        category_assignment: ``"ema"``, ``"frozen"`` or ``"balanced"`` (see the module docstring); the
            last two fix the categories when the filter loss switches on (after the warm-up).
        head: ``"gap"`` (GAP + linear) or ``"fc"`` (max-pool, fc6, fc7, fc8, as the paper's VGG head).
        fc_hidden, fc_grid: width of fc6/fc7 and the pooled grid fc6 sees (7 for VGG-16 at 224 px).
        dropout: before each linear layer of the head.
        **kwargs: optimisation arguments of `InterpretableClassifier`.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        stage: int | None = 3,
        pretrained_backbone: bool | str = False,
        mode: Literal["softmax", "logistic"] = "softmax",
        positive_class: int = 1,
        num_layers: int = 1,
        mask_backbone: bool = True,
        variant: Literal["paper", "released_code"] = "paper",
        filter_loss: Literal["paper", "released_code"] = "paper",
        beta: float = 4.0,
        tau: str | float = "n2",
        prior_alpha: float | None = None,
        momentum: float = 0.9,
        beta_rate: float = 0.05,
        filter_loss_weight: float = 1.0,
        filter_loss_warmup: int = 0,
        normalize_filter_gradient: bool = True,
        clip_log_ratio: bool = True,
        category_assignment: Literal["ema", "frozen", "balanced"] = "ema",
        head: Literal["gap", "fc"] = "gap",
        fc_hidden: int = 4096,
        fc_grid: int = 7,
        dropout: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        if mode not in ("softmax", "logistic"):
            raise ValueError(f"mode must be 'softmax' or 'logistic', got {mode!r}")
        if mode == "logistic" and num_classes != 2:
            raise ValueError(f"logistic mode has num_classes=2 (negative, positive), got {num_classes}")
        if num_layers < 0 or (num_layers == 0 and not mask_backbone):
            raise ValueError(f"need at least one interpretable layer: num_layers={num_layers}, mask_backbone={mask_backbone}")
        if filter_loss_weight < 0 or filter_loss_warmup < 0:
            raise ValueError(f"filter_loss_weight and filter_loss_warmup must be >= 0, got {filter_loss_weight}, {filter_loss_warmup}")
        if head not in ("gap", "fc"):
            raise ValueError(f"head must be 'gap' or 'fc', got {head!r}")
        if category_assignment not in ("ema", "frozen", "balanced"):
            raise ValueError(f"category_assignment must be 'ema', 'frozen' or 'balanced', got {category_assignment!r}")
        self.mode, self.positive_class = mode, positive_class
        self.filter_loss_weight, self.filter_loss_warmup = float(filter_loss_weight), int(filter_loss_warmup)
        self.category_assignment = category_assignment
        self.backbone = Backbone(backbone, stage=stage, pretrained=pretrained_backbone)
        channels = self.backbone.out_channels
        layer_kw = dict(
            variant=variant, loss_rule=filter_loss, beta=beta, tau=tau, prior_alpha=prior_alpha, momentum=momentum,
            beta_rate=beta_rate, single_category=mode == "logistic", normalize_gradient=normalize_filter_gradient,
            clip_log_ratio=clip_log_ratio,
        )
        convs = [False] * int(mask_backbone) + [True] * num_layers
        self.interpretable = nn.ModuleList(InterpretableLayer(channels, num_classes, conv=c, **layer_kw) for c in convs)
        outputs = 1 if mode == "logistic" else num_classes
        if head == "gap":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, outputs))
        else:
            self.head = nn.Sequential(
                nn.MaxPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(fc_grid), nn.Flatten(),
                nn.Linear(channels * fc_grid**2, fc_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(fc_hidden, fc_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(fc_hidden, outputs),
            )

    # ------------------------------------------------------------------ forward
    def _logits(self, features: Tensor) -> Tensor:
        z = self.head(features)
        # Logistic mode as two logits [0, z]: softmax gives sigmoid(z), cross-entropy the logistic loss.
        return torch.cat([torch.zeros_like(z), z], dim=1) if self.mode == "logistic" else z

    def layer_maps(self, images: Tensor) -> tuple[Tensor, list[LayerMaps]]:
        """Logits and every interpretable layer's maps for images in [0, 1]."""
        x = self.backbone(self.normalize(images))
        maps = []
        for layer in self.interpretable:
            maps.append(layer(x))
            x = maps[-1].masked
        return self._logits(x), maps

    def forward(self, images: Tensor) -> Tensor:
        return self.layer_maps(images)[0]

    @property
    def feature_layer(self) -> nn.Module:
        """The module whose output is the last interpretable layer's masked map (hook it for metrics)."""
        return self.interpretable[-1].out

    @property
    def raw_feature_layer(self) -> nn.Module:
        """The last interpretable layer's new conv, whose output is the raw (pre-ReLU, unmasked) map: what
        the released `computeStability.m` reads for location instability."""
        conv = self.interpretable[-1].conv
        if conv is None:
            raise ValueError("the last interpretable layer masks the trunk's output and has no conv of its own (num_layers=0)")
        return conv

    def receptive_field(self, image_size: int) -> ReceptiveField:
        """Of the interpretable layers' cells: the trunk's, widened by each 3x3 conv (centres unchanged)."""
        rf = self.backbone.receptive_field(image_size)
        convs = sum(layer.conv is not None for layer in self.interpretable)
        return ReceptiveField(size=rf.size, jump=rf.jump, rf=rf.rf + 2 * rf.jump * convs, start=rf.start, image_size=image_size)

    def filter_categories(self, layer: int = -1) -> Tensor:
        """(C,) category of each filter of an interpretable layer."""
        return self.interpretable[layer].filter_categories()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "backbone": list(self.backbone.parameters()),
            "interpretable": list(self.interpretable.parameters()),
            "head": list(self.head.parameters()),
        }

    # ------------------------------------------------------------------ training
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """``"plain"`` (filter loss weight 0) for `filter_loss_warmup` epochs, then ``"filter_loss"``."""
        epoch = self.current_epoch if epoch is None else epoch
        return EpochPlan("plain" if epoch < self.filter_loss_warmup else "filter_loss", epoch)

    def compute_losses(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits, maps = self.layer_maps(images)
        ce = F.cross_entropy(logits, labels)
        active = self.plan().phase == "filter_loss"
        if self.training:
            for layer, m in zip(self.interpretable, maps):
                layer.update_statistics(m, labels)
                if self.category_assignment != "ema" and active and layer.fixed_categories[0] < 0:
                    layer.freeze_categories(balanced=self.category_assignment == "balanced")
        epoch = self.current_epoch + 1
        filter_loss = sum(layer.filter_loss(m, labels, update=self.training, epoch=epoch)
                          for layer, m in zip(self.interpretable, maps))
        weight = self.filter_loss_weight if active else 0.0
        return logits, {"loss": ce + weight * filter_loss, "cross_entropy": ce, "filter_loss": filter_loss}

    def on_validation_epoch_end(self) -> None:
        # val/acc_interpretable: validation accuracy once the filter loss is on, -1 before, so that
        # ModelCheckpoint(monitor="val/acc_interpretable") never selects a network trained without it.
        if self.trainer.sanity_checking:
            return
        active = self.filter_loss_weight > 0 and self.plan().phase == "filter_loss"
        acc = self.val_metrics["acc"].compute() if active else torch.full((), -1.0, device=self.device)
        self.log("val/acc_interpretable", acc, sync_dist=False)  # compute() already syncs across ranks

    def _task_batch(self, batch: Any) -> Any:
        """In logistic mode the labels become 1 for `positive_class` and 0 for every other class."""
        if self.mode == "softmax":
            return batch
        if isinstance(batch, dict):
            return {**batch, "label": (batch["label"] == self.positive_class).long()}
        return (batch[0], (batch[1] == self.positive_class).long(), *batch[2:])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(self._task_batch(batch), "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(self._task_batch(batch), "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(self._task_batch(batch), "test")

    def setup(self, stage: str) -> None:
        if self.mode == "softmax":  # logistic mode accepts any data: labels are mapped to one-vs-rest
            super().setup(stage)

    # ------------------------------------------------------------------ explanation
    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | int | None = None) -> Explanation:
        """Heatmap: the summed masked maps of the filters assigned to the target class (default: the
        prediction) in the last interpretable layer, bilinearly upsampled; zero if no filter has it.

        evidence: ``part_maps`` (B, C, h, w) masked maps, ``filter_categories`` (C,), ``assigned`` (B, C)
        bool (filter belongs to the target), ``peaks`` (B, C, 2) (row, col) of each template centre.
        """
        logits, maps = self.layer_maps(images)
        target = self._target(logits, target)
        last = maps[-1]
        categories = self.filter_categories()
        assigned = categories[None, :] == target[:, None]
        cam = (last.masked * assigned[..., None, None]).sum(dim=1)
        heatmap = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        w = last.masked.shape[-1]
        peaks = torch.stack([last.mu // w, last.mu % w], dim=-1)
        evidence = {"part_maps": last.masked, "filter_categories": categories, "assigned": assigned, "peaks": peaks}
        return Explanation(logits=logits, target=target, heatmap=heatmap, evidence=evidence)


# ----------------------------------------------------------------------------------------- builders
def _icnn(backbone: str, default_stage: int | None, **kwargs) -> InterpretableCNN:
    kwargs.setdefault("num_classes", 1000)
    kwargs.setdefault("stage", default_stage)
    return InterpretableCNN(backbone=backbone, **kwargs)


@register_model
def icnn_vgg16(**kwargs) -> InterpretableCNN:
    """The paper's VGG-16: trunk to relu5_3 (masked), one new 3x3 conv of 512 (masked), fc head."""
    kwargs.setdefault("head", "fc")
    kwargs.setdefault("dropout", 0.5)
    return _icnn("vgg16", 4, **kwargs)


@register_model
def icnn_resnet18(**kwargs) -> InterpretableCNN:
    """ResNet-18 after layer3 (256 channels, 14x14 at 224 px) as in the PyTorch port, GAP + linear head."""
    return _icnn("resnet18", 3, **kwargs)


@register_model
def icnn_resnet50(**kwargs) -> InterpretableCNN:
    """ResNet-50 after layer3 (1024 channels) as in the PyTorch port, GAP + linear head."""
    return _icnn("resnet50", 3, **kwargs)


@register_model
def icnn_test_resnet(**kwargs) -> InterpretableCNN:
    """timm's tiny `test_resnet` after layer2 (48 channels, 8x8 at 64 px): for tests and CPU runs."""
    return _icnn("test_resnet", 2, **kwargs)


register_pretrained(PretrainedEntry(
    name="icnn_resnet18.synthparts", class_path="models.icnn.InterpretableCNN",
    dataset="SyntheticParts (10 classes, 64 px)", config="configs/icnn/synthetic.yaml",
    notes="ResNet-18 cut after layer2 (masked), one interpretable 3x3 conv (masked, filter loss), GAP + linear",
))


register_pretrained(PretrainedEntry(
    name="icnn_resnet18.synthparts128", class_path="models.icnn.InterpretableCNN",
    dataset="SyntheticParts (10 classes, 128 px)", config="configs/icnn/synthetic.yaml",
    overlays=("configs/overlays/synthparts_128.yaml",),
    notes="the synthparts recipe at 128 px, the CUB-like operating point of the comparison",
))
