"""FullGrad: completeness of the full-gradient decomposition (biases, BatchNorm's implicit biases, the
zoo's Normalize layer, a timm ResNet with in-place residual sums) and equality of both saliency maps with a
stand-in of the official code (backward hooks on the modules, its post-processing) on normalised input."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explain.fullgrad import fullgrad_decomposition
from explain.posthoc import attribute
from models import create_model
from tests.attribution_nets import Normalised, images, randomise_batchnorm

torch.set_num_threads(1)



def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    return randomise_batchnorm(net).eval()



def _complete(model, x, target):
    input_term, terms = fullgrad_decomposition(model, x, target)
    total = input_term.flatten(1).sum(1) + sum(t.flatten(1).sum(1) for t in terms)
    with torch.no_grad():
        logits = model(x).gather(1, target[:, None])[:, 0]
    return total, logits, terms


def test_completeness_with_biases_batchnorm_and_normalize():
    model, x, target = Normalised(_net()).eval(), images(), torch.tensor([0, 3, 1])
    total, logits, terms = _complete(model, x, target)
    assert len(terms) == 4  # conv bias, two BatchNorms, the linear bias
    torch.testing.assert_close(total, logits, rtol=1e-4, atol=1e-5)


def test_completeness_on_a_zoo_resnet_with_inplace_residual_sums():
    torch.manual_seed(2)
    model = randomise_batchnorm(create_model("cam_test_resnet", num_classes=3), 0.2).eval()
    total, logits, _ = _complete(model, images(2, 32), torch.tensor([2, 0]))
    torch.testing.assert_close(total, logits, rtol=1e-4, atol=1e-5)


def _official(net: nn.Module, image: torch.Tensor, target: int, simple: bool) -> torch.Tensor:
    """The official algorithm on one normalised image: backward hooks collect the output gradients of
    every Conv2d / Linear / BatchNorm2d with a bias (in backward order, re-indexed in reverse), biases
    from the modules in definition order, psi per tensor, bilinear (align_corners) upsampling."""
    biases, grads, handles = [], [], []
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and m.bias is not None:
            handles.append(m.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0])))
            if isinstance(m, nn.BatchNorm2d):
                biases.append(m.bias - m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps))
            else:
                biases.append(m.bias)
    x = image[None].clone().requires_grad_(True)
    out = net(x)
    (input_grad,) = torch.autograd.grad(out[0, target], x)
    for h in handles:
        h.remove()
    grads = grads[::-1]

    def psi(t):
        t = t.abs()
        t = t - t.min()
        return t / (t.max() + 1e-6)

    cam = psi(input_grad * x).sum(1)
    for g, b in zip(grads, biases):
        if g.ndim == 4:
            term = g if simple else g * b.detach().view(1, -1, 1, 1)
            cam = cam + F.interpolate(psi(term), size=image.shape[-2:], mode="bilinear", align_corners=True).sum(1)
    return cam[0]


def test_fullgrad_and_simple_maps_equal_the_official_algorithm_per_image():
    model, x, target = Normalised(_net()).eval(), images(), torch.tensor([2, 0, 1])
    x_norm = model.normalize(x)
    for method, simple in (("fullgrad", False), ("fullgrad_simple", True)):
        ours = attribute(model, x, target, method=method)
        assert ours.shape == (3, 16, 16) and (ours >= 0).all()
        for b in range(len(x)):
            torch.testing.assert_close(ours[b], _official(model.net, x_norm[b], int(target[b]), simple), rtol=1e-4, atol=1e-5)
