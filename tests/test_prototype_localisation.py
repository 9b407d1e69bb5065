"""Localisation of prototype evidence (explain.prototype_localisation) and its sanity checks
(explain.sanity_checks), against per-prototype references written with plain autograd."""
from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain import sanity_checks as S
from explain.prototype_localisation import METHODS, Localisation, gaussian_blur, localise_prototypes, localise_sources
from explain.prp import prp_relevance, stabilise
from models import create_model
from models.base import Explanation
from models.prototype_model import PrototypeModel
from models.prototypes import l2_distances
from test_new_family import GaussianPrototypes
from train.data import SyntheticParts


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and scales away from the identity (negative scales too), so merging matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) * 2.5 - 1)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def families() -> dict[str, PrototypeModel]:
    torch.manual_seed(0)
    return {"protopnet": _randomise_bn(create_model("protopnet_test_resnet", num_classes=3)),
            "prototree": _randomise_bn(create_model("prototree_test_resnet", num_classes=3, depth=2)),
            "gaussian": _randomise_bn(GaussianPrototypes())}


class TinyPrototypes(PrototypeModel):
    """normalise -> conv 3x3 -> BN -> ReLU -> conv 1x1 -> ReLU: a latent whose LRP rules are written out below."""

    def __init__(self) -> None:
        super().__init__(num_classes=2)
        self.conv1, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.prototype_vectors = nn.Parameter(torch.rand(3, 5))
        self.register_prototype_records(3, 8)

    def latent(self, images: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.bn(self.conv1(self.normalize(images))))))

    def prototype_tensor(self) -> Tensor:
        return self.prototype_vectors

    def distances(self, images: Tensor) -> Tensor:
        return l2_distances(self.latent(images), self.prototype_vectors)

    def similarity(self, distances: Tensor) -> Tensor:
        return torch.exp(-distances)

    def prototype_active(self) -> Tensor:
        return torch.ones(3, dtype=torch.bool)

    def prototype_class_connection(self) -> Tensor:
        return torch.ones(3, 2)

    def explain(self, images: Tensor, target=None, top_k: int = 2) -> Explanation:
        sims = self.similarity_maps(images)
        logits = sims.amax(dim=(2, 3)) @ self.prototype_class_connection()
        target = self._target(logits, target)
        ev = self.prototype_evidence(sims, torch.ones_like(logits[:, :1]).expand(-1, 3), self.top_prototypes(sims, top_k),
                                     tuple(images.shape[-2:]))
        return Explanation(logits, target, sims.sum(1), ev)


# ----------------------------------------------------------------------------- references
def _closest_cell(model, image: Tensor, j: int) -> tuple[int, int]:
    with torch.no_grad():
        d = model.distances(image[None])[0, j]
    flat = int(d.flatten().argmin())
    return flat // d.shape[1], flat % d.shape[1]


def _scipy_post(grad: Tensor, sigma: float) -> np.ndarray:
    """|.|, channel mean, scipy's Gaussian filter and min-max: the official post-processing."""
    array = np.abs(grad.double().numpy()).mean(0)
    if sigma:
        array = scipy.ndimage.gaussian_filter(array, sigma=sigma)
    return (array - array.min()) / (array.max() - array.min() + np.finfo(np.float32).eps)


def _noise(seed: int, key: int, shape) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + key))


def _smoothgrad_reference(model, images: Tensor, ids: list[int], samples: int, seed: int = 0) -> np.ndarray:
    """One prototype and one noisy copy at a time, in the normalised space (official smoothgrads())."""
    mean, std = model.normalize.mean, model.normalize.std
    out = []
    for b in range(len(images)):
        normalised = (images[b] - mean[0]) / std[0]
        sigma = float(normalised.max() - normalised.min()) * 0.2
        row = []
        for j in ids:
            h, w = _closest_cell(model, images[b], j)
            noise = _noise(seed, b * model.num_prototypes + j, (samples, *images.shape[1:]))
            grads = []
            for s in range(samples):
                xn = (normalised + noise[s] * sigma).requires_grad_(True)
                d = model.distances((xn * std[0] + mean[0])[None])[0, j, h, w]
                grads.append(torch.autograd.grad(d, xn)[0])
            row.append(_scipy_post(torch.stack(grads).mean(0) * normalised, 5 * 64 / 224))
        out.append(row)
    return np.array(out)


def _tiny_prp_reference(model: TinyPrototypes, image: Tensor, j: int) -> Tensor:
    """PRP written out layer by layer for TinyPrototypes (official lrp_general6 rules)."""
    mean, std = model.normalize.mean, model.normalize.std
    x0 = (image[None] - mean) / std
    scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    w1 = model.conv1.weight * scale[:, None, None, None]  # BN merged into conv1
    a1 = F.relu(model.bn(model.conv1(x0)))
    f = F.relu(model.conv2(a1))
    h, w = _closest_cell(model, image, j)
    q = 1 / ((f[0, :, h, w] - model.prototype_vectors[j]) ** 2 + 1e-12)
    r_f = torch.zeros_like(f)
    r_f[0, :, h, w] = q / (q.sum() + 1e-12)
    # conv2, z+ rule (inputs are >= 0 after ReLU): R = a * W+^T (R / z+)
    a = a1.detach().requires_grad_(True)
    z = F.conv2d(a, model.conv2.weight.clamp(min=0))
    r_a1 = a * torch.autograd.grad(z, a, r_f / stabilise(z.detach()))[0]
    # ReLU and BN pass; conv1 with the merged weights, z^B rule with scalar bounds
    low, high = float(((0 - mean) / std).min()), float(((1 - mean) / std).max())
    x, lo, hi = (t.detach().requires_grad_(True) for t in (x0, torch.full_like(x0, low), torch.full_like(x0, high)))
    z = F.conv2d(x, w1, padding=1) - F.conv2d(lo, w1.clamp(min=0), padding=1) - F.conv2d(hi, w1.clamp(max=0), padding=1)
    gx, gl, gh = torch.autograd.grad(z, (x, lo, hi), r_a1 / stabilise(z.detach()))
    return (x * gx + lo * gl + hi * gh)[0].detach()


# ----------------------------------------------------------------------------- tests
def test_upsampling_is_the_current_evidence_of_every_family(families, images):
    for name, model in families.items():
        explanation = model.explain(images)
        ev = explanation.evidence
        loc = localise_prototypes(model, images, ev["prototype_ids"])
        assert isinstance(loc, Localisation) and loc.method == "upsampling" and Localisation.methods() == METHODS
        assert torch.equal(loc.maps, ev["activation_map"]), name
        assert torch.equal(loc.boxes, ev["box"]), name
        # the default of explain() is unchanged; another method replaces the maps and boxes
        again = model.explain(images, localisation="upsampling").evidence
        assert torch.equal(again["activation_map"], ev["activation_map"]) and "localisation" not in again
        prp = model.explain(images, localisation="prp").evidence
        torch.testing.assert_close(prp["activation_map"], localise_prototypes(model, images, ev["prototype_ids"], "prp").maps)
        assert prp["localisation"] == "prp" and prp["box"].shape == ev["box"].shape


def test_default_selection_is_every_active_prototype(families, images):
    model = families["prototree"]
    loc = localise_prototypes(model, images, method="randgrads")
    active = model.prototype_active().nonzero().squeeze(1)
    assert loc.maps.shape == (2, len(active), 64, 64) and torch.equal(loc.prototypes[0], active)
    with pytest.raises(ValueError, match="unknown localisation method"):
        localise_prototypes(model, images, method="gradcam")
    with pytest.raises(ValueError, match="takes no option"):
        localise_prototypes(model, images, method="prp", samples=3)


@pytest.fixture(scope="module")
def pushed():
    torch.manual_seed(0)
    model = GaussianPrototypes().eval()
    data = SyntheticParts(num_classes=3, image_size=32, train_size=12, val_size=3, test_size=3, batch_size=6, seed=0)
    data.setup("fit")
    model.push(data.push_dataloader())
    return model, data.push_dataloader().dataset


def test_sources_upsampling_boxes_are_the_stored_records(pushed):
    model, dataset = pushed
    sources = torch.stack([dataset[int(i)]["image"] for i in model.prototype_source_index])
    loc = localise_sources(model, sources)
    assert torch.equal(loc.boxes[:, 0].cpu(), model.prototype_box)
    assert torch.equal(loc.cells[:, 0], model.prototype_position)
    prp = localise_sources(model, sources, method="prp")
    assert prp.maps.shape == (model.num_prototypes, 1, 32, 32)


def test_smoothgrad_equals_a_per_prototype_reference(families, images):
    for name in ("protopnet", "gaussian"):
        model = families[name]
        ids = [0, 3]
        loc = localise_prototypes(model, images, torch.tensor(ids), "smoothgrad", samples=3, batch_size=4)
        np.testing.assert_allclose(loc.maps.numpy(), _smoothgrad_reference(model, images, ids, samples=3), atol=2e-4)


def test_randgrads_is_uniform_noise_independent_of_the_model(families, images):
    a = localise_prototypes(families["protopnet"], images, torch.tensor([1, 2]), "randgrads", seed=3)
    b = localise_prototypes(families["gaussian"], images, torch.tensor([1, 2]), "randgrads", seed=3, batch_size=1)
    torch.testing.assert_close(a.maps, b.maps)
    p = families["protopnet"].num_prototypes
    noise = torch.rand((3, 64, 64), generator=torch.Generator().manual_seed(3 * 1_000_003 + 1 * p + 2))
    np.testing.assert_allclose(a.maps[1, 1].numpy(), _scipy_post(noise, 0), atol=1e-6)


def test_prp_equals_the_rules_written_out_on_a_tiny_model(images):
    torch.manual_seed(0)
    model = _randomise_bn(TinyPrototypes())
    for j in range(3):
        h, w = _closest_cell(model, images[0], j)
        relevance = prp_relevance(model, images[:1], torch.tensor([j]), torch.tensor([[h, w]]))
        reference = _tiny_prp_reference(model, images[0], j)
        torch.testing.assert_close(relevance[0], reference, rtol=1e-4, atol=1e-7)
    loc = localise_prototypes(model, images[:1], torch.tensor([2]), "prp")
    expected = _scipy_post(_tiny_prp_reference(model, images[0], 2), 5 * 64 / 224)
    np.testing.assert_allclose(loc.maps[0, 0].numpy(), expected, atol=1e-5)


def test_prp_conserves_relevance_through_residual_trunks(families, images):
    """z^B, z+ (biases ignored), pass, winner-takes-all and the residual sum rule conserve the seed 1;
    autograd alone would count the residual relevance twice."""
    for name, model in families.items():
        ids = torch.tensor([0, 1, 0, 1])
        cells = torch.tensor([[0, 0], [1, 1], [1, 0], [0, 1]])
        relevance = prp_relevance(model, images.repeat(2, 1, 1, 1), ids, cells)
        torch.testing.assert_close(relevance.flatten(1).sum(1), torch.ones(4), rtol=2e-3, atol=0, msg=name)


def test_gaussian_blur_equals_scipy():
    maps = torch.rand(3, 9, 14, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.7, 2.0, 5.0):  # 5: the kernel is wider than the map (repeated reflections)
        expected = np.stack([scipy.ndimage.gaussian_filter(m, sigma) for m in maps.numpy()])
        np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, atol=1e-12)


def test_spearman_ssim_and_masks_by_hand():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(S.spearman(a, a * 3 + 1), torch.ones(1))
    torch.testing.assert_close(S.spearman(a, -a), -torch.ones(1))
    x = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(S.ssim(x, 2 * x + 1), torch.ones(2))
    assert (S.ssim(x, torch.rand(2, 16, 16)) < 0.3).all()
    maps = torch.arange(100.0).view(1, 1, 10, 10)
    mask = S.deletion_masks(maps, 0.05)
    assert mask.sum() == 4 and mask[0, 0, 9, 6:].all()  # values above index int(100 * 0.95) = 95
    objects = torch.zeros(1, 10, 10)
    objects[0, 9, 8:] = 1
    torch.testing.assert_close(S.mask_relevance(maps, objects, (0.05,)), torch.tensor([[[0.5]]]))
    torch.testing.assert_close(S.energy_relevance(maps, objects), torch.tensor([[(98 + 99) / 4950]]))


def test_fidelity_is_the_similarity_ratio_after_deleting_the_top_pixels(families, images):
    model = families["gaussian"]
    loc = localise_prototypes(model, images, torch.tensor([0, 4]), "smoothgrad", samples=2)
    fid = S.prototype_fidelity(model, images, loc, areas=(0.02, 0.1), batch_size=3)
    mean = model.normalize.mean
    for b in range(2):
        for i, j in enumerate([0, 4]):
            h, w = loc.cells[b, i].tolist()
            for a, area in enumerate((0.02, 0.1)):
                m = S.deletion_masks(loc.maps[b, i], area).float()
                deleted = images[b] * (1 - m) + mean[0] * m
                with torch.no_grad():
                    ratio = model.similarity_maps(deleted[None])[0, j, h, w] / model.similarity_maps(images[b:b + 1])[0, j, h, w]
                torch.testing.assert_close(fid[b, i, a], ratio)


class Constant(GaussianPrototypes):
    """The latent ignores the trunk's output (times zero) and the add-on: randomising them changes nothing."""

    def latent(self, images: Tensor) -> Tensor:
        trunk = self.add_on(self.backbone(self.normalize(images)))
        return trunk * 0 + F.adaptive_avg_pool2d(images, trunk.shape[-2:]).mean(1, keepdim=True).expand(-1, trunk.shape[1], -1, -1)


def test_randomisation_changes_the_maps_of_a_trained_model_not_of_a_constant_one(images):
    torch.manual_seed(0)
    data = SyntheticParts(num_classes=3, image_size=32, train_size=24, val_size=6, test_size=6, batch_size=8, seed=0)
    data.setup("fit")
    trained = GaussianPrototypes(lr=1e-2)
    pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, num_sanity_val_steps=0).fit(trained, datamodule=data)
    trained.eval()
    x = next(iter(data.test_dataloader()))["image"][:2]
    for method in ("upsampling", "prp"):
        out = S.prototype_randomisation(trained, x, torch.tensor([0, 2]), method, groups=2)
        assert out["steps"][0] == "prototypes" and len(out["steps"]) == 3 and out["spearman"].shape == (2, 2, 3)
        assert float(out["spearman"][..., -1].nanmean()) < 0.8, method
    constant = Constant().eval()
    constant.prototype_vectors.data.copy_(torch.linspace(0.1, 0.9, 6)[:, None].expand(6, 8))
    out = S.prototype_randomisation(constant, x, torch.tensor([0, 2]), "upsampling", randomise_prototypes=False)
    steps = out["steps"]
    assert steps and all("backbone" in s or "add_on" in s for s in steps)
    torch.testing.assert_close(out["spearman"], torch.ones(2, 2, len(steps)))
    torch.testing.assert_close(out["ssim"], torch.ones(2, 2, len(steps)))
    # randgrads ignores the model: it fails the check on any model
    out = S.prototype_randomisation(trained, x, torch.tensor([0]), "randgrads", groups=1)
    torch.testing.assert_close(out["spearman"], torch.ones(2, 1, 2))


def test_pipnet_randomises_its_prototype_channels(images):
    """PIP-Net has no prototype vectors: its "prototypes" step re-draws the add-on conv that makes them."""
    torch.manual_seed(0)
    with_add_on = create_model("pipnet_test_resnet", num_classes=3, num_features=16)
    assert with_add_on.prototype_layers() == [with_add_on.add_on[0]] and with_add_on.num_prototypes == 16
    model = create_model("pipnet_test_resnet", num_classes=3).eval()  # no add-on conv: the trunk's last conv
    (conv,) = model.prototype_layers()
    assert conv.out_channels == model.num_prototypes and conv is [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)][-1]
    before = conv.weight.detach().clone()
    S._randomise_prototypes(model, torch.Generator().manual_seed(0))
    assert not torch.allclose(conv.weight, before)
    model = create_model("pipnet_test_resnet", num_classes=3).eval()
    out = S.prototype_randomisation(model, images[:2], torch.tensor([[0, 1], [2, 3]]), "upsampling", groups=1)
    assert out["steps"][0] == "prototypes" and out["spearman"].shape == (2, 2, 2)
    assert float(out["spearman"][..., 0].mean()) < 0.99  # the maps change once the prototype channels do


def test_gallery_and_this_looks_like_that_take_the_method(pushed):
    import matplotlib.pyplot as plt

    from explain import viz

    model, dataset = pushed
    fig = viz.prototype_gallery(model, source=dataset, localisation="prp")
    assert sum(ax.get_title().endswith("· prp") for ax in fig.axes) == model.num_prototypes
    plt.close(fig)
    image = dataset[0]["image"][None]
    fig = viz.this_looks_like_that(model, image, top_k=2, localisation="smoothgrad", source=dataset)
    assert any(ax.get_title() == "smoothgrad map" for ax in fig.axes)
    loc = localise_prototypes(model, image, model.explain(image, top_k=2).evidence["prototype_ids"], "smoothgrad")
    drawn = [p for p in fig.axes[0].patches]  # the box on the test image, (x0 - 0.5, y0 - 0.5) and size
    x0, y0, x1, y1 = loc.boxes[0, 0].tolist()
    assert drawn[0].get_xy() == (x0 - 0.5, y0 - 0.5) and drawn[0].get_width() == x1 - x0
    plt.close(fig)


def test_sanity_command_writes_the_table(tmp_path):
    from models.pretrained import save_zoo_checkpoint
    from train.sanity import COLUMNS, main

    torch.manual_seed(0)
    model = create_model("protopnet_test_resnet", num_classes=3).eval()
    data = SyntheticParts(num_classes=3, image_size=32, train_size=6, val_size=3, test_size=3, batch_size=6, seed=0)
    data.setup("fit")
    model.push(data.push_dataloader())
    file = save_zoo_checkpoint(model, tmp_path / "tiny.pt")
    rows = main(["--checkpoint", f"tiny={file}", "--methods", "upsampling", "randgrads", "--num-images", "2",
                 "--top-k", "1", "--random-images", "1", "--groups", "1", "--sources", "2", "--out", str(tmp_path / "s.md")])
    assert [r["method"] for r in rows] == ["upsampling", "randgrads"]
    assert rows[1]["rand. all"] == 1.0  # randgrads does not depend on the model
    text = (tmp_path / "s.md").read_text()
    assert "| ProtoPNet | upsampling |" in text and all(c in text for c, _ in COLUMNS)


def test_without_the_residual_sum_rule_relevance_is_counted_twice(families, images, monkeypatch):
    """The check of spec B.5 (5): autograd alone gives both branches of a residual sum the whole relevance."""
    import explain.prp as prp

    model = families["protopnet"]
    ids, cells = torch.tensor([0, 1]), torch.tensor([[0, 0], [1, 1]])
    monkeypatch.setattr(prp, "_SUMS", set())
    total = prp_relevance(model, images, ids, cells).flatten(1).sum(1)
    assert (total > 1.05).all(), total
