"""Filter metrics: location instability and part interpretability against hand computations."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from explain.filter_metrics import (
    activation_thresholds,
    filter_class_assignment,
    layer_activations,
    location_instability,
    part_interpretability,
)
from models.backbones import ReceptiveField

torch.set_num_threads(2)


class Toy(nn.Module):
    """The 'layer' is a 2x2 average pool of the first `channels` image channels: 8x8 images give
    4x4 maps whose values are written into the images block by block."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.pool = nn.AvgPool2d(2)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x[:, : self.channels]).flatten(1) + self.bias


def images_with_cells(cells: dict[tuple[int, int], tuple[int, int, float]], n: int = 4) -> torch.Tensor:
    """(image, channel) -> (row, col, value) of the one non-zero 4x4 cell."""
    images = torch.zeros(n, 3, 8, 8)
    for (img, ch), (i, j, v) in cells.items():
        images[img, ch, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = v
    return images


# filter 0 peaks: image 0 at cell (0,0) score 4, image 1 (1,2) 3, image 2 (3,3) 2, image 3 (2,1) 1;
# filter 1 always peaks at cell (3,0) with scores 1, 2, 3, 4.
CELLS = {(0, 0): (0, 0, 4.0), (1, 0): (1, 2, 3.0), (2, 0): (3, 3, 2.0), (3, 0): (2, 1, 1.0)}
CELLS.update({(n, 1): (3, 0, float(n + 1)) for n in range(4)})
# landmark 0 at (x=0.5, y=0.5) everywhere; landmark 1 at (x=4.5, y=2.5), hidden in image 2
KEYPOINTS = torch.tensor([[[0.5, 0.5, 1.0], [4.5, 2.5, 1.0]]] * 4)
KEYPOINTS[2, 1, 2] = 0.0
DIAGONAL = math.hypot(8, 8)


def batches(images, **extra):
    return [{"image": images[:2], **{k: v[:2] for k, v in extra.items()}},
            {"image": images[2:], **{k: v[2:] for k, v in extra.items()}}]


def test_location_instability_by_hand():
    images = images_with_cells(CELLS)
    result = location_instability(Toy(), "pool", batches(images, keypoints=KEYPOINTS), top_k=3)
    # evenly tiling cells: centre of cell (i, j) is (y, x) = (2i + 0.5, 2j + 0.5)
    # filter 0, landmark 0, top-3 images 0, 1, 2: centres (0.5,0.5), (2.5,4.5), (6.5,6.5)
    d00 = statistics.stdev([0.0, math.sqrt(4**2 + 2**2), math.sqrt(6**2 + 6**2)])
    # landmark 1 (x=4.5, y=2.5) hidden in image 2 -> images 0, 1, 3; image 3 centre (4.5, 2.5)
    d01 = statistics.stdev([math.sqrt(4**2 + 2**2), 0.0, math.sqrt(2**2 + 2**2)])
    expected = torch.tensor([[d00, d01], [0.0, 0.0]]) / DIAGONAL  # filter 1 never moves
    torch.testing.assert_close(result.per_filter_part, expected)
    assert result.value == pytest.approx((d00 + d01) / 2 / DIAGONAL / 2)
    # only the landmarks asked for; images restricted to the filter's class
    only_first = location_instability(Toy(), "pool", batches(images, keypoints=KEYPOINTS), top_k=3, parts=[0])
    assert only_first.per_filter_part.shape == (2, 1)
    labels = torch.tensor([0, 0, 1, 0])
    by_class = location_instability(Toy(), "pool", batches(images, keypoints=KEYPOINTS, label=labels), top_k=3,
                                    parts=[0], filter_classes=torch.tensor([0, 0]))
    d = statistics.stdev([0.0, math.sqrt(20), math.sqrt(20)])  # images 0, 1, 3
    assert by_class.per_filter_part[0, 0].item() == pytest.approx(d / DIAGONAL)


def test_location_instability_uses_the_receptive_field_centres():
    images = images_with_cells(CELLS)
    rf = ReceptiveField(size=4, jump=2.0, rf=5.0, start=2.0, image_size=8)  # centres one pixel further
    result = location_instability(Toy(), "pool", batches(images, keypoints=KEYPOINTS), top_k=3, parts=[0], receptive_field=rf)
    d = statistics.stdev([math.sqrt(2), math.sqrt(5**2 + 3**2), math.sqrt(7**2 + 7**2)])
    assert result.per_filter_part[0, 0].item() == pytest.approx(d / DIAGONAL)


def test_location_instability_needs_two_images_per_landmark():
    images = images_with_cells(CELLS)
    keypoints = KEYPOINTS.clone()
    keypoints[1:, 1, 2] = 0.0  # landmark 1 visible in image 0 only
    result = location_instability(Toy(), "pool", batches(images, keypoints=keypoints))
    assert torch.isnan(result.per_filter).all() and math.isnan(result.value)


# part masks (S = 2): part 0 in every image, part 1 only in images 1 and 3
PART_MASKS = torch.zeros(4, 2, 8, 8, dtype=torch.bool)
PART_MASKS[0, 0, 0:2, 0:3] = True  # region of filter 0 in image 0 is rows 0-1, cols 0-1: IoU 4/6
PART_MASKS[1, 0, 0:4, 0] = True  # far from the region (rows 2-3, cols 4-5): IoU 0
PART_MASKS[2, 0, 6:8, 6:8] = True  # equal to the region: IoU 1
PART_MASKS[3, 0, 0:4, 0:4] = True  # filter 0 is below threshold in image 3: empty region
PART_MASKS[1, 1, :, 3:7] = True  # 32 pixels containing the 4-pixel region: IoU 1/8 < 0.2
PART_MASKS[3, 1, 4:6, 2:4] = True


def test_part_interpretability_by_hand():
    images = images_with_cells(CELLS)
    toy = Toy()
    loader = batches(images, part_masks=PART_MASKS)
    # 64 positions per filter, top 5% -> k = 3: T_0 = 4th largest of filter 0 = 1 (values 4, 3, 2, 1, 0...)
    # filter 1 values 4, 3, 2, 1 -> T_1 = 1 as well
    result = part_interpretability(toy, "pool", loader, top_fraction=0.05, upsample="nearest")
    torch.testing.assert_close(result.thresholds, torch.tensor([1.0, 1.0]))
    # filter 0: part 0 hits in images 0 and 2 of 4; part 1 misses in images 1 and 3
    # filter 1 (cell (3,0) = rows 6-7, cols 0-1, above threshold in images 1, 2, 3): part 0 IoU 0 in
    # images 1, 2 and 0/(4+16) in image 3; part 1: image 1 IoU 0, image 3 IoU 0
    expected = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(result.per_filter_part, expected)
    torch.testing.assert_close(result.per_filter, torch.tensor([0.5, 0.0]))
    assert result.value == pytest.approx(0.25) and result.best_part[0] == 0
    # filter 0 scored on its class only (images 0, 1 -> hit, miss on part 0; part 1 in image 1 only)
    labels = torch.tensor([0, 0, 1, 1])
    by_class = part_interpretability(toy, "pool", batches(images, part_masks=PART_MASKS, label=labels),
                                     upsample="nearest", thresholds=result.thresholds,
                                     filter_classes=torch.tensor([0, 1]))
    assert by_class.per_filter_part[0].tolist() == [0.5, 0.0]
    # a stricter IoU threshold turns image 0 (IoU 2/3) into a miss
    strict = part_interpretability(toy, "pool", loader, upsample="nearest", thresholds=result.thresholds, iou_threshold=0.7)
    assert strict.per_filter_part[0, 0].item() == pytest.approx(0.25)
    # IoU must exceed the threshold: an IoU of exactly 0.5 (4 of 8 pixels) is a miss at 0.5
    masks = PART_MASKS.clone()
    masks[0, 0, 0:2, 0:4] = True
    exact = part_interpretability(toy, "pool", batches(images, part_masks=masks), upsample="nearest",
                                  thresholds=result.thresholds, iou_threshold=0.5)
    assert exact.per_filter_part[0, 0].item() == pytest.approx(0.25)


def test_thresholds_equal_brute_force_order_statistics():
    torch.manual_seed(0)
    images = torch.rand(10, 3, 8, 8)
    loader = [{"image": images[i : i + 3]} for i in range(0, 10, 3)]
    thresholds = activation_thresholds(Toy(3), "pool", loader, top_fraction=0.05)
    acts = nn.AvgPool2d(2)(images).permute(1, 0, 2, 3).reshape(3, -1)
    k = math.floor(0.05 * acts.shape[1])
    brute = acts.sort(dim=1, descending=True).values[:, k]
    torch.testing.assert_close(thresholds, brute)
    assert torch.all((acts > thresholds[:, None]).sum(dim=1) == k)


def test_filter_class_assignment_by_hand():
    images = images_with_cells(CELLS)
    labels = torch.tensor([0, 1, 1, 0])
    images[0, 0] *= 2
    images[1, 1] *= 3
    # class sums of the (one-cell) activations: filter 0: class 0 8 + 1, class 1 3 + 2 -> 0;
    # filter 1: class 0 1 + 4, class 1 6 + 3 -> 1
    classes = filter_class_assignment(Toy(), "pool", batches(images, label=labels), num_classes=2)
    assert classes.tolist() == [0, 1]
    with pytest.raises(ValueError, match="statistic"):
        filter_class_assignment(Toy(), "pool", batches(images, label=labels), num_classes=2, statistic="sum")


def test_filter_class_assignment_by_the_mean_peak():
    """The released multi-class stability script: argmax_c of the class-wise mean of max_ij x. A
    filter with one strong peak on class 0 and broad weak activation on class 1 goes to class 0 by
    the peak, to class 1 by the mean."""
    images = torch.zeros(4, 3, 8, 8)
    labels = torch.tensor([0, 0, 1, 1])
    images[0:2, 0, 0:2, 0:2] = 4.0  # one 4x4 cell at 4: mean 4 / 16 = 0.25, max 4
    images[2:4, 0] = 0.5  # every cell at 0.5: mean 0.5, max 0.5
    images[:, 1] = torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None, None]  # filter 1: class 1 by both
    loader = batches(images, label=labels)
    assert filter_class_assignment(Toy(), "pool", loader, num_classes=2).tolist() == [1, 1]
    assert filter_class_assignment(Toy(), "pool", loader, num_classes=2, statistic="max").tolist() == [0, 1]


class MaskedToy(nn.Module):
    """An interpretable layer whose new conv copies image channel 0: its raw output is that channel."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        from models.icnn import InterpretableLayer

        self.layer = InterpretableLayer(1, 2, conv=False, variant=variant)
        self.layer.conv = nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.layer.conv.weight.zero_()
            self.layer.conv.weight[0, 0, 1, 1] = 1.0
            self.layer.conv.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer(images[:, :1]).masked


def test_location_instability_reads_the_raw_map_where_the_masked_peak_moves():
    """A sharp peak (1.0) away from a broad block (16 pixels at 0.6): the centroid mask of the released
    code sits in the block and zeroes the peak, so the masked map peaks in the block. The raw map (what
    computeStability.m reads) peaks at the sharp peak; with the paper's argmax mask the two agree."""
    peaks = [(0, 0), (0, 2), (1, 0)]  # (row, col) per image; the block fills rows 4-7, cols 4-7
    images = torch.zeros(3, 3, 8, 8)
    for n, (i, j) in enumerate(peaks):
        images[n, 0, 4:8, 4:8] = 0.6 - 0.01 * n
        images[n, 0, i, j] = 1.0
    keypoints = torch.tensor([[[1.0, 1.0, 1.0]]] * 3)  # (x, y) = (1, 1)
    loader = [{"image": images, "keypoints": keypoints}]
    toy = MaskedToy("released_code")
    raw = location_instability(toy, toy.layer.conv, loader)
    # the map tiles the image 1:1: cell (i, j) is centred on pixel (y, x) = (i, j)
    d = statistics.stdev([math.hypot(j - 1.0, i - 1.0) for i, j in peaks]) / DIAGONAL
    assert raw.value == pytest.approx(d)
    masked = location_instability(toy, toy.layer.out, loader)
    with torch.no_grad():
        masked_maps = toy(images)[:, 0]
    assert all(masked_maps[n].flatten().argmax() // 8 >= 4 for n in range(3))  # peaks inside the block
    assert abs(masked.value - raw.value) > 0.01
    paper = MaskedToy("paper")
    assert location_instability(paper, paper.layer.out, loader).value == pytest.approx(
        location_instability(paper, paper.layer.conv, loader).value)


def test_hooks_are_removed_even_on_errors():
    toy = Toy()
    images = images_with_cells(CELLS)
    loader = [{"image": images[:2], "part_masks": PART_MASKS[:2]}, {"image": images[2:]}]  # 2nd lacks masks
    with pytest.raises(KeyError, match="part_masks"):
        part_interpretability(toy, "pool", loader, thresholds=torch.ones(2))
    assert not toy.pool._forward_hooks
    with pytest.raises(ValueError, match="no submodule"):
        location_instability(toy, "nope", loader)
    assert layer_activations(toy, toy.pool, images).shape == (4, 2, 4, 4) and not toy.pool._forward_hooks


def test_metrics_run_on_an_interpretable_cnn():
    from models import create_model

    torch.manual_seed(0)
    net = create_model("icnn_test_resnet", num_classes=2)
    images = torch.rand(6, 3, 32, 32)
    masks = torch.zeros(6, 2, 32, 32, dtype=torch.bool)
    masks[:, 0, 8:16, 8:16] = True
    masks[:, 1, 20:30, 0:10] = True
    keypoints = torch.tensor([[[12.0, 12.0, 1.0], [5.0, 25.0, 1.0]]] * 6)
    loader = batches(images, part_masks=masks, keypoints=keypoints)
    pi = part_interpretability(net, net.feature_layer, loader)
    assert 0.0 <= pi.value <= 1.0 and pi.per_filter.shape == (48,)
    li = location_instability(net, net.feature_layer, loader)  # uses net.receptive_field
    assert li.per_filter.shape == (48,) and li.value >= 0
