"""This looks like that, because (explain.because): the modifications against the official operations, the
score formula by hand, and constructed prototypes whose property is known."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from explain.because import DEFAULT_MODIFICATIONS, because_scores, modify, sine_warp
from models.prototype_model import PrototypeModel


class PropertyPrototypes(PrototypeModel):
    """latent = feature(images) (B, D, h, w); squared L2 to fixed prototypes; similarity = `offset` - d."""

    def __init__(self, feature: Callable[[Tensor], Tensor], prototypes: Tensor, scale: float = 1.0,
                 offset: float | None = None) -> None:
        super().__init__(num_classes=2)
        self.feature, self.scale, self.offset = feature, scale, offset
        self.register_buffer("vectors", prototypes.float())
        self.register_prototype_records(len(prototypes), 4)

    def latent(self, images: Tensor) -> Tensor:
        return self.feature(images)

    def prototype_tensor(self) -> Tensor:
        return self.vectors

    def distances(self, images: Tensor) -> Tensor:
        z = self.latent(images)
        return ((z[:, None] - self.vectors[None, :, :, None, None]) ** 2).sum(2)

    def similarity(self, distances: Tensor) -> Tensor:
        return self.offset - distances if self.offset is not None else torch.exp(-distances / self.scale)

    def prototype_class_connection(self) -> Tensor:
        return torch.ones(self.num_prototypes, 2)

    def prototype_active(self) -> Tensor:
        return torch.ones(self.num_prototypes, dtype=torch.bool)


def _hue_direction(images: Tensor) -> Tensor:
    """(B, 2, h, w) unit chroma direction of 4 x 4 blocks: unchanged by contrast, saturation, brightness."""
    r, g, b = images.unbind(1)
    a, c = r - (g + b) / 2, (g - b) * math.sqrt(3) / 2
    direction = torch.stack([a, c], 1) / (a**2 + c**2).sqrt().clamp_min(1e-6)[:, None]
    return F.avg_pool2d(direction, 4)


def _grey_spread(images: Tensor) -> Tensor:
    """(B, 1, 1, 1) standard deviation of the grey level over the image: unchanged by hue on grey images,
    saturation (the grey level of a saturation change is the same) and the row/column rolls of shape."""
    grey = images.mean(1)
    return grey.flatten(1).std(1)[:, None, None, None]


def _coloured(n: int = 6, size: int = 16) -> Tensor:
    g = torch.Generator().manual_seed(0)
    colours = 0.3 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    colours[:, 0] = 0.75  # reddish, saturated, well inside [0, 1]
    return colours.expand(n, 3, size, size).clone()


def _checkerboards(n: int = 4, size: int = 32) -> Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = (((y // 8) + (x // 8)) % 2).float()
    levels = torch.linspace(0.2, 0.35, n)[:, None, None]
    grey = levels + board * (1 - 2 * levels)  # two levels symmetric about 0.5
    return grey[:, None].expand(n, 3, size, size).clone()


def test_sine_warp_equals_the_official_rolls():
    image = np.random.default_rng(0).random((40, 37, 3)).astype(np.float32)
    expected = image.copy()
    shift = lambda i: 4 * np.sin(np.pi * i * 0.05)  # noqa: E731
    for i in range(expected.shape[0]):
        expected[i, :, :] = np.roll(expected[i, :, :], int(shift(i)), axis=0)
    for i in range(expected.shape[1]):
        expected[:, i, :] = np.roll(expected[:, i, :], int(shift(i)), axis=0)
    out = sine_warp(torch.from_numpy(image).permute(2, 0, 1)[None])
    np.testing.assert_array_equal(out[0].permute(1, 2, 0).numpy(), expected)


def test_global_score_by_hand():
    # latent = the mean grey level m, prototype 0, similarity 10 - m^2: brightness 0.8 gives
    # delta = (10 - m^2) - (10 - 0.64 m^2) = -0.36 m^2, weighted by 10 - m^2.
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.2, 0.5, 0.9)])
    model = PropertyPrototypes(lambda x: x.mean((1, 2, 3))[:, None, None, None], torch.zeros(1, 1), offset=10.0)
    out = because_scores(model, images, modifications=["brightness"])
    m = torch.tensor([0.2, 0.5, 0.9])
    delta, weight = -0.36 * m**2, 10 - m**2
    torch.testing.assert_close(out.local[:, 0, 0], delta)
    torch.testing.assert_close(out.scores[0, 0], (delta * weight).sum() / weight.sum())


def test_because_names_hue_for_a_hue_prototype():
    pytest.importorskip("cv2")
    images = _coloured()
    prototype = _hue_direction(images[:1])[:, :, 0, 0]
    model = PropertyPrototypes(_hue_direction, prototype, scale=0.05)
    out = because_scores(model, images)
    assert out.modifications == DEFAULT_MODIFICATIONS
    scores = out.as_dict()[0]
    assert out.strongest() == ["hue"]
    others = max(v for k, v in scores.items() if k != "hue")
    assert scores["hue"] > 0.1 and abs(others) < 0.1 * scores["hue"]


def test_because_names_contrast_for_a_contrast_prototype():
    pytest.importorskip("cv2")
    images = _checkerboards()
    model = PropertyPrototypes(_grey_spread, _grey_spread(images[:1]).flatten()[None], scale=0.01)
    out = because_scores(model, images)
    scores = out.as_dict()[0]
    assert out.strongest() == ["contrast"]
    assert scores["contrast"] > 0.5 and max(abs(v) for k, v in scores.items() if k != "contrast") < 0.1 * scores["contrast"]


def test_modifications_keep_the_images_valid_and_errors():
    images = torch.rand(2, 3, 16, 16)
    for m in ("contrast", "saturation", "hue", "shape", "brightness"):
        out = modify(images, m)
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="unknown modification"):
        modify(images, "blur")
    with pytest.raises(ValueError, match="unknown modification"):
        because_scores(PropertyPrototypes(_grey_spread, torch.zeros(1, 1)), images, modifications=["blur"])
