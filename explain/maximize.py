"""Activation maximisation: the image a model responds to most (class-model visualisation).

Simonyan, Vedaldi and Zisserman (2013, "Deep inside convolutional networks") find, by gradient ascent,

    I* = argmax_I  S(I) - lambda ||I - m||_2^2

where S is an unnormalised class score (the logit, not the softmax, which could also rise by lowering
the other classes) and the image is taken relative to the mean image m, from which the ascent also
starts (their "zero image"). Here the image is parametrised in [0, 1] as I = sigmoid(theta), m is the
model's normalisation mean colour (``model.normalize.mean``; 0.5 without one), and S is any
``objective(model, images) -> (B,)``: a class logit, a prototype's similarity or a unit's activation.
Two later regularisers are optional: random jitter (the image rolled by up to `jitter` pixels at each
step, Mordvintsev et al. 2015) and a Gaussian blur every `blur_every` steps (Yosinski et al. 2015).
The paper gives no lambda; the default here is ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF


from .dissect import layer_output

__all__ = ["Maximization", "Objective", "class_logit", "filter_activation", "maximize", "prototype_similarity"]

Objective = Callable[[nn.Module, Tensor], Tensor]
_EPS = 1e-4  # keeps logit(image) finite


@dataclass
class Maximization:
    """image (B, 3, H, W) in [0, 1]; scores (steps + 1, B) the objective S at each iterate, from the
    start image to the final one; objective (steps + 1, B) the ascended S - lambda ||I - m||^2.
    With jitter, the recorded values of steps 0..steps-1 are those of the jittered inputs."""

    image: Tensor
    scores: Tensor
    objective: Tensor


def _per_image(index: int | Sequence[int] | Tensor, batch: int, device: torch.device) -> Tensor:
    index = torch.as_tensor(index, dtype=torch.long, device=device)
    if index.dim() == 0:
        return index.expand(batch)
    if index.shape != (batch,):
        raise ValueError(f"need one index or one per image ({batch}), got shape {tuple(index.shape)}")
    return index


def class_logit(target: int | Sequence[int] | Tensor) -> Objective:
    """The logit of class `target` (one for all images, or one per image)."""

    def objective(model: nn.Module, images: Tensor) -> Tensor:
        logits = model(images)
        return logits.gather(1, _per_image(target, len(images), logits.device)[:, None])[:, 0]

    return objective


def prototype_similarity(prototype: int | Sequence[int] | Tensor) -> Objective:
    """Similarity of prototype `prototype` to its most similar latent patch, in the model's own similarity
    (`similarity_maps` of the prototype interface: ProtoPNet's log or linear similarity, ProtoTree's exp(-d))."""

    def objective(model: nn.Module, images: Tensor) -> Tensor:
        if not callable(getattr(model, "similarity_maps", None)):
            raise TypeError(f"{type(model).__name__} has no prototypes (no similarity_maps())")
        sims = model.similarity_maps(images)
        index = _per_image(prototype, len(images), sims.device)
        if int(index.max()) >= sims.shape[1] or int(index.min()) < 0:
            raise ValueError(f"prototype index out of range 0..{sims.shape[1] - 1}: {index.tolist()}")
        return sims.flatten(2).amax(dim=2).gather(1, index[:, None])[:, 0]

    return objective


def filter_activation(layer: nn.Module | str, unit: int | Sequence[int] | Tensor, reduce: Literal["mean", "max"] = "mean") -> Objective:
    """The mean (or max) over positions of channel `unit` of `layer`'s output (the forward stops there)."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")

    def objective(model: nn.Module, images: Tensor) -> Tensor:
        maps = layer_output(model, layer, images)
        index = _per_image(unit, len(images), maps.device)
        if int(index.max()) >= maps.shape[1] or int(index.min()) < 0:
            raise ValueError(f"unit index out of range 0..{maps.shape[1] - 1}: {index.tolist()}")
        chosen = maps[torch.arange(len(images), device=maps.device), index].flatten(1)
        return chosen.mean(dim=1) if reduce == "mean" else chosen.amax(dim=1)

    return objective


def _centre(model: nn.Module, device: torch.device) -> Tensor:
    """(1, 3, 1, 1) the mean colour m the L2 term pulls towards."""
    mean = getattr(getattr(model, "normalize", None), "mean", None)
    if isinstance(mean, Tensor) and mean.numel() == 3:
        return mean.detach().reshape(1, 3, 1, 1).to(device, torch.float32)
    return torch.full((1, 3, 1, 1), 0.5, device=device)


def _jitter(images: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    dy, dx = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=generator))
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def maximize(
    model: nn.Module,
    objective: Objective,
    image_size: int | tuple[int, int] = 64,
    batch_size: int = 1,
    init: Tensor | None = None,
    steps: int = 200,
    lr: float = 0.05,
    l2: float = 1e-4,
    optimizer: Literal["adam", "sgd"] = "adam",
    jitter: int = 0,
    blur_every: int = 0,
    blur_sigma: float = 0.5,
    seed: int = 0,
    device: Any = None,
) -> Maximization:
    """Optimise images to maximise `objective(model, images)` (B,) minus `l2` ||I - m||^2.

    Args:
        model: called on images in [0, 1]; run in eval mode (its mode is restored after).
        objective: e.g. `class_logit(c)`, `prototype_similarity(p)`, `filter_activation(layer, k)`.
        image_size, batch_size: of the images, when `init` is not given.
        init: (B, 3, H, W) start images in [0, 1] (default: the mean colour, the paper's zero image).
        steps, lr: gradient steps on theta (I = sigmoid(theta)) and their size.
        l2: lambda of the L2 term (the sum over pixels of (I - m)^2, as in the paper).
        optimizer: ``"adam"`` (default, robust to the objective's scale) or ``"sgd"`` (plain gradient
            ascent, the paper's; with a small lr every step raises the objective).
        jitter: roll the input by up to this many pixels at each step (0 = off).
        blur_every, blur_sigma: Gaussian blur of the image every this many steps (0 = off).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("maximize needs gradients: call it outside torch.inference_mode")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if steps < 0 or lr <= 0 or l2 < 0 or jitter < 0 or blur_every < 0:
        raise ValueError(f"need steps >= 0, lr > 0, l2 >= 0, jitter >= 0, blur_every >= 0; got {steps}, {lr}, {l2}, {jitter}, {blur_every}")
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    centre = _centre(model, dev)
    if init is None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        init = centre.expand(batch_size, 3, h, w)
    elif init.dim() != 4 or init.shape[1] != 3:
        raise ValueError(f"init must be (B, 3, H, W) images in [0, 1], got shape {tuple(init.shape)}")
    theta = torch.logit(init.detach().to(dev, torch.float32).clamp(_EPS, 1 - _EPS)).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr) if optimizer == "adam" else torch.optim.SGD([theta], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    kernel = 2 * int(3 * blur_sigma + 0.5) + 1
    scores, totals, was_training = [], [], model.training
    model.eval()
    try:
        with torch.enable_grad():
            for step in range(steps + 1):
                image = torch.sigmoid(theta)
                shown = _jitter(image, jitter, generator) if jitter and step < steps else image
                score = objective(model, shown)
                if score.shape != (len(image),):
                    raise ValueError(f"the objective must return one value per image ({len(image)},), got {tuple(score.shape)}")
                total = score - l2 * (image - centre).pow(2).flatten(1).sum(dim=1)
                scores.append(score.detach())
                totals.append(total.detach())
                if step == steps:
                    break
                (grad,) = torch.autograd.grad(total.sum(), theta)
                theta.grad = -grad  # ascent
                opt.step()
                if blur_every and (step + 1) % blur_every == 0:
                    with torch.no_grad():
                        blurred = TF.gaussian_blur(torch.sigmoid(theta), [kernel, kernel], [blur_sigma, blur_sigma])
                        theta.copy_(torch.logit(blurred.clamp(_EPS, 1 - _EPS)))
    finally:
        model.train(was_training)
    return Maximization(image=torch.sigmoid(theta).detach(), scores=torch.stack(scores), objective=torch.stack(totals))
