"""Post-hoc methods: equality with captum and with per-image implementations of the published formulas,
hook hygiene, layer selection, inference-mode handling (also inside Lightning)."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from explain.posthoc import (
    InferenceModeError,
    attribute,
    baseline_colour,
    find_layer,
    grid_segments,
    list_methods,
    rise_masks,
)
from explain.posthoc import _render_rise_masks
from models import create_model

torch.set_num_threads(1)
SIZE = 64
LAYER = "backbone.body.layer3"  # 4 x 4 maps at 64 px


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("cam_test_resnet", num_classes=4).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _grads_of_one(model, image, target, layer_name):
    """Reference helper: one image's layer activations A (K, h, w) and d logit_target / dA."""
    kept = {}

    def replace(module, inputs, output):  # continue the forward from a leaf we can differentiate
        kept["a"] = output.detach().clone().requires_grad_(True)
        return kept["a"]

    handle = model.get_submodule(layer_name).register_forward_hook(replace)
    try:
        logits = model(image[None])
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits[0, target], kept["a"])
    return kept["a"].detach()[0], g[0]


def test_list_methods_has_every_method():
    expected = {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop", "occlusion",
                "lime", "kernel_shap", "deeplift", "gradcam", "gradcampp", "scorecam", "layercam", "rise", "intrinsic"}
    assert expected <= set(list_methods())


def test_gradcam_equals_captum_layergradcam(model, images):
    target = torch.tensor([0, 1, 3])
    ours = attribute(model, images, target, method="gradcam", layer=LAYER)
    captum = LayerGradCam(model, model.get_submodule(LAYER)).attribute(images, target=target, relu_attributions=True)
    captum = LayerAttribution.interpolate(captum, (SIZE, SIZE), interpolate_mode="bilinear")[:, 0]
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, captum, rtol=1e-4, atol=1e-6)


def test_gradcam_on_a_layer_followed_by_an_inplace_add_equals_captum(model, images):
    # timm's Bottleneck does `x += shortcut` on bn3's output: the kept activations must not change.
    layer = "backbone.body.layer3.0.bn3"
    ours = attribute(model, images, 2, method="gradcam", layer=layer)
    captum = LayerGradCam(model, model.get_submodule(layer)).attribute(images, target=2, relu_attributions=True)
    captum = LayerAttribution.interpolate(captum, (SIZE, SIZE), interpolate_mode="bilinear")[:, 0]
    torch.testing.assert_close(ours, captum, rtol=1e-4, atol=1e-6)


def test_integrated_gradients_equals_captum_and_is_complete(model, images):
    target = torch.tensor([1, 1, 0])
    ours = attribute(model, images, target, method="integrated_gradients", n_steps=64)
    ref = IntegratedGradients(model).attribute(images, baselines=0.0, target=target, n_steps=64).sum(1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    # completeness: attributions sum to f(x) - f(baseline) for the target logit
    with torch.no_grad():
        gap = model(images).gather(1, target[:, None])[:, 0] - model(torch.zeros_like(images))[:, target].diagonal()
    torch.testing.assert_close(ours.sum((1, 2)), gap, rtol=0.05, atol=0.02)


def test_gradcampp_equals_per_image_formula(model, images):
    target = torch.tensor([0, 2, 3])
    ours = attribute(model, images, target, method="gradcampp", layer=LAYER)
    for b in range(len(images)):
        a, g = _grads_of_one(model, images[b], int(target[b]), LAYER)
        weights = torch.zeros(a.shape[0])
        for k in range(a.shape[0]):
            total = a[k].sum()
            for i in range(a.shape[1]):
                for j in range(a.shape[2]):
                    gij = g[k, i, j]
                    if gij == 0:
                        continue  # alpha = 0 where the gradient vanishes
                    alpha = gij**2 / (2 * gij**2 + total * gij**3)
                    weights[k] += alpha * max(float(gij), 0.0)
        cam = F.relu((weights[:, None, None] * a).sum(0))
        ref = F.interpolate(cam[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(ours[b], ref, rtol=1e-4, atol=1e-6)


def test_layercam_equals_per_image_formula(model, images):
    ours = attribute(model, images, 1, method="layercam", layer=LAYER)
    for b in range(len(images)):
        a, g = _grads_of_one(model, images[b], 1, LAYER)
        cam = F.relu((F.relu(g) * a).sum(0))
        ref = F.interpolate(cam[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(ours[b], ref, rtol=1e-4, atol=1e-6)


def test_scorecam_equals_per_image_formula(model, images):
    target = torch.tensor([3, 0, 1])
    ours = attribute(model, images, target, method="scorecam", layer=LAYER, batch_size=7)
    base = model.normalize.mean.view(3, 1, 1)
    for b in range(len(images)):
        a, _ = _grads_of_one(model, images[b], 0, LAYER)
        with torch.no_grad():
            total = torch.zeros(SIZE, SIZE)
            for k in range(a.shape[0]):
                up = F.interpolate(a[k][None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
                if up.max() == up.min():
                    continue
                h = (up - up.min()) / (up.max() - up.min())
                masked = base + (images[b] - base) * h  # x o H in normalised space
                p = torch.softmax(model(masked[None]), 1)[0, target[b]]
                total += p * up
        torch.testing.assert_close(ours[b], F.relu(total), rtol=1e-4, atol=1e-5)


def test_rise_batched_equals_per_image_loop(model, images):
    ours = attribute(model, images, 2, method="rise", n_masks=40, batch_size=12, seed=3)
    gen = torch.Generator().manual_seed(3)
    masks = rise_masks(40, (SIZE, SIZE), 8, 0.1, gen, "cpu")
    base = baseline_colour(model, images)[0]
    for b in range(len(images)):
        sal = torch.zeros(SIZE, SIZE)
        with torch.no_grad():
            for m in masks:
                p = torch.softmax(model((base + (images[b] - base) * m)[None]), 1)[0, 2]
                sal += p * m
        torch.testing.assert_close(ours[b], sal / (40 * 0.1), rtol=1e-4, atol=1e-5)


def test_rise_mask_upsampling_reflects_at_the_borders_by_hand():
    # Grid [[1, 0], [0, 0]], 4 x 4 image: cell 2, upsampled to 6 x 6. Output sample i sits at
    # (i + 0.5) / 3 - 0.5 = -1/3, 0, 1/3, 2/3, 1, 4/3 of the grid; the linear profile of [1, 0] mirrored
    # about the edge samples (skimage's mode="reflect") is 2/3, 1, 2/3, 1/3, 0, 1/3 (repeating the edge
    # would give 1, 1, 2/3, 1/3, 0, 0). Mask = outer product of the profiles, cropped at dy = 1, dx = 0.
    profile = torch.tensor([2 / 3, 1, 2 / 3, 1 / 3, 0, 1 / 3])
    grid = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    mask = _render_rise_masks(grid, torch.tensor([1]), torch.tensor([0]), (4, 4), (2, 2))
    torch.testing.assert_close(mask[0], torch.outer(profile[1:5], profile[0:4]))


def test_rise_masks_equal_scipy_zoom_in_mirror_mode():
    # skimage's resize(order=1, mode="reflect", anti_aliasing=False), which RISE calls, is scipy's
    # zoom(order=1, mode="mirror", grid_mode=True).
    from scipy import ndimage

    gen = torch.Generator().manual_seed(2)
    grid = (torch.rand(3, 1, 8, 8, generator=gen) < 0.5).float()
    dy, dx = torch.tensor([0, 3, 6]), torch.tensor([6, 0, 2])
    masks = _render_rise_masks(grid, dy, dx, (50, 44), (7, 6))
    for i in range(3):
        up = ndimage.zoom(grid[i, 0].double().numpy(), (63 / 8, 54 / 8), order=1, mode="mirror", grid_mode=True)
        ref = torch.from_numpy(up[dy[i]:dy[i] + 50, dx[i]:dx[i] + 44]).float()
        torch.testing.assert_close(masks[i], ref, atol=1e-6, rtol=0)


def _smoothgrad_of_one(model, image, target, n_samples, noise_level, seed):
    """Reference: one image, one noisy copy per backward, the noise of the documented generator."""
    noise = torch.randn((n_samples, *image.shape), generator=torch.Generator().manual_seed(seed))
    sigma = noise_level * (image.max() - image.min())
    total = torch.zeros_like(image)
    for eps in noise:
        x = (image + sigma * eps)[None].requires_grad_(True)
        (g,) = torch.autograd.grad(model(x)[0, target], x)
        total += g[0]
    return (total / n_samples).abs().amax(0)


def test_smoothgrad_noise_is_scaled_per_image_and_batch_invariant(model, images):
    # Batch mates of very different value ranges: sigma must come from each image alone.
    batch = torch.cat([images[:1], images[1:2] * 0.1, images[2:] * 0.5 + 0.5])
    target = torch.tensor([0, 3, 1])
    ours = attribute(model, batch, target, method="smoothgrad", n_samples=5, batch_size=2, seed=7)
    for b in range(3):
        ref = _smoothgrad_of_one(model, batch[b], int(target[b]), 5, 0.15, 7)
        torch.testing.assert_close(ours[b], ref, rtol=1e-4, atol=1e-6)
        alone = attribute(model, batch[b:b + 1], target[b:b + 1], method="smoothgrad", n_samples=5, seed=7)
        torch.testing.assert_close(ours[b], alone[0], rtol=1e-4, atol=1e-6)
    swapped = attribute(model, batch.flip(0), target.flip(0), method="smoothgrad", n_samples=5, batch_size=5, seed=7)
    torch.testing.assert_close(swapped.flip(0), ours, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="n_samples >= 1"):
        attribute(model, batch, target, method="smoothgrad", n_samples=0)


def test_rise_masks_shape_and_density():
    masks = rise_masks(500, (40, 56), 8, 0.25, torch.Generator().manual_seed(0), "cpu")
    assert masks.shape == (500, 40, 56)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6
    assert abs(masks.mean().item() - 0.25) < 0.03  # bilinear upsampling keeps the expected density


def test_grid_segments_are_equal_blocks():
    seg = grid_segments(64, 48, cells=8)
    assert seg.shape == (64, 48)
    counts = torch.bincount(seg.flatten())
    assert len(counts) == 64 and (counts == 8 * 6).all()
    assert seg[0, 0] == 0 and seg[-1, -1] == 63 and seg[8, 6] == 9


def test_find_layer_picks_the_last_4d_map():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(5, 2))
    assert find_layer(net, torch.rand(1, 3, 16, 16)) is net[3]  # the 1 x 1 pooled map does not count


def test_layer_by_name_equals_layer_by_module(model, images):
    by_name = attribute(model, images, 0, method="layercam", layer=LAYER)
    by_module = attribute(model, images, 0, method="layercam", layer=model.get_submodule(LAYER))
    torch.testing.assert_close(by_name, by_module)


def _no_hooks(net: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in net.modules())


class _Exploding(nn.Module):
    """Raises in forward after its conv layer ran (so a hook on it has fired)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)
        self.explode = True

    def forward(self, x):
        y = self.relu(self.conv(x))
        if self.explode:
            raise RuntimeError("boom")
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "rise", "saliency", "guided_backprop", "deeplift", "occlusion"])
@pytest.mark.parametrize("layer", ["conv", None])
def test_hooks_are_removed_after_an_exception(method, layer):
    net = _Exploding().eval()
    with pytest.raises(RuntimeError, match="boom"):
        attribute(net, torch.rand(2, 3, 8, 8), 0, method=method, layer=layer)
    assert _no_hooks(net)
    net.explode = False
    assert attribute(net, torch.rand(2, 3, 8, 8), 0, method=method, layer=layer).shape == (2, 8, 8)
    assert _no_hooks(net)


def test_hooks_removed_when_layer_output_is_not_a_map(model, images):
    with pytest.raises(ValueError, match="must output a"):
        attribute(model, images, 0, method="gradcam", layer="classifier")
    assert _no_hooks(model)


def test_gradient_methods_leave_parameter_gradients_alone(model, images):
    attribute(model, images, 0, method="gradcam", layer=LAYER)
    assert all(p.grad is None for p in model.parameters())


def test_inference_mode_error_and_perturbation_methods_still_work(model, images):
    with torch.inference_mode():
        x = images.clone()
        with pytest.raises(InferenceModeError, match="inference_mode=False"):
            attribute(model, x, method="gradcam")
        out = attribute(model, x, method="rise", n_masks=8)
    assert out.shape == (3, SIZE, SIZE)
    with torch.no_grad():  # a plain no_grad block (Lightning with inference_mode=False) is lifted
        assert attribute(model, images, method="gradcam").abs().sum() > 0


class _ExplainInTest(pl.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.maps = []

    def test_step(self, batch, batch_idx):
        self.maps.append(attribute(self.net, batch[0], batch[1], method="gradcam", layer=LAYER))

    def predict_step(self, batch, batch_idx):
        return attribute(self.net, batch[0], batch[1], method="gradcam", layer=LAYER)


@pytest.mark.parametrize("stage", ["test", "predict"])
@pytest.mark.parametrize("inference_mode", [False, True])
def test_inside_lightning_test_and_predict(model, images, inference_mode, stage):
    module = _ExplainInTest(model)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=inference_mode)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 2])), batch_size=3)
    run = (lambda: trainer.test(module, dataloaders=loader, verbose=False)) if stage == "test" else (
        lambda: trainer.predict(module, dataloaders=loader))
    if inference_mode:
        with pytest.raises(InferenceModeError):
            run()
    else:
        out = run()
        maps = module.maps[0] if stage == "test" else out[0]
        expected = attribute(model, images, torch.tensor([0, 1, 2]), method="gradcam", layer=LAYER)
        torch.testing.assert_close(maps, expected)


FAST = {"rise": {"n_masks": 16}, "xrai": {"steps": 4}, "extremal": {"max_iter": 4}, "meaningful": {"iterations": 4}, "lime": {"n_samples": 16, "cells": 4}, "kernel_shap": {"n_samples": 16, "cells": 4},
        "smoothgrad": {"n_samples": 3}, "integrated_gradients": {"n_steps": 4}, "occlusion": {"window": 16}}


@pytest.mark.parametrize("method", sorted(set(list_methods()) - {"intrinsic"}))
def test_every_method_on_a_plain_timm_classifier(method):
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=3, pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64)
    out = attribute(net, x, method=method, **FAST.get(method, {}))
    assert out.shape == (2, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_intrinsic_is_the_models_own_explanation(model, images):
    torch.testing.assert_close(attribute(model, images, 1, method="intrinsic"), model.explain(images, 1).heatmap)


def test_lime_and_kernel_shap_are_constant_on_superpixels(model, images):
    for method in ("lime", "kernel_shap"):
        out = attribute(model, images[:1], 0, method=method, n_samples=24, cells=4)
        blocks = out[0].view(4, 16, 4, 16)
        assert (blocks.amax((1, 3)) == blocks.amin((1, 3))).all()


def test_bad_input_errors(model, images):
    with pytest.raises(ValueError, match="unknown explanation method"):
        attribute(model, images, method="gradcam2")
    with pytest.raises(TypeError, match="no option"):
        attribute(model, images, method="gradcam", n_masks=3)
    with pytest.raises(ValueError, match="one class per image"):
        attribute(model, images, torch.tensor([0, 1]), method="gradcam")
    with pytest.raises(ValueError, match="no layer"):
        attribute(model, images, method="gradcam", layer="backbone.nope")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        attribute(model, images[0], method="gradcam")


@pytest.mark.parametrize("name", ["cam_test_resnet", "icnn_test_resnet", "protopnet_test_resnet", "prototree_test_resnet"])
def test_every_zoo_family(name):
    from models import is_model

    if not is_model(name):
        pytest.skip(f"{name} is not registered")
    torch.manual_seed(0)
    net = create_model(name, num_classes=3).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    for method in ("intrinsic", "gradcam", "integrated_gradients", "rise"):
        out = attribute(net, x, method=method, **FAST.get(method, {}))
        assert out.shape == (2, SIZE, SIZE) and torch.isfinite(out).all()
