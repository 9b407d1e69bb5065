"""LRP through Zennit: conservation, LRP-0 = gradient x input, BatchNorm canonization against a hand-merged
network, residual sums, equality with Zennit's own call (torchvision ResNet, a timm ResNet with the same
weights, DenseNet, the zoo's Normalize layer and z^B bounds), and the error for models Zennit cannot run."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import NamedMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

from explain.lrp import RULES, _rule_factories, batchnorm_pairs
from explain.posthoc import attribute
from models import create_model
from tests.attribution_nets import Normalised, images, randomise_batchnorm

torch.set_num_threads(1)
ALL_EPSILON = {"first": "epsilon", "conv": "epsilon", "linear": "epsilon"}


def _bias_free_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 4, bias=False),
    ).eval()




def _zennit_call(net, x, target, composite):
    with Gradient(net, composite) as attributor:
        out, relevance = attributor(x, lambda out: torch.eye(out.shape[1])[target] * out)
    return relevance


def test_epsilon_rule_conserves_the_target_logit_on_a_bias_free_relu_network():
    net, x, target = _bias_free_net(), images(), torch.tensor([0, 2, 3])
    relevance = attribute(net, x, target, method="lrp", rules=ALL_EPSILON, epsilon=1e-9, stabilizer=1e-9)
    with torch.no_grad():
        logits = net(x).gather(1, target[:, None])[:, 0]
    assert logits.abs().min() > 1e-3
    torch.testing.assert_close(relevance.sum((1, 2)), logits, rtol=1e-4, atol=1e-7)


def test_zero_rule_equals_gradient_times_input():
    net, x, target = _bias_free_net(), images(), torch.tensor([1, 1, 0])
    ours = attribute(net, x, target, method="lrp", rules={k: "zero" for k in ALL_EPSILON}, stabilizer=1e-12)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg).gather(1, target[:, None]).sum(), xg)
    torch.testing.assert_close(ours, (x * grad).sum(1), rtol=1e-4, atol=1e-7)


def test_zero_rule_through_the_normalize_layer_is_gradient_times_normalised_input():
    # relevance of x_norm = x_norm * d f / d x_norm = (x - mean) * d f / d x, reported at the raw pixels
    model, x = Normalised(_bias_free_net()).eval(), images()
    ours = attribute(model, x, 2, method="lrp", rules={k: "zero" for k in ALL_EPSILON}, stabilizer=1e-12)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 2].sum(), xg)
    torch.testing.assert_close(ours, ((x - model.normalize.mean) * grad).sum(1), rtol=1e-4, atol=1e-7)


def _bn_net_and_merged() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    bn_net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    randomise_batchnorm(bn_net)
    merged = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for conv, bn, out in ((bn_net[0], bn_net[1], merged[0]), (bn_net[3], bn_net[4], merged[2])):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # by hand: W' = W s, b' = (b - mu) s + beta
            out.weight.copy_(conv.weight * scale[:, None, None, None])
            bias = conv.bias if conv.bias is not None else torch.zeros(len(scale))
            out.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
        merged[6].load_state_dict(bn_net[8].state_dict())
    return Normalised(bn_net).eval(), Normalised(merged).eval()


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_canonized_batchnorm_network_equals_its_merged_equivalent(composite):
    bn_net, merged = _bn_net_and_merged()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(bn_net(x), merged(x), rtol=1e-5, atol=1e-6)
    canonized = attribute(bn_net, x, 1, method="lrp", composite=composite)
    reference = attribute(merged, x, 1, method="lrp", composite=composite, canonize=False)
    raw = attribute(bn_net, x, 1, method="lrp", composite=composite, canonize=False)
    torch.testing.assert_close(canonized, reference, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(raw, reference, rtol=1e-2, atol=1e-4)  # BN passed unmerged gives another map


class _FunctionalResidual(nn.Module):
    """h = relu(conv0 x); z = relu(conv1 h + h) (an in-place sum, as timm's blocks); mean-pooled, bias-free."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv0, self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.relu0, self.relu1 = nn.ReLU(), nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        h = self.relu0(self.conv0(x))
        z = self.conv1(h)
        z += h
        return self.head(self.relu1(z).mean(dim=(2, 3)))


def test_residual_sum_and_functional_mean_rules_restore_conservation():
    net, x = _FunctionalResidual().eval(), images()
    with torch.no_grad():
        logits = net(x)[:, 0]
    options = {"rules": ALL_EPSILON, "epsilon": 1e-9, "stabilizer": 1e-9}
    canonized = attribute(net, x, 0, method="lrp", **options).sum((1, 2))
    gradient_through_sums = attribute(net, x, 0, method="lrp", canonize=False, **options).sum((1, 2))
    torch.testing.assert_close(canonized, logits, rtol=1e-4, atol=1e-7)
    assert ((gradient_through_sums - logits).abs() > 0.1 * logits.abs()).all()


def test_equals_zennits_own_call_on_a_torchvision_resnet():
    torch.manual_seed(5)
    net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=4).eval()
    x, target = images(2, 32), torch.tensor([0, 3])
    ours = attribute(net, x, target, method="lrp", composite="epsilon_plus_flat")
    ref = _zennit_call(net, x, target, EpsilonPlusFlat(canonizers=[ResNetCanonizer()])).sum(1)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_timm_resnet_equals_zennits_torchvision_call_with_the_same_weights():
    # timm's blocks end in `x += shortcut`, which Zennit's ResNetCanonizer does not rewrite: the sum rule
    # applied here must give what Zennit gives the same network in torchvision's form.
    torch.manual_seed(6)
    tm = randomise_batchnorm(timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=4), 0.2)
    tm.eval()
    tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=4).eval()
    tv.load_state_dict(tm.state_dict())
    model = Normalised(tm).eval()
    x, target = images(2, 32), torch.tensor([2, 1])
    ours = attribute(model, x, target, method="lrp", composite="epsilon_gamma_box")
    mean, std = model.normalize.mean, model.normalize.std
    composite = EpsilonGammaBox(low=(0 - mean) / std, high=(1 - mean) / std, canonizers=[ResNetCanonizer()])
    ref = _zennit_call(tv, (x - mean) / std, target, composite).sum(1)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-6)


def test_densenet_merges_by_data_flow_and_equals_zennits_own_call():
    # Zennit's SequentialMergeBatchNorm would pair each dense layer's conv2 with the next layer's norm1
    # (which normalises the concatenation). The pairs by DenseNet's structure: conv0 -> norm0 and, in
    # every dense layer, conv1 -> norm2; the other BatchNorms follow a concatenation or an activation.
    # A small torchvision DenseNet cut as the zoo's trunk cuts DenseNet-121 (features, then a ReLU).
    torch.manual_seed(7)
    dense = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2)
    trunk = nn.Sequential(dense.features, nn.ReLU())
    net = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dense.classifier.in_features, 3))
    randomise_batchnorm(net, 0.2).eval()
    layers = [n for n, m in net.named_modules() if type(m).__name__ == "_DenseLayer"]
    pairs = [(("0.0.conv0",), "0.0.norm0")] + [((f"{n}.conv1",), f"{n}.norm2") for n in layers]
    assert len(layers) == 4
    x = images(1, 32)
    ours = attribute(net, x, 1, method="lrp")
    ref = _zennit_call(net, x, torch.tensor([1]), EpsilonPlusFlat(canonizers=[NamedMergeBatchNorm(pairs)])).sum(1)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    assert sorted(batchnorm_pairs(net, x)) == sorted(pairs)


def test_vgg_style_trunk_and_zoo_model_are_left_unchanged():
    torch.manual_seed(8)
    features = torchvision.models.vgg.make_layers([8, "M", 16, "M"], batch_norm=True)
    vgg = Normalised(nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))).eval()
    cam = create_model("cam_test_resnet", num_classes=3).eval()
    x = images(2, 32)
    for model in (vgg, cam):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            before = model(x)
        out = attribute(model, x, 0, method="lrp", composite="epsilon_gamma_box")
        assert out.shape == (2, 32, 32) and torch.isfinite(out).all() and out.abs().sum() > 0
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # canonizers undone
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model(x), before)


class _SharedConvOutput(nn.Module):
    """conv -> BN and conv -> (a second branch): merging the BN into the conv would change the second branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 2)
        randomise_batchnorm(self)

    def forward(self, x):
        c = self.conv(x)
        return self.head((torch.relu(self.bn(c)) + c).mean((2, 3)))


def test_a_canonization_that_changes_the_logits_is_an_error():
    net, x = _SharedConvOutput().eval(), images(2)
    with pytest.raises(RuntimeError, match="changed its output"):
        attribute(net, x, 0, method="lrp")
    assert torch.isfinite(attribute(net, x, 0, method="lrp", canonize=False)).all()


def test_every_rule_name_builds_a_zennit_rule():
    options = {"epsilon": 1e-6, "gamma": 0.25, "stabilizer": 1e-6, "low": 0.0, "high": 1.0}
    factories = _rule_factories()
    assert set(factories) == set(RULES)
    assert all(type(factories[name](options)).__module__ == "zennit.rules" for name in RULES)


def test_prototype_models_and_bad_options_get_one_line_errors():
    proto = create_model("protopnet_test_resnet", num_classes=3).eval()
    with pytest.raises(ValueError, match="has no rule for ProtoPNet"):
        attribute(proto, images(1, 32), 0, method="lrp")
    net = _bias_free_net()
    with pytest.raises(ValueError, match="unknown LRP composite"):
        attribute(net, images(1), 0, method="lrp", composite="epsilon_nope")
    with pytest.raises(ValueError, match="LRP rules must map"):
        attribute(net, images(1), 0, method="lrp", rules={"conv": "magic"})
    with pytest.raises(ValueError, match="no first-layer rule"):
        attribute(net, images(1), 0, method="lrp", composite="epsilon_plus", rules={"first": "flat"})
