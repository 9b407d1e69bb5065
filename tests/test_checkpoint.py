"""Save, load, same logits: Lightning checkpoints of the zoo load without the CLI and weights-only."""
import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from models import CAMNet, NonFiniteLossError


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


def test_wrong_architecture_checkpoint_names_the_keys(tmp_path):
    small = CAMNet(num_classes=3, backbone="test_resnet")
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    other = CAMNet(num_classes=5, backbone="test_resnet")
    with pytest.raises(RuntimeError, match="classifier.weight"):
        other.load_state_dict(torch.load(path, weights_only=True))


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
