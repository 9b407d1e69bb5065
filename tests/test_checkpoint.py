"""Save, load, same logits: Lightning checkpoints of the zoo load without the CLI and weights-only;
the release step takes the checkpoint the whole pipeline ends with."""
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from checkpoints.build import builder_overrides, released_checkpoint
from models import CAMNet, CheckpointError, NonFiniteLossError, create_model, load_pretrained
from train.resume import AtomicCheckpointIO


def _loader(n=16, classes=3, size=32):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g)
    labels = torch.arange(n) % classes
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def test_checkpoint_round_trip_same_logits(tmp_path):
    torch.manual_seed(0)
    model = CAMNet(num_classes=3, backbone="test_resnet", extra_conv=8, lr=1e-2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, _loader(), _loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    expected = model(x)
    loaded = CAMNet.load_from_checkpoint(path, map_location="cpu").eval()
    assert loaded.hparams.extra_conv == 8
    assert torch.equal(loaded(x), expected)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw["state_dict"]) == set(model.state_dict())
    # The one loader reads the class from zoo_class_path, or from LightningCLI's hyper_parameters._class_path.
    assert raw["zoo_class_path"] == "models.cam.CAMNet"
    assert torch.equal(load_pretrained(path)(x), expected)
    cli_style = {k: v for k, v in raw.items() if k != "zoo_class_path"}
    cli_style["hyper_parameters"] = dict(raw["hyper_parameters"], _class_path="models.CAMNet",
                                         _instantiator="lightning.pytorch.cli.instantiate_module")
    torch.save(cli_style, tmp_path / "cli.ckpt")
    loaded = load_pretrained(tmp_path / "cli.ckpt")
    assert loaded.hparams.extra_conv == 8 and torch.equal(loaded(x), expected)


def test_wrong_architecture_checkpoint_names_the_keys(tmp_path):
    small = CAMNet(num_classes=3, backbone="test_resnet")
    path = tmp_path / "small.ckpt"
    torch.save({"state_dict": small.state_dict(), "hyper_parameters": dict(small.hparams, num_classes=5),
                "zoo_class_path": "models.cam.CAMNet"}, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    message = str(info.value)
    assert "\n" not in message and f"checkpoint {path} does not fit CAMNet: " in message
    width = small.state_dict()["classifier.weight"].shape[1]  # weight and bias of the head differ
    assert (f"classifier.weight has shape (3, {width}) in the file, (5, {width}) in the model "
            f"(2 keys differ in shape)") in message


def _run_folder(tmp_path, *names):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return tmp_path / "run"


def test_release_takes_final_then_last_never_best(tmp_path):
    run = _run_folder(tmp_path / "a", "best-epoch=3-acc=0.99.ckpt", "last.ckpt", "final.ckpt", "epoch=9.ckpt")
    assert released_checkpoint(run) == run / "checkpoints" / "final.ckpt"
    run = _run_folder(tmp_path / "b", "best-epoch=3-acc=0.99.ckpt", "best.ckpt", "last.ckpt")
    assert released_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    run = _run_folder(tmp_path / "c", "best-epoch=3-acc=0.99.ckpt")
    with pytest.raises(FileNotFoundError, match=r"neither final.ckpt nor last.ckpt \(found: best-epoch=3-acc=0.99.ckpt\)"):
        released_checkpoint(run)


def test_builder_overrides_rebuild_the_model():
    model = create_model("cam_test_resnet", num_classes=7, lr=0.5, extra_conv=8)
    init_args = dict(model.hparams, mean=list(model.hparams.mean))  # a list, as a file read back holds it
    overrides = builder_overrides("cam_test_resnet", init_args)
    assert overrides == {"num_classes": 7, "lr": 0.5, "extra_conv": 8}
    again = create_model("cam_test_resnet", **overrides)
    assert dict(again.hparams) == dict(model.hparams)


def test_nan_loss_stops_with_the_term_and_step(tmp_path):
    model = CAMNet(num_classes=3, backbone="test_resnet")
    images = torch.rand(8, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    loader = DataLoader(TensorDataset(images, torch.zeros(8, dtype=torch.long)), batch_size=8)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"cross_entropy.*global step 0"):
        trainer.fit(model, loader)


def _fit_one_epoch(images, labels, tmp_path, **kwargs):
    torch.manual_seed(0)
    model = CAMNet(num_classes=3, backbone="test_resnet", **kwargs)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(images, labels), batch_size=8))
    return model


def test_skip_nonfinite_batches_leaves_no_trace(tmp_path):
    torch.manual_seed(1)
    clean = torch.rand(8, 3, 32, 32)
    poisoned = torch.rand(8, 3, 32, 32)
    poisoned[0, 0, 0, 0] = float("nan")
    labels = torch.arange(8) % 3
    skipped = _fit_one_epoch(torch.cat([poisoned, clean]), torch.cat([labels, labels]), tmp_path, skip_nonfinite=True)
    reference = _fit_one_epoch(clean, labels, tmp_path)
    assert skipped.skipped_batches == 1
    # Same weights and BatchNorm statistics as a run that never saw the poisoned batch.
    for (name, a), b in zip(skipped.state_dict().items(), reference.state_dict().values()):
        if "num_batches_tracked" not in name:
            assert torch.allclose(a, b, atol=1e-6), name


def _poison_call(model, call: int):
    """Make the `call`-th training loss NaN (cross-entropy and total), as a diverging run would."""
    compute, calls = model.compute_losses, []

    def poisoned(images, labels):
        logits, losses = compute(images, labels)
        if model.training:
            calls.append(1)
            if len(calls) == call:
                nan = losses["cross_entropy"] * float("nan")
                losses = dict(losses, loss=nan, cross_entropy=nan)
        return logits, losses

    model.compute_losses = poisoned


class _LastCheckpointBytes(pl.Callback):
    """The bytes of last.ckpt as each epoch starts."""

    def __init__(self, path):
        self.path, self.seen = path, {}

    def on_train_epoch_start(self, trainer, pl_module):
        if self.path.exists():
            self.seen[trainer.current_epoch] = self.path.read_bytes()


def _fit_with_nan_at_step(tmp_path, skip_nonfinite):
    torch.manual_seed(0)
    model = CAMNet(num_classes=3, backbone="test_resnet", lr=1e-2, skip_nonfinite=skip_nonfinite)
    _poison_call(model, 5)  # 3 batches an epoch: the 2nd batch of epoch 1, global step 4
    last = tmp_path / "last.ckpt"
    spy = _LastCheckpointBytes(last)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True), spy])
    return model, trainer, spy, last


def test_nan_stop_keeps_the_last_good_checkpoint_unchanged(tmp_path):
    model, trainer, spy, last = _fit_with_nan_at_step(tmp_path, skip_nonfinite=False)
    with pytest.raises(NonFiniteLossError, match=r"train loss term\(s\) loss, cross_entropy at global step 4 \(epoch 1\)"):
        trainer.fit(model, _loader(24))
    # last.ckpt is the one written at the end of epoch 0, to the byte, and it loads.
    assert last.read_bytes() == spy.seen[1]
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    loaded = CAMNet.load_from_checkpoint(last, map_location="cpu").eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(loaded(x)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]  # no half files


def test_skip_nonfinite_completes_the_run_past_the_nan(tmp_path):
    model, trainer, _, last = _fit_with_nan_at_step(tmp_path, skip_nonfinite=True)
    with pytest.warns(UserWarning, match="skipping training batch at global step 4: non-finite loss, cross_entropy"):
        trainer.fit(model, _loader(24))
    assert model.skipped_batches == 1
    # Lightning still counts the skipped batch's optimiser step (which found no gradients to apply).
    assert trainer.current_epoch == 2 and trainer.global_step == 6
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
