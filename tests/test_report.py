"""The HTML report: its sections, accuracies (recorded or evaluated, checked independently), embedded
images, and, where Chromium is installed, every image decoding in a real headless browser."""
import base64
import io
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from browser import CHROMIUM, SKIP_REASON, chromium, images_loaded
from train.report import main
from models import CheckpointError, create_model, save_zoo_checkpoint
from train.data import SyntheticParts

SYNTH = dict(num_classes=3, image_size=32, seed=0)
EVAL_IMAGES = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: one thread is much faster
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Zoo files of a pushed ProtoPNet (accuracy in its metadata), a projected ProtoTree, an ICNN, and a
    Lightning-layout CAM checkpoint whose ModelCheckpoint recorded val/acc."""
    root = tmp_path_factory.mktemp("ckpt")
    dm = SyntheticParts(**SYNTH, train_size=24, val_size=8, test_size=8, batch_size=8, augment=False)
    torch.manual_seed(0)
    protopnet = create_model("protopnet_test_resnet", num_classes=3, stage=2).eval()
    protopnet.push(dm.push_dataloader())
    tree = create_model("prototree_test_resnet", num_classes=3, depth=2).eval()
    tree.push(dm.push_dataloader())
    icnn = create_model("icnn_test_resnet", num_classes=3).eval()
    cam = create_model("cam_test_resnet", num_classes=3).eval()
    meta = {"dataset": "SyntheticParts", "image_size": 32}
    paths = {
        "protopnet": save_zoo_checkpoint(protopnet, root / "protopnet.pt", {**meta, "metrics": {"test_acc": 0.5}}),
        "tree": save_zoo_checkpoint(tree, root / "tree.pt", meta),
        "icnn": save_zoo_checkpoint(icnn, root / "icnn.pt", meta),
    }
    lightning = {"state_dict": cam.state_dict(), "hyper_parameters": dict(cam.hparams), "zoo_class_path": "models.cam.CAMNet",
                 "callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": {"monitor": "val/acc", "best_model_score": torch.tensor(0.75)}}}
    paths["cam"] = root / "epoch=3-step=8.ckpt"  # a Lightning file name with '=' in it
    torch.save(lightning, paths["cam"])
    return {"models": {"protopnet": protopnet, "tree": tree, "icnn": icnn, "cam": cam}, "paths": paths}


@pytest.fixture(scope="module")
def report(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    p = checkpoints["paths"]
    args = [f"protopnet={p['protopnet']}", f"tree={p['tree']}", f"icnn={p['icnn']}", str(p["cam"]),
            "--out", str(out), "--data", "synthetic", "--image-size", "32", "--num-images", "2",
            "--eval-images", str(EVAL_IMAGES)]
    return main(args)


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', page, flags=re.S))


def _images(section: str) -> list[np.ndarray]:
    return [plt.imread(io.BytesIO(base64.b64decode(data)), format="png")
            for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', section)]


def test_report_has_one_section_per_model_with_the_family_figures(report):
    page = report.read_text()
    sections = _sections(page)
    assert list(sections) == ["protopnet", "tree", "icnn", "epoch=3-step=8"]
    # prototype models: gallery, this-looks-like-that, global analysis, examples (+ tree and path for the tree)
    # | filter parts, examples | CAM grid, examples
    counts = {name: len(_images(body)) for name, body in sections.items()}
    assert counts == {"protopnet": 4, "tree": 6, "icnn": 2, "epoch=3-step=8": 2}
    for body in sections.values():
        for image in _images(body):
            assert image.shape[0] > 50 and image.shape[1] > 50 and image[..., :3].std() > 0.05  # decoded, not blank
    assert "The whole tree" in sections["tree"] and "Filter parts" in sections["icnn"]
    assert "<th>model</th><td>ProtoPNet</td>" in sections["protopnet"]
    assert page.count("<img ") == sum(counts.values())


def _accuracy_rows(section: str) -> dict[str, str]:
    return dict(re.findall(r"<tr><th>accuracy: ([^<]+)</th><td>([^<]+)</td></tr>", section))


def test_recorded_accuracies_are_reported_and_missing_ones_evaluated(report, checkpoints):
    sections = _sections(report.read_text())
    assert _accuracy_rows(sections["protopnet"]) == {"test_acc": "50.0%"}
    assert _accuracy_rows(sections["epoch=3-step=8"]) == {"val/acc (best checkpoint)": "75.0%"}
    dataset = SyntheticParts(**SYNTH, test_size=EVAL_IMAGES, cache=False, augment=False).dataset("test")
    images = torch.stack([dataset[i]["image"] for i in range(EVAL_IMAGES)])
    labels = torch.stack([dataset[i]["label"] for i in range(EVAL_IMAGES)])
    for name in ("tree", "icnn"):
        with torch.no_grad():
            expected = (checkpoints["models"][name](images).argmax(1) == labels).float().mean().item()
        rows = _accuracy_rows(sections[name])
        assert rows == {f"evaluated on {EVAL_IMAGES} SyntheticParts test images": f"{100 * expected:.1f}%"}


def test_without_data_the_prototypes_and_tree_come_from_the_checkpoints_alone(checkpoints, tmp_path):
    p = checkpoints["paths"]
    page = main([str(p["protopnet"]), str(p["tree"]), "--data", "none", "--out", str(tmp_path)]).read_text()
    sections = _sections(page)
    assert {name: len(_images(body)) for name, body in sections.items()} == {"protopnet": 1, "tree": 2}  # + gallery
    assert "stored patches" in page and "The whole tree" in page and "No images given" in page


def test_bad_checkpoints_fail_with_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="no pretrained checkpoint named .* and no such file"):
        main([str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        main([str(junk), "--out", str(tmp_path)])


def test_a_released_name_is_reported_with_its_recorded_accuracy(checkpoints, tmp_path, monkeypatch):
    from models import pretrained
    from models.pretrained import PretrainedEntry, sha256_of

    file = checkpoints["paths"]["icnn"]
    entry = PretrainedEntry(name="icnn_tiny.synth", class_path="models.InterpretableCNN", dataset="-", config="-")
    monkeypatch.setitem(pretrained._ENTRIES, "icnn_tiny.synth", entry)
    record = {"file": str(file), "sha256": sha256_of(file), "data": {"class_path": "train.data.SyntheticParts",
                                                                      "init_args": {**SYNTH, "test_size": 8}}}
    monkeypatch.setattr(pretrained, "_manifest", lambda: {"icnn_tiny.synth": record})
    page = main(["icnn_tiny.synth", "--out", str(tmp_path), "--num-images", "2", "--eval-images", "8"]).read_text()
    sections = _sections(page)
    assert list(sections) == ["icnn_tiny.synth"]  # the released name names the section
    assert f"<td>{file}</td>" not in page and "<td>icnn_tiny.synth</td>" in sections["icnn_tiny.synth"]
    assert len(_images(sections["icnn_tiny.synth"])) == 2  # --data auto: the release's recipe is SyntheticParts


RELEASED_CAM = Path(__file__).resolve().parents[1] / "checkpoints" / "cam_resnet18.synthparts.pt"


@pytest.mark.skipif(not RELEASED_CAM.is_file(), reason="the released CAM checkpoint is not built")
def test_the_released_cam_checkpoint_by_name(tmp_path):
    page = main(["cam_resnet18.synthparts", "--data", "none", "--out", str(tmp_path)]).read_text()
    section = _sections(page)["cam_resnet18.synthparts"]
    assert "<th>model</th><td>CAMNet</td>" in section and "No images given" in section


# ------------------------------------------------------------------------------------ headless Chromium
@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_every_image_loads_in_headless_chromium_and_the_page_is_not_blank(report, tmp_path):
    total = report.read_text().count("<img ")
    assert images_loaded(tmp_path, report) == (total, total)
    # The check can fail: a copy with one broken link reports it.
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace("</section>", '<img src="missing.png" alt="x"></section>', 1))
    assert images_loaded(tmp_path, broken) == (total, total + 1)
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars", report.as_uri())
    pixels = plt.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    not_white = (pixels < 0.9).any(axis=2).mean()
    assert not_white > 0.02 and pixels.std() > 0.05  # text and figures, not an empty page
