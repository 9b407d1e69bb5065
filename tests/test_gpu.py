"""CUDA equals CPU: ProtoPNet and ProtoTree push, bf16 autocast push, the cached last-layer phase and every
post-hoc method. Marked ``cuda``; skipped (with the reason) without a GPU or without a package a test needs,
so the suite passes on CPU-only machines. Run on a GPU: ``python -m pytest tests/test_gpu.py -m cuda -rs``.
``ZOO_TEST_DEVICE=cpu`` runs the same comparisons CPU against CPU, a check of the tests themselves.

TF32 is switched off for these tests: cuDNN uses it for float32 convolutions by default, a ~1e-3 relative
error that would flip near-ties of the push; what is compared is the code, not the tensor cores.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("ZOO_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.cuda
needs_device = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(autouse=True)
def _exact_float32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic = saved


def _models():
    return pytest.importorskip("models", reason="the zoo's models do not import here")


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, k: int = 3, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images, self.labels = torch.rand(n, 3, size, size, generator=g), torch.arange(n) % k

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def _loader(dataset, batch_size: int = 5):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


class _EpochShuffle(torch.utils.data.Sampler):
    """A permutation drawn from the epoch (Lightning calls set_epoch): the same order in every run."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())


def _assert_same_state(cuda_model, cpu_model, atol: float = 1e-5):
    """Every tensor of the state dict: floats within `atol`; integers equal (source images, positions),
    except that a box edge may move by 1 px and a uint8 patch pixel by 1: the upsampled activation maps
    differ by float rounding across devices, which can move a pixel across the percentile threshold."""
    expected = cpu_model.state_dict()
    for name, value in cuda_model.state_dict().items():
        value, ref = value.cpu(), expected[name]
        if value.is_floating_point():
            torch.testing.assert_close(value, ref, atol=atol, rtol=1e-4, msg=name)
        elif value.dtype == torch.uint8 or "box" in name:
            assert value.shape == ref.shape and (value.long() - ref.long()).abs().max() <= 1, name
        else:
            assert torch.equal(value, ref), name


# ----------------------------------------------------------------------------------------- push
def _protopnet(**kw):
    torch.manual_seed(0)
    return _models().create_model("protopnet_test_resnet", num_classes=3, stage=2, **kw).eval()


@needs_device
def test_protopnet_push_on_cuda_equals_push_on_cpu():
    data = _Dataset(size=40)
    cpu, gpu = _protopnet(), _protopnet().to(DEVICE)
    cpu.push(_loader(data), epoch=1)
    gpu.push(_loader(data), epoch=1)
    assert gpu.prototype_vectors.device.type == DEVICE.type
    _assert_same_state(gpu, cpu)


def _tree_push(tree, loader):
    """ProtoTree's projection under its current name (push, formerly project)."""
    return tree.push(loader)


@needs_device
def test_prototree_push_on_cuda_equals_push_on_cpu():
    torch.manual_seed(0)
    cpu = _models().create_model("prototree_test_resnet", num_classes=3, depth=2).eval()
    with torch.no_grad():
        cpu.leaves.normal_(0, 2)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    data = _Dataset(n=9, size=64)
    _tree_push(cpu, _loader(data, 4))
    _tree_push(gpu, _loader(data, 4))
    _assert_same_state(gpu, cpu)


@needs_device
def test_bf16_autocast_push_on_cuda_equals_float32_push():
    data = _Dataset()
    exact, mixed = _protopnet().to(DEVICE), _protopnet().to(DEVICE)
    exact.push(_loader(data))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        mixed.push(_loader(data))
    assert mixed.prototype_vectors.dtype == mixed.prototype_distance.dtype == torch.float32
    with torch.no_grad():
        z = exact.latent(data.images.to(DEVICE))  # float32 latent maps
    original = _protopnet().prototype_vectors.to(DEVICE)
    for j in range(mixed.num_prototypes):
        b, (r, c) = int(mixed.prototype_source_index[j]), mixed.prototype_position[j].tolist()
        assert data.labels[b] == mixed.prototype_classes[j].item()
        patch = z[b, :, r, c]
        torch.testing.assert_close(mixed.prototype_vectors[j, :, 0, 0], patch, atol=2e-2, rtol=2e-2)
        # a near-tie may pick another patch, never a far one: float32 distance within 2% of the optimum
        chosen = (patch - original[j, :, 0, 0]).pow(2).sum()
        assert chosen <= exact.prototype_distance[j] * 1.02 + 1e-3
    same = (mixed.prototype_source_index == exact.prototype_source_index) & \
        (mixed.prototype_position == exact.prototype_position).all(dim=1)
    assert same.float().mean() >= 0.5


# --------------------------------------------------------------------------- cached last layer
@needs_device
def test_similarity_cache_on_cuda_equals_cpu_distances():
    data = _Dataset()
    cpu, gpu = _protopnet(), _protopnet().to(DEVICE)
    cache = gpu.build_similarity_cache(torch.utils.data.DataLoader(data, batch_size=5, shuffle=True))
    assert cache.device.type == DEVICE.type and gpu.similarity_cache_valid
    with torch.no_grad():
        reference = cpu.forward_with_distances(data.images)[1]  # row i = sample index i
    torch.testing.assert_close(cache.cpu(), reference, atol=1e-5, rtol=1e-5)


@needs_device
def test_cached_last_layer_phase_on_cuda_equals_recomputing_the_network(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    phases = pytest.importorskip("train.phases", reason="train.phases (the phase callback) does not import here")

    class Data(pl.LightningDataModule):
        num_classes, class_names, augment = 3, ["a", "b", "c"], False

        def __init__(self):
            super().__init__()
            self.data = _Dataset()

        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.data, batch_size=8, sampler=_EpochShuffle(len(self.data)))

        def val_dataloader(self):
            return torch.utils.data.DataLoader(self.data, batch_size=12)

        def push_dataloader(self):
            return torch.utils.data.DataLoader(self.data, batch_size=7)

    # Lightning epochs: 0 joint | 1 (push first), 2 last layer; frozen BN statistics, so both paths
    # see the same eval-mode trunk.
    schedule = dict(num_warm_epochs=0, push_start=0, push_every=1, last_layer_epochs=2, num_train_epochs=1,
                    last_layer_lr=1e-2, freeze_bn_stats=True)
    fitted = {}
    for cache in (False, True):
        model = _protopnet(cache_last_layer=cache, **schedule).train()
        trainer = pl.Trainer(accelerator=DEVICE.type, devices=1, max_epochs=3, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                             default_root_dir=tmp_path / str(cache), callbacks=[phases.Phases(figures=False, final_checkpoint=False)])
        trainer.fit(model, Data())
        fitted[cache] = model
    plain, cached = fitted[False], fitted[True]
    assert cached.last_layer.weight.device.type == DEVICE.type
    assert not torch.equal(cached.last_layer.weight.cpu(), _protopnet().last_layer.weight)  # it did train
    # Tolerances: the joint epoch's CUDA backward may sum in another order, and Adam turns gradients near
    # its eps into steps of up to ~1% of the learning rate, so the trunks agree to ~1e-4, not bitwise.
    torch.testing.assert_close(cached.last_layer.weight, plain.last_layer.weight, atol=1e-4, rtol=1e-3)
    for name, value in plain.state_dict().items():
        if not name.startswith("last_layer"):
            torch.testing.assert_close(cached.state_dict()[name], value, atol=1e-4, rtol=0, msg=name)


# ------------------------------------------------------------------------------------ post-hoc
# LIME and Kernel SHAP fit a 16-feature surrogate: 64 samples keep it well conditioned, so float
# differences of the model's outputs are not amplified.
FAST = {"rise": {"n_masks": 32}, "lime": {"n_samples": 64, "cells": 4}, "kernel_shap": {"n_samples": 64, "cells": 4},
        "smoothgrad": {"n_samples": 4}, "integrated_gradients": {"n_steps": 8}, "occlusion": {"window": 16}}


def _methods() -> list[str]:
    try:
        from explain.posthoc import list_methods
    except ImportError:  # reported by the test itself
        return ["rise"]
    return list_methods()


@needs_device
@pytest.mark.parametrize("method", _methods())
def test_posthoc_method_on_cuda_equals_cpu(method):
    posthoc = pytest.importorskip("explain.posthoc", reason="explain.posthoc does not import here")
    torch.manual_seed(0)
    cpu = _models().create_model("cam_test_resnet", num_classes=4).eval()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3])
    kw = FAST.get(method, {})
    try:
        expected = posthoc.attribute(cpu, images, target, method=method, **kw)
    except ModuleNotFoundError as error:  # captum's methods (and LIME's scikit-learn surrogate)
        pytest.skip(f"{method} needs {error.name or error}, which is not installed")
    got = posthoc.attribute(gpu, images.to(DEVICE), target.to(DEVICE), method=method, **kw)
    assert got.device.type == DEVICE.type and got.shape == expected.shape == (2, 64, 64)
    scale = expected.abs().amax().item()
    assert scale > 0, f"{method}: the CPU map is all zero, nothing is compared"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-4 * scale)


# ------------------------------------------------------------------------------- the GPU script
def test_gpu_check_script_parses_and_runs_every_benchmark_with_a_device_flag():
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu_check.sh"
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    listed = set(next(line for line in script.read_text().splitlines() if line.startswith("BENCHMARKS=")).split('"')[1].split())
    with_device = {p.name for p in (root / "benchmarks").glob("*.py") if '"--device"' in p.read_text()}
    assert listed == with_device
