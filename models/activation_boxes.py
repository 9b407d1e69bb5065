"""High-activation boxes: the tight box around the pixels at or above a percentile of an upsampled map.

ProtoPNet's `find_high_activation_crop` upsamples a prototype's (h, w) activation map bicubically to
the image size, takes the 95th percentile and boxes the pixels at or above it. Done literally for the
2,000 prototypes of a CUB model that is 100M upsampled pixels and 2,000 selections: most of a push.

`high_activation_boxes` gives the same boxes without upsampling whole maps. Bicubic upsampling is
separable and, between two source rows (columns), each output row is a cubic polynomial in its
fractional source coordinate, so on a block of output pixels the upsampled map is a bicubic patch.
Written in the Bernstein basis, the patch lies between the smallest and largest of its 16
coefficients, which are a linear function of the map (two small matrix products). A regular
subsample of the upsampled pixels gives a narrow bracket [low, high] around the percentile; the
block bounds then count the blocks wholly above it and drop those wholly below, first 16 x 16 blocks,
then the 8 x 8 blocks of those left; only the rest are upsampled pixel by pixel, and the two order
statistics are selected among their pixels inside the bracket. A map goes the dense way where the
counts show that the bracket missed, where most blocks stay undecided (plateaus), and where pixels
within float rounding of the threshold would change the box. So the boxes equal those of
`dense_high_activation_boxes` (upsample everything, torch.quantile); the thresholds agree up to the
rounding of the interpolation sums.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dense_high_activation_boxes", "high_activation_boxes", "upsample_maps"]

_CUBIC_A = -0.75  # torch and cv2 INTER_CUBIC


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) -> (N, H, W) bicubic (the official code uses cv2 INTER_CUBIC; both use a = -0.75)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]


def _quantile_ranks(n: int, percentile: float) -> tuple[int, int, Tensor]:
    """torch.quantile's 'linear' order statistics, as 1-based ranks from the top, and the lerp weight.

    As torch computes them: q rounded to float32, its rank q (n - 1) and that rank's fraction in double.
    """
    rank = float(torch.tensor(percentile / 100, dtype=torch.float32)) * (n - 1)
    below, above = math.floor(rank), math.ceil(rank)
    return n - below, n - above, torch.tensor(rank - below, dtype=torch.float32)


def _box_of_mask(mask: Tensor) -> Tensor:
    """(N, H, W) bool, each with some True -> (N, 4) (x0, y0, x1, y1), x1/y1 exclusive."""
    rows, cols = mask.any(dim=2).int(), mask.any(dim=1).int()  # argmax below = first True
    y0, y1 = rows.argmax(dim=1), mask.shape[1] - rows.flip(1).argmax(dim=1)
    x0, x1 = cols.argmax(dim=1), mask.shape[2] - cols.flip(1).argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def dense_high_activation_boxes(
    maps: Tensor, size: tuple[int, int], percentile: float = 95.0, chunk: int = 64
) -> tuple[Tensor, Tensor]:
    """The literal computation: upsample every map, torch.quantile, box. The reference for the fast path."""
    if len(maps) == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=maps.device), torch.zeros(0, device=maps.device)
    boxes, thresholds = [], []
    for part in maps.split(chunk):
        up = upsample_maps(part, size)
        # Same linear interpolation between order statistics as np.percentile's default.
        thr = torch.quantile(up.flatten(1), percentile / 100, dim=1)
        boxes.append(_box_of_mask(up >= thr[:, None, None]))
        thresholds.append(thr)
    return torch.cat(boxes), torch.cat(thresholds)


# ------------------------------------------------------------------------------------ one axis
_COARSE, _FINE = 16, 8  # block sides: all coarse blocks are bounded, then the fine blocks of the mixed ones
_SAMPLE = 4  # the threshold is first estimated from every 4th row and column
_SPREAD = 12  # the estimated bracket spans this many sample ranks either side of the estimate
_CROWDED = 0.25  # maps whose undecided fine blocks hold more than this share of the pixels go dense


@dataclass(frozen=True)
class _Axis:
    """The blocks of one axis: runs of output indices that share their four source taps, cut into
    coarse blocks of at most _COARSE and those into fine blocks of at most _FINE.

    Coarse: start, size (G,), control (G, 4, n_in) Bernstein control weights (every output row of block
    g is a convex combination of control[g]). Fine, two per coarse block (padding where there is one):
    fine_start, fine_size (G, 2), fine_control (G, 2 * 4, n_in), fine_id (G, 2). Pixels of fine block f:
    weights (F, _FINE, n_in), torch's own interpolation weights, zero rows as padding; valid (F, _FINE).
    samples (S, n_in): the weights of every _SAMPLE-th output, for the estimate.
    """

    start: Tensor
    size: Tensor
    control: Tensor
    fine_start: Tensor
    fine_size: Tensor
    fine_control: Tensor
    fine_id: Tensor
    weights: Tensor
    valid: Tensor
    samples: Tensor


def _bernstein_from_samples() -> Tensor:
    """(4, 4) matrix taking a cubic's values at u = 0, 1/3, 2/3, 1 to its Bernstein coefficients."""
    u = torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64)[:, None]
    p = torch.arange(4, dtype=torch.float64)[None]
    binom = torch.tensor([1, 3, 3, 1], dtype=torch.float64)[None]
    return torch.linalg.inv(binom * u**p * (1 - u) ** (3 - p))


def _cubic_weights(t: Tensor) -> Tensor:
    """(..., 4) bicubic convolution weights of the taps floor - 1 .. floor + 2 at fraction t."""
    a = _CUBIC_A
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


@functools.lru_cache(maxsize=16)
def _axis(n_in: int, n_out: int) -> _Axis:
    src = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5  # torch, align_corners=False
    floor = src.floor()
    frac = src - floor
    to_bern = _bernstein_from_samples()
    u = torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64)

    def control(lo: int, hi: int) -> Tensor:  # (4, n_in): the rows lo..hi-1 share their taps
        t0, t1 = frac[lo], frac[hi - 1]
        taps = (floor[lo].long() + torch.arange(-1, 3)).clamp(0, n_in - 1)
        return torch.zeros(4, n_in, dtype=torch.float64).index_add_(1, taps, to_bern @ _cubic_weights(t0 + (t1 - t0) * u))

    cuts = torch.cat([torch.tensor([0]), (floor[1:] != floor[:-1]).nonzero()[:, 0] + 1, torch.tensor([n_out])]).tolist()
    coarse = [(lo, min(lo + _COARSE, hi)) for a, hi in zip(cuts, cuts[1:]) for lo in range(a, hi, _COARSE)]
    fine = [[(f, min(f + _FINE, hi)) for f in range(lo, hi, _FINE)] for lo, hi in coarse]
    flat = [b for group in fine for b in group]
    g = len(coarse)
    fine_start, fine_size, fine_id = (torch.zeros(g, 2, dtype=torch.long) for _ in range(3))
    fine_control = torch.zeros(g, 2 * 4, n_in, dtype=torch.float64)
    n = 0
    for c, group in enumerate(fine):
        for k, (lo, hi) in enumerate(group):
            fine_start[c, k], fine_size[c, k], fine_id[c, k] = lo, hi - lo, n
            fine_control[c, 4 * k: 4 * k + 4] = control(lo, hi)
            n += 1
    exact = upsample_maps(torch.eye(n_in).view(n_in, n_in, 1), (n_out, 1))[..., 0].T  # (n_out, n_in)
    weights = torch.zeros(len(flat), _FINE, n_in, dtype=torch.float32)
    valid = torch.zeros(len(flat), _FINE, dtype=torch.bool)
    for f, (lo, hi) in enumerate(flat):
        weights[f, : hi - lo], valid[f, : hi - lo] = exact[lo:hi], True
    return _Axis(
        torch.tensor([lo for lo, _ in coarse]), torch.tensor([hi - lo for lo, hi in coarse]),
        torch.stack([control(lo, hi) for lo, hi in coarse]).float(),
        fine_start, fine_size, fine_control.float(), fine_id, weights, valid, exact[_SAMPLE // 2:: _SAMPLE])


# ------------------------------------------------------------------------------------ fast boxes
def high_activation_boxes(
    maps: Tensor, size: tuple[int, int], percentile: float = 95.0, chunk: int = 128
) -> tuple[Tensor, Tensor]:
    """Tight boxes around the pixels at or above the `percentile` of each bicubically upsampled map.

    Args:
        maps: (N, h, w) activation (similarity) maps at latent resolution.
        size: (H, W) input resolution.
        percentile: ProtoPNet's `find_high_activation_crop` uses 95.
        chunk: maps per step (bounds memory).

    Returns:
        boxes (N, 4) int64 as (x0, y0, x1, y1), x1/y1 exclusive, and the thresholds (N,).
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    maps = maps.float()
    # The blockwise path saves arithmetic at the price of many small steps, which suits a CPU; an
    # accelerator runs the dense computation as one batched call. Maps one cell high or wide have
    # all output lines along that axis equal, and percentile 0 or 100 puts the threshold on a pixel's
    # own value: there the box depends on how the sums round, so torch's own rounding decides.
    if (maps.device.type != "cpu" or maps.numel() == 0 or size[0] * size[1] <= 1024 or min(size) < _SAMPLE
            or percentile in (0, 100) or min(maps.shape[1:]) == 1 or not bool(torch.isfinite(maps).all())):
        return dense_high_activation_boxes(maps, size, percentile)
    rows, cols = _axis(maps.shape[1], size[0]), _axis(maps.shape[2], size[1])
    parts = [_blockwise_boxes(part, rows, cols, size, percentile) for part in maps.split(chunk)]
    return torch.cat([b for b, _ in parts]), torch.cat([t for _, t in parts])


def _compact(keep: Tensor, *slots: Tensor) -> list[Tensor]:
    """Move each row's kept entries to the front (in order) and drop the columns no row needs."""
    width = max(int(keep.sum(dim=1).max()), 1)
    where = torch.where(keep, keep.cumsum(dim=1) - 1, width)  # the dropped ones go to a spare column
    return [torch.zeros(s.shape[0], width + 1, dtype=s.dtype, device=s.device).scatter_(1, where, s)[:, :width]
            for s in (keep,) + slots]


def _rows(table: Tensor, index: Tensor) -> Tensor:
    """table (G, ...) rows picked by index (N, K) -> (N * K, ...), by index_select (fast on CPU)."""
    return table.index_select(0, index.flatten())


def _extent(box: list[Tensor], where: Tensor, y0: Tensor, x0: Tensor, y1: Tensor, x1: Tensor) -> list[Tensor]:
    """Grow the running (y0, x0, y1, x1) box of each map by the blocks (N, K) where `where`."""
    big = torch.iinfo(torch.long).max
    return [box[0].minimum(torch.where(where, y0, big).amin(dim=1)), box[1].minimum(torch.where(where, x0, big).amin(dim=1)),
            box[2].maximum(torch.where(where, y1, -1).amax(dim=1)), box[3].maximum(torch.where(where, x1, -1).amax(dim=1))]


def _kth_largest_pair(values: Tensor, keep: Tensor, k: Tensor, k_next: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the k-th and k_next-th (k_next in {k, k - 1}) largest of values[keep] (rows with
    fewer than k kept values give junk).

    kthvalue over all rows at once: each row's kept values are packed behind j_max - j spare -inf,
    so that its k-th largest (its j-th smallest) is the j_max-th smallest of its packed row.
    """
    count = keep.sum(dim=1)
    j = (count - k + 1).clamp_min(1)
    pad = j.max() - j
    width = max(int((pad + count).max()), 1) + 1
    where = torch.where(keep, keep.cumsum(dim=1) - 1 + pad[:, None], width)
    packed = torch.full((values.shape[0], width + 1), float("inf"), dtype=values.dtype, device=values.device)
    packed[:, :width].masked_fill_(torch.arange(width, device=values.device)[None] < pad[:, None], float("-inf"))
    packed = packed.scatter_(1, where, values)[:, :width]
    at = int(j.max())
    kth = packed.kthvalue(at, dim=1).values
    return kth, torch.where(k_next < k, packed.kthvalue(at + 1, dim=1).values, kth)


def _blockwise_boxes(maps: Tensor, rows: _Axis, cols: _Axis, size: tuple[int, int], percentile: float) -> tuple[Tensor, Tensor]:
    """Boxes of one chunk; maps whose estimated bracket turns out not to hold go the dense way."""
    num, h, w = maps.shape
    device = maps.device
    n = size[0] * size[1]
    rank_below, rank_above, weight = _quantile_ranks(n, percentile)
    big = torch.iinfo(torch.long).max
    box = [torch.full((num,), fill, device=device) for fill in (big, big, -1, -1)]  # y0, x0, y1, x1
    g_r, g_c = len(rows.start), len(cols.start)
    margin = 1e-5 * maps.abs().flatten(1).amax(dim=1).clamp_min(1e-30)[:, None]

    # A bracket [low, high] for both order statistics, estimated from a regular subsample of pixels.
    sample = (rows.samples @ maps @ cols.samples.T).flatten(1)
    m = sample.shape[1]
    at = min(max(round(rank_below * m / n), 1), m)
    top = sample.topk(min(at + _SPREAD, m), dim=1).values
    low, high = top[:, -1], top[:, max(at - _SPREAD, 1) - 1]
    if at + _SPREAD > m:
        low = torch.full_like(low, float("-inf"))
    if at - _SPREAD < 1:
        high = torch.full_like(high, float("inf"))

    # Coarse blocks, bounded by their 4 x 4 Bernstein coefficients: wholly above high counted, wholly
    # below low dropped, the rest refined.
    coeff = (rows.control.view(g_r * 4, h) @ maps @ cols.control.view(g_c * 4, w).T).view(num, g_r, 4, g_c, 4)
    lo = coeff.amin(dim=4).amin(dim=2) - margin[:, :, None]  # (N, g_r, g_c); one dim at a time is faster
    hi = coeff.amax(dim=4).amax(dim=2) + margin[:, :, None]
    above = lo > high[:, None, None]
    mixed = (~above & (hi >= low[:, None, None])).flatten(1)
    counted = ((rows.size[:, None] * cols.size[None, :]) * above).flatten(1).sum(dim=1)
    for axis, (lines, start, stop) in enumerate(((above.any(dim=2), 0, 2), (above.any(dim=1), 1, 3))):
        blocks = (rows, cols)[axis]
        some = lines.any(dim=1)
        first, last = lines.int().argmax(dim=1), lines.shape[1] - 1 - lines.int().flip(1).argmax(dim=1)
        box[start] = torch.where(some, blocks.start[first], box[start])
        box[stop] = torch.where(some, blocks.start[last] + blocks.size[last], box[stop])
    ci = torch.arange(g_r, device=device).repeat_interleave(g_c).expand(num, -1)
    cj = torch.arange(g_c, device=device).repeat(g_r).expand(num, -1)

    # Their fine blocks: 2 x 2 each, the same way.
    active, ci, cj = _compact(mixed, ci, cj)
    left = (rows.fine_control.view(-1, h) @ maps).view(-1, 2 * 4, w)  # (N * g_r, 8, w)
    coeff = torch.bmm(_rows(left, ci + torch.arange(num, device=device)[:, None] * g_r),
                      _rows(cols.fine_control, cj).transpose(1, 2)).view(num, -1, 2, 4, 2, 4)
    lo, hi = coeff.amin(dim=5).amin(dim=3).flatten(1) - margin, coeff.amax(dim=5).amax(dim=3).flatten(1) + margin
    sizes_r, sizes_c = _rows(rows.fine_size, ci).view(num, -1, 2, 1), _rows(cols.fine_size, cj).view(num, -1, 1, 2)
    exists = (active[:, :, None, None] & (sizes_r > 0) & (sizes_c > 0)).flatten(1)
    above, mixed = exists & (lo > high[:, None]), exists & (lo <= high[:, None]) & (hi >= low[:, None])
    # Maps with broad plateaus near the percentile leave most blocks undecided: those go dense, as
    # cheap there and without a large (N, K, B, B) tensor of undecided pixels.
    crowded = (mixed.sum(dim=1) * _FINE * _FINE) > _CROWDED * size[0] * size[1]
    mixed &= ~crowded[:, None]
    counted = counted + ((sizes_r * sizes_c).flatten(1) * above).sum(dim=1)
    grid = lambda t: t.expand(-1, -1, 2, 2).flatten(1)  # noqa: E731  (N, K, 2, 1) or (N, K, 1, 2) -> (N, 4K)
    fy, fx = grid(_rows(rows.fine_start, ci).view(num, -1, 2, 1)), grid(_rows(cols.fine_start, cj).view(num, -1, 1, 2))
    box = _extent(box, above, fy, fx, fy + grid(sizes_r), fx + grid(sizes_c))

    # Pixels of the mixed fine blocks.
    fi, fj = grid(_rows(rows.fine_id, ci).view(num, -1, 2, 1)), grid(_rows(cols.fine_id, cj).view(num, -1, 1, 2))
    active, fi, fj, fy, fx = _compact(mixed, fi, fj, fy, fx)
    left = (rows.weights.view(-1, h) @ maps).view(-1, _FINE, w)  # (N * F_r, B, w)
    vals = torch.bmm(_rows(left, fi + torch.arange(num, device=device)[:, None] * len(rows.weights)),
                     _rows(cols.weights, fj).transpose(1, 2)).view(num, -1, _FINE, _FINE)
    vals = vals.masked_fill(~active[:, :, None, None], float("-inf"))
    if not (bool(rows.valid.all()) and bool(cols.valid.all())):  # blocks narrower than _FINE: mask their padding
        inside_image = _rows(rows.valid, fi).view(num, -1, _FINE, 1) & _rows(cols.valid, fj).view(num, -1, 1, _FINE)
        vals = vals.masked_fill(~inside_image, float("-inf"))
    flat = vals.flatten(1)
    over = flat > high[:, None]
    counted = counted + over.sum(dim=1)
    keep = ~over & (flat >= low[:, None])
    k_below, k_above = rank_below - counted, rank_above - counted
    # The estimate holds where both order statistics are among the kept pixels.
    holds = (k_above >= 1) & (k_below <= keep.sum(dim=1)) & ~crowded
    v_below, v_above = _kth_largest_pair(flat, keep & holds[:, None], k_below.clamp_min(1), k_above.clamp_min(1))
    thr = torch.lerp(v_below, v_above, weight.to(device))

    def pixel_box(threshold: Tensor) -> Tensor:  # the box with the evaluated pixels >= threshold
        inside = vals >= threshold[:, None, None, None]  # (N, K, B, B)
        has_r, has_c = inside.any(dim=3), inside.any(dim=2)  # (N, K, B)
        first_r, last_r = has_r.int().argmax(dim=2), _FINE - has_r.int().flip(2).argmax(dim=2)
        first_c, last_c = has_c.int().argmax(dim=2), _FINE - has_c.int().flip(2).argmax(dim=2)
        y0, x0, y1, x1 = _extent(box, has_r.any(dim=2), fy + first_r, fx + first_c, fy + last_r, fx + last_c)
        return torch.stack([x0, y0, x1, y1], dim=1)

    # Pixels this close to the threshold may fall on the other side of it in torch's own rounding of
    # the sums (float32, 16 terms with weights summing below 1.25 in absolute value: under 2e-6 of the
    # largest |map| value). The box at thr lies between those at thr + tie and thr - tie; where these
    # differ, torch's dense computation decides.
    tie = 4e-6 * maps.abs().flatten(1).amax(dim=1)
    boxes = pixel_box(thr + tie)
    holds &= (pixel_box(thr - tie) == boxes).all(dim=1)
    if not bool(holds.all()):
        redo = (~holds).nonzero()[:, 0]
        boxes[redo], thr[redo] = dense_high_activation_boxes(maps[redo], size, percentile)
    return boxes, thr
