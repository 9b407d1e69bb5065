"""DataModules: batch contract, push order, caching, augmentation geometry, CUB and image-folder parsing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from train.data import (
    CUB200,
    DataFormatError,
    ImageFolderData,
    ImageLoadError,
    SyntheticParts,
    load_image,
)
from train.synthetic import PART_NAMES

S = len(PART_NAMES)


def _small_synthetic(**kw) -> SyntheticParts:
    args = dict(image_size=64, train_size=24, val_size=10, test_size=10, batch_size=8, seed=1)
    args.update(kw)
    return SyntheticParts(**args)


# ----------------------------------------------------------------------------------- SyntheticParts
def test_synthetic_batches_follow_the_contract():
    dm = _small_synthetic()
    assert dm.num_classes == 10 and len(dm.class_names) == 10  # before setup()
    assert dm.part_names == PART_NAMES
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.push_dataloader()):
        b = next(iter(loader))
        assert set(b) == {"image", "label", "index", "part_masks", "keypoints", "body_box"}
        n = b["image"].shape[0]
        assert b["image"].dtype == torch.float32 and b["image"].shape == (n, 3, 64, 64)
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].max() > 0.5
        assert b["label"].dtype == torch.int64 and b["label"].shape == (n,)
        assert b["index"].dtype == torch.int64 and b["index"].shape == (n,)
        assert b["part_masks"].dtype == torch.bool and b["part_masks"].shape == (n, S, 64, 64)
        assert b["keypoints"].dtype == torch.float32 and b["keypoints"].shape == (n, S, 3)
        assert b["body_box"].dtype == torch.float32 and b["body_box"].shape == (n, 4)
        assert (b["label"] == b["index"] % 10).all()


def test_push_loader_is_train_unaugmented_in_order():
    dm = _small_synthetic(augment=True)
    batches = list(dm.push_dataloader())
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(24))
    images = torch.cat([b["image"] for b in batches])
    gen = dm.generator
    for i in (0, 13, 23):
        expected = torch.from_numpy(gen.sample(i, "train").image).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(images[i], expected, rtol=0, atol=0)
    # The push item equals the raw rendered training sample, masks included.
    item = dm.push_dataset[5]
    np.testing.assert_array_equal(item["part_masks"].numpy(), gen.sample(5, "train").part_masks)
    assert dm.train_dataset.recipe(5) == gen.recipe(5, "train")


def test_train_loader_is_shuffled():
    dm = _small_synthetic(augment=False)
    torch.manual_seed(0)
    order = torch.cat([b["index"] for b in dm.train_dataloader()]).tolist()
    assert sorted(order) == list(range(24)) and order != list(range(24))


def test_cache_modes_agree(tmp_path):
    mem = _small_synthetic(augment=False, cache=True)
    live = _small_synthetic(augment=False, cache=False)
    disk = _small_synthetic(augment=False, cache=str(tmp_path))
    disk.setup()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(f.endswith(".npz") for f in files)  # train, val, test
    disk2 = _small_synthetic(augment=False, cache=str(tmp_path))  # loads what disk wrote
    other = _small_synthetic(augment=False, cache=str(tmp_path), clutter=1)  # other params, other key
    other.setup("validate")
    assert len(list(tmp_path.iterdir())) == 4
    for i in (0, 7):
        ref = live.val_dataset[i]
        for dm in (mem, disk, disk2):
            item = dm.val_dataset[i]
            for k in ref:
                torch.testing.assert_close(item[k], ref[k], rtol=0, atol=0)


def test_horizontal_flip_moves_keypoints_masks_and_box():
    dm = _small_synthetic(augment=False)
    ds = dm.train_dataset
    ref = ds[3]
    ds.transform = v2.RandomHorizontalFlip(p=1.0)
    out = ds[3]
    w = 64
    torch.testing.assert_close(out["image"], ref["image"].flip(-1), rtol=0, atol=0)
    assert torch.equal(out["part_masks"], ref["part_masks"].flip(-1))
    # Keypoints: pixel-index convention, x -> W - 1 - x; boxes: edge convention, x -> W - x.
    torch.testing.assert_close(out["keypoints"][:, 0], w - 1 - ref["keypoints"][:, 0])
    torch.testing.assert_close(out["keypoints"][:, 1:], ref["keypoints"][:, 1:])
    x0, y0, x1, y1 = ref["body_box"].tolist()
    torch.testing.assert_close(out["body_box"], torch.tensor([w - x1, y0, w - x0, y1]))
    for k in range(S):  # and the flipped keypoint lands on the flipped part
        x, y = out["keypoints"][k, :2].round().long().tolist()
        assert out["part_masks"][k, y, x]


def test_default_augmentation_keeps_keypoints_on_their_parts():
    dm = _small_synthetic(image_size=96)
    ds = dm.train_dataset
    torch.manual_seed(1)
    checked = 0
    for i in range(12):
        item = ds[i]
        assert item["image"].shape == (3, 96, 96)
        for k in range(S):
            x, y, vis = item["keypoints"][k].tolist()
            mask = item["part_masks"][k]
            if not vis:
                assert not mask.any() or not (0 <= x <= 95 and 0 <= y <= 95)
                continue
            ys, xs = torch.nonzero(mask, as_tuple=True)
            # Nearest resampling and rotation blur the centre by a pixel or two at most.
            dist = ((xs.float() - x) ** 2 + (ys.float() - y) ** 2).sqrt().min()
            assert dist <= 2.0, (i, k, dist)
            checked += 1
    assert checked >= 30


def test_occlusion_visible_flags_in_batches():
    dm = _small_synthetic(occlusion=1.0, augment=False)
    b = next(iter(dm.val_dataloader()))
    # Visible means some pixel of the part shows; with the occluder it still does.
    assert (b["keypoints"][:, :, 2] == b["part_masks"].flatten(2).any(-1).float()).all()


# ------------------------------------------------------------------------------------- CUB-200-2011
NUM_CUB_PARTS = 15


def make_cub(root: Path, classes: int = 3, per_class: int = 4, seed: int = 0) -> dict:
    """A miniature CUB-200-2011 folder in the official format; returns the ground truth used."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "parts").mkdir()
    truth = {"train": [], "test": [], "boxes": {}, "parts": {}, "sizes": {}, "labels": {}}
    lines = {k: [] for k in ("images", "split", "labels", "boxes", "parts")}
    class_lines = []
    img_id = 0
    for c in range(1, classes + 1):
        cname = f"{c:03d}.Bird_{c}"
        class_lines.append(f"{c} {cname}")
        (root / "images" / cname).mkdir()
        for j in range(per_class):
            img_id += 1
            w, h = int(rng.integers(40, 80)), int(rng.integers(30, 70))
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            rel = f"{cname}/{cname}_{j}.jpg"
            Image.fromarray(arr).save(root / "images" / rel, quality=90)
            is_train = j % 2 == 0
            truth["train" if is_train else "test"].append(img_id)
            bx, by = float(rng.integers(0, w // 3)), float(rng.integers(0, h // 3))
            bw, bh = float(rng.integers(w // 3, w - bx)), float(rng.integers(h // 3, h - by))
            lines["images"].append(f"{img_id} {rel}")
            lines["split"].append(f"{img_id} {int(is_train)}")
            lines["labels"].append(f"{img_id} {c}")
            lines["boxes"].append(f"{img_id} {bx:.1f} {by:.1f} {bw:.1f} {bh:.1f}")
            parts = []
            for p in range(1, NUM_CUB_PARTS + 1):
                if p % 5 == 0:  # invisible, as CUB writes them
                    x, y, v = 0.0, 0.0, 0
                elif p == 1:  # visible but outside the box: must become invisible after the crop
                    x, y, v = float(w - 1), float(h - 1), 1
                    if bx + bw >= w - 1 and by + bh >= h - 1:
                        x, y = 0.0, 0.0
                        if bx == 0 and by == 0:  # box covers the whole image: keep inside
                            x, y = float(w // 2), float(h // 2)
                else:
                    x, y, v = bx + rng.uniform(0, bw), by + rng.uniform(0, bh), 1
                lines["parts"].append(f"{img_id} {p} {x:.1f} {y:.1f} {v}")
                parts.append((round(x, 1), round(y, 1), v))
            truth["boxes"][img_id] = (bx, by, bw, bh)
            truth["parts"][img_id] = parts
            truth["sizes"][img_id] = (w, h)
            truth["labels"][img_id] = c - 1
    (root / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(lines["boxes"]) + "\n")
    (root / "classes.txt").write_text("\n".join(class_lines) + "\n")
    (root / "parts" / "part_locs.txt").write_text("\n".join(lines["parts"]) + "\n")
    (root / "parts" / "parts.txt").write_text(
        "\n".join(f"{p} part {p}" for p in range(1, NUM_CUB_PARTS + 1)) + "\n"
    )
    return truth


@pytest.fixture()
def cub(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "CUB_200_2011"
    return root, make_cub(root)


def test_cub_splits_labels_and_names(cub):
    root, truth = cub
    dm = CUB200(str(root), image_size=32, batch_size=4)
    assert dm.num_classes == 3 and dm.class_names[0] == "001.Bird_1"  # before setup()
    assert len(dm.part_names) == NUM_CUB_PARTS and dm.part_names[0] == "part 1"
    dm.setup()
    assert dm.split_ids("train").tolist() == truth["train"]
    assert dm.split_ids("test").tolist() == truth["test"]
    assert dm.split_ids("push").tolist() == truth["train"]
    assert dm.split_ids("val").tolist() == truth["test"]  # val_fraction = 0: val is the test split
    assert len(dm.train_dataset) == 6 and len(dm.test_dataset) == 6
    labels = [int(dm.test_dataset[i]["label"]) for i in range(6)]
    assert labels == [truth["labels"][i] for i in truth["test"]] and min(labels) == 0
    b = next(iter(dm.push_dataloader()))
    assert set(b) == {"image", "label", "index", "keypoints", "bbox"}
    assert b["image"].shape == (4, 3, 32, 32) and b["keypoints"].shape == (4, NUM_CUB_PARTS, 3)
    assert b["index"].tolist() == [0, 1, 2, 3] and b["bbox"].shape == (4, 4)
    b = next(iter(dm.train_dataloader()))  # augmented path works too
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32


def test_cub_crop_moves_keypoints(cub):
    root, truth = cub
    size = 50
    dm = CUB200(str(root), image_size=size, crop_to_bbox=True)
    ds = dm.test_dataset
    for k, img_id in enumerate(truth["test"]):
        item = ds[k]
        bx, by, bw, bh = truth["boxes"][img_id]
        torch.testing.assert_close(item["bbox"], torch.tensor([0.0, 0.0, size, size]))
        for p, (x, y, v) in enumerate(truth["parts"][img_id]):
            got = item["keypoints"][p]
            inside = v and bx <= x <= bx + bw and by <= y <= by + bh
            if not inside:
                assert got.tolist() == [0.0, 0.0, 0.0], (img_id, p)
                continue
            expected = [(x - bx) * size / bw, (y - by) * size / bh, 1.0]
            torch.testing.assert_close(got, torch.tensor(expected), atol=1e-3, rtol=0)
    # Part 1 lies outside the box on these images, so the crop must have hidden it at least once.
    assert any(ds[k]["keypoints"][0, 2] == 0 for k in range(len(ds)))


def test_cub_without_crop_scales_keypoints_and_box(cub):
    root, truth = cub
    size = 40
    ds = CUB200(str(root), image_size=size, crop_to_bbox=False).test_dataset
    img_id = truth["test"][0]
    w, h = truth["sizes"][img_id]
    bx, by, bw, bh = truth["boxes"][img_id]
    item = ds[0]
    expected_box = [bx * size / w, by * size / h, (bx + bw) * size / w, (by + bh) * size / h]
    torch.testing.assert_close(item["bbox"], torch.tensor(expected_box), atol=1e-3, rtol=0)
    x, y, v = truth["parts"][img_id][1]
    torch.testing.assert_close(item["keypoints"][1], torch.tensor([x * size / w, y * size / h, 1.0]))


def test_cub_val_carved_from_train(cub):
    root, truth = cub
    a = CUB200(str(root), image_size=16, val_fraction=0.5, seed=3)
    b = CUB200(str(root), image_size=16, val_fraction=0.5, seed=3)
    train, val = a.split_ids("train").tolist(), a.split_ids("val").tolist()
    assert sorted(train + val) == truth["train"] and not set(train) & set(val)
    assert len(val) == 3  # one of the two training images of each class
    assert val == b.split_ids("val").tolist()  # deterministic
    assert a.split_ids("test").tolist() == truth["test"]


@pytest.mark.parametrize(
    "filename, line, bad",
    [
        ("images.txt", 2, "2"),
        ("train_test_split.txt", 3, "3 yes"),
        ("bounding_boxes.txt", 1, "1 0 0 10"),
        ("parts/part_locs.txt", 4, "1 4 x 2.0 1"),
        ("image_class_labels.txt", 5, "5 9"),
    ],
)
def test_cub_malformed_line_names_file_and_line(cub, filename, line, bad):
    root, _ = cub
    path = root / filename
    lines = path.read_text().splitlines()
    lines[line - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as err:
        CUB200(str(root)).setup()
    assert f"{filename.split('/')[-1]}:{line}:" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_cub_missing_file_and_id_mismatch(cub):
    root, _ = cub
    labels = root / "image_class_labels.txt"
    text = labels.read_text()
    labels.write_text(text + "99 1\n")
    with pytest.raises(DataFormatError, match=r"image_class_labels\.txt:13: image id 99"):
        CUB200(str(root)).setup()
    labels.write_text("\n".join(text.splitlines()[1:]) + "\n")  # id 1 missing
    with pytest.raises(DataFormatError, match=r"image_class_labels\.txt: no entry for image id\(s\) \[1\]"):
        CUB200(str(root)).setup()
    labels.unlink()
    with pytest.raises(DataFormatError, match=r"image_class_labels\.txt: file not found"):
        CUB200(str(root)).setup()


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated


def test_cub_corrupt_image_error_and_skip(cub, caplog):
    root, truth = cub
    first_test = root / "images" / "001.Bird_1" / "001.Bird_1_1.jpg"  # image id 2, a test image
    _corrupt(first_test)
    dm = CUB200(str(root), image_size=16)
    with pytest.raises(ImageLoadError, match=r"cannot read image '.*001\.Bird_1_1\.jpg'") as err:
        dm.test_dataset[0]
    assert "\n" not in str(err.value) and isinstance(err.value, OSError)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        skip = CUB200(str(root), image_size=16, skip_corrupt=True)
        skip.setup()
    assert skip.num_skipped == 1
    assert skip.split_ids("test").tolist() == truth["test"][1:]
    assert len(skip.test_dataset) == 5 and skip.test_dataset[0]["image"].shape == (3, 16, 16)
    assert any("skipped 1 unreadable" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- image folders
def _write_modes(folder: Path) -> None:
    """One image per PIL mode the loader must handle."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), mode="L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("P").save(folder / "pal.png")
    deep = np.full((20, 30), 65535, dtype=np.uint16)
    deep[:, :10] = 0
    deep[:, 10:20] = 32896  # 128 * 257
    Image.fromarray(deep).save(folder / "deep16.png")


def test_load_image_modes(tmp_path):
    _write_modes(tmp_path)
    im16 = Image.open(tmp_path / "deep16.png")
    assert im16.mode.startswith("I")  # really a 16-bit file
    for name in ("rgb.jpg", "grey.png", "rgba.png", "pal.png", "deep16.png"):
        assert load_image(tmp_path / name).mode == "RGB"
    deep = np.asarray(load_image(tmp_path / "deep16.png"))
    assert deep[0, 0].tolist() == [0, 0, 0] and deep[0, 15].tolist() == [128] * 3
    assert deep[0, 25].tolist() == [255] * 3  # rescaled, not clipped
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match=r"cannot read image '.*bad\.png': "):
        load_image(tmp_path / "bad.png")
    (tmp_path / "empty.jpg").write_bytes(b"")  # a 0-byte file
    with pytest.raises(ImageLoadError, match=r"cannot read image '.*empty\.jpg': ") as err:
        load_image(tmp_path / "empty.jpg")
    assert "\n" not in str(err.value)


def test_image_folder_single_folder_split(tmp_path):
    for c in ("cat", "dog"):
        _write_modes(tmp_path / c)
    dm = ImageFolderData(str(tmp_path), image_size=24, val_fraction=0.2, test_fraction=0.2, batch_size=16)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    dm.setup()
    sets = {s: dm.dataset(s).paths for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert len(set(sum(sets.values(), []))) == 10  # disjoint and complete
    assert dm.dataset("push").paths == sets["train"]
    for split in ("train", "val", "test", "push"):
        for item in dm.dataset(split):
            assert set(item) == {"image", "label", "index"}
            img = item["image"]
            assert img.shape == (3, 24, 24) and img.dtype == torch.float32
            assert 0.0 <= img.min() and img.max() <= 1.0
    b = next(iter(dm.push_dataloader()))
    assert b["index"].tolist() == list(range(6))
    again = ImageFolderData(str(tmp_path), image_size=24, val_fraction=0.2, test_fraction=0.2)
    assert again.dataset("val").paths == sets["val"]  # deterministic


def test_image_folder_split_layout_and_skip(tmp_path, caplog):
    for split in ("train", "test"):
        for c in ("a", "b"):
            _write_modes(tmp_path / split / c)
    _corrupt(tmp_path / "train" / "a" / "rgba.png")
    dm = ImageFolderData(str(tmp_path), image_size=16, val_fraction=0.0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        dm.setup()
    assert dm.num_skipped == 1 and len(dm.train_dataset) == 9
    assert dm.val_dataset.paths == dm.test_dataset.paths  # no val/: val is the test split
    assert all("test" in Path(p).parts for p in dm.test_dataset.paths)
    loud = ImageFolderData(str(tmp_path), image_size=16, val_fraction=0.0)
    index = loud.train_dataset.paths.index(str(tmp_path / "train" / "a" / "rgba.png"))
    with pytest.raises(ImageLoadError, match="rgba.png"):
        loud.train_dataset[index]
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(DataFormatError, match="zebra"):
        ImageFolderData(str(tmp_path), image_size=16).setup()
