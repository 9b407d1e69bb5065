"""This looks like that, because ... (Nauta et al. 2020): how much a prototype's similarity depends on hue,
shape, texture, contrast and saturation.

Every image is modified in one property at a time (spec `explanations_next.md` A.5, official
``preprocessing/create_modified_datasets.py`` and ``mod_values.py``):

==============  =======================================================  ==================
modification    how                                                      value
==============  =======================================================  ==================
contrast        ``adjust_contrast`` (ColorJitter(contrast=[c, c]))        c = 0.45
saturation      ``adjust_saturation``                                    s = 0.7
hue             ``adjust_hue``, a fixed shift                            h = 0.1
texture         OpenCV ``fastNlMeansDenoisingColored`` (BGR, uint8)      h = hColor = 4, template 7, search 21
shape           row i rolled by int(A sin(pi i w)), then column j too    A = 4, w = 0.05
brightness      ``adjust_brightness`` (in the code, not the paper's five) b = 0.8
==============  =======================================================  ==================

The local score of prototype p on image x is delta = g_p(x) - g_p(x_m), both at the latent cell of x
most similar to p (the official nearest patch, reused for x_m); g is the family's similarity. The global
score is the mean of delta over the images weighted by g_p(x): sum(delta g) / sum(g) (official
``weighted_mean``). A large score: the prototype's similarity rests on that property.

Deviations: the images are modified in memory as float tensors (the official code writes each modified
image as a JPEG, so every modification there also carries JPEG artefacts; here only texture is rounded
to uint8, as OpenCV needs); g is each family's own similarity (ProtoPNet's log-similarity in the paper);
weights g_p(x) below 0 (a family whose similarity can be negative) count as 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn

__all__ = ["MODIFICATIONS", "DEFAULT_MODIFICATIONS", "BecauseScores", "modify", "sine_warp", "denoise_texture",
           "because_scores"]

MODIFICATIONS: dict[str, Any] = {"contrast": 0.45, "saturation": 0.7, "hue": 0.1, "texture": 4.0, "shape": (4.0, 0.05),
                                 "brightness": 0.8}
DEFAULT_MODIFICATIONS = ("hue", "shape", "texture", "contrast", "saturation")


def sine_warp(images: Tensor, amplitude: float = 4.0, frequency: float = 0.05) -> Tensor:
    """(B, C, H, W): row i rolled right by int(A sin(pi i w)) (np.roll), then column j down by int(A sin(pi j w))."""
    b, c, h, w = images.shape
    shift = lambda n: (amplitude * torch.sin(torch.pi * torch.arange(n, dtype=torch.float64) * frequency)).trunc().long()  # noqa: E731
    cols = (torch.arange(w)[None, :] - shift(h)[:, None]) % w  # (H, W): out[i, x] = in[i, x - s_i]
    out = images.gather(3, cols.to(images.device).expand(b, c, h, w))
    rows = (torch.arange(h)[:, None] - shift(w)[None, :]) % h  # (H, W): out[y, j] = in[y - s_j, j]
    return out.gather(2, rows.to(images.device).expand(b, c, h, w))


def denoise_texture(images: Tensor, h: float = 4.0) -> Tensor:
    """(B, 3, H, W) in [0, 1] smoothed by OpenCV's non-local means as the official code calls it (on the
    BGR uint8 image: h = hColor = `h`, template window 7, search window 21)."""
    try:
        import cv2  # noqa: PLC0415 - needed for this modification only
    except ImportError:
        raise ImportError("the texture modification needs OpenCV: pip install opencv-python-headless") from None
    if images.shape[1] != 3:
        raise ValueError(f"texture needs RGB images (B, 3, H, W), got {tuple(images.shape)}")
    arrays = (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    out = [cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(a[..., ::-1]), None, h=h, hColor=h,
                                           templateWindowSize=7, searchWindowSize=21)[..., ::-1] for a in arrays]
    return torch.from_numpy(np.stack(out).copy()).permute(0, 3, 1, 2).to(images.device, images.dtype) / 255


def modify(images: Tensor, modification: str, value: Any = None) -> Tensor:
    """(B, 3, H, W) images in [0, 1] changed in one property (`MODIFICATIONS`; `value` None = the paper's)."""
    if modification not in MODIFICATIONS:
        raise ValueError(f"unknown modification {modification!r}; expected one of {list(MODIFICATIONS)}")
    value = MODIFICATIONS[modification] if value is None else value
    if modification == "contrast":
        return TF.adjust_contrast(images, value)
    if modification == "saturation":
        return TF.adjust_saturation(images, value)
    if modification == "hue":
        return TF.adjust_hue(images, value)
    if modification == "brightness":
        return TF.adjust_brightness(images, value)
    if modification == "texture":
        return denoise_texture(images, value)
    return sine_warp(images, *value)


@dataclass
class BecauseScores:
    """Scores of prototypes under each modification.

    Attributes:
        prototypes: (P,) prototype ids.
        modifications: the M modification names.
        local: (B, P, M) delta = g(x) - g(x_m) per image.
        similarity: (B, P) g(x), the weights of the global score.
        scores: (P, M) the global scores.
    """

    prototypes: Tensor
    modifications: tuple[str, ...]
    local: Tensor
    similarity: Tensor
    scores: Tensor

    def as_dict(self) -> dict[int, dict[str, float]]:
        """Prototype id -> {modification: global score}, for views."""
        return {int(j): dict(zip(self.modifications, row.tolist())) for j, row in zip(self.prototypes, self.scores)}

    def strongest(self) -> list[str]:
        """Per prototype, the modification with the largest global score (the property it rests on most)."""
        return [self.modifications[int(i)] for i in torch.nan_to_num(self.scores, nan=float("-inf")).argmax(1)]


@torch.no_grad()
def because_scores(model: nn.Module, images: Tensor, prototypes: Sequence[int] | Tensor | None = None,
                   modifications: Sequence[str] = DEFAULT_MODIFICATIONS, *, values: dict[str, Any] | None = None,
                   batch_size: int = 32) -> BecauseScores:
    """`BecauseScores` of prototypes (None: every active one) of a prototype model on `images` (B, 3, H, W)
    in [0, 1]: the local scores per image and the similarity-weighted global score (module docstring)."""
    if not all(callable(getattr(model, n, None)) for n in ("distances", "similarity", "prototype_active")):
        raise TypeError(f"{type(model).__name__} is not a prototype model (models.prototype_model.PrototypeModel)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    unknown = [m for m in modifications if m not in MODIFICATIONS]
    if unknown:
        raise ValueError(f"unknown modification(s) {unknown}; expected some of {list(MODIFICATIONS)}")
    ids = model.prototype_active().nonzero().squeeze(1) if prototypes is None else torch.as_tensor(prototypes).long()
    ids = ids.to(model.device)
    values = values or {}
    was = model.training
    model.eval()
    try:
        local, sims = [], []
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(model.device).float()
            g = model.similarity(model.distances(x))[:, ids].flatten(2)  # (b, P, h w)
            best, cell = g.max(dim=2)  # the most similar cell (first maximum)
            deltas = []
            for m in modifications:
                gm = model.similarity(model.distances(modify(x, m, values.get(m))))[:, ids].flatten(2)
                deltas.append(best - gm.gather(2, cell[..., None])[..., 0])
            local.append(torch.stack(deltas, dim=2).cpu())
            sims.append(best.cpu())
    finally:
        model.train(was)
    local_t, sim_t = torch.cat(local), torch.cat(sims)
    weight = sim_t.clamp_min(0)[..., None]
    total = weight.sum(0)
    scores = torch.where(total > 0, (local_t * weight).sum(0) / total.clamp_min(1e-30), float("nan"))
    return BecauseScores(ids.cpu(), tuple(modifications), local_t, sim_t, scores)
