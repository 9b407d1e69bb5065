"""ProtoPool (models/protopool.py): losses against hand computations, the forward against a stand-in of the
official ``PrototypeChooser`` on copied weights, the Gumbel schedule, the phases, the slot-constrained push,
resume, the official-checkpoint import and (slow) the synthetic recipe."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from models import ProtoPool, create_model, load_pretrained
from models.convert import convert_checkpoint
from models.pretrained import CheckpointError
from models.protopool_ops import cluster_separation, focal_similarity, gumbel_scale, orthogonality
from train.data import SyntheticParts
from train.phases import Phases

STUBS = Path(__file__).parent / "official_stubs"


def _official_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official():
    """The stand-in PrototypeChooser on the stand-in official ResNet-18 trunk: 3 classes, P = 5, S = 2, D = 8."""
    features = _official_module("official_resnet_features", STUBS / "resnet_features.py")
    chooser = _official_module("official_protopool_model", STUBS / "protopool" / "model.py").PrototypeChooser
    torch.manual_seed(0)
    net = chooser(features.resnet18_features(), num_prototypes=5, num_descriptive=2, num_classes=3, proto_depth=8,
                  use_thresh=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        net.last_layer.weight.add_(0.3 * torch.randn(net.last_layer.weight.shape, generator=g))
        net.proto_presence.mul_(30)  # distinct argmaxes: the one-hot map is what scale 1e4 gives
    return net.eval()


def _converted(official, tmp_path) -> ProtoPool:
    path = tmp_path / "best_model_push.pth"
    torch.save({"model_state_dict": official.state_dict(), "epoch": 7}, path)
    convert_checkpoint(path, "protopool", tmp_path / "zoo.pt")
    return load_pretrained(tmp_path / "zoo.pt", check_hash=False)


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


def _normalise(x):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------- forward
def test_forward_equals_the_official_module_on_copied_weights(official, tmp_path):
    model = _converted(official, tmp_path)
    x = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # A fixed Gumbel sample: both draw it from the same generator state (torch's gumbel_softmax).
        model.slots_hardened.fill_(False)
        model.current_gumbel_scale.fill_(gumbel_scale(4, 30))
        model.train()
        model.backbone.eval()  # BatchNorm on running statistics in both
        torch.manual_seed(5)
        logits, min_d, q = model.forward_parts(x)
        torch.manual_seed(5)
        ref_logits, ref_min, ref_q = official(_normalise(x), gumbel_scale=gumbel_scale(4, 30))
        torch.testing.assert_close(q, ref_q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(min_d, ref_min, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(q, torch.softmax(official.proto_presence, dim=1))  # the noise mattered
        # Scale 0: plain softmax(Π), as officially (eval mode too, no noise there).
        model.eval()
        model.current_gumbel_scale.fill_(0)
        torch.testing.assert_close(model(x), official(_normalise(x), gumbel_scale=0)[0], rtol=1e-4, atol=1e-4)
        # Converted (pushed) models use the one-hot map argmax Π: the official evaluation at scale 1e4.
        model.slots_hardened.fill_(True)
        torch.manual_seed(6)
        ref_logits, _, ref_q = official(_normalise(x), gumbel_scale=1e4)
        torch.testing.assert_close(model.assignment(), ref_q, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(x), ref_logits, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)  # batch of 1 (official squeeze)


def test_convert_rejects_foreign_files_with_one_line(official, tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"model_state_dict": {"w": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="proto_presence"):
        convert_checkpoint(path, "protopool", tmp_path / "zoo.pt")
    torch.save({"model_state_dict": official.state_dict(), "epoch": _Evil()}, path)  # a pickle that would run code
    with pytest.raises(CheckpointError, match="refusing"):
        convert_checkpoint(path, "protopool", tmp_path / "zoo.pt")
    state = dict(official.state_dict(), ones=torch.zeros_like(official.ones))
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(CheckpointError, match="ones"):
        convert_checkpoint(path, "protopool", tmp_path / "zoo.pt")


# -------------------------------------------------------------------------------------- losses
def test_each_loss_term_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, c, p, s = 4, 3, 5, 2
    d_min = torch.rand(b, p, generator=g) * 3
    d_avg = d_min + torch.rand(b, p, generator=g)
    logits_pi = torch.randn(c, p, s, generator=g)
    q = torch.softmax(logits_pi * 3, dim=1)
    labels = torch.tensor([0, 2, 1, 2])
    phi = lambda d: math.log((d + 1) / (d + 1e-4))  # noqa: E731
    focal = focal_similarity(d_min, d_avg, q)
    for i in range(b):
        for k in range(c):
            for j in range(s):
                mix_min = sum(float(d_min[i, n] * q[k, n, j]) for n in range(p))
                mix_avg = sum(float(d_avg[i, n] * q[k, n, j]) for n in range(p))
                assert math.isclose(float(focal[i, k, j]), phi(mix_min) - phi(mix_avg), rel_tol=1e-4, abs_tol=1e-5)
    cluster, separation = cluster_separation(d_min, q, labels)
    want_c = want_s = 0.0
    for i in range(b):
        r = [sum(float(q[labels[i], n, j]) for j in range(s)) for n in range(p)]
        order = sorted(range(p), key=lambda n: -r[n])
        want_c += min(float(d_min[i, n]) for n in order[:s]) / b
        want_s += min(float(d_min[i, n]) for n in order[s:]) / b  # the P - S least assigned
    assert math.isclose(float(cluster), want_c, rel_tol=1e-6) and math.isclose(float(separation), want_s, rel_tol=1e-6)
    want_o = sum(float(logits_pi[k, :, j] @ logits_pi[k, :, jj] / (logits_pi[k, :, j].norm() * logits_pi[k, :, jj].norm()))
                 for k in range(c) for j in range(s) for jj in range(s)) / (s * c) - 1
    assert math.isclose(float(orthogonality(logits_pi)), want_o, rel_tol=1e-5, abs_tol=1e-6)


def test_model_losses_total_and_mixup_by_hand():
    torch.manual_seed(0)
    model = create_model("protopool_test_resnet", num_classes=3, num_prototypes=5, slots_per_class=2)
    with torch.no_grad():
        model.last_layer.weight.add_(0.1 * torch.randn_like(model.last_layer.weight))
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    model.eval()
    logits, d_min, q = model.forward_parts(x)
    y2, lam = torch.tensor([1, 1, 0, 2]), 0.3
    terms = model.losses_from_parts(logits, d_min, q, y, (y2, lam))
    ce = lambda t: -sum(float(torch.log_softmax(logits[i], 0)[t[i]]) for i in range(4)) / 4  # noqa: E731
    assert math.isclose(float(terms["cross_entropy"]), lam * ce(y) + (1 - lam) * ce(y2), rel_tol=1e-5)
    w, ident = model.last_layer.weight, model.slot_class_identity.T
    l1 = sum(abs(float(w[k, j])) for k in range(3) for j in range(6) if ident[k, j] == 0)
    assert math.isclose(float(terms["l1"]), l1, rel_tol=1e-5)
    cl, sep = cluster_separation(d_min, q, y)  # the first labels, as officially
    total = float(terms["cross_entropy"]) + 0.8 * float(cl) - 0.08 * float(sep) + 1e-4 * l1 + float(orthogonality(model.slot_logits))
    assert math.isclose(float(terms["loss"]), total, rel_tol=1e-5)
    model.set_phase("last")
    assert math.isclose(float(model.losses_from_parts(logits, d_min, q, y)["loss"]), ce(y) + 1e-4 * l1, rel_tol=1e-5)


def test_gumbel_schedule_is_the_official_formula_and_follows_the_lightning_epoch():
    for e in range(40):  # official lambda1 with start 1.3, end 1000, gumbel_time 30
        alpha = (1000 / 1.3) ** 2 / 30
        official = 1.3 * math.sqrt(alpha * e) if e < 30 else 1000
        assert math.isclose(gumbel_scale(e, 30), official, rel_tol=1e-12)
        assert math.isclose(gumbel_scale(e, 30), 1000 * math.sqrt(min(e, 30) / 30), rel_tol=1e-9)
    model = create_model("protopool_test_resnet", warmup_time=3, num_train_epochs=6, gumbel_time=4)
    for lightning_epoch in range(5):  # Lightning epoch L trains official epoch L + 1
        plan = model.plan(lightning_epoch)
        model.enter_phase(plan)
        assert plan.epoch == lightning_epoch + 1
        assert math.isclose(float(model.current_gumbel_scale), gumbel_scale(lightning_epoch + 1, 4), rel_tol=1e-6)


# -------------------------------------------------------------------------------------- phases
def test_phases_freeze_exactly_the_right_parameters_and_follow_the_official_lrs():
    model = create_model("protopool_test_resnet", warmup_time=3, num_train_epochs=10, last_layer_epochs=7, lr=1e-3,
                         joint_lr_step_size=5)
    assert [model.plan(e).phase for e in range(16)] == ["warm"] * 2 + ["joint"] * 7 + ["last"] * 7
    assert [model.plan(e).actions for e in range(16)].count(("push",)) == 1 and model.plan(9).push
    assert model.schedule_length() == 16
    groups = {name: {id(p) for p in params} for name, params in model.parameter_groups().items()}
    expected = {"warm": {"add_on", "prototypes", "slots"}, "joint": {"backbone", "add_on", "prototypes", "slots"},
                "last": {"last_layer"}}
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    for phase, trainable in expected.items():
        model.set_phase(phase)
        model.train()
        model.compute_losses(x, y)[1]["loss"].backward()
        for name, ids in groups.items():
            for p in model.parameters():
                if id(p) in ids:
                    assert p.requires_grad == (name in trainable), (phase, name)
                    assert (p.grad is not None) == (name in trainable), (phase, name)
    lrs = {e: model.learning_rates(model.plan(e)) for e in range(16)}
    assert lrs[0] == [3e-3] * 3
    assert lrs[2] == pytest.approx([1e-4, 3e-3, 3e-3, 3e-3])  # first joint epoch (official epoch 3)
    assert lrs[7] == pytest.approx([1e-5, 3e-4, 3e-4, 3e-4])  # 6th joint epoch: StepLR(5, 0.1) stepped 5 times
    assert lrs[9] == pytest.approx([1e-4]) and lrs[14] == pytest.approx([1e-4 * 0.95])  # fine-tuning x0.95 per 5


def test_plateau_decay_follows_the_official_counter():
    model = create_model("protopool_test_resnet", plateau_patience=5)
    model.set_phase("joint")
    history = [(2.0, 0.5), (1.9, 0.4), *[(2.5, 0.3)] * 8, (1.8, 0.2), *[(3.0, 0.1)] * 7]
    waiting, best_loss, best_acc, decays = 0, float("inf"), -1.0, []
    for epoch, (loss, acc) in enumerate(history):  # official main.py, with --use_scheduler
        if loss < best_loss or acc > best_acc:
            waiting, best_loss, best_acc = 0, min(loss, best_loss), max(acc, best_acc)
        else:
            waiting += 1
        if waiting > 5:
            decays.append(epoch)
        assert model.plateau_step(loss, acc) == (epoch in decays)
    assert decays == [7, 8, 9, 16, 17] and int(model.plateau_decays[1]) == 5
    plan = model.plan(model.hparams.warmup_time - 1)  # the first joint epoch
    assert model.learning_rates(plan) == pytest.approx([f * 0.95 ** 5 for f in (1e-4, 3e-3, 3e-3, 3e-3)], rel=1e-9)


# ------------------------------------------------------------------------------------------ push
@pytest.fixture(scope="module")
def data():
    return SyntheticParts(num_classes=3, image_size=32, train_size=16, val_size=8, test_size=8, batch_size=8, seed=0)


def test_push_puts_every_prototype_on_a_latent_patch_of_an_allowed_class_brute_force(data):
    torch.manual_seed(0)
    model = create_model("protopool_test_resnet", num_classes=3, num_prototypes=7, slots_per_class=2, stage=2)
    with torch.no_grad():  # slot map: prototypes 0, 1 shared by classes 0 and 1, 2..4 single, 5 and 6 in no slot
        model.slot_logits.fill_(0)
        for c, protos in enumerate([(0, 1), (1, 2), (3, 4)]):
            for s, p in enumerate(protos):
                model.slot_logits[c, p, s] = 1
    assert model.push_classes()[:, :].tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1],
                                                   [0, 0, 0], [0, 0, 0]]
    data.setup("fit")
    batches = list(data.push_dataloader())
    images, labels = torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])
    index = torch.cat([b["index"] for b in batches])
    model.eval()
    with torch.no_grad():
        z = model.latent(images)  # (N, D, h, w)
    before = model.prototype_tensor().detach().clone()
    model.push(data.push_dataloader(), epoch=0)
    allowed, constrained = model.push_classes(), 0
    for j in range(7):
        vector = model.prototype_tensor()[j].detach()
        if not allowed[j].any():  # official: prototypes no slot selects become zero
            assert not model.prototype_active()[j] and (vector == 0).all() and int(model.prototype_source_index[j]) == -1
            continue
        d = ((z - before[j][None, :, None, None]) ** 2).sum(dim=1)  # (N, h, w), brute force
        ok = allowed[j, labels]
        nearest = d.masked_fill(~ok[:, None, None], float("inf")).flatten().argmin()
        row, cell = divmod(int(nearest), d.shape[1] * d.shape[2])
        torch.testing.assert_close(vector, z[row].flatten(1)[:, cell], atol=1e-6, rtol=0)
        assert int(model.prototype_source_index[j]) == int(index[row]) and bool(allowed[j, labels[row]])
        constrained += not ok[int(d.flatten().argmin()) // (d.shape[1] * d.shape[2])]
    assert constrained > 0  # the class constraint decided at least one prototype
    assert bool(model.slots_hardened)
    explanation = model.explain(images[:2])
    assert set(explanation.evidence["prototype_ids"].flatten().tolist()) <= set(range(5))
    conn = model.prototype_class_connection()
    torch.testing.assert_close(conn.sum(0), model.last_layer.weight.sum(1))  # every slot counted once


def _fit(folder: Path, ckpt_path=None, **limits) -> ProtoPool:
    pl.seed_everything(0)
    model = create_model("protopool_test_resnet", num_classes=3, stage=2, warmup_time=2, num_train_epochs=3,
                         last_layer_epochs=1, lr=1e-2)
    data = SyntheticParts(num_classes=3, image_size=32, train_size=16, val_size=8, test_size=8, batch_size=8)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True)
    trainer = pl.Trainer(logger=False, deterministic=True, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=folder, callbacks=[checkpoint, Phases(figures=False)],
                         **{"max_epochs": 3, **limits})
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


def test_resumed_mid_joint_epoch_ends_like_the_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    expected = _fit(tmp_path / "reference")
    assert int(expected.push_epoch) == 2 and bool(expected.slots_hardened)
    _fit(tmp_path / "stopped", max_steps=3)  # after 1 of 2 batches of the joint epoch 1
    model = _fit(tmp_path / "resumed", tmp_path / "stopped" / "last.ckpt")
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


# ----------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_synthetic_recipe_reaches_90_percent(tmp_path):
    from train.cli import main

    cli = main(["fit", "--config", "configs/protopool/synthetic.yaml", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--runs_root", str(tmp_path)])
    assert float(cli.trainer.callback_metrics["test/acc"]) >= 0.9
    assert int(cli.model.push_epoch) == cli.model.hparams.num_train_epochs - 1
