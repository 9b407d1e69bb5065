"""Random inputs to the generator and the CUB parser: accepted, or rejected with the library's own
error type — never a crash from deep inside."""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from train.data import CUB200, DataFormatError, ImageLoadError
from train.synthetic import PART_NAMES, SyntheticPartsError, SyntheticPartsGenerator

from tests.test_data import make_cub

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_or_not = st.one_of(st.floats(-2, 3), st.just(float("nan")), st.just(float("inf")))


@FUZZ
@given(
    num_classes=st.integers(-3, 200),
    image_size=st.integers(-8, 80),
    clutter=st.integers(-3, 12),
    occlusion=finite_or_not,
    color_jitter=finite_or_not,
    shortcut=finite_or_not,
    scale=st.tuples(st.floats(-1, 2), st.floats(-1, 2)),
    index=st.integers(-5, 10**6),
    split=st.sampled_from(["train", "val", "test", "push", "bogus"]),
)
def test_generator_accepts_or_rejects_cleanly(num_classes, image_size, clutter, occlusion, color_jitter, shortcut,
                                              scale, index, split):
    try:
        gen = SyntheticPartsGenerator(num_classes=num_classes, image_size=image_size, clutter=clutter,
                                      occlusion=occlusion, color_jitter=color_jitter, shortcut=shortcut,
                                      scale_range=scale)
        sample = gen.sample(index, split)
    except SyntheticPartsError:
        return
    # Accepted: the sample honours the contract.
    assert sample.image.shape == (image_size, image_size, 3) and sample.image.dtype == np.uint8
    assert sample.part_masks.shape == (len(PART_NAMES), image_size, image_size)
    assert sample.part_masks.sum(0).max() <= 1  # parts never overlap
    assert 0 <= sample.label < num_classes
    visible = sample.keypoints[:, 2] > 0
    assert np.all((sample.keypoints[visible, :2] >= 0) & (sample.keypoints[visible, :2] <= image_size - 1))


@FUZZ
@given(remove=st.lists(st.text(max_size=8) | st.sampled_from(PART_NAMES), max_size=3),
       replace=st.dictionaries(st.text(max_size=8) | st.sampled_from(PART_NAMES), st.integers(-3, 9), max_size=2))
def test_interventions_accept_or_reject_cleanly(remove, replace):
    gen = SyntheticPartsGenerator(num_classes=4, image_size=32)
    recipe = gen.recipe(3, "test")
    try:
        out = gen.render(recipe, remove=remove, replace=replace)
    except SyntheticPartsError:
        return
    for name in remove:
        assert not out.part_masks[PART_NAMES.index(name)].any()


CUB_FILES = ["images.txt", "train_test_split.txt", "image_class_labels.txt", "bounding_boxes.txt",
             "classes.txt", "parts/part_locs.txt", "parts/parts.txt"]


@pytest.fixture(scope="module")
def cub_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cub") / "CUB_200_2011"
    make_cub(root, classes=2, per_class=2)
    return root


@FUZZ
@given(file=st.sampled_from(CUB_FILES), line=st.integers(0, 40),
       action=st.sampled_from(["replace", "delete", "duplicate", "truncate_file", "empty_file"]),
       text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_cub_parser_accepts_or_rejects_cleanly(cub_template, file, line, action, text):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "CUB"
        shutil.copytree(cub_template, root)
        path = root / file
        lines = path.read_text().splitlines()
        i = line % max(len(lines), 1)
        if action == "replace":
            lines[i] = text
        elif action == "delete":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, lines[i])
        elif action == "truncate_file":
            lines = lines[: i]
        else:
            lines = []
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            data = CUB200(root, image_size=32, batch_size=2)
            for split in ("train", "test"):
                dataset = data.dataset(split)
                for k in range(len(dataset)):
                    item = dataset[k]
                    assert item["image"].shape == (3, 32, 32)
                    assert 0 <= int(item["label"]) < data.num_classes
        except (DataFormatError, ImageLoadError) as exc:
            message = str(exc)
            assert "\n" not in message.strip()  # one line
            assert "CUB" in message  # names the folder or file at fault


# ---------------------------------------------------------------------------- ProtoPNet schedule
from models.protopnet import PHASES, check_schedule, protopnet_schedule  # noqa: E402

small = st.integers(-3, 12)


@st.composite
def _near_valid(draw):
    """A bounded schedule that ends on a push, then perhaps one value nudged by -1..1."""
    warm, push_every = draw(st.integers(0, 5)), draw(st.integers(1, 4))
    push_start = warm + draw(st.integers(0, 4))
    first = -(-push_start // push_every) * push_every  # first push epoch
    values = [warm, push_start, push_every, draw(st.integers(1, 3)), first + push_every * draw(st.integers(0, 2)) + 1]
    i = draw(st.integers(0, 9))
    if i < 5:
        values[i] += draw(st.integers(-1, 1))
    return tuple(values)


@FUZZ
@given(st.tuples(small, small, small, small, st.none() | st.integers(-3, 30)) | _near_valid())
def test_protopnet_schedule_is_consistent_or_rejected(schedule):
    """Every Lightning epoch has one phase; pushes only after warm-up, each followed by exactly its
    `last` last-layer epochs; the official epochs run in order -- or a ValueError, nothing else."""
    warm, push_start, push_every, last, total = schedule
    try:
        check_schedule(warm, push_start, push_every, last, total)
    except ValueError as error:
        assert "\n" not in str(error) and "=" in str(error)  # one line naming key=value
        with pytest.raises(ValueError):
            protopnet_schedule(0, warm, push_start, push_every, last, total)
        return
    # Brute-force reference: unroll the official loop.
    expected = []  # (phase, official epoch, push)
    official = range(total) if total is not None else range(40)
    for e in official:
        expected.append(("warm" if e < warm else "joint", e, False))
        if e >= push_start and e % push_every == 0:
            expected += [("last", e, i == 0) for i in range(last)]
    plans = [protopnet_schedule(t, warm, push_start, push_every, last, total) for t in range(len(expected) + 3)]
    assert [(p.phase, p.epoch, p.push) for p in plans[:len(expected)]] == expected
    assert all(p.phase in PHASES for p in plans)
    for t, p in enumerate(plans[:len(expected)]):
        if p.push:
            assert p.epoch >= warm and p.epoch >= push_start and plans[t - 1].phase != "last"
        if p.phase == "last" and not p.push:
            assert plans[t - 1].phase == "last" and plans[t - 1].epoch == p.epoch  # follows its push
    if total is not None:  # after the schedule: last layer only, no push; it ended on a push
        assert all(p.phase == "last" and not p.push for p in plans[len(expected):])
        assert expected[-1][0] == "last" and any(push for _, _, push in expected)
        joint = sum(phase == "joint" for phase, _, _ in expected)
        assert plans[len(expected)].joint_epochs == joint >= 1


# ---------------------------------------------------------------------------- ProtoTree schedule
from models import create_model  # noqa: E402
from train.trees import ProtoTreePipeline, check_tree_schedule  # noqa: E402


@FUZZ
@given(freeze=st.integers(-3, 40), milestones=st.lists(st.integers(-3, 120), max_size=6),
       max_epochs=st.none() | st.integers(-1, 120))
def test_prototree_schedule_is_consistent_or_rejected(freeze, milestones, max_epochs):
    try:
        check_tree_schedule(freeze, milestones, max_epochs)
    except ValueError as error:
        assert "\n" not in str(error) and "ProtoTree schedule:" in str(error)
        assert freeze < 0 or any(m < 1 for m in milestones) or any(b <= a for a, b in zip(milestones, milestones[1:]))
        return
    assert freeze >= 0 and all(m >= 1 for m in milestones) and milestones == sorted(set(milestones))


@FUZZ
@given(threshold=st.floats(-1, 2) | st.just(float("nan")), explanations=st.integers(-3, 5))
def test_prototree_pipeline_arguments_accepted_or_rejected(threshold, explanations):
    try:
        ProtoTreePipeline(num_local_explanations=explanations)
        create_model("prototree_test_resnet", num_classes=3, depth=1, prune_threshold=threshold)
    except ValueError as error:
        assert "\n" not in str(error)
        assert not 0 <= threshold < 1 or explanations < 0
        return
    assert 0 <= threshold < 1 and explanations >= 0
