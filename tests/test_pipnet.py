"""PIP-Net (models/pipnet.py, models/pipnet_loss.py): losses against hand computations, the stop-gradient,
the sparse non-negative classifier, the official schedule and learning rates, the phases' trainable
parameters, the top-k search against brute force, the scoring sheet, OOD thresholds, and forward equality
and checkpoint import against a stand-in of the official module (tests/official_stubs/pipnet)."""
from __future__ import annotations

import contextlib
import importlib
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from models import PIPNet, create_model, load_pretrained
from models.convert import convert_checkpoint
from models.pipnet_loss import (alignment_loss, classification_loss, classifier_lr, cosine_lr, pipnet_schedule,
                                tanh_loss)
from train.data import SyntheticParts
from train.phases import Phases

STUBS = Path(__file__).parent / "official_stubs"


def _softmax_maps(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).softmax(dim=1)


# ------------------------------------------------------------------------------------------- losses
def test_each_loss_term_equals_a_hand_computation():
    f1, f2 = _softmax_maps(2, 3, 2, 2, seed=1), _softmax_maps(2, 3, 2, 2, seed=2)
    rows = [(b, i, j) for b in range(2) for i in range(2) for j in range(2)]
    dots = [sum(float(f1[b, p, i, j] * f2[b, p, i, j]) for p in range(3)) for b, i, j in rows]
    expected = -sum(math.log(d + 1e-12) for d in dots) / len(dots)  # both directions have the same value
    assert alignment_loss(f1, f2).item() == pytest.approx(expected, rel=1e-6)

    p1, p2 = f1.amax(dim=(2, 3)), f2.amax(dim=(2, 3))
    term = lambda p: sum(math.log(math.tanh(float(p[:, k].sum())) + 1e-8) for k in range(3)) / 3  # noqa: E731
    assert tanh_loss(p1, p2).item() == pytest.approx(-(term(p1) + term(p2)) / 2, rel=1e-6)

    out, labels = torch.tensor([[0.5, 2.0, 0.0], [1.5, 0.2, 3.0]]), torch.tensor([1, 0])
    logits = [[math.log1p(v**2) for v in row] for row in out.tolist()]
    nll = [-(row[y] - math.log(sum(math.exp(v) for v in row))) for row, y in zip(logits, labels.tolist())]
    assert classification_loss(out, labels, torch.tensor([2.0])).item() == pytest.approx(sum(nll) / 2, rel=1e-6)


def test_alignment_stop_gradient_shows_in_the_gradients():
    """d L_A / d z1 = -z2 / (2 N <z1, z2>) per row: each view sees the other as a constant target (without the
    stop-gradient each direction would add its own term and the gradient would double)."""
    f1 = _softmax_maps(1, 4, 2, 3, seed=3).requires_grad_(True)
    f2 = _softmax_maps(1, 4, 2, 3, seed=4).requires_grad_(True)
    alignment_loss(f1, f2).backward()
    n = 6
    dots = (f1 * f2).sum(dim=1, keepdim=True).detach()
    torch.testing.assert_close(f1.grad, -f2.detach() / (2 * n * (dots + 1e-12)))
    torch.testing.assert_close(f2.grad, -f1.detach() / (2 * n * (dots + 1e-12)))


def test_total_loss_per_phase_uses_the_official_weights():
    torch.manual_seed(0)
    model = create_model("pipnet_test_resnet", num_classes=3, epochs_pretrain=2, epochs=4, finetune_epochs=1, freeze_epochs=2)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 2])
    for epoch, (wa, wt, wc) in {0: (0.5, 5, 0), 1: (1.0, 5, 0), 2: (0, 0, 2), 3: (5, 2, 2), 5: (5, 2, 2)}.items():
        _, terms = model.compute_losses(images, labels, plan=model.plan(epoch))
        expected = wa * terms["alignment"] + wt * terms["tanh"] + wc * terms["classification"]
        torch.testing.assert_close(terms["loss"], expected)


# ---------------------------------------------------------------------------------------- schedule
def test_schedule_and_learning_rates_follow_the_official_schedulers():
    plans = [pipnet_schedule(e, epochs_pretrain=2, epochs=12, finetune_epochs=3, freeze_epochs=5) for e in range(16)]
    assert [p.phase for p in plans] == ["pretrain"] * 2 + ["finetune"] * 3 + ["frozen"] * 2 + ["full"] * 9
    assert [p.epoch for p in plans[:4]] == [1, 2, 1, 2]
    assert pipnet_schedule(0, epochs_pretrain=0, finetune_epochs=3, freeze_epochs=2).phase == "frozen"  # no pretraining: no finetune
    # The official schedulers, stepped as pipnet/train.py does, against the closed forms.
    iters, epochs, base = 3, 12, 0.05
    net = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=5e-4)
    cls = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=base)
    s_net = torch.optim.lr_scheduler.CosineAnnealingLR(net, T_max=iters * epochs, eta_min=5e-6)
    s_cls = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(cls, T_0=5, eta_min=1e-3, T_mult=1)
    net_steps = 0
    for e in range(1, epochs + 1):
        plan = pipnet_schedule(e + 1, epochs_pretrain=2, epochs=epochs, finetune_epochs=3, freeze_epochs=5)
        for i in range(iters):
            g = (e - 1) * iters + i
            assert cls.param_groups[0]["lr"] == pytest.approx(classifier_lr(base, g, iters, epochs), rel=1e-9)
            cls.step()  # (no gradients: no change) then the scheduler, in the official order
            s_cls.step(e - 1 + i / iters)
            if plan.phase != "finetune":
                k = (e - 1 - plan.joint_epochs) * iters + i
                assert k == net_steps
                assert net.param_groups[0]["lr"] == pytest.approx(cosine_lr(5e-4, 5e-6, k, iters * epochs), rel=1e-9)
                net.step()
                s_net.step()
                net_steps += 1


def _named(model, group):
    ids = {id(p) for p in model.parameter_groups()[group]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_phase_switching_freezes_exactly_the_official_groups():
    model = create_model("pipnet_resnet50", num_classes=5)
    names = {g: _named(model, g) for g in ("backbone", "to_freeze", "to_train", "never", "add_on", "classifier")}
    trunk = lambda n: n.removeprefix("backbone.body.")  # noqa: E731
    assert names["to_train"] and all(trunk(n).startswith("layer4.2.") for n in names["to_train"])
    assert {trunk(n).split(".")[0] for n in names["to_freeze"]} == {"layer3", "layer4"}
    assert not any(trunk(n).startswith("layer4.2.") for n in names["to_freeze"])
    assert {trunk(n).split(".")[0] for n in names["backbone"]} == {"layer2"}
    assert {trunk(n).split(".")[0] for n in names["never"]} == {"conv1", "bn1", "layer1"}
    expected = {"pretrain": {"to_train", "to_freeze", "add_on"}, "finetune": {"classifier"},
                "frozen": {"to_train", "to_freeze", "add_on", "classifier"},
                "full": {"to_train", "to_freeze", "add_on", "classifier", "backbone"}}
    for epoch, phase in [(0, "pretrain"), (10, "finetune"), (13, "frozen"), (20, "full")]:
        plan = model.plan(epoch)
        assert plan.phase == phase
        model.enter_phase(plan)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set().union(*(names[g] for g in expected[phase])), phase
    assert not model.classifier.normalization_multiplier.requires_grad
    convnext = create_model("pipnet_convnext_tiny_26", num_classes=2)
    assert {n.removeprefix("backbone.body.").split(".")[0] for n in _named(convnext, "backbone")} == {str(i) for i in range(6)}
    assert all(n.startswith("backbone.body.7.2.") for n in _named(convnext, "to_train"))
    assert not _named(convnext, "never")
    with torch.no_grad():
        assert convnext.latent(torch.rand(1, 3, 224, 224)).shape == (1, 768, 26, 26)
        assert model.latent(torch.rand(1, 3, 64, 64)).shape == (1, 2048, 8, 8)  # stride 8, as 28 x 28 at 224 px
    assert create_model("pipnet_convnext_tiny_13", num_classes=2).receptive_field(224).size == 13  # the layer arithmetic


# ------------------------------------------------------------------------------------ training runs
class Snapshots(pl.Callback):
    """Parameters at the start and end of every epoch."""

    def __init__(self):
        self.start, self.end = {}, {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start[trainer.current_epoch] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_epoch_end(self, trainer, pl_module):
        self.end[trainer.current_epoch] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.fixture(scope="module")
def data():
    return SyntheticParts(num_classes=3, image_size=32, train_size=24, val_size=6, test_size=12, batch_size=8, seed=0,
                          augment="pipnet_cub")


@pytest.fixture(scope="module")
def trained(data):
    """Lightning epochs 0 pretrain | 1 finetune | 2 frozen | 3 full, then the top-k search and the zeroing."""
    torch.manual_seed(0)
    model = create_model("pipnet_test_resnet", num_classes=3, epochs_pretrain=1, epochs=3, finetune_epochs=1, freeze_epochs=2,
                         lr_block=1e-2, lr_net=1e-2, topk=4, patch_size=8)
    with torch.no_grad():  # some weights just above 0: the shrinkage must take them to exactly 0
        model.classifier.weight[:, :6] = 5e-4
    snapshots = Snapshots()
    trainer = pl.Trainer(max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0,
                         callbacks=[Phases(figures=False, final_checkpoint=False), snapshots])
    trainer.fit(model, datamodule=data)
    return model.eval(), snapshots, trainer


def test_training_changes_only_each_phases_parameters_and_keeps_the_classifier_sparse(trained):
    model, snaps, trainer = trained
    for epoch in range(4):
        phase = model.plan(epoch).phase
        allowed = set().union(*(_named(model, g) for g in model.trainable_groups(phase)))
        changed = {n for n in snaps.start[epoch] if not torch.equal(snaps.start[epoch][n], snaps.end[epoch][n])}
        assert changed <= allowed, (phase, changed - allowed)
        assert changed, phase
    assert "classifier.weight" not in {n for n in snaps.start[0] if not torch.equal(snaps.start[0][n], snaps.end[0][n])}
    w = model.classifier.weight
    assert (w >= 0).all()  # clamped after every phase-2 step
    assert (w[:, :6] == 0).all()  # 5e-4 - 1e-3 -> 0 at the first phase-2 step
    assert float(model.classifier.normalization_multiplier) == 2.0
    assert "val/global_size" in trainer.callback_metrics and "val/local_size" in trainer.callback_metrics


def test_shrinkage_subtracts_from_every_weight_and_clamps_at_zero():
    model = create_model("pipnet_test_resnet", num_classes=2)
    w = torch.tensor([[0.5, 2e-3, 5e-4, 0.0] * (model.num_prototypes // 4)] * 2)
    with torch.no_grad():
        model.classifier.weight.copy_(w)
        model.classifier.normalization_multiplier.fill_(0.5)
    model.shrink_weights()
    torch.testing.assert_close(model.classifier.weight.detach(), torch.clamp(w - 1e-3, min=0))
    assert float(model.classifier.normalization_multiplier) == 1.0


def test_top_k_patches_are_the_brute_force_top_k_and_records_are_filled(trained, data):
    model, _, trainer = trained
    batches = list(data.push_dataloader())
    images = torch.cat([b["image"] for b in batches])
    index = torch.cat([b["index"] for b in batches])
    with torch.no_grad():
        z = model.latent(images)  # (N, P, h, w)
    pooled = z.amax(dim=(2, 3))
    k = model.hparams.topk
    row_of = {int(i): n for n, i in enumerate(index)}
    for j in range(model.num_prototypes):
        # The k largest pooled scores (brute force over every image; ties within float rounding of the batch size).
        torch.testing.assert_close(model.topk_similarity[j], pooled[:, j].sort(descending=True).values[:k])
        rows = [row_of[int(i)] for i in model.topk_source_index[j]]
        assert len(set(rows)) == k
        torch.testing.assert_close(pooled[rows, j], model.topk_similarity[j])
        n = rows[0]
        r, c = model.prototype_position[j].tolist()
        assert int(model.prototype_source_index[j]) == int(index[n])
        assert float(z[n, j, r, c]) == pytest.approx(float(pooled[n, j]), abs=1e-6)  # the top patch of the top image
        box = model.patch_box(torch.tensor([[r, c]]), z.shape[-2:], images.shape[-2:])[0]
        assert model.prototype_box[j].tolist() == box.tolist()
        assert model.prototype_patch[j].float().std() > 0
    assert int(model.push_epoch) == trainer.current_epoch and (model.prototype_rf_box >= 0).all()


def test_unused_prototypes_are_zeroed_after_the_top_k_search(trained):
    model, _, _ = trained
    never = (model.topk_similarity <= 0.1).all(dim=1)
    assert (model.classifier.weight[:, never] == 0).all()
    assert not model.prototype_active()[never].any()


def test_scoring_sheet_sums_are_the_scores_and_the_explanation_has_the_evidence(trained, data):
    model, _, _ = trained
    with torch.no_grad():
        model.classifier.weight.copy_(torch.rand_like(model.classifier.weight) * (torch.rand_like(model.classifier.weight) > 0.7))
    images = torch.cat([data.test_dataset[i]["image"][None] for i in range(4)])
    explanation = model.explain(images)
    pooled, sheet = explanation.evidence["pooled"], model.scoring_sheet()
    for b in range(len(images)):
        for c, entries in enumerate(sheet):
            total = sum(float(pooled[b, j]) * w for j, w in entries)
            assert total == pytest.approx(float(explanation.logits[b, c]), rel=1e-5, abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(explanation.logits, model(images))  # eval mode: the clamped scores
    assert ((pooled == 0) | (pooled >= 0.1)).all()
    ev = explanation.evidence
    assert ev["prototype_ids"].shape == (4, 10) and ev["activation_map"].shape == (4, 10, 32, 32)
    for b, local in enumerate(ev["scoring_sheet"]):
        for c, rows in local.items():
            assert all(abs(row[3]) > 0.01 and row[3] == pytest.approx(row[1] * row[2]) for row in rows)
    expected_local = ((pooled[:, None, :] * torch.relu(model.classifier.weight)[None]) > 1e-3).any(dim=1).sum(dim=1).float().mean()
    assert float(ev["local_size"]) == pytest.approx(float(expected_local))
    assert float(ev["global_size"]) == float((model.classifier.weight > 1e-3).any(dim=0).sum())


def test_views_work_through_the_prototype_interface(trained, data):
    import matplotlib.pyplot as plt

    from explain import viz

    model, _, _ = trained
    with torch.no_grad():
        model.classifier.weight.copy_(torch.rand_like(model.classifier.weight))
    images = torch.cat([data.test_dataset[i]["image"][None] for i in range(2)])
    fig = viz.prototype_gallery(model, max_prototypes=6, source=data.push_dataloader().dataset)
    assert sum(1 for ax in fig.axes if ax.get_title().startswith("p")) >= 6
    fig2 = viz.this_looks_like_that(model, images, top_k=3)
    grey = fig2.axes[-1].containers[0]  # the bars are the scores: the model's own sums of presence x weight
    logits = model.explain(images).logits[0]
    order = logits.argsort(descending=True).tolist()[::-1]
    torch.testing.assert_close(torch.tensor([b.get_width() for b in grey], dtype=torch.float32), logits[order].float())
    fig3 = viz.global_analysis(model, data.push_dataloader(), k=2, prototypes=range(3))
    assert sum(1 for ax in fig3.axes if ax.get_title().startswith("train #")) == 6
    for f in (fig, fig2, fig3):
        plt.close(f)


def test_ood_thresholds_follow_the_official_percentile_rule(trained, data):
    model, _, _ = trained
    loader = data.test_dataloader()
    thresholds = model.ood_thresholds(loader, percent=95.0)
    with torch.no_grad():
        out = torch.cat([model.features(b["image"], inference=False)[2] for b in loader])
    best, pred = out.max(dim=1)
    ref = {}
    for c in pred.unique().tolist():
        ref[c] = float(np.percentile(best[pred == c].numpy().astype(np.float64), 5))
    mean = float(np.mean(list(ref.values())))
    ref = torch.tensor([ref.get(c, mean) for c in range(3)], dtype=torch.float64)
    passed = sum(float(b) > float(ref[p]) for b, p in zip(best, pred)) / len(best)
    while passed < 0.95:
        ref = ref * 0.999
        passed = sum(float(b) >= float(ref[p]) for b, p in zip(best, pred)) / len(best)
    torch.testing.assert_close(thresholds, ref.float())
    images = torch.cat([b["image"] for b in loader])
    assert model.in_distribution(images, thresholds).float().mean() >= 0.95


@pytest.mark.parametrize("recipe", ["cub_convnext_tiny_26", "cars_convnext_tiny_26"])
def test_paper_recipes_hold_the_official_arguments(recipe):
    """used_arguments/{CUB,CARS}_arguments.txt: 10 + 60 epochs, batch 64, lr 0.05 / 5e-4 / 5e-4, freeze 10, seed 1,
    ConvNeXt-tiny-26 with ImageNet weights; one Lightning epoch per official epoch."""
    import inspect

    import yaml

    import train.data

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "pipnet" / f"{recipe}.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert {k: args[k] for k in ("backbone", "epochs_pretrain", "epochs", "finetune_epochs", "freeze_epochs", "lr",
                                 "lr_block", "lr_net", "weight_decay", "num_features", "bias")} == {
        "backbone": "convnext_tiny_26", "epochs_pretrain": 10, "epochs": 60, "finetune_epochs": 3, "freeze_epochs": 10,
        "lr": 0.05, "lr_block": 0.0005, "lr_net": 0.0005, "weight_decay": 0.0, "num_features": 0, "bias": False}
    assert args["pretrained_backbone"] is True and cfg["seed_everything"] == 1
    assert cfg["trainer"]["max_epochs"] == 70 and args["num_classes"] == (200 if "cub" in recipe else 196)
    data = cfg["data"]
    assert data["init_args"]["batch_size"] == 64 and data["init_args"]["epoch_repeats"] == 1
    assert data["init_args"]["augment"] == ("pipnet_cub" if "cub" in recipe else "pipnet_cars")
    cls = getattr(train.data, data["class_path"].rsplit(".", 1)[1])
    params = set(inspect.signature(cls).parameters) | set(inspect.signature(train.data.ZooDataModule).parameters)
    assert set(data["init_args"]) <= params
    model = PIPNet(**{**args, "pretrained_backbone": False})
    assert model.num_prototypes == 768


# ------------------------------------------------------------------------------- official stand-in
@contextlib.contextmanager
def official_pipnet():
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in ("pipnet", "resnet_features")}
    sys.path.insert(0, str(STUBS))
    try:
        yield importlib.import_module("pipnet.pipnet")
    finally:
        sys.path.remove(str(STUBS))
        for n in [n for n in sys.modules if n.split(".")[0] in ("pipnet", "resnet_features")]:
            sys.modules.pop(n)
        sys.modules.update(saved)


def _randomise(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        net._classification.weight.copy_(torch.randn(net._classification.weight.shape, generator=g).abs()
                                          * (torch.rand(net._classification.weight.shape, generator=g) > 0.5))
        net._classification.normalization_multiplier.fill_(2.0)
        if net._classification.bias is not None:
            net._classification.bias.copy_(torch.rand(net._classification.bias.shape, generator=g))


@pytest.mark.parametrize("trunk", ["resnet18", "convnext_tiny_26"])
def test_forward_equals_the_official_module_on_copied_weights(tmp_path, trunk):
    torch.manual_seed(0)
    with official_pipnet() as official:
        features = official.resnet_pipnet_features("resnet18") if trunk == "resnet18" else official.convnext_tiny_features(100)
        net = official.get_network(4, features, bias=trunk == "resnet18")
        _randomise(net, 0)
        net.eval()
        path = tmp_path / "net_trained"
        torch.save({"model_state_dict": nn.DataParallel(net).state_dict(), "optimizer_net_state_dict": {}}, path)
    model = convert_checkpoint(path, "pipnet", tmp_path / "zoo.pt")
    assert not any(n.split(".")[0] == "pipnet" for n in sys.modules)
    loaded = load_pretrained(tmp_path / "zoo.pt")
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        for inference in (False, True):
            features_o, pooled_o, out_o = net(normalised, inference=inference)
            features_z, pooled_z, out_z = loaded.features(x, inference=inference)
            torch.testing.assert_close(features_z, features_o, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(pooled_z, pooled_o, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(out_z, out_o, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x), net(normalised, inference=True)[2], rtol=1e-4, atol=1e-5)
    assert isinstance(model, PIPNet) and model.hparams.backbone == ("resnet18" if trunk == "resnet18" else "convnext_tiny_26")


@pytest.mark.slow
def test_synthetic_recipe_reaches_90_percent(tmp_path, monkeypatch):
    """The recipe the release is built from: fit through the CLI, then the final model (after the top-k search
    and the zeroing) on the test split; the classifier ends sparse."""
    from train.cli import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = Path(__file__).resolve().parents[1]
    cli = main(["fit", "--config", str(root / "configs" / "pipnet" / "synthetic.yaml"), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--runs_root", str(tmp_path), "--test_after_fit", "false"])
    model = load_pretrained(Path(cli.trainer.default_root_dir) / "checkpoints" / "final.ckpt", check_hash=False)
    right = total = 0
    with torch.no_grad():
        for batch in cli.datamodule.test_dataloader():
            right += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    assert right / total >= 0.9
    figures = model.sparsity_figures()
    assert 0 < figures["global_size"] < model.num_prototypes and figures["sparsity"] > 0.5
    assert (model.prototype_source_index[model.prototype_active()] >= 0).all()
