"""The training CLI in a subprocess, as a user runs it; user errors and crafted checkpoints at every
command-line entry point."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

TINY = [
    "--trainer.logger", "false",
    "--trainer.enable_progress_bar", "false",
    "--model.init_args.backbone", "test_resnet",
    "--model.init_args.stage", "null",
    "--data.init_args.train_size", "40",
    "--data.init_args.val_size", "20",
    "--data.init_args.test_size", "20",
    "--data.init_args.image_size", "32",
    "--data.init_args.batch_size", "20",
]


def run_cli(repo_root: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "IZOO_DEBUG"} | dict(WANDB_MODE="disabled", PYTHONPATH=str(repo_root))
    return subprocess.run(
        [sys.executable, str(repo_root / "train.py"), *args],
        cwd=cwd or repo_root, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, request):
    repo_root = Path(request.config.rootpath)
    runs = tmp_path_factory.mktemp("runs")
    extra = tmp_path_factory.mktemp("cfg") / "override.yaml"
    extra.write_text("trainer:\n  max_epochs: 2\n")
    args = ["fit", "--config", "configs/cam/synthetic.yaml", "--config", str(extra), *TINY,
            "--runs_root", str(runs), "--name", "tiny"]
    first = run_cli(repo_root, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(repo_root, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    return repo_root, runs, first


def test_fit_writes_config_checkpoint_and_figures(fitted):
    _, runs, first = fitted
    run_dirs = sorted((runs / "tiny").iterdir())
    assert len(run_dirs) == 2, "two runs in the same folder must not clash"
    for run in run_dirs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["trainer"]["max_epochs"] == 2  # the second --config overrides the first
        assert cfg["model"]["init_args"]["backbone"] == "test_resnet"
        assert cfg["seed_everything"] == 0
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "figures" / "explanations.png").stat().st_size > 1000
    assert "test/acc" in first.stdout  # the best checkpoint was tested after fit


def test_checkpoint_is_weights_only_and_tests_again(fitted):
    repo_root, runs, _ = fitted
    run = sorted((runs / "tiny").iterdir())[0]
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # nothing but tensors and plain values
    assert state["hyper_parameters"]["num_classes"] == 10
    result = run_cli(repo_root, "test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(run / "retest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout


def test_wrong_key_is_named(repo_root, tmp_path):
    result = run_cli(repo_root, "fit", "--config", "configs/cam/synthetic.yaml", "--model.init_args.num_clases", "3")
    assert result.returncode != 0
    assert "num_clases" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    result = run_cli(repo_root, "fit", "--config", "configs/cam/synthetic.yaml", "--config", str(bad))
    assert result.returncode != 0
    assert "max_epoch" in result.stderr


def test_print_config_resolves_classes(repo_root):
    result = run_cli(repo_root, "fit", "--config", "configs/cam/synthetic.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = yaml.safe_load(result.stdout)
    assert cfg["model"]["class_path"] == "models.CAMNet"
    assert cfg["data"]["class_path"] == "train.data.SyntheticParts"
    assert cfg["model"]["init_args"]["lr"] == 0.002


def test_class_count_mismatch_names_both_numbers(repo_root, tmp_path):
    result = run_cli(repo_root, "fit", "--config", "configs/cam/synthetic.yaml", *TINY,
                     "--model.init_args.num_classes", "7", "--runs_root", str(tmp_path))
    assert result.returncode != 0
    assert "num_classes=7" in result.stderr and "10 classes" in result.stderr


def test_wrong_type_and_unknown_backbone_fail_before_training(repo_root, tmp_path):
    result = run_cli(repo_root, "fit", "--config", "configs/cam/synthetic.yaml", "--trainer.max_epochs", "many")
    assert result.returncode != 0
    assert "max_epochs" in result.stderr
    result = run_cli(repo_root, "fit", "--config", "configs/cam/synthetic.yaml", *TINY,
                     "--model.init_args.backbone", "resnet_nope", "--runs_root", str(tmp_path))
    assert result.returncode != 0
    assert "unknown backbone 'resnet_nope'" in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained, nothing written


def test_trainer_gets_crash_safe_checkpoints_and_the_resume_hooks(tmp_path):
    from train.cli import ZooCLI
    from train.phases import Phases
    from train.resume import AtomicCheckpointIO

    cli = ZooCLI(args=["--config", "configs/cam/synthetic.yaml", "--trainer.logger", "false",
                       "--runs_root", str(tmp_path)], run=False, parser_kwargs={"default_env": False})
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(c, Phases) for c in cli.trainer.callbacks) == 1


# ------------------------------------------------------------------------------------ user errors, crafted files
class _RunsCode:
    """Unpickling this calls os.system: what a weights-only read must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(folder: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints whose class path names code to run, or a class outside the zoo, and a pickle payload.
    Each one, if built, would create `marker` (or at least be a non-zoo object)."""
    from models.pretrained import FORMAT

    def zoo(class_path: str, init_args: dict) -> dict:
        return {"format": FORMAT, "class_path": class_path, "init_args": init_args, "state_dict": {}, "meta": {}}

    touch = ["touch", str(marker)]
    payloads = {
        "lightning_class_path": {"hyper_parameters": {"_class_path": "subprocess.Popen", "args": touch}, "state_dict": {}},
        "zoo_class_path": {"zoo_class_path": "subprocess.Popen", "hyper_parameters": {"args": touch}, "state_dict": {}},
        "class_path": zoo("subprocess.Popen", {"args": touch}),
        "os_system": zoo("os.system", {"command": f"touch {marker}"}),
        "builtins_open": zoo("builtins.open", {"file": str(marker), "mode": "w"}),
        "non_zoo_class": {"zoo_class_path": "torch.nn.Linear", "hyper_parameters": {"in_features": 2, "out_features": 2},
                          "state_dict": {}},
        "zoo_module_not_a_model": zoo("models.backbones.Backbone", {}),
        "no_such_zoo_module": zoo("models.no_such_module.Popen", {"args": touch}),
        "reduce_payload": {"state_dict": {}, "hyper_parameters": {}, "zoo_class_path": "models.CAMNet",
                           "extra": _RunsCode(marker)},
    }
    paths = {}
    for name, payload in payloads.items():
        paths[name] = folder / f"{name}.ckpt"
        torch.save(payload, paths[name])
    return paths


def _entry_points(path: Path, out: Path) -> dict[str, tuple]:
    """Every command-line entry point that reads a checkpoint file: (main, argv)."""
    from models import convert
    from train import compare, dissect, report, sanity

    return {
        "train.report": (report.main, [str(path), "--out", str(out), "--data", "none"]),
        "train.compare": (compare.main, ["--checkpoint", str(path), "--num-images", "1", "--out", str(out)]),
        "train.dissect": (dissect.main, ["--model", str(path), "--out", str(out)]),
        "train.sanity": (sanity.main, ["--checkpoint", str(path), "--num-images", "1", "--out", str(out / "s.md")]),
        "models.convert": (convert.main, [str(path), "--arch", "protopnet", "--out", str(out / "zoo.pt")]),
    }


def _assert_one_line_refusal(stderr: str, code) -> None:
    lines = stderr.strip().splitlines()
    assert code not in (0, None), stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr


def test_crafted_checkpoints_are_refused_by_every_entry_point_in_one_line(tmp_path, capsys):
    from train.errors import run_main

    marker = tmp_path / "marker"
    for kind, path in _crafted(tmp_path, marker).items():
        for app, (main, argv) in _entry_points(path, tmp_path / "out").items():
            with pytest.raises(SystemExit) as exit_:
                run_main(main, argv)  # what `python -m <app>` runs
            stderr = capsys.readouterr().err
            _assert_one_line_refusal(stderr, exit_.value.code)
            assert not marker.exists(), f"{app} ran the code of {kind}"
            assert str(path) in stderr or "refusing" in stderr or "not a model class" in stderr, (app, kind, stderr)


def test_the_class_path_exploit_is_refused_as_a_subprocess(repo_root, tmp_path):
    marker = tmp_path / "marker"
    path = _crafted(tmp_path, marker)["lightning_class_path"]
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    env.pop("IZOO_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "train.report", str(path), "--out", str(tmp_path / "r"), "--data", "none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    _assert_one_line_refusal(done.stderr, done.returncode)
    assert not marker.exists()
    assert not (tmp_path / "r" / "index.html").exists()
    # train.py's own --ckpt_path: LightningCLI would import the module the checkpoint's _class_path names
    done = run_cli(repo_root, "test", "--config", "configs/cam/synthetic.yaml", *TINY, "--ckpt_path", str(path),
                   "--runs_root", str(tmp_path / "runs"))
    assert done.returncode == 1 and "Traceback" not in done.stderr and not marker.exists()
    assert "refusing to build 'subprocess.Popen'" in done.stderr.splitlines()[-1]


def test_user_errors_of_train_py_are_one_line(repo_root, tmp_path):
    """A missing data folder and a checkpoint of another architecture, as a user runs train.py."""
    from models import create_model

    missing = run_cli(repo_root, "fit", "--config", "configs/cam/synthetic.yaml", *TINY[:4],
                      "--model.init_args.backbone", "test_resnet", "--model.init_args.stage", "null",
                      "--data", "train.data.ImageFolderData", "--data.init_args.root", str(tmp_path / "no_folder"),
                      "--runs_root", str(tmp_path / "runs"))
    _assert_one_line_refusal(missing.stderr.splitlines()[-1], missing.returncode)
    assert "Traceback" not in missing.stderr and missing.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no_folder" in missing.stderr.splitlines()[-1]

    # CAMNet's hyper-parameters (LightningCLI merges them into the config) over an ICNN's weights
    cam = create_model("cam_test_resnet", num_classes=10, stage=None)
    icnn = create_model("icnn_test_resnet", num_classes=10)
    wrong = tmp_path / "icnn.ckpt"
    torch.save({"state_dict": icnn.state_dict(), "hyper_parameters": {"_class_path": "models.CAMNet", **cam.hparams}}, wrong)
    args = ["test", "--config", "configs/cam/synthetic.yaml", *TINY, "--ckpt_path", str(wrong), "--runs_root", str(tmp_path / "runs")]
    result = run_cli(repo_root, *args)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last.startswith("error: checkpoint ") and str(wrong) in last and "does not fit CAMNet" in last


def test_izoo_debug_lets_the_traceback_through(tmp_path, monkeypatch, capsys):
    from models import CheckpointError
    from train import report
    from train.errors import run_main

    argv = [str(tmp_path / "missing.pt"), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        run_main(report.main, argv)
    assert exit_.value.code == 1 and capsys.readouterr().err.startswith("error: no pretrained checkpoint named")
    monkeypatch.setenv("IZOO_DEBUG", "1")
    with pytest.raises(CheckpointError, match="no pretrained checkpoint named"):
        run_main(report.main, argv)

    def bug(argv):
        raise KeyError("a bug, not a user error")

    monkeypatch.delenv("IZOO_DEBUG")
    with pytest.raises(KeyError):  # not one of USER_ERRORS: the traceback stays
        run_main(bug)


def test_one_line_joins_jsonargparse_reports_and_drops_their_noise():
    from train.errors import USER_ERRORS, one_line

    report = ('Parser key "trainer.max_epochs":\n  Does not validate against any of the Union subtypes\n'
              "  Subtypes: [<class 'int'>, <class 'NoneType'>]\n  Errors:\n    - Expected a <class 'int'>\n"
              "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: many")
    assert one_line(ValueError(report)) == 'Parser key "trainer.max_epochs": Expected a <class \'int\'>; Given value: many'
    assert one_line(ValueError("")) == "ValueError"
    assert one_line(ValueError("x" * 1000)) == "x" * 397 + "..."
    parsed = "Given value: {" + ", ".join(f"'k{i}': {i}" for i in range(30)) + "}"
    assert one_line(ValueError(f'Parser key "model":\n  {parsed}')) == 'Parser key "model":' 
    from models import CheckpointError
    from train.data import DataFormatError, ImageLoadError

    for error in (CheckpointError, DataFormatError, ImageLoadError, FileNotFoundError):
        assert issubclass(error, USER_ERRORS)
    assert not issubclass(RuntimeError, USER_ERRORS) and not issubclass(KeyError, USER_ERRORS)  # bugs keep their traceback
