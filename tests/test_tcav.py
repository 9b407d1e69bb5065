"""TCAV on a constructed model whose class logit grows along a known direction u of its layer: the
concept along u scores ~1 and is significant, a random concept scores ~0.5 and is not; CAV sign and
score by hand; the SyntheticParts concept sets of train.tcav."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explain.tcav import CAV, layer_activations, layer_gradients, run_tcav, tcav_score, train_cav

torch.set_num_threads(1)
D = 32


class _Known(nn.Module):
    """logit_0(h) = 3 u.h + 0.5 |h|^2 (gradient 3u + h varies per example), logit_1 = -logit_0; h = layer(x)."""

    def __init__(self, u: torch.Tensor):
        super().__init__()
        self.layer = nn.Identity()
        self.register_buffer("u", u)
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so the model has a device

    def forward(self, x):
        h = self.layer(x)
        z = 3 * h @ self.u + 0.5 * (h * h).sum(1) + self.anchor
        return torch.stack([z, -z], 1)


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    model = _Known(u).eval()
    sample = lambda n: torch.randn(n, D, generator=g)  # noqa: E731
    targets = {0: sample(200)}
    concepts = {"along_u": sample(40) + 4 * u, "random": sample(40)}
    randoms = [sample(40) for _ in range(6)]
    return model, u, targets, concepts, randoms


def test_concept_along_the_logit_direction_scores_one_and_random_does_not(setup):
    model, u, targets, concepts, randoms = setup
    rows = {r["concept"]: r for r in run_tcav(model, "layer", targets, concepts, randoms)}
    along, rand = rows["along_u"], rows["random"]
    assert along["mean"] > 0.95 and along["significant"] and along["cav_accuracy"] > 0.7
    assert 0.25 < rand["mean"] < 0.75 and not rand["significant"]
    assert 0.3 < along["null_mean"] < 0.7
    assert len(along["scores"]) == len(randoms)


def test_cav_points_toward_the_concept_and_score_by_hand(setup):
    model, u, _, concepts, randoms = setup
    cav = train_cav(concepts["along_u"], randoms[0])
    cosine = float(cav.vector @ u / cav.vector.norm())
    assert cosine > 0.5  # -coef of the (concept = 0, counterpart = 1) classifier points to the concept
    g = torch.randn(50, D)
    expected = sum(float(g[i] @ cav.vector) > 0 for i in range(50)) / 50
    assert tcav_score(g, cav) == pytest.approx(expected)
    assert tcav_score(g, CAV(-cav.vector, 1.0)) == pytest.approx(1 - expected)


def test_layer_gradients_equal_the_analytic_gradient(setup):
    model, u, targets, _, _ = setup
    x = targets[0][:5]
    (grad,) = layer_gradients(model, x, 0, ["layer"], batch_size=2)
    torch.testing.assert_close(grad, 3 * u[None] + x)
    (ce,) = layer_gradients(model, x, 0, ["layer"], objective="cross_entropy")
    z = 3 * x @ u + 0.5 * (x * x).sum(1)
    p1 = torch.sigmoid(-2 * z)  # softmax of [z, -z]: 1 - p0
    torch.testing.assert_close(ce, (2 * p1)[:, None] * (3 * u[None] + x))
    (acts,) = layer_activations(model, x, "layer")
    torch.testing.assert_close(acts, x)


def test_bad_input_errors(setup):
    model, _, targets, concepts, randoms = setup
    with pytest.raises(ValueError, match="at least 2 random sets"):
        run_tcav(model, "layer", targets, concepts, randoms[:1])
    with pytest.raises(ValueError, match="one layer"):
        train_cav(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="objective"):
        layer_gradients(model, targets[0][:2], 0, "layer", objective="loss")


def test_synthetic_concept_sets_contain_the_variant():
    from train.tcav import concept_images
    from train.synthetic import PART_NAMES, SyntheticPartsGenerator

    gen = SyntheticPartsGenerator(num_classes=4, image_size=32, seed=0)
    images, recipes = concept_images(gen, 4, slot=1, variant=3, start=100, seed=0, return_recipes=True)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
    for image, (recipe, replace) in zip(images, recipes):
        assert replace[PART_NAMES[1]] == 3
        again = gen.render(recipe, replace=replace).image
        assert np.array_equal(again, (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
