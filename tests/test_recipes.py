"""The papers' CUB and Cars recipes: a dry run of each CUB recipe through the CLI on a miniature CUB folder,
checked against an unrolling of the official training loops, and the papers' backbone weights."""
from __future__ import annotations

import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from models.backbones import Backbone, PretrainedWeightsError
from test_data import make_cub, one_thread  # noqa: F401 (a fixture)
from train.cli import main

ROOT = Path(__file__).resolve().parents[1]
CUB_TRAIN = 5994  # official CUB-200-2011 training images
PROTOPNET = ["cub_resnet34", "cub_densenet121", "cub_vgg19"]


def _recipe(path: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / path).read_text())


def official_protopnet(num_train_epochs: int) -> list[tuple[str, dict[str, float], bool]]:
    """The passes over the training set of the official ``main.py``, in order: (phase, lr per trained
    group, pushed just before). Warm epochs < 5; joint epochs call ``StepLR(5, 0.1).step()`` before
    training; after the train and test of an epoch e >= 10 with e % 10 == 0: push, then 20 last-layer passes."""
    passes, scheduler_steps = [], 0
    for epoch in range(num_train_epochs):
        if epoch < 5:
            passes.append(("warm", {"add_on": 3e-3, "prototypes": 3e-3}, False))
        else:
            scheduler_steps += 1
            f = 0.1 ** (scheduler_steps // 5)
            passes.append(("joint", {"backbone": 1e-4 * f, "add_on": 3e-3 * f, "prototypes": 3e-3 * f}, False))
        if epoch >= 10 and epoch % 10 == 0:
            passes += [("last", {"last_layer": 1e-4}, i == 0) for i in range(20)]
    return passes


def official_prototree(epoch: int, freeze_epochs: int = 30, milestones=(60, 70, 80, 90, 100)) -> dict[str, float]:
    """lr per trained group in 1-based epoch ``epoch`` of the official ``main_tree.py``: the lr_net group is
    frozen for epochs 1..freeze_epochs; MultiStepLR(milestones, 0.5) is stepped after each epoch."""
    f = 0.5 ** sum(m < epoch for m in milestones)
    lrs = {"last_block": 1e-3 * f, "add_on": 1e-3 * f, "prototypes": 1e-3 * f}
    if epoch > freeze_epochs:
        lrs["backbone"] = 1e-5 * f
    return lrs


class Record(pl.Callback):
    """What the trainer did: lr of every group that had gradients when an optimizer stepped, per epoch,
    and the epochs that began with a push."""

    def __init__(self) -> None:
        self.lrs: dict[int, dict[str, float]] = {}
        self.pushed: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and int(getattr(pl_module, "push_epoch", -1)) == trainer.current_epoch:
            self.pushed.append(trainer.current_epoch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        groups = {g["name"]: g["lr"] for g in optimizer.param_groups if any(p.grad is not None for p in g["params"])}
        self.lrs.setdefault(trainer.current_epoch, {}).update(groups)


@pytest.fixture(scope="module")
def mini_cub(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "CUB_200_2011"
    make_cub(root)  # 3 classes, 6 training and 6 test images
    return root


def dry_run(recipe: str, root: Path, runs: Path, epochs: int, train_batches: int, *extra: str):
    """The recipe through the CLI, on the miniature folder with a tiny trunk, `epochs` epochs of one batch."""
    cli = main(["fit", "--config", str(ROOT / "configs" / recipe),
                "--data.init_args.root", str(root), "--data.init_args.num_workers", "0",
                "--data.init_args.image_size", "64", "--data.init_args.batch_size", "8",
                "--data.init_args.eval_batch_size", "8",
                "--model.init_args.num_classes", "3", "--model.init_args.backbone", "test_resnet",
                "--model.init_args.pretrained_backbone", "false",
                "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu",
                "--trainer.max_epochs", str(epochs), "--trainer.num_sanity_val_steps", "0",
                # a fraction (a plain 1 reaches Lightning as 1.0 = all batches)
                "--trainer.limit_train_batches", str(1.5 / train_batches),
                "--trainer.callbacks+=test_recipes.Record",
                "--test_after_fit", "false", "--runs_root", str(runs), *extra])
    record = next(c for c in cli.trainer.callbacks if isinstance(c, Record))
    return cli, record


def _close(got: dict[str, float], expected: dict[str, float]) -> bool:
    return got.keys() == expected.keys() and all(math.isclose(got[k], expected[k], rel_tol=1e-9) for k in got)


@pytest.mark.parametrize("name", [PROTOPNET[0], *(pytest.param(n, marks=pytest.mark.slow) for n in PROTOPNET[1:])])
def test_protopnet_recipe_dry_run_follows_the_official_schedule(name, mini_cub, tmp_path, one_thread):
    recipe = _recipe(f"protopnet/{name}.yaml")
    official = official_protopnet(recipe["model"]["init_args"]["num_train_epochs"])
    # The recipe as written: one Lightning epoch per official pass over ~180k images of 80.
    assert recipe["trainer"]["max_epochs"] == len(official) == 91
    data = recipe["data"]["init_args"]
    assert data["augment"] == "protopnet" and data["batch_size"] == 80 and data["crop_to_bbox"]
    assert data["epoch_repeats"] * CUB_TRAIN == 179_820 and math.ceil(179_820 / 80) == 2248

    n_train, epochs = 6, 12  # to the first push (after official epoch 10) and its first last-layer pass
    cli, record = dry_run(f"protopnet/{name}.yaml", mini_cub, tmp_path, epochs, math.ceil(30 * n_train / 8))
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    assert model.schedule_length() == len(official)
    assert len(trainer.train_dataloader.dataset) == 30 * n_train  # the offline set's size
    assert len(trainer.train_dataloader) == math.ceil(30 * n_train / 8)
    views = [i // n_train for i in trainer.train_dataloader.sampler]
    aug = dm.train_dataset.transform
    assert aug.name == "protopnet"
    pipelines = [aug.pipelines.index(aug.for_view(v, 30)) for v in views]
    assert [pipelines.count(k) for k in range(3)] == [10 * n_train] * 3  # 10 rotated, 10 skewed, 10 sheared
    assert not hasattr(dm.push_dataset, "for_view") and dm.push_dataset.transform is None
    for epoch in range(epochs):
        phase, lrs, _ = official[epoch]
        assert _close(record.lrs[epoch], lrs), (epoch, phase, record.lrs[epoch], lrs)
    assert record.pushed == [e for e, (_, _, pushed) in enumerate(official[:epochs]) if pushed] == [11]
    assert [e for e, p in enumerate(official) if p[2]] == [11, 41, 71]  # after official epochs 10, 20, 30


def test_prototree_cub_recipe_dry_run_follows_the_official_schedule(mini_cub, tmp_path, one_thread):
    recipe = _recipe("prototree/cub_resnet50.yaml")
    data = recipe["data"]["init_args"]
    assert recipe["trainer"]["max_epochs"] == 100 and data["batch_size"] == 64
    assert data["epoch_repeats"] * CUB_TRAIN == 29_970 and math.ceil(29_970 / 64) == 469  # train_corners
    assert data["train_corners"] and data["crop_to_bbox"] and not data["test_crop_to_bbox"]

    n_train, epochs = 6, 2
    cli, record = dry_run("prototree/cub_resnet50.yaml", mini_cub, tmp_path, epochs, math.ceil(5 * n_train / 8),
                          "--model.init_args.last_block", "layer4.0")  # the tiny trunk's last block
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    assert len(trainer.train_dataloader.dataset) == 5 * n_train and len(trainer.train_dataloader) == 4
    assert dm.train_dataset.transform.name == "prototree_cub" and dm.train_dataset.corners
    assert dm.push_dataset.crop_to_bbox and not dm.test_dataset.crop_to_bbox  # train_crop / test_full
    for epoch in range(epochs):
        assert _close(record.lrs[epoch], official_prototree(epoch + 1)), (epoch, record.lrs[epoch])
    assert _close(official_prototree(61), {k: v / 2 for k, v in official_prototree(60).items()})
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert sorted(scheduler.milestones) == [60, 70, 80, 90, 100] and scheduler.gamma == 0.5
    projected = model.prototype_source_index[model.prototype_source_index >= 0]
    assert len(projected) > 0 and int(projected.max()) < len(dm.push_dataset)  # projected on the crops


def official_protopool(lightning_epoch: int, num_train_epochs: int = 100, warmup_time: int = 10, lr: float = 1e-3):
    """lr per trained group in a Lightning epoch under the official ProtoPool ``main.py`` (without --use_scheduler's
    plateau decay): official epoch e = L + 1 (epoch 0 only evaluates); warm before warmup_time; joint with
    StepLR(5, 0.1) stepped after each joint epoch; after epoch num_train_epochs - 1 the push and the fine-tuning
    epochs t = 0, 1, ... at lr / 10 x 0.95^(t // 5)."""
    e = lightning_epoch + 1
    if e < warmup_time:
        return {"add_on": 3 * lr, "slots": 3 * lr, "prototypes": 3 * lr}
    if e < num_train_epochs:
        f = 0.1 ** ((e - warmup_time) // 5)
        return {"backbone": lr / 10 * f, "add_on": 3 * lr * f, "slots": 3 * lr * f, "prototypes": 3 * lr * f}
    return {"last_layer": lr / 10 * 0.95 ** ((e - num_train_epochs) // 5)}


@pytest.mark.slow  # ~1 min: 13 epochs through the CLI
def test_protopool_cub_recipe_dry_run_follows_the_official_schedule(mini_cub, tmp_path, one_thread):
    recipe = _recipe("protopool/cub_resnet50.yaml")
    init, data = recipe["model"]["init_args"], recipe["data"]["init_args"]
    assert recipe["trainer"]["max_epochs"] == 99 + 25 and (init["num_prototypes"], init["slots_per_class"],
                                                           init["prototype_dim"]) == (202, 10, 256)
    assert data["augment"] == "protopnet" and data["batch_size"] == 80 and data["crop_to_bbox"]
    assert data["epoch_repeats"] * CUB_TRAIN == 179_820
    assert Path(init["pretrained_backbone"]).name == "BBN.iNaturalist2017.res50.180epoch.best_model.pth"
    n_train, epochs, trained = 6, 13, 12  # warm 0-8, joint 9-10, push at the start of 11, fine-tuning 11-12
    cli, record = dry_run("protopool/cub_resnet50.yaml", mini_cub, tmp_path, epochs, math.ceil(30 * n_train / 8),
                          "--model.init_args.num_train_epochs", str(trained), "--model.init_args.plateau_patience", "null")
    assert cli.model.schedule_length() == trained - 1 + 25
    for epoch in range(epochs):
        assert _close(record.lrs[epoch], official_protopool(epoch, trained)), (epoch, record.lrs[epoch])
    assert record.pushed == [11]


def test_recipes_use_the_papers_weights():
    import timm

    for name in PROTOPNET:
        init = _recipe(f"protopnet/{name}.yaml")["model"]["init_args"]
        assert init["backbone"] == f"{name[4:]}.tv_in1k" and init["pretrained_backbone"] is True
    cars = _recipe("prototree/cars_resnet50.yaml")["model"]["init_args"]
    assert cars["backbone"] == "resnet50.tv_in1k" and cars["pretrained_backbone"] is True
    icnn = _recipe("icnn/cub_vgg16.yaml")["model"]["init_args"]
    assert icnn["backbone"] == "vgg16.tv_in1k" and icnn["pretrained_backbone"] is True
    cub_tree = _recipe("prototree/cub_resnet50.yaml")["model"]["init_args"]
    assert Path(cub_tree["pretrained_backbone"]).name == "BBN.iNaturalist2017.res50.180epoch.best_model.pth"
    # timm's .tv_in1k tags are torchvision's files (its untagged default is another recipe).
    for tag in ("resnet34.tv_in1k", "resnet50.tv_in1k"):
        assert timm.models.get_pretrained_cfg(tag).url.startswith("https://download.pytorch.org/models/")
    assert timm.models.get_pretrained_cfg("resnet34").tag != "tv_in1k"


def _trunk(net: torch.nn.Module, name: str) -> torch.nn.Module:
    if name.startswith("densenet"):
        return torch.nn.Sequential(net.features, torch.nn.ReLU())
    return torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


@pytest.mark.parametrize("name", ["resnet34", "densenet121"])
def test_torchvision_weight_files_load_into_the_tagged_trunk(name, tmp_path, one_thread):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(name).eval()
    state = net.state_dict()
    if name.startswith("densenet"):  # the file torchvision serves has the old key names ("norm.1")
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "weights.pth")
    trunk = Backbone(f"{name}.tv_in1k", pretrained=str(tmp_path / "weights.pth")).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), _trunk(net, name)(x), rtol=0, atol=0)


def test_bbn_inaturalist_file_loads_as_prototree_does(tmp_path, one_thread):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()
    bbn = {}  # BBN's layout: DataParallel prefix, layer4 of 2 blocks + cb_block / rb_block, a classifier
    for key, value in net.state_dict().items():
        if key.startswith("fc."):
            continue
        bbn["module.backbone." + key.replace("layer4.2.", "cb_block.")] = value
        if key.startswith("layer4.2."):
            bbn["module.backbone." + key.replace("layer4.2.", "rb_block.")] = torch.randn_like(value.float())
    bbn["module.classifier.weight"] = torch.randn(5089, 4096)
    torch.save(bbn, tmp_path / "BBN.iNaturalist2017.res50.180epoch.best_model.pth")
    trunk = Backbone("resnet50", pretrained=str(tmp_path / "BBN.iNaturalist2017.res50.180epoch.best_model.pth")).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), _trunk(net, "resnet50")(x), rtol=0, atol=0)


def test_unfetchable_weights_fail_before_training_naming_the_flag(mini_cub, tmp_path, monkeypatch):
    import timm

    create = timm.create_model

    def offline(name, **kwargs):
        if kwargs.get("pretrained") and "pretrained_cfg_overlay" not in kwargs:
            raise OSError("Network is unreachable")
        return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsError) as info:
        Backbone("resnet34.tv_in1k", pretrained=True)
    message = str(info.value)
    assert "\n" not in message and "'resnet34.tv_in1k'" in message
    assert "--model.init_args.pretrained_backbone /path/to/weights.pth" in message
    with pytest.raises(FileNotFoundError, match="pretrained_backbone"):
        Backbone("resnet34", pretrained=str(tmp_path / "missing.pth"))
    # Through the CLI: the recipe stops while building the model, before any training step.
    with pytest.raises((ValueError, SystemExit, PretrainedWeightsError)) as info:
        main(["fit", "--config", str(ROOT / "configs/protopnet/cub_resnet34.yaml"), "--data.init_args.root", str(mini_cub),
              "--model.init_args.num_classes", "3", "--trainer.logger", "false", "--runs_root", str(tmp_path)])
    assert "--model.init_args.pretrained_backbone /path/to/weights.pth" in str(info.value)
