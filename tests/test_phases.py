"""The phase mechanism shared by every family: train mode at fit, declared plans, pruned columns held at 0."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from models import create_model
from train.data import SyntheticParts
from train.phases import Phases

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _data():
    return SyntheticParts(num_classes=3, image_size=32, train_size=16, val_size=6, test_size=6, batch_size=8, seed=0)


def _fit(model, max_epochs: int = 1, callbacks=()):
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[Phases(figures=False, final_checkpoint=False), *callbacks])
    trainer.fit(model, datamodule=_data())
    return trainer


class ModeSpy(pl.Callback):
    """Records the BatchNorm modes seen at the first training batch and the running means around it."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            norms = [m for m in module.modules() if isinstance(m, BATCH_NORMS)]
            self.training = [m.training for m in norms]
            self.means = [m.running_mean.clone() for m in norms]


@pytest.mark.parametrize("builder, kwargs", [
    ("cam_test_resnet", {}),
    ("protopnet_test_resnet", {"num_classes": 3, "stage": 2, "num_warm_epochs": 0, "push_start": 5, "push_every": 5}),
    ("prototree_test_resnet", {"num_classes": 3, "depth": 2}),
    ("icnn_test_resnet", {"num_classes": 3}),
])
def test_fit_trains_in_train_mode_whatever_mode_the_model_came_in(builder, kwargs):
    # A released model loads in eval mode; Lightning keeps module modes at fit. Without the phase callback's
    # train(), BatchNorm statistics would stay frozen and dropout off.
    torch.manual_seed(0)
    kwargs = {"num_classes": 3, **kwargs}
    model = create_model(builder, **kwargs).eval()
    spy = ModeSpy()
    _fit(model, callbacks=[spy])
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    assert norms and all(spy.training)
    assert any(not torch.equal(before, m.running_mean) for before, m in zip(spy.means, norms))


def test_pruned_columns_stay_exactly_zero_while_the_last_layer_trains():
    torch.manual_seed(0)
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2, num_warm_epochs=0, push_start=0, push_every=1,
                         last_layer_epochs=3, num_train_epochs=1, prune_epoch=2, prune_k=2, prune_threshold=2,
                         last_layer_lr=0.1)
    phases = Phases(figures=False, final_checkpoint=False)
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[phases])
    trainer.fit(model, datamodule=_data())
    pruned = phases.results[(2, "prune")]
    assert len(pruned) > 0 and not model.prototype_mask[pruned].any()
    assert torch.equal(model.last_layer.weight[:, pruned], torch.zeros(3, len(pruned)))
    kept = model.prototype_mask
    assert (model.last_layer.weight[:, kept] != 0).any()  # the rest did train


def test_plans_are_declared_by_the_model():
    tree = create_model("prototree_test_resnet", num_classes=3, freeze_epochs=2)
    assert [tree.plan(e).phase for e in range(4)] == ["warm", "warm", "joint", "joint"]
    icnn = create_model("icnn_test_resnet", num_classes=3, filter_loss_warmup=1)
    assert [icnn.plan(e).phase for e in range(3)] == ["plain", "filter_loss", "filter_loss"]
    cam = create_model("cam_test_resnet", num_classes=3)
    assert cam.plan(7).phase == "train" and cam.plan(7).actions == ()
    net = create_model("protopnet_test_resnet", num_classes=3, num_warm_epochs=1, push_start=2, push_every=2,
                       last_layer_epochs=2, num_train_epochs=3, prune_epoch=5)
    # official epochs 0 warm | 1 joint | 2 joint + push -> Lightning 3, 4 last | after the schedule: last
    assert [(p.phase, p.actions) for p in map(net.plan, range(7))] == [
        ("warm", ()), ("joint", ()), ("joint", ()), ("last", ("push",)), ("last", ()), ("last", ("prune",)), ("last", ())]
    with pytest.raises(ValueError, match="prune_epoch=1 must be a last-layer epoch after a push"):
        create_model("protopnet_test_resnet", num_classes=3, num_warm_epochs=1, push_start=2, push_every=2,
                     prune_epoch=1).plan(1)


def test_linear_similarity_keeps_the_last_layer_phase():
    # Deviation from the official main.py, which skips the last-layer passes when the similarity is linear:
    # the zoo trains the last layer after every push whatever the similarity (documented in ProtoPNet).
    net = create_model("protopnet_test_resnet", num_classes=3, similarity="linear", num_warm_epochs=0, push_start=0,
                       push_every=1, last_layer_epochs=2, num_train_epochs=1)
    assert [net.plan(e).phase for e in range(3)] == ["joint", "last", "last"]
