"""ProtoPNet under a Lightning Trainer: phases, push and pruning callbacks, resume, checkpoints, CLI config."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from models import ProtoPNet, create_model
from train.phases import Phases

# num_train_epochs=3 with a push after official epoch 2 and two last-layer epochs:
# Lightning epochs 0 warm | 1, 2 joint | 3 (push first), 4 last | 5 last (after the schedule: pruning).
SCHEDULE = dict(num_warm_epochs=1, push_start=2, push_every=2, last_layer_epochs=2, num_train_epochs=3,
                joint_lr_step_size=1, last_layer_lr=1e-2)
PHASES = ["warm", "joint", "joint", "last", "last", "last"]


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n=24, k=3, size=32):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.labels = torch.arange(n) % k

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


class TinyData(pl.LightningDataModule):
    num_classes = 3
    class_names = ["a", "b", "c"]

    def __init__(self):
        super().__init__()
        self.data = _Dataset()

    def train_dataloader(self):  # unshuffled: a resumed run sees the same batches
        return torch.utils.data.DataLoader(self.data, batch_size=8)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=12)

    def push_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=7)


def _model(**kwargs):
    torch.manual_seed(0)
    return create_model("protopnet_test_resnet", num_classes=3, stage=2, **SCHEDULE, **kwargs)


PRUNING = {"prune_epoch": 5, "prune_k": 4, "prune_threshold": 2}


class Pruned:
    """The ids the phase callback's pruning of epoch 5 returned."""

    def __init__(self, phases):
        self.phases = phases

    @property
    def pruned(self):
        return self.phases.results[(5, "prune")].tolist()


class Recorder(pl.Callback):
    """Per epoch: phase, which parameter groups changed, joint lrs, and the logged val metrics."""

    def __init__(self):
        self.phase, self.changed, self.lr, self.metrics = {}, {}, {}, {}

    @staticmethod
    def _params(m):
        return {"backbone": m.backbone, "add_on": m.add_on, "last_layer": m.last_layer}, m.prototype_vectors

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        if batch_idx == 0:  # after the push callback and the model's phase switch
            e = trainer.current_epoch
            self.phase[e] = m.phase
            mods, protos = self._params(m)
            self._before = {k: [p.detach().clone() for p in v.parameters()] for k, v in mods.items()}
            self._before["prototypes"] = [protos.detach().clone()]
            self.lr[e] = {g["name"]: g["lr"] for g in trainer.optimizers[1].param_groups}
            if e == 3:  # just pushed: the latent maps of the push data, as the push saw them (eval mode)
                m.eval()
                with torch.no_grad():
                    self.pushed = (m.latent(trainer.datamodule.data.images), m.prototype_vectors.detach().clone())
                m.train()
                m.set_phase(m.phase)

    def on_train_epoch_end(self, trainer, m):
        mods, protos = self._params(m)
        now = {k: list(v.parameters()) for k, v in mods.items()}
        now["prototypes"] = [protos]
        self.changed[trainer.current_epoch] = {
            k for k, ps in now.items() if any(not torch.equal(a, b) for a, b in zip(ps, self._before[k]))
        }

    def on_validation_end(self, trainer, m):
        if not trainer.sanity_checking:
            self.metrics[trainer.current_epoch] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _trainer(tmp_path, max_epochs, callbacks):
    return pl.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=callbacks, deterministic=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    recorder, push = Recorder(), Phases()
    prune = Pruned(push)
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    model, data = _model(**PRUNING), TinyData()
    trainer = _trainer(tmp, 6, [recorder, push, ckpt])
    trainer.fit(model, data)
    return tmp, model, data, recorder, push, prune


def test_phases_train_exactly_their_parameters(run):
    _, _, _, rec, _, _ = run
    assert [rec.phase[e] for e in range(6)] == PHASES
    assert rec.changed[0] == {"add_on", "prototypes"}  # warm: trunk and last layer untouched
    assert rec.changed[1] == rec.changed[2] == {"backbone", "add_on", "prototypes"}  # joint: last layer untouched
    assert rec.changed[3] == rec.changed[4] == rec.changed[5] == {"last_layer"}  # last: only the last layer


def test_joint_lr_decays_with_official_offset(run):
    _, _, _, rec, _, _ = run
    # step_size 1, gamma 0.1, stepped before each joint epoch: x0.1 in the 1st joint epoch, x0.01 in the 2nd.
    assert rec.lr[1] == pytest.approx({"backbone": 1e-5, "add_on": 3e-4, "prototypes": 3e-4})
    assert rec.lr[2] == pytest.approx({"backbone": 1e-6, "add_on": 3e-5, "prototypes": 3e-5})


def test_push_happens_once_and_prototypes_sit_on_patches(run):
    tmp, model, data, rec, push, _ = run
    assert int(model.push_epoch) == 3
    assert [p.name for p in push.saved] == ["prototypes_epoch2.png"] and push.saved[0].stat().st_size > 1000
    # val/acc_pushed is -1 before the push and the validation accuracy after it.
    assert [rec.metrics[e]["val/acc_pushed"] for e in range(3)] == [-1, -1, -1]
    assert all(rec.metrics[e]["val/acc_pushed"] == rec.metrics[e]["val/acc"] for e in (3, 4, 5))
    # (Official BN behaviour: the trunk's BN statistics move in the last-layer epochs afterwards, so
    # the check is on the latent maps at push time.)
    z, vectors = rec.pushed
    for j in range(model.num_prototypes):
        b, (r, c) = int(model.prototype_source_index[j]), model.prototype_position[j].tolist()
        assert data.data.labels[b] == j // 2
        torch.testing.assert_close(vectors[j, :, 0, 0], z[b, :, r, c], atol=1e-6, rtol=0)
    assert torch.equal(vectors, model.prototype_vectors.detach())  # frozen after the push


def test_pruning_callback_prunes_by_nearest_patches(run):
    _, model, data, _, _, prune = run
    keep = model.prototype_mask
    assert sorted(prune.pruned) == torch.nonzero(~keep).squeeze(1).tolist()
    # Brute force on the final model (the prototypes did not move after pruning).
    model.eval()
    per_image = model.distances(data.data.images).flatten(2).amin(2)  # (N, P)
    for j in range(model.num_prototypes):
        order = sorted(range(24), key=lambda i: (float(per_image[i, j]), i))[:4]
        own = sum(int(data.data.labels[i]) == j // 2 for i in order)
        assert (j in prune.pruned) == (own < 2)


def test_checkpoint_is_weights_only_and_loads_without_the_trainer(run):
    tmp, model, _, _, _, _ = run
    path = tmp / "ckpt" / "epoch=5.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["num_train_epochs"] == 3
    loaded = ProtoPNet.load_from_checkpoint(path, map_location="cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_missing_push_callback_is_a_clear_error(tmp_path):
    # Official epoch 0 is a (joint) push epoch, so Lightning epoch 1 must start with a push.
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2, num_warm_epochs=0, push_start=0,
                         push_every=1, last_layer_epochs=1)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_train_batches=1, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="add train.phases.Phases"):
        trainer.fit(model, TinyData())


def test_resume_mid_joint_continues_with_identical_optimiser_state(run, tmp_path):
    tmp, reference, _, _, _, _ = run
    ckpt = tmp / "ckpt" / "epoch=1.ckpt"  # end of Lightning epoch 1: between the two joint epochs
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)

    class Check(pl.Callback):
        def on_train_start(self, trainer, m):  # right after the restore
            self.restored = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]
            self.first_epoch = trainer.current_epoch

        def on_train_batch_start(self, trainer, m, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 0:
                self.phase = m.phase

    check = Check()
    model = _model(**PRUNING)
    trainer = _trainer(tmp_path, 6, [check, Phases(figures=False)])
    trainer.fit(model, TinyData(), ckpt_path=ckpt)
    assert check.first_epoch == 2 and check.phase == "joint"
    for restored, stored in zip(check.restored, saved["optimizer_states"]):
        assert restored["param_groups"] == stored["param_groups"]
        for pid, st in stored["state"].items():
            for key, value in st.items():
                assert torch.equal(restored["state"][pid][key], value)
    # ... and it ends exactly where the uninterrupted run ended.
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    final = torch.load(tmp / "ckpt" / "epoch=5.ckpt", map_location="cpu", weights_only=True)["optimizer_states"]
    for mine, ref in zip([o.state_dict() for o in trainer.optimizers], final):
        assert mine["param_groups"] == ref["param_groups"]
        for pid, st in ref["state"].items():
            for key, value in st.items():
                assert torch.equal(mine["state"][pid][key], value)


# --------------------------------------------------------------------------------------------- CLI
def test_synthetic_config_runs_through_the_cli(repo_root, tmp_path):
    cfg = yaml.safe_load((repo_root / "configs/protopnet/synthetic.yaml").read_text())
    assert cfg["model"]["class_path"] == "models.ProtoPNet"
    tiny = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "3",
            "--model.init_args.backbone", "test_resnet", "--model.init_args.stage", "2",
            "--model.init_args.num_warm_epochs", "1", "--model.init_args.push_start", "1",
            "--model.init_args.push_every", "1", "--model.init_args.last_layer_epochs", "1",
            "--model.init_args.num_train_epochs", "2",
            # the speed switches through the CLI (un-augmented data, so the cache is used)
            "--model.init_args.cache_last_layer", "true", "--model.init_args.channels_last", "true",
            "--data.init_args.augment", "false",
            "--data.init_args.train_size", "30", "--data.init_args.val_size", "10", "--data.init_args.test_size", "10",
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "15",
            "--runs_root", str(tmp_path), "--name", "tiny"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(repo_root))
    result = subprocess.run([sys.executable, str(repo_root / "train.py"), "fit", "--config",
                             "configs/protopnet/synthetic.yaml", *tiny],
                            cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((tmp_path / "tiny").iterdir())
    figures = {p.name for p in (run_dir / "figures").iterdir()}
    assert {"prototypes_epoch1.png", "explanations.png"} <= figures
    assert "test/acc" in result.stdout and "augmented online" not in result.stderr
    best = Path(next(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("best")))
    assert int(torch.load(best, map_location="cpu", weights_only=True)["state_dict"]["push_epoch"]) >= 0


# ------------------------------------------------------------------------------ cached last layer
class _EpochShuffle(torch.utils.data.Sampler):
    """A permutation drawn from the epoch (Lightning calls set_epoch): the same order in every run."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())


class ShuffledTinyData(TinyData):
    augment = False  # declared, as the zoo's datamodules do

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=8, sampler=_EpochShuffle(len(self.data)))


class NetworkCalls(pl.Callback):
    """Trunk forward calls made by training steps, per epoch; cache builds per epoch; whether the
    training batches reached the device with their images."""

    def __init__(self):
        self.calls, self.builds, self.images, self._in_step = {}, {}, {}, False

    def on_fit_start(self, trainer, m):
        m.backbone.register_forward_hook(lambda *_: self._count(trainer.current_epoch))
        build = m.build_similarity_cache

        def counted(loader):
            self.builds[trainer.current_epoch] = self.builds.get(trainer.current_epoch, 0) + 1
            return build(loader)
        m.build_similarity_cache = counted

    def _count(self, epoch):
        if self._in_step:
            self.calls[epoch] = self.calls.get(epoch, 0) + 1

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        self._in_step = True
        self.images.setdefault(trainer.current_epoch, set()).add("image" in batch)

    def on_train_batch_end(self, *args):
        self._in_step = False


# Lightning epochs: 0 joint | 1 (push first), 2 last layer.
CACHE_SCHEDULE = dict(num_warm_epochs=0, push_start=0, push_every=1, last_layer_epochs=2, num_train_epochs=1,
                      last_layer_lr=1e-2)


def _cached_model(cache):
    # freeze_bn_stats: the uncached path then sees the eval-mode trunk too, so both must agree.
    torch.manual_seed(0)
    return create_model("protopnet_test_resnet", num_classes=3, stage=2, freeze_bn_stats=True,
                        cache_last_layer=cache, **CACHE_SCHEDULE)


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory):
    runs = {}
    for cache in (False, True):
        tmp = tmp_path_factory.mktemp(f"cache{cache}")
        calls = NetworkCalls()
        ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        model = _cached_model(cache)
        _trainer(tmp, 3, [calls, Phases(figures=False), ckpt]).fit(model, ShuffledTinyData())
        runs[cache] = (tmp, model, calls)
    return runs


def test_cached_last_layer_equals_recomputing_the_network(cached_runs):
    (_, plain, plain_calls), (_, cached, calls) = cached_runs[False], cached_runs[True]
    # Same shuffled batch order, same frozen network: the same last layer within float tolerance.
    torch.testing.assert_close(cached.last_layer.weight, plain.last_layer.weight, atol=1e-5, rtol=1e-4)
    assert not torch.equal(cached.last_layer.weight, _cached_model(True).last_layer.weight)  # it did train
    for name, value in plain.state_dict().items():
        if not name.startswith("last_layer"):
            assert torch.equal(cached.state_dict()[name], value), name
    # The cache is built once, right after the push (epoch 1), and the trunk never runs in a
    # training step of a last-layer epoch (epochs 1, 2); without cache it runs in every step.
    assert calls.builds == {1: 1}
    assert calls.calls.get(1, 0) == calls.calls.get(2, 0) == 0 and calls.calls[0] == 3
    assert all(plain_calls.calls[e] == 3 for e in range(3)) and plain_calls.builds == {}
    # ... nor are the images of those batches copied to the device.
    assert calls.images == {0: {True}, 1: {False}, 2: {False}} and plain_calls.images == {e: {True} for e in range(3)}


def test_similarity_cache_rows_and_invalidation():
    model, data = _cached_model(True), TinyData()
    loader = torch.utils.data.DataLoader(data.data, batch_size=5, sampler=_EpochShuffle(24))  # any order
    cache = model.build_similarity_cache(loader)
    model.eval()
    with torch.no_grad():
        reference = model.forward_with_distances(data.data.images)[1]  # row i = sample index i
    torch.testing.assert_close(cache, reference, atol=1e-5, rtol=1e-5)
    assert model.similarity_cache_valid
    with torch.no_grad():
        model.last_layer.weight.mul_(2)  # the cache does not depend on the last layer
    assert model.similarity_cache_valid

    def stale_after(change):
        model.build_similarity_cache(loader)
        change()
        return not model.similarity_cache_valid

    assert stale_after(lambda: model.push(data.push_dataloader()))
    assert stale_after(lambda: model.prototype_vectors.detach().add_(0.1))
    assert stale_after(lambda: model.prune(data.push_dataloader(), k=4, threshold=4))
    backbone_param = next(model.backbone.parameters())
    assert stale_after(lambda: backbone_param.detach().mul_(1.01))  # e.g. an optimiser step on the trunk
    assert stale_after(lambda: model.load_state_dict(model.state_dict()))


def test_cache_is_not_used_on_augmented_data(tmp_path):
    class Augmented(ShuffledTinyData):
        augment = True

    torch.manual_seed(0)
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2, num_warm_epochs=0, push_start=0,
                         push_every=1, last_layer_epochs=1, num_train_epochs=1, cache_last_layer=True)
    calls = NetworkCalls()
    with pytest.warns(UserWarning, match="augmented online"):
        _trainer(tmp_path, 2, [calls, Phases(figures=False)]).fit(model, Augmented())
    assert calls.builds == {} and calls.calls[1] == 3 and model.similarity_cache is None


def test_resume_in_the_last_layer_phase_rebuilds_the_cache(cached_runs, tmp_path):
    tmp, reference, _ = cached_runs[True]
    calls = NetworkCalls()
    model = _cached_model(True)
    # The end of epoch 1 (the first cached pass): epoch 2 is a last-layer epoch without a push.
    _trainer(tmp_path, 3, [calls, Phases(figures=False)]).fit(model, ShuffledTinyData(),
                                                                       ckpt_path=tmp / "ckpt" / "epoch=1.ckpt")
    assert calls.builds == {2: 1} and calls.calls.get(2, 0) == 0
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


def test_cli_rejects_an_impossible_schedule_before_training(repo_root, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(repo_root))
    result = subprocess.run([sys.executable, str(repo_root / "train.py"), "fit", "--config", "configs/protopnet/synthetic.yaml",
                             "--model.init_args.push_start", "0", "--trainer.logger", "false",
                             "--runs_root", str(tmp_path), "--name", "bad"],
                            cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # (jsonargparse re-raises it wrapped, with the whole config; the cause is our one line.)
    line = ("error: ProtoPNet schedule: push_start=0 < num_warm_epochs=1: the first push must come after warm-up "
            "(IZOO_DEBUG=1 shows the traceback)")
    assert line in result.stderr.splitlines(), result.stderr[-2000:]
    assert "Epoch 0" not in result.stdout + result.stderr and not (tmp_path / "bad").exists()
