"""Network Dissection: streamed quantiles against torch.quantile, pooled IoU by hand and by brute force,
a ground-truth part unit labelled with its part on SyntheticParts, the Broden reader, the report."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from explain.concepts import BrodenConcepts, ConceptSet, concept_maps_from_masks
from explain.dissect import StreamingQuantile, count_detectors, default_layer, dissect, layer_output, write_report
from train.dissect import main

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------ quantiles
def _check_quantile(chunks: list[torch.Tensor], q: float, bins: int) -> None:
    sketch = StreamingQuantile(chunks[0].shape[0], bins=bins)
    for chunk in chunks:
        sketch.update(chunk)
    values = torch.cat(chunks, dim=1).double()
    estimate, bound = sketch.quantile(q)
    exact = torch.quantile(values, q, dim=1)
    assert ((estimate - exact).abs() <= bound * (1 + 1e-9) + 1e-12).all(), (estimate, exact, bound)
    span = values.amax(dim=1) - values.amin(dim=1)
    varied = span > 0
    # the stated range bound: width < 4 (max - min), so one bin is < 4 (max - min) / bins
    assert (sketch.width[varied] < 4 * span[varied]).all()
    assert sketch.counts.sum(dim=1).eq(values.shape[1]).all()


def test_streamed_quantile_within_its_bound_of_torch_quantile():
    g = torch.Generator().manual_seed(0)
    chunks = []
    for i in range(30):  # the range grows up and down over the stream; units differ in scale
        base = torch.relu(torch.randn(6, 500, generator=g)) * torch.tensor([1.0, 10, 0.1, 3, 1, 1])[:, None]
        base[3] -= 0.5 * i * (i % 4 == 0)
        base[4] = 0.0  # a dead unit
        base[5] = base[5] * (1 + i)  # a unit whose range keeps growing
        chunks.append(base)
    _check_quantile(chunks, 0.995, bins=1024)
    sketch = StreamingQuantile(6, bins=1024)
    for c in chunks:
        sketch.update(c)
    estimate, bound = sketch.quantile(0.995)
    assert estimate[4] == pytest.approx(0.0, abs=1e-5)  # dead unit: threshold 0 within its tiny bin
    # continuous units: the two order statistics at rank q (n - 1) lie in one bin or in adjacent ones
    step = sketch.width[[0, 1, 5]] / 1024
    assert (bound[[0, 1, 5]] <= 2 * step * (1 + 1e-12)).all() and (bound[[0, 1, 5]] >= step).all()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    q=st.floats(0.0, 1.0),
    scale=st.floats(1e-3, 1e3),
    bins=st.sampled_from([2, 8, 64, 512]),
)
def test_streamed_quantile_property(seed, sizes, q, scale, bins):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(3, n, generator=g).mul(scale).round(decimals=1) for n in sizes]  # with ties
    _check_quantile(chunks, q, bins)


def test_streamed_quantile_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        StreamingQuantile(2, bins=7)
    sketch = StreamingQuantile(2, bins=8)
    with pytest.raises(ValueError, match="NaN"):
        sketch.update(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"\(2, N\)"):
        sketch.update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="no values"):
        sketch.quantile(0.5)


# ------------------------------------------------------------------------------------ pooled IoU
class ImageChannels(nn.Module):
    """The dissected 'layer' outputs the image's channels: each channel is a unit whose activation
    map is written into the images by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=(2, 3)))


def test_iou_is_pooled_over_the_dataset_by_hand():
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0, 0:2, 0:2] = 1.0  # unit 0: 4 px in image A
    images[1, 0, 4:7, 0:4] = 1.0  # ... 12 px in image B
    maps = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    maps[0, 0, 0:2, 0:2] = 1  # concept "a": the same 4 px in A
    maps[1, 0, 0:2, 6:8] = 1  # ... 4 px elsewhere in B
    maps[1, 0, 6:8, 0:3] = 2  # concept "b" in B only: 6 px, 3 of them under unit 0 (row 6, cols 0-2)
    annotated = torch.tensor([[True, False], [True, True]])  # image A is not annotated for b's category
    batch = {"image": images, "concept_maps": maps, "annotated": annotated}
    concepts = ConceptSet(("a", "b"), ("object", "part"))
    d = dissect(ImageChannels(), "layer", [batch], concepts, top_fraction=0.2, top_k=2)
    # 16 of 128 positions are 1 for unit 0: its 0.8 quantile is 0 (<= one bin off), so M = the ones
    assert 0 <= d.thresholds[0] < 1e-3
    assert d.intersection[0].tolist() == [4, 3]
    assert d.activation[0].tolist() == [16, 12]  # b counts unit 0's pixels in annotated image B only
    assert d.truth.tolist() == [8, 6]
    assert d.union[0].tolist() == [16 + 8 - 4, 12 + 6 - 3]
    assert d.iou[0].tolist() == pytest.approx([0.2, 0.2])  # the mean of per-image IoUs would be 0.5 for a
    # units 1 and 2 are all zero: no region, no detection
    assert d.intersection[1:].sum() == 0 and d.iou[1:].max() == 0
    assert d.detectors.tolist() == [True, False, False]
    assert d.label(0) == "a" and d.label(1) is None
    assert d.summary()["detectors"] == 1 and d.summary()["concepts"] == 1
    # top images of unit 0 by max activation: both images score 1, slot indices point into thumbnails
    assert sorted(d.top_positions[0].tolist()) == [0, 1]
    assert d.top_images.shape[0] == 2


def _bilinear_numpy(a: np.ndarray, size: int) -> np.ndarray:
    """Reference bilinear resize with half-pixel centres (align_corners=False), edges clamped."""
    n = a.shape[0]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    t = src - i0
    rows = a[i0] * (1 - t)[:, None] + a[i1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i1] * t[None, :]


class LowResUnits(nn.Module):
    """Units = 4x4 average pools of the images' channels (so 16x16 images give 4x4 maps)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.AvgPool2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).sum(dim=(1, 2, 3))[:, None]


def test_pooled_counts_match_brute_force_with_upsampling_and_layers():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 16, 16, generator=g)
    maps = torch.randint(0, 4, (6, 2, 16, 16), generator=g)  # 2 label layers, concepts 1..3
    maps[:, 1] = torch.where(maps[:, 1] == maps[:, 0], 0, maps[:, 1])  # one concept at most once per pixel
    annotated = torch.rand(6, 3, generator=g) > 0.3
    loader = [{"image": images[i:i + 4], "concept_maps": maps[i:i + 4], "annotated": annotated[i:i + 4]} for i in (0, 4)]
    d = dissect(LowResUnits(), "layer", loader, ConceptSet(("x", "y", "z"), ("c1", "c2", "c3")), top_fraction=0.2, top_k=0)
    act = F.avg_pool2d(images, 4).numpy()
    inter, union = np.zeros((3, 3), int), np.zeros((3, 3), int)
    for b in range(6):
        for u in range(3):
            region = _bilinear_numpy(act[b, u], 16) > d.thresholds[u].item()
            for k in range(3):
                label = (maps[b] == k + 1).any(dim=0).numpy()
                inter[u, k] += (region & label).sum()
                union[u, k] += (region.sum() if annotated[b, k] else 0) + label.sum() - (region & label).sum()
    assert d.intersection.numpy().tolist() == inter.tolist()
    assert d.union.numpy().tolist() == union.tolist()
    assert d.num_images == 6


def test_dissect_rejects_bad_batches():
    model, concepts = ImageChannels(), ConceptSet(("a",), ("object",))
    with pytest.raises(KeyError, match="concept_maps' or 'part_masks"):
        dissect(model, "layer", [{"image": torch.zeros(1, 3, 4, 4)}], concepts)
    bad = {"image": torch.zeros(1, 3, 4, 4), "concept_maps": torch.full((1, 1, 4, 4), 5)}
    with pytest.raises(ValueError, match=r"0\.\.1"):
        dissect(model, "layer", [bad], concepts)
    with pytest.raises(ValueError, match="no batches"):
        dissect(model, "layer", [], concepts)
    with pytest.raises(ValueError, match="no layer 'nope'"):
        dissect(model, "nope", [{"image": torch.zeros(1, 3, 4, 4), "part_masks": torch.ones(1, 1, 4, 4)}], concepts)

    class Reshuffled:  # yields the images in another order on the second pass
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            order = [0, 1] if self.passes == 1 else [1, 0]
            return iter([{"image": torch.rand(1, 3, 4, 4), "concept_maps": torch.ones(1, 1, 4, 4, dtype=torch.long),
                          "index": torch.tensor([i])} for i in order])

    with pytest.raises(ValueError, match="same order"):
        dissect(model, "layer", Reshuffled(), concepts)


def test_layer_output_stops_after_the_layer_and_removes_its_hook():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("ran past the dissected layer")

    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), Boom())
    x = torch.randn(2, 3, 8, 8)
    out = layer_output(model, "0", x)
    assert torch.allclose(out, conv(x)) and (out < 0).any()  # the in-place ReLU never ran on it
    assert not conv._forward_hooks
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        layer_output(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), "0", torch.randn(1, 3, 2, 2))


# ------------------------------------------------------------------------------------ SyntheticParts
class PartOracle(nn.Module):
    """Units that fire on ground-truth parts of known images: the forward finds each input in a bank of
    the dataset's images (exact match) and returns, at 1/2 resolution, a blurred mask of each part
    (units 0..3) and smooth noise (unit 4). Blurring peaks a unit at the part's centre, so its top 0.5%
    lies inside the part, as a real part detector's would."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        super().__init__()
        n, s, h, w = masks.shape
        blur = torch.ones(1, 1, 5, 5) / 25
        parts = F.avg_pool2d(F.conv2d(masks.float().flatten(0, 1)[:, None], blur, padding=2), 2).view(n, s, h // 2, w // 2)
        noise = F.avg_pool2d(torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(0)), 2)
        self.register_buffer("bank", images.flatten(1))
        self.register_buffer("units", torch.cat([parts, noise], dim=1))
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distance, index = (x.flatten(1)[:, None] - self.bank[None]).abs().amax(dim=2).min(dim=1)
        assert distance.max() < 1e-6, "an image that is not in the bank"
        return self.layer(self.units[index]).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def synthetic():
    from train.data import SyntheticParts

    dm = SyntheticParts(num_classes=4, image_size=64, train_size=8, val_size=8, test_size=32, batch_size=16, augment=False)
    items = [dm.test_dataset[i] for i in range(32)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["part_masks"] for it in items])
    return dm, images, masks


def test_part_units_are_labelled_with_their_part_on_synthetic_parts(synthetic, tmp_path):
    dm, images, masks = synthetic
    model = PartOracle(images, masks)
    concepts = ConceptSet.from_parts(dm.part_names)
    d = dissect(model, "layer", dm.test_dataloader(), concepts, top_k=4)
    assert [d.label(u) for u in range(5)] == ["head", "wing", "tail", "marking", None]
    off_diagonal = d.iou[:4, :4] - torch.diag(torch.diag(d.iou[:4, :4]))
    assert off_diagonal.max() < 0.04 and d.score[4] < 0.02  # noise hits parts about as often as their area share
    assert count_detectors(model, "layer", dm.test_dataloader(), concepts) == {
        "layer": "layer", "units": 5, "detectors": 4, "concepts": 4,
        "per_category": {"part": {"detectors": 4, "concepts": 4}}, "detected": ["head", "marking", "tail", "wing"],
    }
    # the top images of the head unit are those with the largest peak of the blurred head (ties allowed)
    peak = model.units[:, 0].flatten(1).amax(dim=1)
    assert torch.equal(d.top_scores[0], peak.topk(4).values) and torch.equal(peak[d.top_positions[0]], d.top_scores[0])

    html_path = write_report(d, tmp_path / "report", title="oracle <units>")
    text = html_path.read_text()
    sections = re.findall(r"<div class='unit' id='unit-(\d+)'>", text)
    assert sorted(map(int, sections)) == [0, 1, 2, 3, 4]
    sources = re.findall(r"<img src='([^']+)'", text)
    assert "bargraph.svg" in sources and len(sources) == 6
    for src in sources:
        assert (html_path.parent / src).is_file(), src
    strip = np.asarray(Image.open(html_path.parent / "images" / "unit_0000.png"))
    assert strip.shape == (64, 4 * 64 + 3 * 3, 3)
    assert "4/5 units covering 4 concepts" in text and "oracle &lt;units&gt;" in text
    with (html_path.parent / "tally.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    assert rows[-1]["unit"] == "4" and rows[-1]["label"] == "" and rows[-1]["detector"] == "0"
    head = next(r for r in rows if r["unit"] == "0")
    assert head["label"] == "head" and int(head["part-intersect"]) == int(d.intersection[0, 0])
    assert float(head["score"]) == pytest.approx(float(d.score[0]), abs=1e-6)
    assert json.loads((html_path.parent / "summary.json").read_text())["detectors"] == 4


def test_command_line_on_synthetic_parts(tmp_path):
    data_args = json.dumps({"num_classes": 3, "image_size": 32, "train_size": 4, "val_size": 4, "test_size": 6})
    rows = main(["--model", "arch:cam_test_resnet", "--data-args", data_args, "--out", str(tmp_path),
                 "--top-k", "2", "--batch-size", "4", "--device", "cpu"])
    assert len(rows) == 1 and rows[0]["units"] > 0
    report = tmp_path / "arch_cam_test_resnet"
    assert (report / "report.html").is_file() and (report / "tally.csv").is_file()
    with (tmp_path / "summary.csv").open() as fh:
        summary = list(csv.DictReader(fh))
    assert summary[0]["model"] == "arch_cam_test_resnet" and int(summary[0]["units"]) == rows[0]["units"]


def test_command_line_reads_the_data_recipe_next_to_a_checkpoint(tmp_path):
    from models import create_model
    from models.pretrained import save_zoo_checkpoint

    run = tmp_path / "runs" / "cam" / "20260101-000000"
    ckpt = save_zoo_checkpoint(create_model("cam_test_resnet", num_classes=3), run / "checkpoints" / "best.pt")
    (run / "config.yaml").write_text(
        "data:\n  class_path: train.data.SyntheticParts\n  init_args:\n"
        "    num_classes: 3\n    image_size: 32\n    train_size: 4\n    val_size: 4\n    test_size: 5\n"
    )
    rows = main(["--model", str(ckpt), "--out", str(tmp_path / "out"), "--top-k", "1", "--device", "cpu"])
    assert rows[0]["model"] == "cam_best" and rows[0]["layer"] == "backbone"
    assert "5 images;" in (tmp_path / "out" / "cam_best" / "report.html").read_text()


def test_command_line_takes_a_released_name_and_its_recorded_recipe(tmp_path, monkeypatch):
    from models import create_model, pretrained
    from models.pretrained import PretrainedEntry, save_zoo_checkpoint, sha256_of

    file = save_zoo_checkpoint(create_model("cam_test_resnet", num_classes=3), tmp_path / "cam.pt")
    entry = PretrainedEntry(name="cam_tiny.synth", class_path="models.CAMNet", dataset="-", config="-")
    monkeypatch.setitem(pretrained._ENTRIES, "cam_tiny.synth", entry)
    data = {"class_path": "train.data.SyntheticParts",
            "init_args": {"num_classes": 3, "image_size": 32, "train_size": 4, "val_size": 4, "test_size": 7}}
    monkeypatch.setattr(pretrained, "_manifest", lambda: {"cam_tiny.synth": {"file": str(file), "sha256": sha256_of(file), "data": data}})
    rows = main(["--model", "cam_tiny.synth", "--out", str(tmp_path / "out"), "--top-k", "1", "--device", "cpu"])
    assert rows[0]["model"] == "cam_tiny.synth" and rows[0]["layer"] == "backbone"
    assert "7 images;" in (tmp_path / "out" / "cam_tiny.synth" / "report.html").read_text()  # the release's test_size


def test_default_layer():
    from models import create_model

    assert default_layer(create_model("cam_test_resnet", num_classes=2)) == "backbone"
    relu = nn.ReLU()
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert default_layer(plain) is relu  # the last spatial map; the pooled 1 x 1 map is not one


# ------------------------------------------------------------------------------------ Broden layout
def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _broden(root):
    """Two 8x8 images; object segmentations (concept number = R + 256 G), a part PNG, a scene label."""
    seg_a = np.zeros((8, 8, 3))
    seg_a[:4, :4, 0] = 1  # number 1 "sky" in the top-left quadrant
    seg_b = np.zeros((8, 8, 3))
    seg_b[4:, :, 0], seg_b[4:, :, 1] = 2, 1  # number 258 = 2 + 256 "door" in the bottom half
    part_b = np.zeros((8, 8, 3))
    part_b[4:, :2, 0] = 3  # number 3 "knob"
    _png(root / "images" / "a.png", np.full((8, 8, 3), 200))
    _png(root / "images" / "b.png", np.full((8, 8, 3), 50))
    _png(root / "images" / "a_obj.png", seg_a)
    _png(root / "images" / "b_obj.png", seg_b)
    _png(root / "images" / "b_part.png", part_b)
    (root / "index.csv").write_text(
        "image,split,ih,iw,sh,sw,object,part,scene\n"
        "a.png,train,8,8,8,8,a_obj.png,,4\n"
        "b.png,train,8,8,8,8,b_obj.png,b_part.png,\n"
        "c.png,val,8,8,8,8,,,\n"
    )
    (root / "label.csv").write_text(
        "number,name,category,frequency\n1,sky,object(5);part(1),5\n258,door,object(3),3\n3,knob,part(2),2\n4,beach,scene(1),1\n"
    )


def test_broden_reader_decodes_segmentations_and_image_labels(tmp_path):
    _broden(tmp_path)
    ds = BrodenConcepts(tmp_path, split="train")
    assert ds.concepts.names == ("sky", "door", "knob", "beach")
    assert ds.concepts.categories == ("object", "object", "part", "scene")
    a, b = ds[0], ds[1]
    assert a["image"].shape == (3, 8, 8) and a["image"].max() == pytest.approx(200 / 255)
    assert a["concept_maps"].shape == (2, 8, 8) == b["concept_maps"].shape  # 2 layers: the most any row has
    assert (a["concept_maps"][0] == 1).sum() == 16 and (a["concept_maps"][1] == 4).all()  # scene: the whole image
    assert (b["concept_maps"][0] == 2).sum() == 32 and (b["concept_maps"][1] == 3).sum() == 8
    assert a["annotated"].tolist() == [True, True, False, True]  # a has object and scene, no part
    assert b["annotated"].tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="not columns"):
        BrodenConcepts(tmp_path, categories=["texture"])
    with pytest.raises(FileNotFoundError, match="c.png"):
        BrodenConcepts(tmp_path, split="val")[0]


def test_dissect_on_a_broden_folder(tmp_path):
    _broden(tmp_path)
    ds = BrodenConcepts(tmp_path, split="train")
    d = dissect(ImageChannels(), "layer", DataLoader(ds, batch_size=2), ds.concepts, top_fraction=0.6, top_k=1)
    # unit 0 = the red channel, uniform in each image (200 and 50): its 0.4 quantile is 50 / 255 (the
    # estimate a fraction of a bin above), so it fires on all of image a only: a's sky 16 px, beach 64 px; b is annotated for object and part
    assert d.intersection[0].tolist() == [16, 0, 0, 64]
    assert d.truth.tolist() == [16, 32, 8, 64]
    assert d.activation[0].tolist() == [64, 64, 0, 64]
    assert d.label(0) == "beach"


def test_concept_maps_from_masks():
    masks = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0, 0] = masks[0, 2, 1, 1] = True
    assert concept_maps_from_masks(masks).tolist() == [[[[1, 0], [0, 3]]]]
    masks[0, 1, 0, 0] = True  # overlap: one layer per concept
    assert concept_maps_from_masks(masks)[0, :, 0, 0].tolist() == [1, 2, 0]
