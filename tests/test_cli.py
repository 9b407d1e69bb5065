"""The training CLI in a subprocess, as a user runs it."""
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
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(repo_root))
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
