"""The comparison: intervals, table, the pointing game's tolerance rules, SyntheticParts loading and
re-rendering, and the command line end to end on a tiny model."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import yaml
from scipy import stats

from explain.compare import METRICS, evaluate, pointing_tolerance, summarise, to_markdown
from models import create_model, load_pretrained
from train.apps import load_synthetic, run_config
from train.compare import main

torch.set_num_threads(1)
DATA = {"num_classes": 3, "image_size": 32, "test_size": 4, "clutter": 2, "seed": 0}


def test_summary_mean_and_t_interval_match_scipy():
    values = [0.1, 0.4, 0.35, 0.8, float("nan")]
    rows = [{"model": "m", "method": "gradcam", "metric": "deletion", "image": i, "value": v} for i, v in enumerate(values)]
    (s,) = summarise(rows)
    finite = values[:4]
    low, high = stats.t.interval(0.95, 3, loc=sum(finite) / 4, scale=stats.sem(finite))
    assert s["n"] == 4 and s["mean"] == pytest.approx(sum(finite) / 4)
    assert s["ci_low"] == pytest.approx(low) and s["ci_high"] == pytest.approx(high)


def test_markdown_cells_and_directions():
    summary = [
        {"model": "cam", "method": "gradcam", "metric": "deletion", "n": 9, "mean": 0.25, "ci_low": 0.2, "ci_high": 0.3},
        {"model": "cam", "method": "gradcam", "metric": "insertion", "n": 0, "mean": float("nan"), "ci_low": 0, "ci_high": 0},
    ]
    table = to_markdown(summary, digits=2)
    assert "| model | method | deletion ↓ | insertion ↑ |" in table
    assert "| cam | gradcam | 0.25 ± 0.05 | – |" in table


@pytest.fixture(scope="module")
def synthetic():
    return load_synthetic(DATA, 3)


def test_load_synthetic_and_render_round_trip(synthetic):
    assert synthetic["image"].shape == (3, 3, 32, 32) and synthetic["part_masks"].shape == (3, 4, 32, 32)
    assert synthetic["background_names"] == ["distractor0", "distractor1"]
    render = synthetic["render_fn"]
    for i in range(3):
        torch.testing.assert_close(render(i, []), synthetic["image"][i])  # same bytes as the dataset
        without_head = render(i, ["head"])
        changed = (without_head - synthetic["image"][i]).abs().amax(0) > 0
        head = synthetic["part_masks"][i, 0]
        assert changed[head].all() and not changed[~head].any()  # exactly the head's pixels change
        one_distractor = render(i, ["distractor0"])
        both = render(i, ["distractors"])
        moved_one = (one_distractor - synthetic["image"][i]).abs().amax(0) > 0
        moved_both = (both - synthetic["image"][i]).abs().amax(0) > 0
        assert not (moved_one & synthetic["part_masks"][i].any(0)).any()  # parts untouched
        assert (moved_one <= moved_both).all()  # removing one distractor changes a subset of the pixels


def _checkpoint(tmp_path, num_classes=3):
    """A CAM network saved as train.py saves it, in a run folder whose config.yaml holds the data recipe."""
    torch.manual_seed(0)
    model = create_model("cam_test_resnet", num_classes=num_classes)
    run = tmp_path / "runs" / "tiny_cam" / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    path = run / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "zoo_class_path": "models.cam.CAMNet"}, path)
    config = {"model": {"class_path": "models.CAMNet"}, "data": {"class_path": "train.data.SyntheticParts", "init_args": DATA}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return model.eval(), path


def test_run_config_of_a_run_folder_and_of_a_release(tmp_path, monkeypatch):
    from models import pretrained
    from models.pretrained import PretrainedEntry, save_zoo_checkpoint, sha256_of

    model, path = _checkpoint(tmp_path)
    assert run_config(path)["data"]["init_args"] == DATA  # runs/<name>/<stamp>/config.yaml
    file = save_zoo_checkpoint(model, tmp_path / "tiny.pt")
    assert run_config(file) == {}  # no run folder around it
    entry = PretrainedEntry(name="tiny_cam.test", class_path="models.cam.CAMNet", dataset="-", config="-")
    monkeypatch.setitem(pretrained._ENTRIES, "tiny_cam.test", entry)
    record = {"file": str(file), "sha256": sha256_of(file), "data": {"init_args": DATA}}
    monkeypatch.setattr(pretrained, "_manifest", lambda: {"tiny_cam.test": record})
    assert run_config("tiny_cam.test")["data"]["init_args"] == DATA  # the data recipe the release recorded
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(load_pretrained("tiny_cam.test")(x), model(x))


def test_pointing_tolerance_rules_on_a_constructed_map():
    """A 64 px map peaking at (x, y) = (10, 10) and a one-pixel part at (20, 10): 10 px away. TorchRay's
    15 px at the image's resolution hits; 15 px scaled to 64 / 224 (4.29 px) misses; 11 px hits and 10 px
    misses (strictly within)."""
    images = torch.zeros(1, 3, 64, 64)
    heatmap = torch.zeros(1, 64, 64)
    heatmap[0, 10, 10] = 1.0
    masks = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    masks[0, 0, 10, 20] = True
    batch = {"image": images, "part_masks": masks}
    game = METRICS["pointing_game"]
    assert pointing_tolerance("torchray", 64) == 15.0
    assert pointing_tolerance("scaled", 64) == pytest.approx(15 * 64 / 224)
    assert pointing_tolerance("scaled", 224) == 15.0  # the two rules agree at the paper's 224 px
    assert game(None, images, heatmap, None, batch).item() == 1.0  # default: TorchRay's
    assert game(None, images, heatmap, None, batch, tolerance="torchray").item() == 1.0
    assert game(None, images, heatmap, None, batch, tolerance="scaled").item() == 0.0
    assert game(None, images, heatmap, None, batch, tolerance=11).item() == 1.0
    assert game(None, images, heatmap, None, batch, tolerance=10).item() == 0.0
    masks[0, 0, 10, 14] = True  # 4 px away: within the scaled 4.29 px too
    assert game(None, images, heatmap, None, batch, tolerance="scaled").item() == 1.0
    for bad in ("paper", 0, -1.0, True):
        with pytest.raises(ValueError, match="tolerance must be 'torchray', 'scaled' or a number"):
            pointing_tolerance(bad, 64)


def test_main_end_to_end(tmp_path):
    _, path = _checkpoint(tmp_path)
    out = tmp_path / "out"
    summary = main(["--checkpoint", str(path), "--methods", "intrinsic", "gradcam", "rise", "--metrics", "deletion",
                    "pointing_game", "funnybirds", "--num-images", "3", "--batch-size", "2", "--quick",
                    "--device", "cpu", "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"results.csv", "summary.csv", "table.md", "grid_tiny_cam.png"}
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    metrics = {"deletion", "pointing_game", "fb_single_deletion", "fb_preservation", "fb_deletion",
               "fb_distractibility", "fb_background_independence", "time_ms"}
    assert {r["metric"] for r in rows} == metrics
    assert len(rows) == 3 * len(metrics) * 3  # methods x metrics x images
    for s in summary:  # the table's means are the means of the per-image rows
        values = [float(r["value"]) for r in rows if (r["method"], r["metric"]) == (s["method"], s["metric"])]
        finite = [v for v in values if math.isfinite(v)]
        assert s["mean"] == pytest.approx(sum(finite) / len(finite)) if finite else math.isnan(s["mean"])
    assert "| tiny_cam | rise |" in (out / "table.md").read_text()


def test_data_file_and_plain_model_skip_intrinsic(tmp_path, synthetic):
    _, path = _checkpoint(tmp_path)
    data_file = tmp_path / "data.pt"
    torch.save({k: synthetic[k] for k in ("image", "label", "part_masks", "body_box")}, data_file)
    summary = main(["--checkpoint", f"cam={path}", "--data-file", str(data_file),
                    "--methods", "gradcam", "--model-methods", "cam=intrinsic,rise", "--method-arg", "rise.n_masks=4",
                    "--metrics", "energy_pointing_game", "relevance_mass", "--num-images", "2",
                    "--device", "cpu", "--out", str(tmp_path / "o2"), "--figure-images", "2"])
    assert {s["metric"] for s in summary} == {"energy_pointing_game", "relevance_mass", "time_ms"}
    assert {s["method"] for s in summary} == {"intrinsic", "rise"}  # the per-model override wins
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    rows, _ = evaluate({"plain": plain}, {k: synthetic[k] for k in ("image", "label", "part_masks")},
                       ["intrinsic", "gradcam"], ["pointing_game"])
    assert {r["method"] for r in rows} == {"gradcam"}  # a model without explain() has no intrinsic row
    rows, _ = evaluate({"plain": plain}, {k: synthetic[k] for k in ("image", "label", "part_masks")}, ["gradcam"],
                       ["pointing_game"], metric_kwargs={"pointing_game": {"tolerance": 100.0}})
    assert all(r["value"] == 1.0 for r in rows if r["metric"] == "pointing_game")  # every pixel is within 100 px
    with pytest.raises(ValueError, match="NAME.option=value"):
        main(["--checkpoint", str(path), "--metric-arg", "deletion=3", "--data-file", str(data_file)])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate({"plain": plain}, synthetic, ["gradcam"], ["nope"])


@pytest.mark.parametrize("resolution", [64, 128])
def test_resolution_presets_name_releases_of_that_resolution(resolution):
    from models import list_pretrained
    from train.apps import synthetic_recipe
    from train.compare import _parse_args

    args = _parse_args(["--resolution", str(resolution)])
    names = dict(spec.split("=", 1) for spec in args.checkpoint)
    assert set(names.values()) <= set(list_pretrained())
    assert all(synthetic_recipe(source)["image_size"] == resolution for source in names.values())
    assert len({load_pretrained(s).__class__ for s in names.values()}) == len(names)  # one network per family
    assert len(names) == (9 if resolution == 128 else 8)  # the 64 px CBM release is at 48 px: a run of its own
    assert args.localisation == ["upsampling", "smoothgrad", "randgrads", "prp"] and args.sanity
    assert f"deletion.step={(resolution // 64) ** 2 * 128}" in args.metric_arg  # 33 steps per curve at both


def test_config_file_gives_defaults_that_flags_override(tmp_path):
    from train.compare import _parse_args

    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"checkpoint": "cam=a.pt", "methods": ["gradcam"], "num-images": 2,
                                      "metric_arg": {"deletion.step": 7}, "model_methods": {"cam": ["rise", "lime"]}}))
    args = _parse_args(["--config", str(config), "--num-images", "3"])
    assert args.checkpoint == ["cam=a.pt"] and args.methods == ["gradcam"] and args.num_images == 3
    assert args.metric_arg == ["deletion.step=7"] and args.model_methods == ["cam=rise,lime"]
    config.write_text(yaml.safe_dump({"checkpoint": ["a.pt"], "nope": 1}))
    with pytest.raises(ValueError, match="unknown option 'nope'"):
        _parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match="--resolution 99: no preset"):
        _parse_args(["--resolution", "99"])
    with pytest.raises(ValueError, match="not both"):
        _parse_args(["--resolution", "64", "--config", str(config)])
    with pytest.raises(ValueError, match="give --checkpoint"):
        _parse_args([])
