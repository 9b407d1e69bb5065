"""B-cos networks: the layer against its formula, B = 1 as a unit-norm linear layer, the contribution map
summing to the logit, the network as an exact dynamic linear map (against a frozen-scale reference built
from basis vectors, not from autograd), and the zoo wrapper against the bcos package's own model."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from bcos.data.transforms import AddInverse
from bcos.models import resnet as bcos_resnet
from bcos.modules import BcosConv2d

import models
from models.bcos import BCOS_NORMS, BcosNet, explanation_smoothing

ROOT = Path(__file__).resolve().parents[1]


def _net(norm: str = "bnu", classes: int = 3, size: int = 16, **kwargs) -> BcosNet:
    """A tiny B-cos ResNet-18 (width 4) whose uncentered batch norms are calibrated on one batch, so its
    logits are O(1) rather than the ~1e-4 of a fresh network (the 1e-6 stabilisers then stay negligible)."""
    torch.manual_seed(0)
    model = BcosNet(num_classes=classes, architecture="resnet18", model_args={"inplanes": 4}, norm=norm, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the first batch's variance
    with torch.no_grad():
        model.train()(torch.rand(16, 3, size, size))
    return model.eval()


def _patch_norms(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """||patch|| per output position, zero padding counted (by unfolding, not by the package)."""
    patches = F.unfold(x, kernel, padding=padding, stride=stride)  # (B, C k k, L)
    return (patches.pow(2).sum(1) + 1e-6).sqrt()


# ------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("b,max_out", [(2.0, 1), (2.0, 2), (1.5, 1), (2.5, 2)])
def test_bcos_conv_equals_its_formula_by_hand(b, max_out):
    torch.manual_seed(1)
    layer = BcosConv2d(4, 3, kernel_size=3, stride=2, padding=1, b=b, max_out=max_out)
    x = torch.randn(2, 4, 7, 7)
    out = layer(x)
    w = layer.linear.weight.flatten(1)
    w_hat = w / w.norm(dim=1, keepdim=True)  # unit norm per output unit
    patches = F.unfold(x, 3, padding=1, stride=2)  # (B, 36, L)
    lin = torch.einsum("ok,bkl->bol", w_hat, patches)
    if max_out > 1:  # M consecutive units per output channel, max before the cos scaling
        lin = lin.unflatten(1, (3, max_out)).max(2).values
    norm = (patches.pow(2).sum(1, keepdim=True) + 1e-6).sqrt()
    cos = lin / norm
    # the definition: ||w_hat|| ||x|| |cos|^B sgn(cos), with ||w_hat|| = 1
    expected = norm * cos.abs().pow(b) * cos.sign()
    torch.testing.assert_close(out.flatten(2), expected, rtol=1e-4, atol=1e-5)


def test_b_equal_one_is_a_unit_norm_linear_layer():
    torch.manual_seed(2)
    layer = BcosConv2d(5, 4, kernel_size=3, padding=1, b=1)
    x = torch.randn(3, 5, 6, 6)
    w = layer.linear.weight
    expected = F.conv2d(x, w / w.flatten(1).norm(dim=1)[:, None, None, None], padding=1)
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(layer(x), F.conv2d(x, w, padding=1))  # the weights are really normalised


def test_every_layer_is_bias_free_bcos_with_the_configured_b():
    model = BcosNet(num_classes=4, model_args={"inplanes": 4}, b=1.75, max_out=2)
    convs = [m for m in model.modules() if isinstance(m, BcosConv2d)]
    assert len(convs) == 1 + 16 + 3 + 1  # stem, 8 blocks x 2, 3 downsamples, the 1x1 classifier
    assert all(c.b == 1.75 and c.max_out == 2 and c.linear.bias is None for c in convs)
    assert all(getattr(m, "bias", None) is None for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not [m for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d))]


def test_the_input_is_x_and_its_inverse_without_normalisation():
    model = _net()
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model.encoded(images), torch.cat([images, 1 - images], 1))
    with pytest.raises(ValueError, match=r"RGB images \(B, 3, H, W\)"):
        model(torch.rand(2, 6, 8, 8))
    with pytest.raises(ValueError, match="no mean/std"):
        BcosNet(num_classes=3, mean=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------- the explanation
@pytest.mark.parametrize("norm", sorted(BCOS_NORMS))
def test_contribution_map_sums_to_the_logit_minus_the_logit_bias(norm):
    model = _net(norm, classes=4, logit_temperature=2.0, logit_bias=0.5)
    images = torch.rand(3, 3, 16, 16)
    logits = model(images)
    assert logits.abs().max() > 0.05  # not the trivial case of vanishing outputs
    for k in range(4):
        explanation = model.explain(images, k)
        torch.testing.assert_close(explanation.heatmap.sum((1, 2)), logits[:, k] - 0.5, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(explanation.logits, logits)
    default = _net(classes=4)
    assert default.logit_bias == pytest.approx(-torch.log(torch.tensor(3.0)).item())
    explanation = default.explain(images)
    torch.testing.assert_close(explanation.heatmap.sum((1, 2)) + default.logit_bias,
                               explanation.logits.gather(1, explanation.target[:, None])[:, 0], rtol=1e-4, atol=1e-5)
    assert torch.equal(explanation.target, explanation.logits.argmax(1))


def _frozen_dynamic_map(model: BcosNet, x6: torch.Tensor) -> torch.Tensor:
    """The matrix W(x) (K, 6 H W) of one encoded image without autograd: record every B-cos layer's dynamic
    scale |w_hat x| / ||x|| at x, then push the basis vectors through the network with those scales fixed
    (each layer then is linear: its normalised convolution times the recorded scale)."""
    convs = [m for m in model.net.modules() if isinstance(m, BcosConv2d)]
    scales, handles = {}, []

    def record(m, args, out):
        inp = args[0]
        lin = m.linear(inp)
        kernel, stride, padding = m.linear.kernel_size[0], m.linear.stride[0], m.linear.padding[0]
        norm = _patch_norms(inp, kernel, stride, padding).view(inp.shape[0], 1, *lin.shape[-2:])
        scales[m] = lin.abs() / norm

    def frozen(m, args, out):
        return m.linear(args[0]) * scales[m]

    with torch.no_grad():
        handles = [c.register_forward_hook(record) for c in convs]
        recorded = model.net(x6)
        for h in handles:
            h.remove()
        handles = [c.register_forward_hook(frozen) for c in convs]
        d = x6.numel()
        basis = torch.eye(d).view(d, *x6.shape[1:])
        columns = model.net(basis) - model.logit_bias  # (d, K): the logit layer adds b to every column
        for h in handles:
            h.remove()
    return columns.T, recorded


def test_the_network_is_dynamic_linear_and_explanation_mode_gives_its_weights():
    model = _net(classes=3, size=8)
    images = torch.rand(1, 3, 8, 8)
    x6 = model.encoded(images)
    matrix, recorded = _frozen_dynamic_map(model, x6)  # (3, 384)
    # piecewise dynamic-linear: logits = W(x) x + b exactly, with W(x) from the frozen scales
    torch.testing.assert_close(matrix @ x6.flatten() + model.logit_bias, recorded[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(images)[0], recorded[0])
    for k in range(3):
        _, _, _, weights = model.dynamic_linear_weights(images, k)  # autograd with the dynamic scales detached
        torch.testing.assert_close(weights.flatten(), matrix[k], rtol=1e-4, atol=1e-6)
    # without detaching, the input gradient is not W(x): explanation mode is what makes it the linear map
    x = x6.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model.net(x)[0, 0], x)
    assert (plain.flatten() - matrix[0]).abs().max() > 1e-2 * matrix[0].abs().max()


def test_explanation_is_per_image_restores_the_mode_and_has_the_colour_coding():
    model = _net(classes=3)
    images = torch.rand(3, 3, 16, 16)
    model.train()
    batch = model.explain(images, torch.tensor([0, 2, 1]))
    assert model.training  # explained in eval mode, then restored
    model.eval()
    for i, k in enumerate([0, 2, 1]):
        single = model.explain(images[i:i + 1], k)
        torch.testing.assert_close(batch.heatmap[i], single.heatmap[0])
    colour = batch.evidence["colour"]
    assert colour.shape == (3, 16, 16, 4) and colour.min() >= 0 and colour.max() <= 1
    assert explanation_smoothing(224) == 15 and explanation_smoothing(64) == 5 and explanation_smoothing(16) == 1
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        model.explain(images)


def test_the_wrapper_is_the_packages_model_and_explanation():
    """BcosNet = bcos.models.resnet18 on AddInverse(x); its batched explanation = the package's explain()."""
    model = _net(classes=5)
    package = bcos_resnet.resnet18(num_classes=5, inplanes=4, in_chans=6, norm_layer=BCOS_NORMS["bnu"])
    package.load_state_dict(model.net.state_dict())
    package.eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), package(AddInverse()(images)))
    ours = model.explain(images, smooth=3)
    for i in range(2):
        x6 = AddInverse()(images[i:i + 1]).requires_grad_(True)
        theirs = package.explain(x6, idx=int(ours.target[i]), smooth=3)
        assert theirs["explained_class_idx"] == int(ours.target[i])
        torch.testing.assert_close(ours.evidence["dynamic_linear_weights"][i], theirs["dynamic_linear_weights"][0])
        torch.testing.assert_close(ours.heatmap[i], theirs["contribution_map"][0].detach())
        torch.testing.assert_close(ours.evidence["colour"][i], torch.from_numpy(theirs["explanation"]))


# ------------------------------------------------------------------------------------------- training
def test_losses_are_the_b_cos_bce_variants():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 1, 4])
    onehot = F.one_hot(labels, 5).float()
    bce = _net(classes=5, loss="bce").criterion(logits, labels)
    torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(logits, onehot))
    off = _net(classes=5, loss="uniform_off_bce").criterion(logits, labels)
    torch.testing.assert_close(off, F.binary_cross_entropy_with_logits(logits, onehot.clamp(min=1 / 5)))
    with pytest.raises(ValueError, match="unknown B-cos loss"):
        BcosNet(num_classes=3, loss="hinge")


def test_warm_up_then_cosine_and_adaptive_gradient_clipping(monkeypatch):
    model = BcosNet(num_classes=3, model_args={"inplanes": 4}, lr=1e-3, scheduler="cosine", warmup_epochs=2,
                    warmup_start_factor=0.01, agc_clip_factor=0.01)
    model.trainer = SimpleNamespace(max_epochs=6)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["weight_decay"] == 0
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-5, 1e-3 * (0.01 + 0.99 / 2)] + [1e-3 * (1 + torch.cos(torch.tensor(t * torch.pi / 4)).item()) / 2
                                                    for t in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-5)
    weight = model.net.conv1.linear.weight
    weight.grad = torch.full_like(weight, 10.0)
    # the trainer's own clipping (none configured) is Lightning's; here only the adaptive clipping runs
    monkeypatch.setattr(pl.LightningModule, "configure_gradient_clipping", lambda *args, **kwargs: None)
    model.configure_gradient_clipping(optimizer)
    unit = weight.detach().flatten(1).norm(dim=1).clamp(min=1e-3)
    assert (weight.grad.flatten(1).norm(dim=1) <= 0.01 * unit * (1 + 1e-4)).all()


def test_builders_and_the_released_entry():
    assert {"bcos_resnet18", "bcos_resnet18_quarter", "bcos_resnet34", "bcos_resnet50", "bcos_densenet121"} <= set(
        models.list_models("bcos_*"))
    small = models.create_model("bcos_resnet18_quarter", num_classes=10)
    assert isinstance(small, models.BcosNet) and sum(p.numel() for p in small.parameters()) < 1e6
    assert models.pretrained_entry("bcos_resnet18_quarter.synthparts").config == "configs/bcos/synthetic.yaml"


@pytest.mark.slow
def test_synthetic_recipe_reaches_90_percent(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", "configs/bcos/synthetic.yaml",
                             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                             "--runs_root", str(tmp_path), "--name", "bcos"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=5400)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list((tmp_path / "bcos").iterdir())
    model = models.load_pretrained(run / "checkpoints" / "last.ckpt")
    from train.data import SyntheticParts

    data = SyntheticParts(num_classes=10, image_size=64, train_size=2000, val_size=500, test_size=500, seed=0)
    correct = total = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    assert correct / total >= 0.9


def test_imagenet_recipe_is_b_cos_v2s_cnn_recipe():
    import yaml

    from train.transforms import train_augmentation

    recipe = yaml.safe_load((ROOT / "configs/bcos/imagenet_resnet50.yaml").read_text())
    args = recipe["model"]["init_args"]
    assert recipe["trainer"]["max_epochs"] == 90 and recipe["trainer"]["devices"] * recipe["data"]["init_args"]["batch_size"] == 256
    assert (args["optimizer"], args["lr"], args["weight_decay"], args["loss"]) == ("adam", 0.001, 0.0, "uniform_off_bce")
    assert (args["warmup_epochs"], args["warmup_start_factor"], args["agc_clip_factor"]) == (5, 0.01, 0.01)
    assert (args["b"], args["max_out"], args["norm"]) == (2.0, 1, "bnu")
    augmentation = train_augmentation(recipe["data"]["init_args"]["augment"], 224)
    crop = augmentation.pipelines[0].transforms[0]
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and augmentation.resize == 256


def test_report_shows_the_contribution_maps_and_colour_coding():
    from explain import viz
    from explain.report import model_figures

    model = _net(classes=3)
    images, labels = torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    figures = dict(model_figures(model, images, labels, num_images=2))
    fig = next(f for caption, f in figures.items() if caption.startswith("Contribution maps"))
    signed = fig.axes[2].images[0]  # row 2 (contributions) of column 0, panels are row-major
    explanation = model.explain(images)
    vrange = float(explanation.heatmap[0].abs().quantile(0.995))
    assert signed.get_clim() == pytest.approx((-vrange, vrange), rel=1e-3)
    assert fig.axes[4].images[0].get_array().shape == (16, 16, 4)  # the RGBA colour coding
    viz.plt.close("all")


def test_a_zoo_file_round_trip_rebuilds_the_same_network(tmp_path):
    model = _net(classes=3)
    path = models.save_zoo_checkpoint(model, tmp_path / "bcos.pt")
    loaded = models.load_pretrained(path, check_hash=False)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    assert isinstance(loaded, BcosNet) and loaded.logit_bias == model.logit_bias
