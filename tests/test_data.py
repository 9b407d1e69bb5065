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
    corner_regions,
    DataFormatError,
    ImageFolderData,
    ImageLoadError,
    SyntheticParts,
    load_image,
)
from train.synthetic import PART_NAMES
from train.transforms import apply_transform

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
        assert set(b) == {"image", "label", "index", "part_masks", "keypoints", "body_box", "concepts"}
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


# ------------------------------------------------------------------------- recipes' augmentation, epoch size
def _smooth_image(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([128 + 100 * np.sin(xx / 7.0), 128 + 100 * np.cos(yy / 5.0),
                     128 + 60 * np.sin((xx + yy) / 9.0)], -1).astype(np.uint8)


def _warp(arr: np.ndarray, coefficients: list[float]) -> np.ndarray:
    from torchvision.transforms.v2 import functional as F

    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return F.perspective(t, None, None, coefficients=coefficients).permute(1, 2, 0).numpy().astype(float)


def _augmentor_rotate(im: Image.Image, angle: int) -> Image.Image:
    """Augmentor's RotateRange with PIL: rotate on an expanded canvas, crop (E, A, X - E, Y - A), resize back."""
    w, h = im.size
    r = im.rotate(angle, expand=True, resample=Image.BICUBIC)
    big_x, big_y = r.size
    t = np.tan(np.radians(abs(angle)))
    e = t * (big_y - big_x * t) - t * t
    a = t * (big_x - e)
    return r.crop((round(e), round(a), round(big_x - e), round(big_y - a))).resize((w, h), Image.BICUBIC)


def _augmentor_shear(im: Image.Image, angle: int, along_x: bool) -> Image.Image:
    """Augmentor's Shear with PIL: affine on a widened canvas, crop the filled part, resize back."""
    w, h = im.size
    phi = np.tan(np.radians(angle))
    shift = phi * (h if along_x else w)
    if along_x:
        shift = np.ceil(shift) if shift > 0 else np.floor(shift)
    offset = shift if angle > 0 else 0.0
    shift = abs(shift)
    if along_x:
        out = im.transform((int(round(w + shift)), h), Image.AFFINE, (1, phi, -offset, 0, 1, 0), Image.BICUBIC)
        out = out.crop((shift, 0, w, h))
    else:
        out = im.transform((w, int(round(h + shift))), Image.AFFINE, (1, 0, 0, phi, 1, -offset), Image.BICUBIC)
        out = out.crop((0, shift, w, h))
    return out.resize((w, h), Image.BICUBIC)


def test_augmentor_warps_match_augmentor_with_pil():
    from train.transforms import AugmentorRotate, AugmentorShear, AugmentorSkew

    w, h = 96, 64
    arr = _smooth_image(w, h)
    im = Image.fromarray(arr)
    inner = (slice(4, -4), slice(4, -4))  # borders differ by the resampling kernels only
    for angle in (-15, -6, 4, 15):
        diff = np.abs(_warp(arr, AugmentorRotate.coefficients(w, h, angle)) - np.asarray(_augmentor_rotate(im, angle)))
        assert diff[inner].mean() < 1.5 and np.percentile(diff[inner], 99) < 6, angle
    for angle in (-9, -1, 3, 11):
        for along_x in (True, False):
            diff = np.abs(_warp(arr, AugmentorShear.coefficients(w, h, angle, along_x))
                          - np.asarray(_augmentor_shear(im, angle, along_x)))
            assert diff[inner].mean() < 1.5 and np.percentile(diff[inner], 99) < 10, (angle, along_x)
    # Skew: the corners move outwards; the left tilt (TL up, BL down by 12 px) maps (0, -12) of the output
    # to the input's corner (0, 0), so the output's left edge shows the input's left column squeezed.
    coef = AugmentorSkew.coefficients(w, h, 12, ((0, 1), (3, 1)))
    a, b, c, d, e, f, g, k = coef
    for (x, y), (u, v) in (((0, -12), (0, 0)), ((0, h + 12), (0, h)), ((w, 0), (w, 0)), ((w, h), (w, h))):
        den = g * x + k * y + 1
        assert abs((a * x + b * y + c) / den - u) < 1e-6 and abs((d * x + e * y + f) / den - v) < 1e-6


def test_augmentor_draws_follow_augmentor():
    from train.transforms import AugmentorRotate, AugmentorShear, AugmentorSkew

    torch.manual_seed(0)
    rotations = [AugmentorRotate(15).draw()["angle"] for _ in range(3000)]
    assert set(rotations) == set(range(-15, 16))
    assert 1.5 < rotations.count(0) / rotations.count(1) < 2.6  # 0 is drawn from both sides: twice as often
    shears = [AugmentorShear(10).draw()["angle"] for _ in range(3000)]
    assert set(shears) == set(range(-9, 12)) - {0}  # int(uniform(-11, 11)), then +1 unless -1
    skews = [AugmentorSkew(0.2).draw(224) for _ in range(3000)]
    assert {s["amount"] for s in skews} == set(range(1, 46))  # randint(1, ceil(224 x 0.2))
    assert len({s["moves"] for s in skews}) == 12  # 4 tilts + 8 corner moves


def test_augmentor_warps_move_keypoints_with_the_content(one_thread):
    from train.transforms import train_augmentation

    size = 64
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    points = torch.tensor([[20.0, 24.0, 1.0], [40.0, 30.0, 1.0]])
    for x, y, _ in points.tolist():
        image[:, int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 255
    aug = train_augmentation("protopnet", size)
    torch.manual_seed(3)
    for view in range(30):
        out, _, kp, _ = apply_transform(aug.for_view(view, 30), image.clone(), None, points.clone())
        for x, y, vis in kp.tolist():
            if vis:  # the bright dot is still around the moved keypoint
                x0, y0 = int(round(x)), int(round(y))
                patch = out[0, max(y0 - 2, 0):y0 + 3, max(x0 - 2, 0):x0 + 3]
                assert patch.max() > 100, (view, x, y)


def test_recipe_augmentations_and_bad_names():
    from train.transforms import AugmentorRotate, AugmentorShear, AugmentorSkew, train_augmentation

    aug = train_augmentation("protopnet", 224)
    assert [type(p.transforms[0]) for p in aug.pipelines] == [AugmentorRotate, AugmentorSkew, AugmentorShear]
    assert all(p.transforms[1].p == 0.5 for p in aug.pipelines)
    counts = np.bincount([aug.pipelines.index(aug.for_view(r, 30)) for r in range(30)])
    assert counts.tolist() == [10, 10, 10]  # one official epoch: 10 rotated, 10 skewed, 10 sheared per image
    cars = train_augmentation("prototree_cars", 224)
    assert cars.resize == 256
    out = cars(torch.zeros(3, 256, 256, dtype=torch.uint8))
    assert out.shape == (3, 224, 224)
    assert train_augmentation(False, 224) is None
    with pytest.raises(ValueError, match="augment='bogus'"):
        _small_synthetic(augment="bogus")
    with pytest.raises(ValueError, match="epoch_repeats=0"):
        _small_synthetic(epoch_repeats=0)


def test_corner_regions_hand_computed():
    # box x 10..50, y 20..40 in a 100 x 60 image: margins int(4.0) = 4 and int(2.0) = 2
    regions = corner_regions((10.0, 20.0, 50.0, 40.0), 100, 60)
    assert regions == [(0, 0, 54, 42), (0, 18, 54, 60), (6, 0, 100, 42), (6, 18, 100, 60), (0, 0, 100, 60)]
    assert corner_regions((0.0, 0.0, 100.0, 60.0), 100, 60)[0] == (0, 0, 100, 60)  # clipped to the image


def test_cub_prototree_views_and_crops(cub):
    root, truth = cub
    size = 32
    dm = CUB200(str(root), image_size=size, crop_to_bbox=True, test_crop_to_bbox=False, train_corners=True,
                augment=False, epoch_repeats=5, batch_size=6)
    img_id = truth["train"][0]
    w, h = truth["sizes"][img_id]
    bx, by, bw, bh = truth["boxes"][img_id]
    source = load_image(dm.train_dataset.paths[0])

    repeated = dm.train_dataloader().dataset
    n = len(dm.train_dataset)
    assert len(repeated) == 5 * n == 30
    for view, region in enumerate(corner_regions((bx, by, bx + bw, by + bh), w, h)):
        expected = torch.from_numpy(np.array(source.resize((size, size), Image.BILINEAR, box=region))).permute(2, 0, 1)
        got = repeated[view * n]
        assert int(got["index"]) == 0
        torch.testing.assert_close(got["image"], expected.float() / 255, rtol=0, atol=0)
    # Push on the box crops, test on the full images.
    assert dm.push_dataset.crop_to_bbox and not dm.push_dataset.corners
    assert not dm.test_dataset.crop_to_bbox and not dm.val_dataset.crop_to_bbox
    test_id = truth["test"][0]
    tw, th = truth["sizes"][test_id]
    assert dm.test_dataset.crop_box(0, tw, th) == (0.0, 0.0, float(tw), float(th))


@pytest.fixture()
def one_thread():
    """Tiny warps are dominated by thread start-up on a busy 2-core machine (the loader workers use 1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_repeated_epoch_is_deterministic_and_resumes_mid_epoch(cub, one_thread):
    root, _ = cub

    def make() -> CUB200:
        return CUB200(str(root), image_size=24, augment="protopnet", epoch_repeats=4, batch_size=5, seed=2)

    def batches(dm: CUB200, epoch: int) -> list[dict]:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return list(loader)

    first = batches(make(), 1)
    assert sum(len(b["index"]) for b in first) == 24 and len(first) == 5  # 6 images x 4 views, batch 5
    counts = np.bincount(torch.cat([b["index"] for b in first]).numpy())
    assert counts.tolist() == [4] * 6  # every image once per view
    again = batches(make(), 1)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
    assert not torch.equal(batches(make(), 2)[0]["image"], first[0]["image"])  # other epoch, other draws
    resumed = make()
    resumed.load_state_dict({"epoch": 1, "train_batches_done": 2})
    rest = list(resumed.train_dataloader())  # the datamodule's resume point sets epoch and skip
    assert len(rest) == 3
    for a, b in zip(first[2:], rest):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
