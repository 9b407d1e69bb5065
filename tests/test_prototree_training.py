"""ProtoTree training with Lightning: leaf update wiring, freezing, schedule, post-training pipeline, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from models import ProtoTree, create_model
from train.phases import Phases
from models.prototree import leaf_update

ROOT = Path(__file__).resolve().parents[1]


def loader(n: int = 8, size: int = 32, classes: int = 3, batch: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    data = [{"image": torch.rand(3, size, size, generator=gen), "label": torch.tensor(i % classes), "index": torch.tensor(i)}
            for i in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)


def trainer(epochs: int, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                      accelerator="cpu", **kwargs)


class Recorder(pl.Callback):
    """Snapshots of the model at every batch start (callbacks run before the module's own hooks)."""

    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.epoch_starts: list[torch.Tensor] = []
        self.final: torch.Tensor | None = None

    def on_train_epoch_start(self, trainer, module) -> None:
        self.epoch_starts.append(module.leaves.detach().clone())

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append({"batch": batch, "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
                             "epoch": trainer.current_epoch})

    def on_train_end(self, trainer, module) -> None:
        self.final = module.leaves.detach().clone()


def test_leaf_update_uses_the_pre_step_forward_and_epoch_start_counts():
    torch.manual_seed(0)
    model = create_model("prototree_test_resnet", num_classes=3, depth=2, lr=0.01, lr_block=0.01, lr_net=0.01)
    rec = Recorder()
    data = loader()
    trainer(2, [rec]).fit(model, train_dataloaders=data)
    ref = create_model("prototree_test_resnet", num_classes=3, depth=2).train()
    after = [b["state"]["leaves"] for b in rec.batches[1:]] + [rec.final]
    for step, (record, leaves_after) in enumerate(zip(rec.batches, after)):
        ref.load_state_dict(record["state"])
        with torch.no_grad():
            out = ref.tree_forward(record["batch"]["image"])  # same weights as the step's own forward
        expected = leaf_update(record["state"]["leaves"], rec.epoch_starts[record["epoch"]], len(data),
                               out.path, out.y, record["batch"]["label"], True)
        assert torch.allclose(leaves_after, expected, atol=1e-4, rtol=1e-4), f"step {step}"
    assert (rec.final > 0).any()
    # Over one epoch the epoch-start counts are removed (up to the ReLU), so the counts of epoch 2 are
    # the soft class counts routed in epoch 2 alone: total mass = number of training images.
    assert torch.allclose(rec.final.sum(), torch.tensor(8.0), atol=1e-3)


def test_freezing_and_parameter_groups_follow_the_epochs():
    torch.manual_seed(0)
    model = create_model("prototree_test_resnet", num_classes=3, depth=2, last_block="layer4.0", freeze_epochs=1,
                         lr_net=0.01, milestones=[1, 2])
    snapshots, flags, lrs = [], [], []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx > 0:
                return
            # (the phase callback entered the epoch's phase at its start)
            flags.append([p.requires_grad for p in module.parameter_groups()["backbone"]])
            lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})
            snapshots.append({k: v.detach().clone() for k, v in module.named_parameters()})

        def on_train_end(self, trainer, module):
            snapshots.append({k: v.detach().clone() for k, v in module.named_parameters()})

    trainer(3, [Watch(), Phases()]).fit(model, train_dataloaders=loader())
    assert not any(flags[0]) and all(flags[1]) and all(flags[2])  # frozen in epoch 1 (1-based) only
    block = {n for n, _ in model.named_parameters() if n.startswith("backbone.body.layer4.0.")}
    trunk = {n for n, _ in model.named_parameters() if n.startswith("backbone.") and n not in block}

    def changed(names, a, b):
        return any(not torch.equal(snapshots[a][n], snapshots[b][n]) for n in names)

    assert not changed(trunk, 0, 1)  # frozen trunk
    assert changed(block, 0, 1) and changed({"add_on.weight", "prototype_vectors"}, 0, 1)
    assert changed(trunk, 1, 2)  # unfrozen from the second epoch
    # MultiStepLR(milestones=[1, 2], gamma=0.5), stepped after each epoch
    for name, base in {"backbone": 0.01, "last_block": 1e-3, "add_on": 1e-3, "prototypes": 1e-3}.items():
        assert [round(lr[name] / base, 6) for lr in lrs] == [1.0, 0.5, 0.25]


def test_gradient_trained_leaves_learn_through_the_optimiser():
    torch.manual_seed(0)
    model = create_model("prototree_test_resnet", num_classes=3, depth=2, derivative_free=False, lr_leaves=0.05)
    before = model.leaves.detach().clone()
    trainer(1).fit(model, train_dataloaders=loader())
    assert isinstance(model.leaves, torch.nn.Parameter) and not torch.equal(before, model.leaves.detach())


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from train.data import SyntheticParts
    from train.trees import ProtoTreePipeline

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    dm = SyntheticParts(num_classes=4, image_size=64, train_size=16, val_size=8, test_size=12, batch_size=8, seed=0)
    model = create_model("prototree_test_resnet", num_classes=4, depth=3, lr_net=1e-3, prune_threshold=0.3)
    pipeline = ProtoTreePipeline(num_local_explanations=2)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=run / "checkpoints", monitor="val/acc", mode="max")
    fit = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=run, callbacks=[pipeline, checkpoint, Phases(figures=False)], accelerator="cpu")
    fit.fit(model, datamodule=dm)
    return run, dm, model, pipeline, fit


def test_pipeline_prunes_projects_evaluates_and_draws(pipeline_run):
    run, dm, model, pipeline, fit = pipeline_run
    results = json.loads((run / "prototree.json").read_text())
    assert set(results) >= {"trained", "pruned", "pruned_and_projected", "removed_nodes", "projected_prototypes"}
    final = results["pruned_and_projected"]
    structure = model.structure()
    assert final["num_prototypes"] == len(structure.internal) == results["projected_prototypes"]
    assert final["num_leaves"] == len(structure.leaves)
    assert 1 <= final["path_length_greedy"] <= final["depth"] <= 3
    for key in ("acc_distributed", "acc_greedy", "fidelity_greedy", "fidelity_sample_max"):
        assert 0.0 <= final[key] <= 1.0
    assert sorted(results["removed_nodes"]) == sorted(
        set(range(15)) - set(structure.internal) - set(structure.leaves))
    # The distributed accuracy in the JSON is the model's own on the test split.
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(b["image"]).argmax(1) == b["label"]).sum()) for b in dm.test_dataloader())
    assert final["acc_distributed"] == pytest.approx(correct / 12)
    figures = run / "figures"
    assert (figures / "tree.svg").is_file() or "n0 ->" in (figures / "tree.dot").read_text()
    assert len(list((figures / "local_explanations").glob("*.png"))) == 2
    assert len(list((figures / "tree_patches").glob("node_*.png"))) == len(structure.internal)


def test_projected_prototypes_are_latent_patches_of_allowed_classes(pipeline_run):
    _, dm, model, _, _ = pipeline_run
    model.eval()
    allowed = model.projection_classes()
    with torch.no_grad():
        batches = list(dm.push_dataloader())
        latents = torch.cat([model.latent(b["image"]) for b in batches])
        labels = torch.cat([b["label"] for b in batches])
    for node in model.structure().internal:
        src, (r, c) = int(model.prototype_source_index[node]), model.prototype_position[node].tolist()
        assert allowed[node, labels[src]]
        assert torch.allclose(model.prototype_vectors[node], latents[src, :, r, c], atol=1e-5)


def test_final_tree_checkpoint_reloads_with_its_pruning(pipeline_run):
    _, dm, model, pipeline, fit = pipeline_run
    assert fit.checkpoint_callback.best_model_path == str(pipeline.checkpoint)
    loaded = ProtoTree.load_from_checkpoint(pipeline.checkpoint, map_location="cpu", weights_only=True).eval()
    assert torch.equal(loaded.forced_route, model.forced_route)
    images = next(iter(dm.test_dataloader()))["image"]
    with torch.no_grad():
        assert torch.allclose(loaded(images), model.eval()(images), atol=1e-5)


def test_cli_fit_with_the_synthetic_config(tmp_path):
    args = ["fit", "--config", "configs/prototree/synthetic.yaml", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
            "--model.init_args.backbone", "test_resnet", "--model.init_args.stage", "null",
            "--model.init_args.depth", "2", "--model.init_args.num_features", "8",
            "--data.init_args.train_size", "16", "--data.init_args.val_size", "8", "--data.init_args.test_size", "8",
            "--data.init_args.batch_size", "8", "--data.init_args.image_size", "32",
            "--runs_root", str(tmp_path), "--name", "tree"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/fidelity_greedy" in result.stdout and "test/acc_greedy" in result.stdout
    (run,) = list((tmp_path / "tree").iterdir())
    assert (run / "prototree.json").is_file() and (run / "checkpoints" / "pruned_and_projected.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "models.ProtoTree"


@pytest.mark.slow
def test_synthetic_recipe_reaches_90_percent(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", "configs/prototree/synthetic.yaml",
                             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                             "--runs_root", str(tmp_path), "--name", "tree"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list((tmp_path / "tree").iterdir())
    results = json.loads((run / "prototree.json").read_text())
    final = results["pruned_and_projected"]
    assert final["acc_distributed"] >= 0.9 and final["depth"] >= 4
    assert (run / "figures" / "local_explanations").is_dir()
