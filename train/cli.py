"""LightningCLI of the zoo: `python train.py fit --config configs/<family>/<recipe>.yaml`.

Each run gets its own folder ``runs/<name>/<timestamp>/`` holding the resolved ``config.yaml``,
``checkpoints/``, ``figures/`` and the logger's files, so two runs never clash.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from models.base import InterpretableClassifier
from models.pretrained import CheckpointError
from models.pretrained import zoo_classes
from models.pretrained import _load_state as load_state
from models.pretrained import _read as read_checkpoint

from .errors import run_main
from .phases import Phases
from .resume import AtomicCheckpointIO

__all__ = ["ZooCLI", "main"]


class _SaveConfigInRunDir(SaveConfigCallback):
    """Writes the resolved config into the run folder (`trainer.default_root_dir`)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        path = Path(trainer.default_root_dir) / self.config_filename
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def _unique_run_dir(root: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, i = root / name / stamp, 1
    while run_dir.exists():
        run_dir, i = root / name / f"{stamp}-{i}", i + 1
    return run_dir


class ZooCLI(LightningCLI):
    """LightningCLI with a run folder per run, test-after-fit, and plain-typed model arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", _SaveConfigInRunDir)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(InterpretableClassifier, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=str | None, default=None, help="run name: runs/<name>/<timestamp>/")
        parser.add_argument("--runs_root", type=str, default="runs", help="folder that holds the runs")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="test the best checkpoint after fit")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.get("default_root_dir") in (None, os.getcwd(), "."):
            name = cfg.get("name") or cfg.model.class_path.rsplit(".", 1)[-1].lower()
            cfg.trainer.default_root_dir = str(_unique_run_dir(Path(cfg.get("runs_root") or "runs"), name))
        run_dir = cfg.trainer.default_root_dir
        logger = cfg.trainer.get("logger")
        for spec in logger if isinstance(logger, list) else [logger]:
            init = getattr(spec, "init_args", None)
            if init is not None and init.get("save_dir") in (None, ".", ""):
                init.save_dir = run_dir
        for spec in cfg.trainer.get("callbacks") or []:
            if spec.class_path.endswith("ModelCheckpoint") and spec.init_args.get("dirpath") is None:
                spec.init_args.dirpath = str(Path(run_dir) / "checkpoints")

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer, with crash-safe checkpoint files unless the config names its own CheckpointIO, and
        the phase callback (`Phases`) unless the config names one."""
        trainer = super().instantiate_trainer(**kwargs)
        connector = trainer._accelerator_connector
        if getattr(connector, "checkpoint_io", None) is None:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if not any(isinstance(c, Phases) for c in trainer.callbacks):
            trainer.callbacks.append(Phases())
        return trainer

    def _parse_ckpt_path(self) -> None:
        """LightningCLI imports the ``_class_path`` that a ``--ckpt_path`` file's hyper-parameters name;
        a file naming anything but a zoo model class is refused first, so it cannot import other modules."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            class_path = (read_checkpoint(Path(path)).get("hyper_parameters") or {}).get("_class_path")
            if class_path is not None and str(class_path) not in zoo_classes():
                raise CheckpointError(f"--ckpt_path {path}: refusing to build {str(class_path)[:120]!r}: "
                                      "not a model class of the zoo")
        super()._parse_ckpt_path()

    def _check_ckpt_path(self) -> None:
        """Fail in one line (`CheckpointError`) on a ``--ckpt_path`` file that is unreadable, not
        weights-only or of another architecture, before Lightning's restore raises deep inside."""
        path = self.config_init[self.subcommand].get("ckpt_path")
        if not path or not Path(path).is_file():  # "last", "best" or a missing file: Lightning's own messages
            return
        payload = read_checkpoint(Path(path))
        if not isinstance(payload.get("state_dict"), dict):
            raise CheckpointError(f"--ckpt_path {path}: no state_dict, not a Lightning checkpoint")
        load_state(self.model, payload["state_dict"], path)  # the weights Lightning restores next

    before_fit = before_validate = before_test = before_predict = _check_ckpt_path

    def after_fit(self) -> None:
        """Test the best checkpoint after ``fit`` (``--test_after_fit false`` skips it)."""
        cfg = self.config[self.subcommand]
        if not cfg.get("test_after_fit") or self.trainer.fast_dev_run:
            return
        has_best = any(isinstance(c, ModelCheckpoint) and c.best_model_path for c in self.trainer.callbacks)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)


def main(args: list[str] | None = None) -> ZooCLI:
    """Entry point used by `train.py`; `args` replaces sys.argv (for tests). A config the parser rejects
    raises `argparse.ArgumentError` (one of `train.errors.USER_ERRORS`) instead of exiting."""
    return ZooCLI(args=args, parser_kwargs={"default_env": False, "exit_on_error": False})


if __name__ == "__main__":
    run_main(main)
