"""CUDA out-of-memory retries, tested on CPU by injecting `torch.OutOfMemoryError` above a batch size:
the chunking helpers, the push and nearest-patch searches, and the post-hoc methods that batch work
give the result of one big batch and say once that they retried."""
import warnings

import pytest
import torch

import models.prototypes as prototypes
from explain.posthoc import attribute
from models import create_model
from models.chunking import AdaptiveChunks, retry_with_smaller_batch, run_in_chunks

torch.set_num_threads(1)


def _fragile(limit: int):
    calls = []

    def fn(x, y):
        calls.append(len(x))
        if len(x) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return x * 2 + y, {"sum": x.sum(dim=1)}

    return fn, calls


def _oom_messages(record) -> list[str]:
    return [str(w.message) for w in record if "out of memory" in str(w.message)]


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result():
    x, y = torch.arange(40.0).view(20, 2), torch.ones(20, 2)
    fn, calls = _fragile(limit=6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, extra = run_in_chunks(fn, x, y, what="push")
    assert torch.equal(out, x * 2 + y) and torch.equal(extra["sum"], x.sum(dim=1))
    assert calls == [20, 10, 5, 5, 5, 5]  # 20 -> 10 -> 5, then the rest in chunks of 5
    assert _oom_messages(record) == ["CUDA out of memory in push at batch size 20; retrying with 10",
                                     "CUDA out of memory in push at batch size 10; retrying with 5"]


def test_the_size_that_fits_is_kept_for_later_calls_so_the_warning_comes_once():
    fn, calls = _fragile(limit=4)
    chunks = AdaptiveChunks(what="push")
    x = torch.rand(8, 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            out, _ = chunks(fn, x, x)
            assert torch.equal(out, 3 * x)
    assert calls == [8, 4, 4] + [4, 4] * 2 and chunks.size == 4
    assert _oom_messages(record) == ["CUDA out of memory in push at batch size 8; retrying with 4"]


def test_a_single_sample_that_does_not_fit_re_raises():
    fn, _ = _fragile(limit=0)
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(UserWarning):
        run_in_chunks(fn, torch.ones(4, 2), torch.ones(4, 2))


def test_fixed_chunks_without_errors():
    fn, calls = _fragile(limit=100)
    x = torch.rand(10, 2)
    out, _ = run_in_chunks(fn, x, x, chunk_size=3)
    assert calls == [3, 3, 3, 1] and torch.allclose(out, 3 * x)


def test_retry_with_smaller_batch_halves_down_to_the_minimum():
    tried = []

    def fn(size):
        tried.append(size)
        if size > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return size

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert retry_with_smaller_batch(fn, 24, "steps") == 3
    assert tried == [24, 12, 6, 3]
    assert _oom_messages(record) == [f"CUDA out of memory in steps at batch size {n}; retrying with {n // 2}" for n in (24, 12, 6)]
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(UserWarning, match="retrying with 8"):
        retry_with_smaller_batch(fn, 16, "steps", minimum=8)
    assert tried == [16, 8]
    with pytest.raises(ValueError, match="minimum"):
        retry_with_smaller_batch(fn, 4, minimum=5)


# --------------------------------------------------------------------------------------------- push
def _push_data(n=22, batch_size=8):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 8, 8, generator=g)
    images[17] = images[5]  # with protos[4] below, an exact tie between two batches
    labels, index = torch.arange(n) % 3, torch.arange(n)
    batches = [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size], "index": index[i:i + batch_size]}
               for i in range(0, n, batch_size)]
    protos = torch.rand(6, 3, generator=g)
    protos[4] = _latent(images[5:6])[0, :, 1, 2]  # a patch of images 5 and 17 (class 2, like prototype 4)
    allowed = torch.zeros(6, 3, dtype=torch.bool)
    allowed[torch.arange(6), torch.arange(6) // 2] = True
    return batches, protos, allowed


def _latent(images):  # elementwise, so that every batch size gives the same bits
    return (images[:, :, ::2, ::2] * 2 - 1).contiguous()


@pytest.mark.parametrize("where", ["latent", "distances"])
def test_push_splits_a_batch_that_runs_out_of_memory_with_the_same_result(monkeypatch, where):
    batches, protos, allowed = _push_data()
    expected = prototypes.push_prototypes(_latent, protos, batches, allowed_classes=allowed)
    sizes = []

    def limited(fn):
        def wrapped(x, *args):
            sizes.append(len(x))
            if len(x) > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return fn(x, *args)
        return wrapped

    latent_fn = _latent
    if where == "latent":
        latent_fn = limited(_latent)
    else:
        monkeypatch.setattr(prototypes, "l2_distances", limited(prototypes.l2_distances))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = prototypes.push_prototypes(latent_fn, protos, batches, allowed_classes=allowed)
    assert _oom_messages(record) == ["CUDA out of memory in push at batch size 8; retrying with 4",
                                     "CUDA out of memory in push at batch size 4; retrying with 2"]
    assert max(sizes) == 8 and sizes.count(8) == 1  # later batches start at the size that fitted
    assert result.found.all() and int(result.sample_index[4]) == 5 and float(result.distance[4]) == 0
    for field in ("vectors", "distance", "sample_index", "position", "found", "distance_map"):
        assert torch.equal(getattr(result, field), getattr(expected, field)), field


def test_nearest_patches_splits_a_batch_that_runs_out_of_memory_with_the_same_result():
    batches, protos, _ = _push_data()
    expected = prototypes.nearest_patches(_latent, protos, batches, k=4)

    def latent_fn(images):
        if len(images) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return _latent(images)

    with pytest.warns(UserWarning, match="CUDA out of memory in nearest patches at batch size 8; retrying with 4"):
        result = prototypes.nearest_patches(latent_fn, protos, batches, k=4)
    for field in ("distance", "sample_index", "position", "label"):
        assert torch.equal(getattr(result, field), getattr(expected, field)), field


# ------------------------------------------------------------------------------------------ post-hoc
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("cam_test_resnet", num_classes=4).eval()


# method, options, the batch size the model may take, the first warning
POSTHOC = [
    ("occlusion", dict(window=8, stride=8, batch_size=16), 10, "occlusion at batch size 32; retrying with 16"),
    ("rise", dict(n_masks=48, batch_size=32), 20, "RISE (masks per pass) at batch size 16; retrying with 8"),
    ("scorecam", dict(layer="backbone.body.layer3", batch_size=64), 6, "Score-CAM at batch size 64; retrying with 32"),
    ("lime", dict(n_samples=24, batch_size=12), 5, "LIME at batch size 12; retrying with 6"),
    ("kernel_shap", dict(n_samples=24, batch_size=12), 5, "Kernel SHAP at batch size 12; retrying with 6"),
    ("integrated_gradients", dict(n_steps=8), 7, "integrated gradients at batch size 16; retrying with 8"),
]


@pytest.mark.parametrize("method, options, limit, message", POSTHOC, ids=[p[0] for p in POSTHOC])
def test_posthoc_methods_retry_smaller_batches_with_the_same_maps(model, monkeypatch, method, options, limit, message):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 3])
    expected = attribute(model, images, target, method, **options)
    sizes, forward = [], model.forward

    def fragile(x):
        sizes.append(len(x))
        if len(x) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(x)

    monkeypatch.setattr(model, "forward", fragile)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        heatmap = attribute(model, images, target, method, **options)
    messages = _oom_messages(record)
    assert messages and messages[0] == "CUDA out of memory in " + message
    assert len(messages) == len(set(messages))  # each halving said once, not once per batch
    assert max(sizes) > limit  # the error really happened
    # Same maps up to float rounding: CPU convolutions round differently on batches of other sizes
    # (~1e-7 on logits of ~0.1 here), and partial sums are added in another order.
    assert torch.allclose(heatmap, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(heatmap, torch.zeros_like(heatmap))
