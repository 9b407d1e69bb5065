"""The gallery command (`python -m train.gallery`): one section per release, its figures drawn through the
interfaces the model offers (a pushed prototype model: gallery, this-looks-like-that, global analysis; a model
without an explanation of its own: post-hoc methods), PNGs that decode, links that resolve, palette compression."""
import io
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from models import PlainClassifier, create_model, pretrained, save_zoo_checkpoint
from models.pretrained import PretrainedEntry, sha256_of
from train.data import SyntheticParts
from train.gallery import main, small_png

SYNTH = dict(num_classes=3, image_size=32, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: one thread is much faster
    yield
    torch.set_num_threads(before)


@pytest.fixture
def releases(tmp_path, monkeypatch):
    """Two tiny releases declared the way checkpoints/manifest.json declares the real ones."""
    dm = SyntheticParts(**SYNTH, train_size=12, val_size=4, test_size=8, batch_size=6, augment=False)
    torch.manual_seed(0)
    protopnet = create_model("protopnet_test_resnet", num_classes=3, stage=2).eval()
    protopnet.push(dm.push_dataloader())
    plain = PlainClassifier(architecture="test_resnet", num_classes=3).eval()
    records = {}
    for name, model in {"protopnet_tiny.synth": protopnet, "plain_tiny.synth": plain}.items():
        file = save_zoo_checkpoint(model, tmp_path / f"{name}.pt", {"dataset": "SyntheticParts"})
        entry = PretrainedEntry(name=name, class_path=f"models.{type(model).__name__}", dataset="SyntheticParts",
                                config=f"configs/{name}.yaml")
        monkeypatch.setitem(pretrained._ENTRIES, name, entry)
        records[name] = {"file": str(file), "sha256": sha256_of(file), "metrics": {"test_acc": 0.5},
                         "data": {"class_path": "train.data.SyntheticParts", "init_args": {**SYNTH, "test_size": 32}}}
    monkeypatch.setattr(pretrained, "_manifest", lambda: records)
    return list(records)


def test_the_gallery_has_one_section_per_release_with_its_figures(releases, tmp_path):
    out = tmp_path / "gallery"
    page = main([*releases, "--out", str(out), "--num-images", "2"]).read_text()
    sections = dict(re.findall(r"^## `([^`]+)`\n(.*?)(?=^## |\Z)", page, flags=re.M | re.S))
    assert list(sections) == releases
    links = {name: re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body) for name, body in sections.items()}
    assert len(links["protopnet_tiny.synth"]) == 4  # prototypes, this looks like that, nearest patches, examples
    assert len(links["plain_tiny.synth"]) == 1 and "gradcam" in sections["plain_tiny.synth"]  # post-hoc methods
    assert "50.0% test accuracy" in sections["plain_tiny.synth"]
    for name, files in links.items():
        assert sorted(p.name for p in (out / name).glob("*.png")) == sorted(f.split("/")[1] for f in files)
        for file in files:
            image = plt.imread(out / file)[..., :3]
            assert image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 0.05  # decoded, not blank
    # A second run replaces the figures (no stale PNGs of an earlier run are left).
    (out / "plain_tiny.synth" / "9-old.png").write_bytes(b"")
    main(["plain_tiny.synth", "--out", str(out), "--num-images", "2"])
    assert [p.name for p in (out / "plain_tiny.synth").glob("*.png")] == [links["plain_tiny.synth"][0].split("/")[1]]


def test_unknown_names_fail_with_one_line(releases, tmp_path):
    with pytest.raises(ValueError, match="not released: nope.synth; released names: .*protopnet_tiny.synth"):
        main(["nope.synth", "--out", str(tmp_path)])


def test_small_png_keeps_the_picture_in_fewer_bytes():
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.imshow(rng.random((32, 32)), cmap="jet")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    before, after = buffer.getvalue(), small_png(buffer.getvalue())
    original = np.asarray(Image.open(io.BytesIO(before)).convert("RGB"), dtype=float)
    reduced = np.asarray(Image.open(io.BytesIO(after)).convert("RGB"), dtype=float)
    assert len(after) < len(before) and original.shape == reduced.shape
    assert np.abs(original - reduced).mean() < 4  # of 255: the same figure
