"""Guided Grad-CAM = guided backprop x upsampled Grad-CAM; Deconvnet's ReLU backward rule by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explain.posthoc import attribute
from models import create_model

torch.set_num_threads(1)


def test_guided_gradcam_is_guided_backprop_times_upsampled_gradcam():
    torch.manual_seed(0)
    model = create_model("cam_test_resnet", num_classes=3).eval()
    x, target, layer = torch.rand(2, 3, 32, 32), torch.tensor([1, 2]), "backbone.body.layer2"
    ours = attribute(model, x, target, method="guided_gradcam", layer=layer)
    cam = attribute(model, x, target, method="gradcam", layer=layer)  # bilinear, as the paper
    assert cam.abs().sum() > 0 and ours.abs().sum() > 0
    # the map is sum_c gb_c * cam = cam * sum_c gb_c, the zoo's guided_backprop map
    torch.testing.assert_close(ours, attribute(model, x, target, method="guided_backprop") * cam, rtol=1e-4, atol=1e-7)


def _one_layer():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)).eval()


def test_deconvnet_relu_backward_rule_by_hand():
    net = _one_layer()
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    w1, w2 = net[1].weight.detach(), net[3].weight.detach()
    ours = attribute(net, x, 1, method="deconvnet")
    active = (x.flatten(1) @ w1.T) > 0
    assert (~active).any() and (w2[1] < 0).any()  # both rules below make a difference here
    deconv = (F.relu(w2[1]) @ w1).expand(4, -1)  # relu of the upstream gradient, whatever the forward mask
    gradient = (w2[1] * active) @ w1
    torch.testing.assert_close(ours, deconv.reshape(4, 3, 2, 2).sum(1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, gradient.reshape(4, 3, 2, 2).sum(1), atol=1e-4)


def test_without_relu_modules_a_clear_error():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    for method in ("deconvnet", "guided_gradcam"):
        with pytest.raises(ValueError, match="nn.ReLU modules only"):
            attribute(net, torch.rand(2, 3, 2, 2), 0, method=method, **({"layer": net[0]} if method == "guided_gradcam" else {}))
