"""Interrupted runs: a fit killed with SIGKILL mid-epoch or mid-push resumes from `last` and ends
identically; checkpoint files are written atomically."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from train.resume import AtomicCheckpointIO, EpochSeededDataset, EpochShuffleSampler

ROOT = Path(__file__).resolve().parents[1]

# "kill" dies by SIGKILL before training step `kill_step`; "resume" resumes the runs in the given
# folders (comma-separated) from `last`, then fits the uninterrupted reference in a fresh folder next
# to them (fewer interpreter starts).
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import lightning.pytorch as pl
    import torch
    from models import CAMNet, create_model
    from train.data import SyntheticParts
    from train.phases import Phases
    from train.resume import AtomicCheckpointIO

    mode, outs, kill_step, family = sys.argv[1], [Path(f) for f in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]

    class Kill(pl.Callback):  # SIGKILL: no clean-up, no exception handlers, like a lost machine
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)

    def fit(folder, kill, ckpt_path):
        pl.seed_everything(0)
        if family == "cam":
            model = CAMNet(num_classes=3, backbone="test_resnet", dropout=0.3, lr=1e-2, scheduler="step", step_size=1, gamma=0.5)
        elif family == "pipnet":  # 0 pretraining | 1 classifier only | 2 everything: two optimisers, per-step rates
            model = create_model("pipnet_test_resnet", num_classes=3, epochs_pretrain=1, epochs=2, finetune_epochs=1,
                                 freeze_epochs=1, lr_block=1e-2, lr_net=1e-2, topk=2, patch_size=8)
        elif family == "protopool":  # epoch 0 warm, 1 joint (Gumbel noise and mixup draws), 2 push + last layer
            model = create_model("protopool_test_resnet", num_classes=3, stage=2, warmup_time=2, num_train_epochs=3,
                                 last_layer_epochs=1, lr=1e-2)
        else:  # a tree with derivative-free leaves, its trunk frozen in epoch 0 (phase warm), then joint
            model = create_model("prototree_test_resnet", num_classes=3, depth=2, freeze_epochs=1, lr_net=1e-2,
                                 milestones=[1, 2])
        data = SyntheticParts(num_classes=3, image_size=32, train_size=40, val_size=12, test_size=12, batch_size=8)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True)
        trainer = pl.Trainer(max_epochs=3, logger=False, deterministic=True, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=folder, plugins=[AtomicCheckpointIO()],
                             callbacks=[checkpoint, Phases(figures=False, final_checkpoint=False)] + ([Kill()] if kill else []))
        trainer.fit(model, data, ckpt_path=ckpt_path)
        torch.save({"state": model.state_dict(), "val_acc": trainer.callback_metrics["val/acc"]}, folder / "final.pt")

    if mode == "kill":
        fit(outs[0], True, None)
    else:
        for folder in outs:
            fit(folder, False, "last")
        fit(outs[0].parent / "reference", False, None)
    """
)


def _start(mode: str, *outs: Path, kill_step: int = -1, script: str = SCRIPT, family: str = "cam") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    return subprocess.Popen([sys.executable, "-c", script, mode, ",".join(map(str, outs)), str(kill_step), family], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run(mode: str, *outs: Path, kill_step: int = -1, script: str = SCRIPT, family: str = "cam") -> tuple[int, str]:
    """Return code and the end of stderr."""
    process = _start(mode, *outs, kill_step=kill_step, script=script, family=family)
    _, err = process.communicate(timeout=600)
    return process.returncode, err[-3000:]


# PIP-Net and ProtoPool resume like the others but cost 20-60 s each on 2 CPU cores: in the slow tier.
@pytest.mark.parametrize("family", ["cam", "prototree", pytest.param("pipnet", marks=pytest.mark.slow),
                                    pytest.param("protopool", marks=pytest.mark.slow)])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, family):
    # 5 batches per epoch. Killed after 2 batches of epoch 1 (step 7), and at the epoch boundary
    # (step 5: `last` was saved after the last batch of epoch 0, before its validation; Lightning
    # resumes it straight into epoch 1, whose batches must all be trained). The tree changes phase
    # there (its trunk unfreezes) and its leaf update subtracts the counts of the epoch's start.
    runs = {7: tmp_path / "mid_epoch", 5: tmp_path / "epoch_boundary"}
    killers = {step: _start("kill", folder, kill_step=step, family=family) for step, folder in runs.items()}
    for step, folder in runs.items():
        _, err = killers[step].communicate(timeout=600)
        assert killers[step].returncode == -9, err[-3000:]  # really killed
        assert not (folder / "final.pt").exists()
        assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == step
    code, err = _run("resume", *runs.values(), family=family)
    assert code == 0, err
    expected = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    for step, folder in runs.items():
        actual = torch.load(folder / "final.pt", weights_only=True)
        # Deterministic CPU run: the same weights to the bit and the same final metric.
        for name, value in expected["state"].items():
            assert torch.equal(actual["state"][name], value), (step, name)
        assert torch.equal(actual["val_acc"], expected["val_acc"]), step


# A ProtoPNet whose Lightning epochs are 0 warm | 1 joint | 2 push, then last layer. "kill" dies by
# SIGKILL inside the push, after it has searched `kill_step` batches of the push loader (3 in all);
# "resume" resumes that run from `last`, then fits an uninterrupted reference in a fresh folder.
PUSH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import lightning.pytorch as pl
    import torch
    import models.prototypes
    from models import create_model
    from train.data import SyntheticParts
    from train.phases import Phases
    from train.resume import AtomicCheckpointIO

    mode, out, kill_after = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)

    if mode == "kill":
        update, seen = models.prototypes.PushSearch.update, []

        def update_then_die(self, *args, **kwargs):
            if len(seen) == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            seen.append(1)
            return update(self, *args, **kwargs)

        models.prototypes.PushSearch.update = update_then_die

    class FirstBatch(pl.Callback):
        def __init__(self):
            self.first = None
        def on_train_batch_start(self, trainer, model, batch, batch_idx):
            if self.first is None:  # after the push callback and the model's phase switch
                self.first = (trainer.current_epoch, model.phase, int(model.push_epoch))

    def fit(folder, ckpt_path):
        pl.seed_everything(0)
        model = create_model("protopnet_test_resnet", num_classes=3, stage=2, num_warm_epochs=1, push_start=1,
                             push_every=1, last_layer_epochs=1, num_train_epochs=2, last_layer_lr=1e-2)
        data = SyntheticParts(num_classes=3, image_size=32, train_size=24, val_size=12, test_size=12, batch_size=8)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)  # each epoch, as the configs
        phases = FirstBatch()
        trainer = pl.Trainer(max_epochs=3, logger=False, deterministic=True, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=folder, plugins=[AtomicCheckpointIO()],
                             callbacks=[checkpoint, Phases(max_prototypes=6), phases])
        trainer.fit(model, data, ckpt_path=ckpt_path)
        torch.save({"state": model.state_dict(), "val_acc": trainer.callback_metrics["val/acc"],
                    "first": phases.first}, folder / "final.pt")

    if mode == "kill":
        fit(out, None)
    else:
        fit(out, "last")
        fit(out.parent / "reference", None)
    """
)


def test_sigkill_during_push_then_resume_matches_uninterrupted_run(tmp_path):
    interrupted = tmp_path / "interrupted"
    code, err = _run("kill", interrupted, kill_step=1, script=PUSH_SCRIPT)  # dies after 1 of 3 push batches
    assert code == -9, err
    # Nothing half-written: every file is a whole checkpoint, the newest one from before the push
    # (end of Lightning epoch 1, 3 batches an epoch); the push's gallery was not begun.
    assert sorted(p.name for p in interrupted.iterdir()) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    for path in interrupted.glob("*.ckpt"):
        torch.load(path, weights_only=True)
    saved = torch.load(interrupted / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 6 and saved["epoch"] == 1
    assert saved["state_dict"]["push_epoch"] == -1
    assert not (interrupted / "figures").exists()

    code, err = _run("resume", interrupted, script=PUSH_SCRIPT)
    assert code == 0, err
    expected = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    actual = torch.load(interrupted / "final.pt", weights_only=True)
    # The resumed run starts at epoch 2 with the push done and the last-layer phase on ...
    assert actual["first"] == (2, "last", 2) and expected["first"] == (0, "warm", -1)
    # ... and ends, on a deterministic CPU run, with the same weights, prototypes, push records
    # (source images, boxes, uint8 patches) to the bit, and the same validation accuracy.
    assert int(expected["state"]["push_epoch"]) == 2
    for name, value in expected["state"].items():
        assert torch.equal(actual["state"][name], value), name
    assert torch.equal(actual["val_acc"], expected["val_acc"])
    gallery = "figures/prototypes_epoch1.png"
    assert np.array_equal(plt.imread(interrupted / gallery), plt.imread(tmp_path / "reference" / gallery))


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def crash(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def _fit_protopnet(folder: Path, ckpt_path: Path | None = None, callbacks=(), **limits):
    """The ProtoPNet of PUSH_SCRIPT in this process, checkpointed after every training step."""
    import lightning.pytorch as pl

    from models import create_model
    from train.data import SyntheticParts
    from train.phases import Phases

    pl.seed_everything(0)
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2, num_warm_epochs=1, push_start=1,
                         push_every=1, last_layer_epochs=1, num_train_epochs=2, last_layer_lr=1e-2)
    data = SyntheticParts(num_classes=3, image_size=32, train_size=24, val_size=12, test_size=12, batch_size=8)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True)
    trainer = pl.Trainer(logger=False, deterministic=True, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=folder, callbacks=[checkpoint, Phases(figures=False), *callbacks],
                         **{"max_epochs": 3, **limits})
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def test_resume_after_an_epochs_last_batch_runs_the_next_epochs_start_hooks(tmp_path):
    # Stopping after epoch 1 leaves last.ckpt from its last training batch: what a SIGKILL during
    # epoch 1's validation or epoch 2's push leaves with per-step checkpoints. Lightning resumes it into
    # epoch 2 without epoch-start hooks; the phase callback runs them before its first batch (the push, the last-layer phase).
    torch.set_num_threads(1)
    expected = _fit_protopnet(tmp_path / "reference").state_dict()
    _fit_protopnet(tmp_path / "stopped", max_epochs=2)
    assert torch.load(tmp_path / "stopped" / "last.ckpt", weights_only=True)["global_step"] == 6
    model = _fit_protopnet(tmp_path / "resumed", tmp_path / "stopped" / "last.ckpt", [])
    assert model.phase == "last" and int(model.push_epoch) == 2
    for name, value in expected.items():
        assert torch.equal(model.state_dict()[name], value), name


def test_protopnet_resumed_mid_epoch_ends_like_the_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    expected = _fit_protopnet(tmp_path / "reference").state_dict()
    _fit_protopnet(tmp_path / "stopped", max_steps=4)  # after 1 of 3 batches of the joint epoch 1
    model = _fit_protopnet(tmp_path / "resumed", tmp_path / "stopped" / "last.ckpt", [])
    for name, value in expected.items():
        assert torch.equal(model.state_dict()[name], value), name


def test_push_gallery_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from explain.viz import save_figure

    path = tmp_path / "prototypes_epoch1.png"
    save_figure(Figure(figsize=(1, 1)), path)
    whole = path.read_bytes()

    def crash(self, fname, *args, **kwargs):  # the process dies half-way through the PNG
        with open(fname, "wb") as fh:
            fh.write(whole[: len(whole) // 2])
        raise OSError("killed while writing")

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(OSError, match="killed while writing"):
        save_figure(Figure(figsize=(1, 1)), path)
    assert path.read_bytes() == whole
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_sampler_order_is_a_function_of_seed_and_epoch_and_skips_on_resume():
    a, b = EpochShuffleSampler(10, seed=3, batch_size=4), EpochShuffleSampler(10, seed=3, batch_size=4)
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    assert sorted(i - 20 for i in full) == list(range(10))  # epoch 2 encoded as 2 * n + i
    b.skip_batches = 1
    assert list(b) == full[4:]
    assert list(b) == full  # the skip applies once
    b.skip_batches = 1
    b.set_epoch(2)  # Lightning re-announcing the same epoch keeps the skip ...
    assert list(b) == full[4:]
    b.skip_batches = 1
    b.set_epoch(3)  # ... moving on to the next one cancels it
    assert len(list(b)) == 10
    a.set_epoch(3)
    assert [i - 30 for i in a] != [i - 20 for i in full]


def test_augmentation_is_seeded_by_epoch_and_index():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    data = EpochSeededDataset(Noisy(), seed=1)
    torch.rand(5)  # whatever ran before does not matter
    first = data[4 + 2]
    torch.rand(7)
    assert torch.equal(data[4 + 2], first)
    assert not torch.equal(data[8 + 2], first)  # another epoch, another draw
