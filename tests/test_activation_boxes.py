"""High-activation boxes without upsampling whole maps, checked against the literal computation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.activation_boxes import _axis, _quantile_ranks, dense_high_activation_boxes, high_activation_boxes, upsample_maps


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


@pytest.mark.parametrize("n_in, n_out", [(7, 224), (7, 150), (14, 448), (5, 97)])
def test_block_bounds_contain_every_upsampled_value(n_in, n_out):
    """The lemma the fast path stands on: on each block the map lies between its Bernstein coefficients."""
    rows = _axis(n_in, n_out)
    maps = _maps("normal", n=50, h=n_in, w=n_in, seed=1)
    up = upsample_maps(maps, (n_out, n_out))
    coeff = torch.einsum("gph,nhw,kqw->ngkpq", rows.control, maps, rows.control)  # (N, G, G, 4, 4)
    lo, hi = coeff.amin(dim=(3, 4)), coeff.amax(dim=(3, 4))
    for g, (start, size) in enumerate(zip(rows.start.tolist(), rows.size.tolist())):
        for k, (cstart, csize) in enumerate(zip(rows.start.tolist(), rows.size.tolist())):
            block = up[:, start:start + size, cstart:cstart + csize].flatten(1)
            scale = 1e-5 * maps.abs().flatten(1).amax(dim=1)
            assert (block.amin(dim=1) >= lo[:, g, k] - scale).all() and (block.amax(dim=1) <= hi[:, g, k] + scale).all()
    # Blocks tile the axis, and the fine blocks tile each coarse one.
    assert rows.start.tolist() == np.cumsum([0] + rows.size.tolist()[:-1]).tolist() and int(rows.size.sum()) == n_out
    sizes = rows.fine_size.sum(dim=1)
    assert torch.equal(sizes, rows.size) and torch.equal(rows.fine_start[:, 0], rows.start)


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
        _axis.cache_clear()
        assert torch.equal(high_activation_boxes(maps, (224, 224))[0], ref)
    finally:
        torch.set_default_dtype(default)
        _axis.cache_clear()
