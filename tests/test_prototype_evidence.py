"""Ground truth for prototypes (explain.prototype_parts, train.prototype_evidence) and the consistency and
stability protocol of Huang et al. (2023) (explain.localisation_metrics), against hand computations."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from explain import localisation_metrics as L
from explain.prototype_localisation import Localisation, localise_sources
from explain.prototype_parts import (box_pixels, parts_summary, part_labels, pointed_parts, prototype_class_sets,
                                     region_shares, source_parts)
from models import create_model
from train.data import SyntheticParts
from train.prototype_evidence import REGION_NAMES, evidence_rows, prototype_source_parts, source_samples


def _regions() -> torch.Tensor:
    """(1, 3, 8, 8): part A = rows 0-1 x cols 0-3, part B = rows 4-5 x cols 4-7, distractor = row 7 x cols 0-1."""
    r = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    r[0, 0, 0:2, 0:4] = True
    r[0, 1, 4:6, 4:8] = True
    r[0, 2, 7, 0:2] = True
    return r


def test_region_shares_by_hand():
    regions = _regions()
    maps = torch.zeros(1, 8, 8)
    maps[0, 0, 0:4] = 1.0  # 4 pixels on A
    maps[0, 4, 4:6] = 1.0  # 2 on B
    maps[0, 3, 0:2] = 1.0  # 2 on the background
    # 8 ones among 64 values: the 90th percentile (linear, index 56.7 of the sorted map) is 1.
    top = region_shares(maps, regions, percentile=90)
    torch.testing.assert_close(top, torch.tensor([[4 / 8, 2 / 8, 0.0, 2 / 8]]))
    # box x 2..5, y 0..5 (24 px): 4 on A (rows 0-1, cols 2-3), 4 on B (rows 4-5, cols 4-5), 16 background
    box = region_shares(maps, regions, evidence="box", boxes=torch.tensor([[2, 0, 6, 6]]))
    torch.testing.assert_close(box, torch.tensor([[4 / 24, 4 / 24, 0.0, 16 / 24]]))
    energy_map = torch.full((1, 8, 8), -1.0)
    energy_map[0, 0, 0] = 3.0  # A
    energy_map[0, 7, 1] = 1.0  # distractor; negative values count as 0
    energy = region_shares(energy_map, regions, evidence="energy")
    torch.testing.assert_close(energy, torch.tensor([[0.75, 0.0, 0.25, 0.0]]))
    assert box_pixels(torch.tensor([[2, 0, 6, 6]]), (8, 8)).sum() == 24
    with pytest.raises(ValueError, match="overlap"):
        region_shares(maps, torch.cat([regions, regions[:, :1]], 1))
    with pytest.raises(ValueError, match="evidence"):
        region_shares(maps, regions, evidence="mass")


class _FakeModel:
    """Four prototypes: of classes 0, 1, none (votes for 1 and 2), 0."""

    prototype_classes = torch.tensor([0, 1, -1, 0])

    def prototype_class_connection(self):
        return torch.tensor([[1.0, -0.5, -0.5], [-0.5, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_source_parts_by_hand():
    regions = _regions().expand(4, -1, -1, -1)
    maps = torch.zeros(4, 1, 8, 8)
    maps[0, 0, 0, 0:3] = 1.0  # A
    maps[1, 0, 0:2, 0:2] = 1.0  # A
    maps[2, 0, 4:6, 5:7] = 1.0  # B
    maps[3, 0, 2:4, 0:2] = 1.0  # background
    loc = Localisation(maps, torch.zeros(4, 1, 4, dtype=torch.long), torch.arange(4)[:, None], torch.zeros(4, 1, 2), "x")
    part_variants = torch.tensor([[0, 1]] * 4)  # every source shows variant 0 in slot A, 1 in slot B
    class_variants = torch.tensor([[0, 1], [2, 1], [0, 3]])
    parts = source_parts(_FakeModel(), loc, regions, part_variants, class_variants, ["A", "B", "distractors"], 2,
                         percentile=97)  # the top 3 of 64 pixels: those at 1
    assert parts.region.tolist() == [0, 0, 1, 3]
    # 0: class 0 has A=0 -> its part; 1: class 1 has A=2, not 0 -> another part;
    # 2: classes {1, 2}, class 1 has B=1 -> its part; 3: background
    assert parts.class_part.tolist() == [True, False, True, False]
    assert parts.on_part.tolist() == [True, True, True, False]
    assert parts_summary(parts) == {"class parts": 0.5, "other parts": 0.25, "distractors": 0.0, "background": 0.25}
    assert part_labels(parts) == {0: "A", 1: "A", 2: "B", 3: "background"}
    assert prototype_class_sets(_FakeModel()).tolist() == [[True, False, False], [False, True, False],
                                                          [False, True, True], [True, False, False]]


def test_pointed_parts_by_hand():
    masks = _regions()[:, :2]  # parts A, B
    maps = torch.zeros(1, 3, 8, 8)
    maps[0, 0, 1, 3] = 1.0  # on A
    maps[0, 1, 5, 7] = 2.0  # on B
    maps[0, 2, 3, 3] = 1.0  # nowhere
    assert pointed_parts(maps, masks).tolist() == [[0, 1, -1]]


@pytest.fixture(scope="module")
def pushed():
    torch.manual_seed(0)
    data = SyntheticParts(num_classes=3, image_size=32, train_size=12, test_size=6, batch_size=6, seed=0, cache=False,
                          augment=False)
    model = create_model("protopnet_test_resnet", num_classes=3, prototypes_per_class=1).eval()
    model.push(data.push_dataloader())
    recipe = {"num_classes": 3, "image_size": 32, "seed": 0, "test_size": 6}
    return model, data, recipe


def test_sources_are_the_push_images_and_shares_follow_their_masks(pushed):
    model, data, recipe = pushed
    ids = torch.arange(model.num_prototypes)
    src = source_samples(recipe, model.prototype_source_index[ids].tolist())
    push = data.dataset("push")
    for i, j in enumerate(model.prototype_source_index.tolist()):
        item = push[j]
        torch.testing.assert_close(src["image"][i], item["image"])
        assert torch.equal(src["regions"][i, :4], item["part_masks"])
    assert not (src["regions"].sum(1) > 1).any() and src["regions"][:, 5].any()  # disjoint; distractors present
    parts = prototype_source_parts(model, recipe, "upsampling")
    loc = localise_sources(model, src["image"], ids)
    torch.testing.assert_close(parts.shares, region_shares(loc.maps[:, 0], src["regions"]))
    # ProtoPNet pushes onto its own class: every prototype on a part is on a part of its class
    assert torch.equal(parts.class_part, parts.on_part)
    assert parts.names == [*REGION_NAMES, "background"]


def test_evidence_rows_of_a_tiny_model(pushed):
    from train.apps import load_synthetic

    model, _, recipe = pushed
    data = load_synthetic(recipe, 6)
    rows = evidence_rows("tiny", model, recipe, data, ["upsampling", "randgrads"], top_k=2)
    metrics = {r["metric"] for r in rows}
    assert metrics == {"class_part", "other_part", "body", "distractors", "background", "part_share", "pointing",
                       "pointing_same_part", "consistency", "stability"}
    for method in ("prototypes/upsampling", "prototypes/randgrads"):
        shares = sum(r["value"] for r in rows if r["method"] == method and r["metric"] in
                     ("class_part", "other_part", "body", "distractors", "background"))
        assert shares == pytest.approx(model.num_prototypes)  # one region per prototype
    upsampled = [r["value"] for r in rows if r["method"] == "prototypes/upsampling" and r["metric"] == "consistency"]
    direct = L.prototype_consistency(model.similarity_maps, data["image"], data["keypoints"], data["label"],
                                     model.prototype_classes)
    assert upsampled == pytest.approx(direct.tolist(), nan_ok=True)


# ----------------------------------------------------------------------------- the EvalProtoPNet protocol
def _official_parts(maps: np.ndarray, keypoints: np.ndarray, half: int) -> np.ndarray:
    """The official loop for already upsampled maps (P, H, W) of one image: np.where of the max, in_bbox."""
    size = maps.shape[-1]
    out = np.zeros((len(maps), len(keypoints)))
    for p, m in enumerate(maps):
        where = np.where(m == m.max())
        y, x = where[0][0], where[1][0]
        region = (max(0, y - half), min(size, y + half), max(0, x - half), min(size, x + half))
        for s, (kx, ky, visible) in enumerate(keypoints):
            ky, kx = int(ky), int(kx)
            if visible and region[0] <= ky <= region[1] and region[2] <= kx <= region[3]:
                out[p, s] = 1
    return out


def _spots(n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a strong red spot and a faint green spot at part 0's keypoint (varying place)."""
    g = torch.Generator().manual_seed(3)
    images = torch.full((n, 3, size, size), 0.5)
    keypoints = torch.zeros(n, 2, 3)
    for b in range(n):
        x, y = (int(v) for v in torch.randint(6, size - 6, (2,), generator=g))
        images[b, 0, y, x] = 1.0
        images[b, 1, y, x] = 0.501
        keypoints[b, 0] = torch.tensor([x + 0.7, y + 0.2, 1.0])  # the truncated keypoint is the spot
        keypoints[b, 1] = torch.tensor([(x + 16) % size, (y + 16) % size, 1.0])  # far from it
    return images, keypoints


def test_consistency_and_stability_equal_the_official_loop():
    images, keypoints = _spots(12)
    labels = torch.zeros(12, dtype=torch.long)
    fn = lambda x: x[:, :2]  # noqa: E731 - prototype 0 is the red channel, prototype 1 the green one
    classes = torch.tensor([0, 0])
    std = (0.229, 0.224, 0.225)
    consistency = L.prototype_consistency(fn, images, keypoints, labels, classes, half_size=2)
    stability = L.prototype_stability(fn, images, keypoints, labels, classes, half_size=2, pixel_std=std)
    noisy = L.stability_noise(images, std)
    clean = np.stack([_official_parts(fn(images)[b].numpy(), keypoints[b].numpy(), 2) for b in range(12)])
    perturbed = np.stack([_official_parts(fn(noisy)[b].numpy(), keypoints[b].numpy(), 2) for b in range(12)])
    expected_consistency = ((clean.sum(0) / 12) >= 0.8).any(1).astype(float)
    expected_stability = (np.abs(clean - perturbed).sum(-1) == 0).mean(0)
    assert consistency.tolist() == expected_consistency.tolist() == [1.0, 1.0]  # both peak on part 0 when clean
    assert stability.tolist() == pytest.approx(expected_stability.tolist())
    assert stability[0] == 1.0 and stability[1] < 0.5  # the noise moves the faint spot's peak away
    assert (noisy - images).abs().amax() <= 0.25 * max(std) + 1e-6  # clipped in normalised space


def test_protocol_details():
    # the official region is inclusive and the keypoint an integer: x = 14.9 -> 14 = peak 10 + half 4
    maps = torch.zeros(1, 1, 32, 32)
    maps[0, 0, 10, 10] = 1.0
    keypoints = torch.tensor([[[14.9, 10.0, 1.0], [15.0, 10.0, 1.0], [10.0, 10.0, 0.0]]])
    assert L.part_vectors(maps, keypoints, half_size=4).tolist() == [[[True, False, False]]]
    # a 4 x 4 latent map is upsampled bicubically to the image size given
    small = torch.zeros(1, 1, 4, 4)
    small[0, 0, 3, 3] = 1.0
    assert L.part_vectors(small, torch.tensor([[[30.0, 30.0, 1.0]]]), half_size=4, size=(32, 32)).item()
    assert L.protocol_half_size(224) == 36 and L.protocol_half_size(64) == 10
    # class sets: a prototype of no class of its own is scored on the images of its classes
    images, keypoints = _spots(4)
    labels = torch.tensor([0, 1, 2, 2])
    sets = torch.tensor([[True, True, False]])
    fn = lambda x: x[:, :1]  # noqa: E731
    assert L.prototype_consistency(fn, images, keypoints, labels, sets, half_size=2).tolist() == [1.0]
    assert math.isnan(L.prototype_consistency(fn, images, keypoints, labels, torch.tensor([-1]), half_size=2).item())



# ----------------------------------------------------------------------------- views and applications
def test_gallery_labels_prototypes_with_their_part_and_because_scores(pushed):
    from explain import viz

    model, _, _ = pushed
    fig = viz.prototype_gallery(model, part_labels={0: "wing", 1: "background"},
                                because={0: {"hue": 0.1, "shape": 0.5}})
    axes = [ax for ax in fig.axes if ax.get_title()]
    titles = {ax.get_title().split(" · ")[0]: ax for ax in axes}
    assert "wing" in titles["p0"].get_title() and "background" in titles["p1"].get_title()
    assert titles["p0"].get_xlabel().endswith("shape +0.50\nhue +0.10")  # largest score first, after the weights
    assert "hue" not in titles["p1"].get_xlabel()
    viz.plt.close(fig)


def test_report_evidence_and_compare_rows(pushed, tmp_path):
    import yaml

    from train import compare
    from train import sanity as train_sanity
    from train.report import _prototype_evidence

    model, data, recipe = pushed
    images = torch.stack([data.dataset("test")[i]["image"] for i in range(4)])
    evidence = _prototype_evidence(model, recipe, images, "upsampling")
    parts = prototype_source_parts(model, recipe)
    assert evidence["part_labels"] == part_labels(parts)
    assert set(evidence["because"]) == set(range(model.num_prototypes))
    assert all(set(v) == {"hue", "shape", "texture", "contrast", "saturation"} for v in evidence["because"].values())
    assert "class parts" in evidence["evidence_note"]
    # a train.py run folder: runs/<name>/<stamp>/checkpoints/last.ckpt with the run's config.yaml
    run = tmp_path / "runs" / "tiny" / "stamp"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"class_path": "train.data.SyntheticParts",
                                                              "init_args": {**recipe, "train_size": 12}}}))
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "zoo_class_path": f"{type(model).__module__}.{type(model).__name__}"}, run / "checkpoints" / "last.ckpt")
    ckpt = str(run / "checkpoints" / "last.ckpt")
    sanity = ["num_images=3", "random_images=2", "sources=2"]
    summary = compare.main(["--checkpoint", ckpt, "--methods", "--localisation", "upsampling", "--num-images", "6",
                            "--out", str(tmp_path / "out"), "--device", "cpu", "--sanity", *sanity])
    # the sanity table of the comparison is train.sanity's on the same checkpoint (the timing column aside)
    train_sanity.main(["--checkpoint", ckpt, "--methods", "upsampling", "--device", "cpu",
                       "--out", str(tmp_path / "sanity.md"), *(f"--{o.split('=')[0].replace('_', '-')}={o.split('=')[1]}" for o in sanity)])

    def rows(text: str) -> list[list[str]]:
        return [line.split("|")[1:3] + line.split("|")[4:] for line in text.splitlines() if "| upsampling |" in line]

    assert rows((tmp_path / "out" / "sanity.md").read_text()) == rows((tmp_path / "sanity.md").read_text()) != []
    with pytest.raises(ValueError, match="unknown key 'images'"):
        compare.main(["--checkpoint", ckpt, "--methods", "--localisation", "upsampling", "--num-images", "2",
                      "--out", str(tmp_path / "out3"), "--device", "cpu", "--sanity", "images=2"])
    cells = {s["metric"]: s["mean"] for s in summary if s["method"] == "prototypes/upsampling"}
    assert cells["class_part"] == pytest.approx(float(parts.class_part.float().mean()))
    assert cells["background"] == pytest.approx(float((parts.region == len(parts.names) - 1).float().mean()))
    assert "prototypes/upsampling" in (tmp_path / "out" / "table.md").read_text()
    with pytest.raises(ValueError, match="nothing to compare"):
        compare.main(["--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--methods", "--num-images", "2",
                      "--out", str(tmp_path / "out2"), "--device", "cpu"])
