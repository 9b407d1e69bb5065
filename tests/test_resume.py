"""Interrupted runs: a fit killed with SIGKILL mid-epoch resumes from `last` and ends identically;
checkpoint files are written atomically."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from train.resume import AtomicCheckpointIO, EpochSeededDataset, EpochShuffleSampler

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import lightning.pytorch as pl
    import torch
    from models import CAMNet
    from train.data import SyntheticParts
    from train.resume import AtomicCheckpointIO

    mode, out, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class Kill(pl.Callback):  # SIGKILL: no clean-up, no exception handlers, like a lost machine
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    pl.seed_everything(0)
    model = CAMNet(num_classes=3, backbone="test_resnet", dropout=0.3, lr=1e-2, scheduler="step", step_size=1, gamma=0.5)
    data = SyntheticParts(num_classes=3, image_size=32, train_size=40, val_size=12, test_size=12, batch_size=8)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True)
    trainer = pl.Trainer(max_epochs=3, logger=False, deterministic=True, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out, plugins=[AtomicCheckpointIO()],
                         callbacks=[checkpoint] + ([Kill()] if mode == "kill" else []))
    trainer.fit(model, data, ckpt_path="last" if mode == "resume" else None)
    torch.save({"state": model.state_dict(), "val_acc": trainer.callback_metrics["val/acc"]}, os.path.join(out, "final.pt"))
    """
)


def _run(mode: str, out: Path, kill_step: int = -1) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(out), str(kill_step)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kill_step", [7])  # 5 batches per epoch: killed after 2 batches of epoch 1
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, kill_step):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    done = _run("plain", reference)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _run("kill", interrupted, kill_step)
    assert killed.returncode == -9  # really killed
    assert not (interrupted / "final.pt").exists()
    saved = torch.load(interrupted / "last.ckpt", weights_only=True)
    assert saved["global_step"] == kill_step
    resumed = _run("resume", interrupted)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(reference / "final.pt", weights_only=True)
    actual = torch.load(interrupted / "final.pt", weights_only=True)
    # Deterministic CPU run: the same weights to the bit and the same final metric.
    for name, value in expected["state"].items():
        assert torch.equal(actual["state"][name], value), name
    assert torch.equal(actual["val_acc"], expected["val_acc"])


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


def test_sampler_order_is_a_function_of_seed_and_epoch_and_skips_on_resume():
    a, b = EpochShuffleSampler(10, seed=3, batch_size=4), EpochShuffleSampler(10, seed=3, batch_size=4)
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    assert sorted(i - 20 for i in full) == list(range(10))  # epoch 2 encoded as 2 * n + i
    b.skip_batches = 1
    assert list(b) == full[4:]
    assert list(b) == full  # the skip applies once
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
