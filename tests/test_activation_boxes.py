"""High-activation boxes without upsampling whole maps, checked against the literal computation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import cpu_kernels
from models.activation_boxes import _quantile_ranks, _taps, dense_high_activation_boxes, high_activation_boxes, upsample_maps


def _maps(kind: str, n: int = 300, h: int = 7, w: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, h, w, generator=g)
    if kind == "normal":
        return torch.randn(n, h, w, generator=g) * 100
    # A pushed prototype's own map: distance 0 at its patch, log similarity, as ProtoPNet stores it.
    d = torch.rand(n, h, w, generator=g) * torch.rand(n, 1, 1, generator=g) * 10
    d.view(n, -1)[torch.arange(n), torch.randint(0, h * w, (n,), generator=g)] = 0
    return torch.log((d + 1) / (d + 1e-4))


@pytest.mark.parametrize("kind", ["uniform", "normal", "prototype"])
@pytest.mark.parametrize("size, percentile", [((224, 224), 95.0), ((200, 150), 95.0), ((224, 224), 50.0), ((97, 224), 99.0),
                                              ((224, 224), 100.0), ((40, 31), 5.0)])
def test_boxes_equal_the_dense_computation(kind, size, percentile):
    maps = _maps(kind)
    boxes, thr = high_activation_boxes(maps, size, percentile)
    ref_boxes, ref_thr = dense_high_activation_boxes(maps, size, percentile)
    assert torch.equal(boxes, ref_boxes)
    # Same order statistics; the upsampled values differ only by float rounding of the sums.
    torch.testing.assert_close(thr, ref_thr, rtol=1e-5, atol=1e-5 * float(maps.abs().max()))


def test_odd_shapes_equal_the_dense_computation():
    g = torch.Generator().manual_seed(5)
    for h, w, size in ((1, 7, (224, 224)), (7, 1, (80, 70)), (3, 11, (150, 301)), (14, 14, (448, 448))):
        maps = torch.randn(20, h, w, generator=g)
        assert torch.equal(high_activation_boxes(maps, size)[0], dense_high_activation_boxes(maps, size)[0]), (h, w, size)


def test_dense_reference_is_numpy_percentile():
    maps = _maps("prototype", n=4)
    boxes, thr = dense_high_activation_boxes(maps, (224, 224))
    up = F.interpolate(maps[:, None], size=(224, 224), mode="bicubic", align_corners=False)[:, 0].numpy()
    for n in range(4):
        t = np.percentile(up[n], 95)
        ys, xs = np.nonzero(up[n] >= t)
        assert abs(float(thr[n]) - t) <= 1e-6 * abs(t)
        assert boxes[n].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_constant_and_non_finite_maps():
    maps = torch.stack([torch.full((7, 7), 3.0), torch.zeros(7, 7), _maps("uniform", n=1)[0]])
    maps[2, 3, 3] = float("nan")
    boxes, _ = high_activation_boxes(maps, (224, 224))
    assert boxes[0].tolist() == [0, 0, 224, 224] and boxes[1].tolist() == [0, 0, 224, 224]
    assert torch.equal(boxes, dense_high_activation_boxes(maps, (224, 224))[0])


def test_empty_and_bad_percentile():
    boxes, thr = high_activation_boxes(torch.zeros(0, 7, 7), (224, 224))
    assert boxes.shape == (0, 4) and thr.shape == (0,)
    with pytest.raises(ValueError, match="percentile"):
        high_activation_boxes(torch.zeros(1, 7, 7), (224, 224), percentile=101)


def test_random_shapes_sizes_and_percentiles_equal_the_dense_computation():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 15, 2))
        size = tuple(int(v) for v in rng.integers(20, 300, 2))
        percentile = float(rng.choice([0.0, 5.0, 50.0, 95.0, 99.0, 100.0, rng.uniform(0, 100)]))
        maps = torch.from_numpy(rng.standard_normal((10, h, w)) * 10 ** rng.uniform(-3, 3)).float()
        boxes = high_activation_boxes(maps, size, percentile)[0]
        assert torch.equal(boxes, dense_high_activation_boxes(maps, size, percentile)[0]), (h, w, size, percentile)


@pytest.mark.parametrize("n", [2, 7, 1041, 10001, 50176])
@pytest.mark.parametrize("percentile", [0.1, 5.0, 50.0, 95.0, 99.9, 37.3])
def test_quantile_ranks_are_torch_quantiles(n, percentile):
    x = torch.rand(n, generator=torch.Generator().manual_seed(n))
    below, above, weight = _quantile_ranks(n, percentile)
    top = x.sort(descending=True).values
    assert torch.equal(torch.lerp(top[below - 1], top[above - 1], weight), torch.quantile(x, percentile / 100))


def test_cases_found_in_review():
    # A weight torch.quantile takes as 1e-4 and a float32 rank would make 0.
    m = torch.tensor([[[2, 1, 0], [2, -1, -2], [0, -2, -2], [1, 0, 0], [-2, 0, 1], [0, -1, -2], [-2, 0, 1]]]).float()
    assert high_activation_boxes(m, (137, 73), 99.9)[0].tolist() == dense_high_activation_boxes(m, (137, 73), 99.9)[0].tolist()
    # Rows equal along one axis: whole lines tie with the threshold up to rounding.
    m = torch.tensor([[[0.0, 0, 1], [0, 0, 1]]])
    assert high_activation_boxes(m, (247, 85), 99.9)[0].tolist() == dense_high_activation_boxes(m, (247, 85), 99.9)[0].tolist()
    # Maps that vary little for their size.
    g = torch.Generator().manual_seed(3)
    for offset, scale in ((1, 1e-4), (1, 1e-5), (1000, 1e-3)):
        m = offset + scale * torch.randn(100, 7, 7, generator=g)
        assert torch.equal(high_activation_boxes(m, (224, 224))[0], dense_high_activation_boxes(m, (224, 224))[0])
    # Images thinner than the subsample step.
    m = torch.randn(2, 7, 7, generator=g)
    for size in ((2, 600), (600, 2), (1, 2000)):
        assert torch.equal(high_activation_boxes(m, size)[0], dense_high_activation_boxes(m, size)[0])


def test_does_not_depend_on_the_default_dtype():
    maps = _maps("prototype", n=20)
    ref = high_activation_boxes(maps, (224, 224))[0]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _taps.cache_clear()
        assert torch.equal(high_activation_boxes(maps, (224, 224))[0], ref)
    finally:
        torch.set_default_dtype(default)
        _taps.cache_clear()


# ------------------------------------------------------------------------------ compiled kernels
needs_numba = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")


@needs_numba
def test_select_is_the_order_statistic():
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 10, 257, 3000):
        for values in (rng.standard_normal(n), rng.integers(0, 3, n), np.zeros(n)):  # with many ties
            a = values.astype(np.float32)
            for j in {0, n // 2, n - 1}:
                assert cpu_kernels._select(a.copy(), n, j) == np.sort(a)[j]


@needs_numba
@pytest.mark.parametrize("kind", ["uniform", "normal", "prototype"])
def test_kernel_boxes_equal_the_dense_ones_where_it_vouches_for_them(kind):
    """Without the dense redo: where the kernel says ok its boxes are torch's, and it says ok nearly always."""
    maps = _maps(kind, n=400)
    ranks = _quantile_ranks(224 * 224, 95.0)
    boxes, thr, ok = cpu_kernels.boxes_above_percentile(maps, _taps(7, 224), _taps(7, 224), (ranks[0], ranks[1], float(ranks[2])), 4e-6)
    ref_boxes, ref_thr = dense_high_activation_boxes(maps, (224, 224))
    assert ok.float().mean() > 0.95
    assert torch.equal(boxes[ok], ref_boxes[ok])
    torch.testing.assert_close(thr[ok], ref_thr[ok], rtol=1e-5, atol=1e-5 * float(maps.abs().max()))


def test_taps_are_torch_upsampling():
    maps = _maps("normal", n=5, h=5, w=9)
    (ti, tw), (xi, xw) = _taps(5, 97), _taps(9, 130)
    rows = (maps.numpy()[:, :, xi] * xw).sum(axis=-1)  # (N, 5, 130)
    up = (rows[:, ti] * tw[None, :, :, None]).sum(axis=2)  # (N, 97, 130)
    np.testing.assert_allclose(up, upsample_maps(maps, (97, 130)).numpy(), rtol=0, atol=1e-5 * float(maps.abs().max()))


def test_without_numba_the_dense_path_gives_the_boxes(monkeypatch):
    maps = _maps("prototype", n=20)
    fast = high_activation_boxes(maps, (224, 224))[0]
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    assert torch.equal(high_activation_boxes(maps, (224, 224))[0], fast)


def test_the_redo_path_is_the_dense_computation():
    """Maps whose boxes the kernel cannot vouch for are redone on torch's own upsampled values."""
    from models.activation_boxes import _redo_boxes

    for percentile, size in ((95.0, (224, 224)), (37.3, (97, 130)), (100.0, (50, 50)), (0.0, (31, 17)), (99.9, (137, 73))):
        maps = _maps("normal", n=30, seed=int(percentile))
        boxes, thr = _redo_boxes(maps, size, percentile)
        ref_boxes, ref_thr = dense_high_activation_boxes(maps, size, percentile)
        assert torch.equal(boxes, ref_boxes) and torch.equal(thr, ref_thr)


def _boxes_in_child(maps):
    torch.set_num_threads(2)  # so that the kernels use their thread pool
    return high_activation_boxes(maps, (224, 224))[0]


@needs_numba
def test_kernels_work_in_a_forked_child():
    """A child forked after the kernels' thread pool started has none of its threads: it makes its own."""
    import multiprocessing

    maps = _maps("prototype", n=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = high_activation_boxes(maps, (224, 224))[0]
    finally:
        torch.set_num_threads(threads)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert torch.equal(pool.apply_async(_boxes_in_child, (maps,)).get(timeout=120), ref)


def test_extreme_magnitudes_and_maps_that_require_grad():
    """Found in review: float32 sums that overflow, tie margins that underflow, and autograd inputs."""
    g = torch.Generator().manual_seed(0)
    huge = torch.full((1, 3, 3), -3e38)
    huge[0, 1, 1] = 3e38
    cases = [(huge, (16, 16)), (torch.rand(16, 7, 7, generator=g) * 3.4e38, (224, 224)),
             (torch.randn(64, 7, 7, generator=g) * 1e-43, (224, 224)), (torch.randn(16, 7, 7, generator=g) * 1e-41, (97, 130))]
    for maps, size in cases:
        boxes, thr = high_activation_boxes(maps, size)
        ref_boxes, ref_thr = dense_high_activation_boxes(maps, size)
        assert torch.equal(boxes, ref_boxes)
        assert torch.equal(thr.isnan(), ref_thr.isnan())
    maps = _maps("prototype", n=8).requires_grad_()
    assert torch.equal(high_activation_boxes(maps, (224, 224))[0], dense_high_activation_boxes(maps.detach(), (224, 224))[0])
