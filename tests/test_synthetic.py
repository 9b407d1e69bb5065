"""SyntheticParts generator: determinism, ground truth consistent with the pixels, interventions."""

from __future__ import annotations

import hashlib
import itertools
import pickle

import numpy as np
import pytest

from train.synthetic import (
    NUM_VARIANTS,
    PART_COLORS,
    PART_NAMES,
    PATTERN_SHADE,
    SyntheticPartsGenerator,
    variant_appearance,
)

S = len(PART_NAMES)


def _digest(gen: SyntheticPartsGenerator, split: str, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        s = gen.sample(i, split)
        for a in (s.image, s.part_masks, s.keypoints, s.body_box):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def gen() -> SyntheticPartsGenerator:
    return SyntheticPartsGenerator(num_classes=10, image_size=96, seed=3, clutter=3)


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_across_instances():
    a = SyntheticPartsGenerator(seed=11, image_size=64, occlusion=0.5, color_jitter=0.5, shortcut=0.5)
    b = SyntheticPartsGenerator(seed=11, image_size=64, occlusion=0.5, color_jitter=0.5, shortcut=0.5)
    for split in ("train", "val", "test"):
        assert _digest(a, split, range(6)) == _digest(b, split, range(6))
    # Rendering order does not matter (no hidden state between samples).
    assert a.sample(5, "val").image.tobytes() == b.sample(5, "val").image.tobytes()
    np.testing.assert_array_equal(a.class_variants, b.class_variants)


def test_different_seed_differs():
    a = SyntheticPartsGenerator(seed=0, image_size=64)
    b = SyntheticPartsGenerator(seed=1, image_size=64)
    assert _digest(a, "train", range(4)) != _digest(b, "train", range(4))
    for i in range(4):
        assert a.sample(i).image.tobytes() != b.sample(i).image.tobytes()


def test_push_is_train_and_splits_disjoint(gen):
    assert gen.sample(4, "push").image.tobytes() == gen.sample(4, "train").image.tobytes()
    hashes = {
        split: {hashlib.sha256(gen.sample(i, split).image.tobytes()).hexdigest() for i in range(40)}
        for split in ("train", "val", "test")
    }
    assert all(len(h) == 40 for h in hashes.values())  # no duplicate scenes inside a split either
    for x, y in itertools.combinations(hashes, 2):
        assert not hashes[x] & hashes[y], (x, y)
    recipes = {split: {repr(gen.recipe(i, split).body) for i in range(40)} for split in ("train", "test")}
    assert not recipes["train"] & recipes["test"]


def test_recipe_is_plain_and_rebuilds_the_image(gen):
    r = gen.recipe(7, "test")
    r2 = pickle.loads(pickle.dumps(r))
    assert r2 == r
    assert gen.render(r2).image.tobytes() == gen.sample(7, "test").image.tobytes()
    assert r.label == 7 % gen.num_classes
    assert tuple(r.variants) == tuple(gen.class_variants[r.label])


def test_labels_balanced(gen):
    labels = [gen.recipe(i, "train").label for i in range(50)]
    assert np.bincount(labels, minlength=10).tolist() == [5] * 10


def test_knobs_change_nothing_else():
    """The knobs use draws that are always made, so a cue can be switched on without moving the scene."""
    plain = SyntheticPartsGenerator(seed=5, image_size=64, shortcut=0.0)
    cued = SyntheticPartsGenerator(seed=5, image_size=64, shortcut=1.0, occlusion=1.0)
    for i in range(5):
        r = cued.recipe(i)
        assert r.shortcut is not None and r.occluder is not None
        again = cued.render(r, remove=["shortcut", "occluder"])
        assert again.image.tobytes() == plain.sample(i).image.tobytes()


def test_invalid_arguments(gen):
    with pytest.raises(ValueError):
        SyntheticPartsGenerator(num_classes=1)
    with pytest.raises(ValueError):
        SyntheticPartsGenerator(num_classes=NUM_VARIANTS ** (S - 1) + 1)
    with pytest.raises(ValueError):
        gen.recipe(0, "holdout")
    with pytest.raises(ValueError):
        gen.render(gen.recipe(0), remove=["beak"])
    with pytest.raises(ValueError):
        gen.render(gen.recipe(0), replace={"head": NUM_VARIANTS})


# ------------------------------------------------------------------------------------ classes
@pytest.mark.parametrize("k", [2, 3, 10, 50, NUM_VARIANTS ** (S - 1)])
def test_class_combinations(k):
    g = SyntheticPartsGenerator(num_classes=k, image_size=32, seed=k)
    cv = g.class_variants
    assert cv.shape == (k, S) and cv.min() >= 0 and cv.max() < NUM_VARIANTS
    assert len({tuple(row) for row in cv}) == k
    slot_used = np.zeros(S, dtype=bool)
    for c1, c2 in itertools.combinations(range(k), 2):
        diff = cv[c1] != cv[c2]
        assert diff.sum() >= 2, (c1, c2)
        slot_used |= diff
        assert g.distinguishing_parts(c1, c2) == [PART_NAMES[s] for s in np.flatnonzero(diff)]
    assert slot_used.all()  # every slot distinguishes some pair
    assert g.distinguishing_parts(0, 0) == []


def test_variant_appearances_unique():
    """No (shape, colour) pair in two slots; inside a slot variants differ in shape and colour."""
    seen = {}
    for s in range(S):
        shapes, colors = set(), set()
        for v in range(NUM_VARIANTS):
            shape, color, _pattern = variant_appearance(s, v)
            assert (shape, color) not in seen
            seen[(shape, color)] = (s, v)
            shapes.add(shape)
            colors.add(color)
        assert len(shapes) == len(colors) == NUM_VARIANTS


# ------------------------------------------------------------------------------------ ground truth
def _part_colors(slot: int, variant: int) -> set[tuple[int, ...]]:
    _shape, ci, _pattern = variant_appearance(slot, variant)
    base = PART_COLORS[ci]
    shade = (base * np.float32(PATTERN_SHADE)).astype(np.float32)
    return {tuple(np.floor(base + 0.5).astype(int)), tuple(np.floor(shade + 0.5).astype(int))}


def test_masks_match_pixels_and_keypoints(gen):
    n = gen.image_size
    for i in range(12):
        s = gen.sample(i, "train")
        assert s.image.shape == (n, n, 3) and s.image.dtype == np.uint8
        assert s.part_masks.shape == (S, n, n) and s.part_masks.dtype == bool
        assert s.keypoints.shape == (S, 3) and s.keypoints.dtype == np.float32
        assert s.body_box.shape == (4,) and s.body_box.dtype == np.float32
        assert s.part_masks.sum(axis=0).max() <= 1  # parts never share a pixel
        x0, y0, x1, y1 = s.body_box
        for k in range(S):
            mask = s.part_masks[k]
            # Without occlusion every part is in the image and large: 10-20% of the side wide.
            assert mask.sum() > (0.05 * n) ** 2
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert 0.07 * n <= cols[-1] - cols[0] + 1 <= 0.3 * n
            # Every mask pixel shows the part's colour or its pattern colour.
            colors = {tuple(c) for c in s.image[mask].tolist()}
            assert colors <= _part_colors(k, s.recipe.variants[k]), (i, k, colors)
            # The keypoint is the part centre: inside the mask, near its centroid.
            x, y, vis = s.keypoints[k]
            assert vis == 1.0
            assert mask[int(round(y)), int(round(x))]
            yy, xx = np.nonzero(mask)
            assert abs(xx.mean() - x) < 0.15 * n and abs(yy.mean() - y) < 0.15 * n
            # The object box holds every part pixel.
            assert x0 <= cols[0] and cols[-1] + 1 <= x1 and y0 <= rows[0] and rows[-1] + 1 <= y1


def test_distractors_are_not_parts(gen):
    """Removing the distractors changes only non-part pixels and leaves every mask as it is."""
    for i in range(6):
        r = gen.recipe(i)
        full, bare = gen.render(r), gen.render(r, remove=["distractors"])
        np.testing.assert_array_equal(full.part_masks, bare.part_masks)
        changed = (full.image != bare.image).any(-1)
        assert changed.any()
        assert not (changed & full.part_masks.any(0)).any()


@pytest.mark.parametrize("part", PART_NAMES)
def test_remove_part_changes_exactly_its_pixels(gen, part):
    k = PART_NAMES.index(part)
    for i in range(5):
        r = gen.recipe(i, "val")
        full, cut = gen.render(r), gen.render(r, remove=[part])
        changed = (full.image != cut.image).any(-1)
        mask = full.part_masks[k]
        assert not (changed & ~mask).any()  # nothing outside the part moved
        assert changed[mask].mean() > 0.9  # and the part is gone (what was behind may match a pixel)
        assert not cut.part_masks[k].any() and cut.keypoints[k, 2] == 0
        others = [j for j in range(S) if j != k]
        np.testing.assert_array_equal(cut.part_masks[others], full.part_masks[others])
        np.testing.assert_array_equal(cut.keypoints[k, :2], full.keypoints[k, :2])


def test_remove_all_parts_and_body(gen):
    r = gen.recipe(3)
    bare = gen.render(r, remove=list(PART_NAMES) + ["body"])
    assert not bare.part_masks.any() and not bare.keypoints[:, 2].any()
    np.testing.assert_array_equal(bare.body_box, np.zeros(4, np.float32))


def test_replace_part_variant(gen):
    r = gen.recipe(2, "test")
    k = PART_NAMES.index("tail")
    new = (r.variants[k] + 1) % NUM_VARIANTS
    full, swapped = gen.render(r), gen.render(r, replace={"tail": new})
    union = full.part_masks[k] | swapped.part_masks[k]
    changed = (full.image != swapped.image).any(-1)
    assert changed.any() and not (changed & ~union).any()
    assert {tuple(c) for c in swapped.image[swapped.part_masks[k]].tolist()} <= _part_colors(k, new)
    np.testing.assert_array_equal(swapped.keypoints[k], full.keypoints[k])
    assert swapped.label == full.label  # the label is the recipe's; the caller decides what it means


def test_occlusion_masks_only_visible_pixels():
    g = SyntheticPartsGenerator(image_size=64, seed=2, occlusion=1.0)
    for i in range(6):
        r = g.recipe(i)
        occ, clear = g.render(r), g.render(r, remove=["occluder"])
        slot = r.occluder["slot"]
        assert not (occ.part_masks & ~clear.part_masks).any()  # occlusion only removes mask pixels
        assert occ.part_masks[slot].sum() < clear.part_masks[slot].sum()
        grey = np.floor(r.occluder["grey"] + 0.5)
        hidden = clear.part_masks[slot] & ~occ.part_masks[slot]
        assert (occ.image[hidden] == grey).all()  # the hidden pixels show the occluder


def test_shortcut_cue_is_class_colour():
    g = SyntheticPartsGenerator(num_classes=5, image_size=64, seed=4, shortcut=1.0)
    corner = {}
    for i in range(15):
        s = g.sample(i)
        corner.setdefault(s.label, set()).add(tuple(s.image[4, 4].tolist()))
    assert all(len(c) == 1 for c in corner.values())  # one colour per class
    assert len({next(iter(c)) for c in corner.values()}) == 5  # distinct across classes


def test_color_jitter_keeps_geometry():
    plain = SyntheticPartsGenerator(image_size=64, seed=6)
    jit = SyntheticPartsGenerator(image_size=64, seed=6, color_jitter=1.0)
    for i in range(4):
        a, b = plain.sample(i), jit.sample(i)
        np.testing.assert_array_equal(a.part_masks, b.part_masks)
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        assert a.image.tobytes() != b.image.tobytes()


def test_small_images_still_have_all_parts():
    g = SyntheticPartsGenerator(image_size=32, seed=0, clutter=5)
    for i in range(10):
        s = g.sample(i)
        assert s.part_masks.reshape(S, -1).any(1).all()
        assert ((s.keypoints[:, :2] >= 0) & (s.keypoints[:, :2] <= 31)).all()
