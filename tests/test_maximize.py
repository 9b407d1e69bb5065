"""Activation maximisation: monotone ascent on a tiny smooth model, the L2 pull, the three objectives
against direct computations, jitter and blur."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from explain.maximize import class_logit, filter_activation, maximize, prototype_similarity
from models import create_model
from models.prototypes import similarity

torch.set_num_threads(2)


class TinySmooth(nn.Module):
    """conv -> softplus -> average pool -> linear: smooth, so small gradient steps always ascend."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.Softplus()
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():  # unit-scale weights, so that the logits respond visibly to the image
            self.conv.weight.normal_(0, 1)
            self.fc.weight.normal_(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_class_logit_rises_monotonically_with_small_gradient_steps():
    model = TinySmooth()
    result = maximize(model, class_logit(2), image_size=16, steps=40, lr=5.0, l2=0.0, optimizer="sgd")
    scores = result.scores[:, 0]
    assert scores.shape == (41,) and result.image.shape == (1, 3, 16, 16)
    assert (scores.diff() > 0).all(), scores
    assert scores[-1] > scores[0] + 1.0
    assert torch.allclose(scores[-1], model(result.image)[0, 2])  # the last entry is the returned image's score
    assert 0 <= result.image.min() and result.image.max() <= 1


def test_regularised_objective_rises_monotonically_and_l2_pulls_to_the_mean_colour():
    model = TinySmooth()
    result = maximize(model, class_logit([0, 3]), batch_size=2, image_size=12, steps=30, lr=5.0, l2=1e-3, optimizer="sgd")
    assert (result.objective.diff(dim=0) > 0).all()
    # with no objective the L2 term alone pulls a random image towards the centre m = 0.5 (no normalize)
    start = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = maximize(model, lambda m, x: x.new_zeros(len(x)), init=start, steps=20, lr=20.0, l2=0.05, optimizer="sgd")
    distance = -flat.objective[:, 0] / 0.05  # objective = -l2 ||I - m||^2
    assert (distance.diff() < 0).all() and distance[-1] < 0.5 * distance[0]
    assert torch.allclose(distance[0], (start - 0.5).pow(2).sum(), rtol=1e-3)  # sigmoid(logit(start)) = start


def test_adam_raises_a_class_logit_of_a_zoo_model_above_random_images():
    torch.manual_seed(0)
    model = create_model("cam_test_resnet", num_classes=5).eval()
    result = maximize(model, class_logit(4), image_size=32, steps=10, lr=0.1)
    start = torch.as_tensor(model.normalize.mean).reshape(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert torch.allclose(result.scores[0, 0], model(start)[0, 4], atol=1e-5)  # the paper's start: the mean image
    random_images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert result.scores[-1, 0] > result.scores[0, 0] and result.scores[-1, 0] > model(random_images)[:, 4].max()
    assert not model.training


def test_filter_activation_matches_the_layer_output():
    model = TinySmooth()
    x = torch.rand(3, 3, 10, 10)
    maps = model.act(model.conv(x))
    mean = filter_activation("act", torch.tensor([0, 5, 2]))(model, x)
    peak = filter_activation("act", 1, reduce="max")(model, x)
    assert torch.allclose(mean, maps[[0, 1, 2], [0, 5, 2]].mean(dim=(1, 2)))
    assert torch.allclose(peak, maps[:, 1].amax(dim=(1, 2)))
    result = maximize(model, filter_activation("act", 3), image_size=10, steps=10, lr=5.0, optimizer="sgd", l2=0.0)
    assert (result.scores.diff(dim=0) > 0).all()
    with pytest.raises(ValueError, match="out of range"):
        filter_activation("act", 6)(model, x)


def test_prototype_similarity_matches_each_family():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    protopnet = create_model("protopnet_test_resnet", num_classes=2, prototypes_per_class=2).eval()
    _, min_d = protopnet.forward_with_distances(x)
    got = prototype_similarity(torch.tensor([1, 3]))(protopnet, x)
    assert torch.allclose(got, similarity(min_d[[0, 1], [1, 3]], protopnet.similarity_kind))
    tree = create_model("prototree_test_resnet", num_classes=2, depth=2).eval()
    out = tree.tree_forward(x)
    assert torch.allclose(prototype_similarity(0)(tree, x), torch.exp(-out.min_distances[:, 0]))
    result = maximize(protopnet, prototype_similarity(0), image_size=32, steps=5, lr=0.05)
    assert result.scores[-1, 0] > result.scores[0, 0]
    with pytest.raises(TypeError, match="no prototypes"):
        prototype_similarity(0)(TinySmooth(), x)


def test_blur_keeps_a_uniform_image_and_bad_arguments_fail_clearly():
    constant = lambda m, x: x.new_zeros(len(x))  # noqa: E731
    start = torch.full((1, 3, 8, 8), 0.3)
    result = maximize(TinySmooth(), constant, init=start, steps=3, l2=0.0, blur_every=1, blur_sigma=1.0, jitter=3)
    assert torch.allclose(result.image, start, atol=1e-4)  # no gradient, and blurring a flat image keeps it
    with pytest.raises(ValueError, match="optimizer"):
        maximize(TinySmooth(), constant, optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"one value per image"):
        maximize(TinySmooth(), lambda m, x: m(x), steps=1)
    with pytest.raises(ValueError, match=r"one index or one per image"):
        maximize(TinySmooth(), class_logit([0, 1, 2]), batch_size=2, steps=1)
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        maximize(TinySmooth(), constant, steps=1)
