"""Explanation metrics: hand computations on models with a known response, references (scipy, RISE-style
per-image loops), and batched == per-image."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.sparse import lil_matrix
from scipy.sparse.linalg import spsolve
from scipy.stats import spearmanr
from torch import nn

from explain import metrics as M
from explain.posthoc import attribute
from models import create_model
from models.base import Normalize

torch.set_num_threads(1)


class Weighted(nn.Module):
    """P(class 0) = sum_ij w_ij x_ij (channel 0), P(class 1) = the rest: a model with a known response."""

    def __init__(self, weights: torch.Tensor, normalize: bool = False):
        super().__init__()
        self.register_buffer("w", weights)
        if normalize:
            self.normalize = Normalize()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        f = (x[:, 0] * self.w).flatten(1).sum(1).clamp(1e-7, 1 - 1e-7)
        return torch.stack([f.log(), (1 - f).log()], dim=1)


W = torch.tensor([[0.4, 0.3], [0.2, 0.1]])  # pixel weights, flat order (0, 1, 2, 3)
RANKING = torch.tensor([[[0.5, 0.1], [0.9, 0.3]]])  # relevance order: pixel 2, 0, 3, 1


@pytest.mark.parametrize("step, expected", [(1, 0.5), (2, 0.45), (3, 0.4)])
def test_deletion_auc_equals_hand_computation(step, expected):
    # Scores after removing 0..4 pixels in the order 2, 0, 3, 1: 1, .8, .4, .3, 0.
    # step 1: (2.5 - 1/2 - 0/2) / 4 = 0.5; step 2: scores 1, .4, 0 -> (1.4 - .5) / 2 = 0.45;
    # step 3: n_steps = ceil(4/3) = 2, scores 1, .3, 0 -> (1.3 - .5) / 2 = 0.4.
    model = Weighted(W)
    value = M.deletion(model, torch.ones(1, 3, 2, 2), RANKING, step=step)
    assert value.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("step, expected", [(1, 0.5), (2, 0.55)])
def test_insertion_auc_equals_hand_computation(step, expected):
    # From a zero image, inserting 2, 0, 3, 1: scores 0, .2, .6, .7, 1 -> (2.5 - 0 - .5) / 4 = 0.5;
    # step 2: 0, .6, 1 -> (1.6 - .5) / 2 = 0.55.
    model = Weighted(W)
    value = M.insertion(model, torch.ones(1, 3, 2, 2), RANKING, step=step, substrate=0.0)
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_deletion_substrate_is_the_models_mean_colour():
    model = Weighted(torch.full((4, 4), 1 / 16), normalize=True)
    M.deletion(model, torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4), step=16)
    fully_deleted = model.seen[-1][1::2]  # (image, step) pairs in one batch; step 1 replaces every pixel
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    torch.testing.assert_close(fully_deleted, mean.expand_as(fully_deleted))


def test_blur_equals_rise_gkern_on_the_normalised_tensor():
    x = torch.rand(2, 3, 20, 20)
    norm = Normalize()
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1
    k = torch.from_numpy(gaussian_filter(impulse, 5)).float()
    kern = torch.zeros(3, 3, 11, 11)
    for c in range(3):
        kern[c, c] = k  # RISE's gkern: a (3, 3, 11, 11) diagonal kernel
    ref = F.conv2d(norm(x), kern, padding=5) * norm.std + norm.mean
    torch.testing.assert_close(M.blur(x, norm.mean), ref, rtol=1e-5, atol=1e-5)
    assert M.rise_blur_kernel().sum().item() == pytest.approx(1.0, abs=1e-6)


def _rise_style_curve(model, image, heatmap, finish, target, step):
    """RISE's CausalMetric.single_run: one image, one forward per step, pixels replaced in place."""
    n = image.shape[-1] * image.shape[-2]
    n_steps = math.ceil(n / step)
    order = heatmap.flatten().argsort(descending=True, stable=True)
    current = image.clone().flatten(1)
    finish = finish.flatten(1)
    scores = []
    for i in range(n_steps + 1):
        with torch.no_grad():
            scores.append(torch.softmax(model(current.view(1, *image.shape)), 1)[0, target].item())
        idx = order[i * step:(i + 1) * step]
        current[:, idx] = finish[:, idx]
    scores = np.array(scores)
    return (scores.sum() - scores[0] / 2 - scores[-1] / 2) / n_steps


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("cam_test_resnet", num_classes=3).eval()


def test_batched_deletion_and_insertion_equal_a_per_image_loop(net):
    torch.manual_seed(1)
    x, h = torch.rand(3, 3, 32, 32), torch.rand(3, 32, 32)
    h[0, :8] = 0.5  # ties are broken the same way (lower index first)
    target = torch.tensor([0, 2, 1])
    deletion = M.deletion(net, x, h, target, step=40, batch_size=7)
    insertion = M.insertion(net, x, h, target, step=40, batch_size=50)
    base = net.normalize.mean[0]
    for b in range(3):
        ref_del = _rise_style_curve(net, x[b], h[b], base.expand_as(x[b]), target[b], 40)
        ref_ins = _rise_style_curve(net, M.blur(x[b:b + 1], net.normalize.mean)[0], h[b], x[b], target[b], 40)
        assert deletion[b].item() == pytest.approx(ref_del, abs=1e-5)
        assert insertion[b].item() == pytest.approx(ref_ins, abs=1e-5)


def test_pointing_game_tolerance_is_strict():
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, 0, 15] = True  # the only ground-truth pixel: x = 15, y = 0
    x, h = torch.zeros(1, 3, 40, 40), torch.zeros(1, 40, 40)
    hit = M.pointing_game(None, x, h, masks=mask, points=torch.tensor([[0.1, 0.0]]))  # distance 14.9
    miss = M.pointing_game(None, x, h, masks=mask, points=torch.tensor([[0.0, 0.0]]))  # distance 15.0
    assert hit.item() == 1.0 and miss.item() == 0.0


@pytest.mark.parametrize("pixel, expected", [((5, 14), 1.0), ((0, 15), 0.0), ((12, 9), 0.0), ((30, 30), 0.0)])
def test_pointing_game_at_the_heatmap_maximum(pixel, expected):
    h = torch.zeros(1, 40, 40)
    h[0, 0, 0] = 1.0  # maximum at (x, y) = (0, 0)
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, pixel[0], pixel[1]] = True  # (row, col): distances sqrt(221) = 14.87, 15, 15, 42
    assert M.pointing_game(None, torch.zeros(1, 3, 40, 40), h, masks=mask).item() == expected


def test_energy_pointing_game_and_relevance_mass_by_hand():
    h = torch.tensor([[[2.0, 4.0], [-2.0, 0.0]]])  # min-max -> [2/3, 1, 0, 1/3], total 2
    mask = torch.tensor([[[True, False], [True, False]]])
    x = torch.zeros(1, 3, 2, 2)
    assert M.energy_pointing_game(None, x, h, masks=mask).item() == pytest.approx((2 / 3) / 2)
    assert M.relevance_mass(None, x, h, masks=mask).item() == pytest.approx(2 / 6)
    flat = torch.ones(1, 2, 2)  # a constant map spreads its energy evenly
    assert M.energy_pointing_game(None, x, flat, masks=mask).item() == pytest.approx(0.5)
    assert M.relevance_mass(None, x, -flat, masks=mask).item() == 0.0


def _spsolve_imputation(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's system, built element by element and solved with scipy.sparse.linalg.spsolve."""
    c, h, w = image.shape
    idx = np.flatnonzero(removed.ravel())
    var = -np.ones(h * w, dtype=int)
    var[idx] = np.arange(len(idx))
    a = lil_matrix((len(idx), len(idx)))
    rhs = np.zeros((len(idx), c))
    flat = image.reshape(c, -1)
    for e, p in enumerate(idx):
        y, x = divmod(p, w)
        total = 0.0
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy, dx) == (0, 0) or not (0 <= y + dy < h and 0 <= x + dx < w):
                    continue
                weight = 1 / 6 if dy == 0 or dx == 0 else 1 / 12
                q = (y + dy) * w + x + dx
                total += weight
                if var[q] >= 0:
                    a[e, var[q]] -= weight
                else:
                    rhs[e] += weight * flat[:, q]
        a[e, e] = total
    out = flat.copy()
    out[:, idx] = spsolve(a.tocsc(), rhs).T
    return out.reshape(c, h, w)


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_road_imputation_equals_sparse_solve(fraction):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=gen, dtype=torch.float64)
    removed = torch.rand(2, 24, 20, generator=gen) < fraction
    removed[1, :12] = True  # a large hole touching the border
    cg = M.road_impute(x, removed, tol=1e-10, max_iter=2000, solver="cg")
    cg32 = M.road_impute(x.float(), removed, solver="cg")
    direct = M.road_impute(x, removed)  # "auto" on the CPU
    direct32 = M.road_impute(x.float(), removed, solver="direct")
    for b in range(2):
        ref = _spsolve_imputation(x[b].numpy(), removed[b].numpy())
        np.testing.assert_allclose(cg[b].numpy(), ref, atol=1e-8)
        np.testing.assert_allclose(direct[b].numpy(), ref, atol=1e-12)
        np.testing.assert_allclose(cg32[b].numpy(), ref, atol=1e-4)
        np.testing.assert_allclose(direct32[b].numpy(), ref, atol=1e-6)
    kept = ~removed[:, None].expand_as(x)
    assert torch.equal(cg[kept], x[kept]) and torch.equal(direct[kept], x[kept])


def test_road_solvers_draw_the_same_noise():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    removed = torch.rand(2, 16, 16, generator=gen) < 0.5
    a, b = (M.road_impute(x, removed, noise=0.05, generator=torch.Generator().manual_seed(0), solver=s, tol=1e-9,
                          max_iter=500) for s in ("direct", "cg"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="solver must be"):
        M.road_impute(x, removed, solver="lu")


def test_road_noise_only_touches_imputed_pixels():
    x = torch.rand(1, 3, 16, 16)
    removed = torch.zeros(1, 16, 16, dtype=torch.bool)
    removed[0, 4:12, 4:12] = True
    clean = M.road_impute(x, removed)
    noisy = M.road_impute(x, removed, noise=0.05, generator=torch.Generator().manual_seed(0))
    diff = (noisy - clean)[removed[:, None].expand_as(x)]
    assert torch.equal(noisy[~removed[:, None].expand_as(x)], x[~removed[:, None].expand_as(x)])
    assert diff.std().item() == pytest.approx(0.05, rel=0.2)


def test_road_noise_is_pixel_units_on_the_imputed_pixels_only():
    # ROAD imputes images in [0, 1] and normalises afterwards: the noise std is 0.01 in pixel units,
    # whatever the model's normalisation (zoo models: std ~0.22, which must not scale it).
    model = Weighted(torch.full((32, 32), 1 / 1024), normalize=True)
    gen = torch.Generator().manual_seed(4)
    x, h = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 32, 32, generator=gen)
    M.road(model, x, h, fractions=(0.5,), noise=0.0)
    clean = model.seen[-1]
    M.road(model, x, h, fractions=(0.5,), noise=0.01, seed=1)
    diff = model.seen[-1] - clean
    removed = torch.zeros(2, 32 * 32, dtype=torch.bool)
    removed.scatter_(1, h.flatten(1).argsort(1, descending=True)[:, :512], True)
    removed = removed.view(2, 1, 32, 32).expand_as(x)
    assert torch.equal(diff[~removed], torch.zeros_like(diff[~removed]))
    for c in range(3):
        noise = diff[:, c][removed[:, c]]  # 1024 draws per channel
        assert noise.std().item() == pytest.approx(0.01, rel=0.1)
        assert abs(noise.mean().item()) < 0.01 * 4 / math.sqrt(len(noise))


def _replaced_per_step(model, metric, heatmap, **kw):
    """(n_steps + 1, H * W) bool: which pixels each step of `metric` took from the other image."""
    image = torch.ones(1, 3, *heatmap.shape[-2:])
    metric(model, image, heatmap, step=1, substrate=0.0, **kw)
    steps = model.seen[-1][:, 0].flatten(1)  # one batch of every (image, step) pair
    return steps == 0 if metric is M.deletion else steps == 1


@pytest.mark.parametrize("metric", [M.deletion, M.insertion])
@pytest.mark.parametrize("heatmap, order", [
    ([[0.2, 0.7], [0.7, 0.2]], [1, 2, 0, 3]),  # two ties: the lower flat index y * W + x goes first
    ([[0.5, 0.5], [0.5, 0.5]], [0, 1, 2, 3]),  # a constant map: row-major from the top left
    ([[0.1, 0.3], [0.3, 0.3]], [1, 2, 3, 0]),
])
def test_deletion_and_insertion_take_tied_pixels_in_row_major_order(metric, heatmap, order):
    replaced = _replaced_per_step(Weighted(W), metric, torch.tensor([heatmap]))
    for i in range(5):
        expected = torch.zeros(4, dtype=torch.bool)
        expected[order[:i]] = True
        assert torch.equal(replaced[i], expected), (i, replaced[i])


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_takes_tied_pixels_in_row_major_order(order):
    model = Weighted(torch.full((4, 4), 1 / 16))
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    M.road(model, x, torch.zeros(1, 4, 4), order=order, fractions=(0.25,), noise=0.0)
    changed = (model.seen[-1] != x).any(1)[0].flatten()
    assert changed.nonzero()[:, 0].tolist() == [0, 1, 2, 3]  # 4 of 16 pixels: the first row


def test_average_drop_and_increase_by_hand():
    model = Weighted(W)
    h = torch.tensor([[[1.0, 0.0], [0.5, 0.25]]])  # already in [0, 1]: x o L = L on a white image
    drop = M.average_drop(model, torch.ones(1, 3, 2, 2), h)
    assert drop.item() == pytest.approx((1 - (0.4 + 0.1 + 0.025)) * 100, abs=1e-3)
    assert M.increase_in_confidence(model, torch.ones(1, 3, 2, 2), h).item() == 0.0
    # With a mean-colour substrate, masking a black image raises P(class 0) from ~0 to 0.485.
    grey_model = Weighted(W, normalize=True)
    black, flat = torch.zeros(1, 3, 2, 2), torch.ones(1, 2, 2)
    assert M.increase_in_confidence(grey_model, black, flat, target=torch.tensor([0])).item() == 100.0
    assert M.average_drop(grey_model, black, flat, target=torch.tensor([0])).item() == 0.0
    assert M.average_drop(model, torch.ones(1, 3, 2, 2), flat).item() == pytest.approx(100.0)  # keeps nothing


@pytest.mark.parametrize("name", ["deletion", "insertion", "road", "average_drop", "increase_in_confidence",
                                  "pointing_game", "energy_pointing_game", "relevance_mass"])
def test_batched_metrics_equal_per_image_calls(net, name):
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 32, generator=gen)
    h = torch.rand(3, 32, 32, generator=gen)
    masks = torch.rand(3, 32, 32, generator=gen) > 0.8
    kw = {"masks": masks} if name in ("pointing_game", "energy_pointing_game", "relevance_mass") else {}
    if name == "road":
        kw = {"noise": 0.0}
    if name in ("deletion", "insertion"):
        kw = {"step": 64}
    fn = getattr(M, name)
    batched = fn(net, x, h, None, **kw)
    looped = torch.cat([fn(net, x[b:b + 1], h[b:b + 1], None, **{k: v[b:b + 1] for k, v in kw.items() if k == "masks"},
                           **{k: v for k, v in kw.items() if k != "masks"}) for b in range(3)])
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-5)


def test_road_morf_vs_lerf_on_a_model_with_known_response():
    # The model only looks at the left half: a map on the left half should hurt more under MoRF than LeRF.
    w = torch.zeros(16, 16)
    w[:, :8] = 1 / 128
    model = Weighted(w)
    x = torch.ones(2, 3, 16, 16)
    x[:, :, :, 8:] = 0.0  # the informative half is white, the rest black: imputation mixes them
    h = torch.zeros(2, 16, 16)
    h[:, :, :8] = 1.0
    morf = M.road(model, x, h, target=torch.zeros(2, dtype=torch.long), fractions=(0.5,), noise=0.0)
    lerf = M.road(model, x, h, target=torch.zeros(2, dtype=torch.long), order="lerf", fractions=(0.5,), noise=0.0)
    assert (morf < 0.6).all() and (lerf > 0.99).all()


def test_spearman_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 5, (4, 50), generator=gen).float()
    b = torch.randn(4, 50, generator=gen)
    ours = M.spearman(a, b)
    for i in range(4):
        assert ours[i].item() == pytest.approx(spearmanr(a[i].numpy(), b[i].numpy()).statistic, abs=1e-6)
    assert torch.isnan(M.spearman(torch.ones(1, 5), torch.rand(1, 5))).all()


def test_model_randomisation(net):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def gradcam(m, images, target):
        return attribute(m, images, target, method="gradcam", layer="backbone.body.layer3")

    def weight_free(m, images, target):  # an "explanation" that ignores the model: never changes
        return images.mean(1)

    h = gradcam(net, x, None)
    curve, names = M.randomisation_curve(net, x, h, explain_fn=gradcam)
    assert curve.shape == (2, len(names)) and names[0] == "classifier"
    assert len(names) == sum(1 for m in net.modules() if list(m.parameters(recurse=False)))
    assert M.model_randomisation(net, x, h, explain_fn=gradcam).max() < 0.9
    same = M.model_randomisation(net, x, x.mean(1), explain_fn=weight_free)
    torch.testing.assert_close(same, torch.ones(2))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # the original is untouched


def _peak_maps(peaks: list[list[tuple[int, int]]], size: int = 32) -> torch.Tensor:
    """(B, P, size, size) maps that are 1 at the given (x, y) peak of each (image, prototype)."""
    maps = torch.zeros(len(peaks), len(peaks[0]), size, size)
    for b, row in enumerate(peaks):
        for p, (px, py) in enumerate(row):
            maps[b, p, py, px] = 1.0
    return maps


def test_prototype_consistency_by_hand():
    # Prototypes of classes 0, 1, 2; images of classes 0, 0, 1; half_size 4 -> a 9 x 9 box (inclusive).
    maps = _peak_maps([[(10, 10), (0, 0), (0, 0)], [(10, 10), (0, 0), (0, 0)], [(0, 0), (0, 0), (0, 0)]])
    keypoints = torch.tensor([
        [[12, 9, 1], [10, 14, 1]],  # part 0 inside, part 1 inside (y = 14 is on the inclusive border)
        [[20, 20, 1], [10, 14, 0]],  # part 0 outside, part 1 invisible
        [[30, 30, 1], [25, 2, 1]],  # both far from prototype 1's peak at (0, 0)
    ], dtype=torch.float)
    labels = torch.tensor([0, 0, 1])
    classes = torch.tensor([0, 1, 2])
    images = torch.zeros(3, 3, 32, 32)
    fn = lambda x: maps[: len(x)] if len(x) == 3 else maps[:1]  # noqa: E731
    out = M.prototype_consistency(fn, images, keypoints, labels, classes, half_size=4)
    # prototype 0: part 0 in 1 of 2 images (0.5), part 1 in 1 of 1 visible (1.0) -> consistent
    assert out[0].item() == 1.0 and out[1].item() == 0.0 and math.isnan(out[2].item())
    strict = M.prototype_consistency(fn, images, keypoints, labels, classes, half_size=3)  # y = 14 now outside
    assert strict[0].item() == 0.0


def test_prototype_stability_by_hand():
    keypoints = torch.tensor([[[10, 10, 1]], [[30, 30, 1]]], dtype=torch.float)
    labels = torch.tensor([0, 0])
    images = torch.full((2, 3, 32, 32), 0.5)

    def moves_with_noise(x):  # the peak jumps from (10, 10) to (0, 31) once the image is perturbed
        clean = (x == 0.5).flatten(1).all(1)
        peaks = [[(10, 10)] if c else [(0, 31)] for c in clean.tolist()]
        return _peak_maps(peaks)

    out = M.prototype_stability(moves_with_noise, images, keypoints, labels, torch.tensor([0]), half_size=4)
    assert out.item() == pytest.approx(0.5)  # image 0 loses its part, image 1 never had it
    steady = M.prototype_stability(lambda x: _peak_maps([[(10, 10)]] * len(x)), images, keypoints, labels,
                                   torch.tensor([0]), half_size=4)
    assert steady.item() == 1.0


# ----------------------------------------------------------------------------- FunnyBirds-style checks
REGIONS = {"a": (slice(0, 4), slice(0, 4)), "b": (slice(0, 4), slice(8, 12)), "c": (slice(8, 12), slice(0, 4)),
           "bg0": (slice(12, 15), slice(12, 15))}


def _render(index: int, remove: list[str]) -> torch.Tensor:
    image = torch.zeros(3, 16, 16)
    for name, (rows, cols) in REGIONS.items():
        if name not in remove:
            image[:, rows, cols] = 1.0
    return image


class _PartModel(nn.Module):
    """logit 0 = 4 mean(a) + 2 mean(b) + 0 mean(c) + w_bg mean(bg0); logit 1 = 3."""

    def __init__(self, w_bg: float):
        super().__init__()
        self.w = {"a": 4.0, "b": 2.0, "c": 0.0, "bg0": w_bg}

    def forward(self, x):
        l0 = sum(w * x[:, 0, REGIONS[n][0], REGIONS[n][1]].mean((1, 2)) for n, w in self.w.items())
        return torch.stack([l0, torch.full_like(l0, 3.0)], dim=1)


def test_funnybirds_checks_by_hand():
    heatmap = torch.zeros(1, 16, 16)
    heatmap[0, 0:4, 0:4] = 1.0  # importance a = 16
    heatmap[0, 0:4, 8:12] = 0.5  # b = 8
    heatmap[0, 12:15, 12:15] = 0.3  # bg0 = 2.7; total = 26.7
    thresholds = (0.05, 0.2, 0.5, 0.9)  # important: {a, b, bg0}, {a, b}, {a}, {}
    out = M.funnybirds(_PartModel(0.01), _render(0, [])[None], heatmap, render_fn=_render, indices=torch.tensor([0]),
                       part_names=["a", "b", "c"], background_names=["bg0"], thresholds=thresholds)
    assert out["single_deletion"].item() == pytest.approx(1.0)  # importance 16, 8, 0 vs drops 4, 2, 0
    # PC: removing the unimportant parts keeps class 0 while a stays (l0 >= 4 > 3)
    assert out["preservation"][0].tolist() == [1.0, 1.0, 1.0, 0.0]
    # DC: removing the important parts flips the class as soon as a is among them
    assert out["deletion"][0].tolist() == [1.0, 1.0, 1.0, 0.0]
    # irrelevant: c (drop 0) and bg0 (drop 0.01 < 5% of 6.01); bg0 is called important at t = 0.05
    assert out["distractibility"][0].tolist() == [0.5, 1.0, 1.0, 1.0]
    assert out["background_independence"].item() == 1.0
    best = M.funnybirds_at_best_threshold(out)
    assert best["threshold"].item() == pytest.approx(0.2) and best["distractibility"].item() == 1.0
    strong_bg = M.funnybirds(_PartModel(1.0), _render(0, [])[None], heatmap, render_fn=_render,
                             indices=torch.tensor([0]), part_names=["a", "b", "c"], background_names=["bg0"],
                             thresholds=thresholds)
    assert strong_bg["background_independence"].item() == 0.0  # removing bg0 drops the logit by 1/7 > 5%


def test_part_importance_dilates_masks():
    masks = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    masks[0, 0, 5, 5] = True
    heatmap = torch.ones(1, 10, 10)
    assert M.part_importance(heatmap, masks).item() == 25.0  # 5 x 5 max-pool dilation


def test_metric_input_errors(net):
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="heatmaps must be"):
        M.deletion(net, x, torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        M.deletion(net, x, torch.full((2, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="substrate"):
        M.deletion(net, x, torch.rand(2, 16, 16), substrate="grey")
    with pytest.raises(ValueError, match="order"):
        M.road(net, x, torch.rand(2, 16, 16), order="up")
    with pytest.raises(ValueError, match="kept pixel"):
        M.road_impute(x, torch.ones(2, 16, 16, dtype=torch.bool))


def test_prototype_metrics_on_a_zoo_prototype_model():
    from models import is_model

    if not is_model("protopnet_test_resnet"):
        pytest.skip("ProtoPNet is not registered")
    torch.manual_seed(0)
    model = create_model("protopnet_test_resnet", num_classes=2).eval()
    images = torch.rand(4, 3, 64, 64)
    keypoints = torch.tensor([[[10.0, 10.0, 1.0], [50.0, 40.0, 1.0]]]).repeat(4, 1, 1)
    labels = torch.tensor([0, 0, 1, 1])
    similarity_maps = lambda x: -model.distances(x)  # noqa: E731  (any (B, P, h, w) map works)
    classes = model.prototype_class_identity.argmax(1)
    consistency = M.prototype_consistency(similarity_maps, images, keypoints, labels, classes, half_size=16)
    stability = M.prototype_stability(similarity_maps, images, keypoints, labels, classes, half_size=16)
    assert consistency.shape == stability.shape == classes.shape
    assert set(consistency.tolist()) <= {0.0, 1.0} and ((stability >= 0) & (stability <= 1)).all()


# ----------------------------------------------------------------------------- classification accuracy
def test_top5_accuracy_keeps_its_own_state_after_a_batch_where_it_equals_top1():
    # torchmetrics would merge top-1 and top-5 into one compute group after a first batch on which they
    # agree (here: all right). Second batch: every label ranks second, so top-1 is wrong and top-5 right.
    # Each class appears once per batch, so macro and micro averages agree: top-1 1/2, top-5 1.
    model = create_model("cam_test_resnet", num_classes=10)
    labels = torch.arange(10)
    first = F.one_hot(labels, 10).float() * 5
    second = first * 0.8 + F.one_hot((labels + 1) % 10, 10).float() * 5
    for collection in (model.train_metrics, model.val_metrics, model.test_metrics):
        collection.update(first, labels)
        collection.update(second, labels)
        values = {k.split("/")[1]: v.item() for k, v in collection.compute().items()}
        assert values == pytest.approx({"acc": 0.5, "acc_top5": 1.0})


def test_metrics_module_re_exports_the_split_modules():
    from explain import localisation_metrics, perturbation_metrics, sanity_checks

    for module in (perturbation_metrics, localisation_metrics, sanity_checks):
        for name in module.__all__:
            assert getattr(M, name) is getattr(module, name) and name in M.__all__, name
    assert len(M.__all__) == len(set(M.__all__)) == 36
