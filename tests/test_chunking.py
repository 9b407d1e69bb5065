import pytest
import torch

from models.chunking import run_in_chunks


def _fragile(limit: int):
    calls = []

    def fn(x, y):
        calls.append(len(x))
        if len(x) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return x * 2 + y, {"sum": x.sum(dim=1)}

    return fn, calls


def test_out_of_memory_halves_the_chunk_and_gives_the_same_result():
    x, y = torch.arange(40.0).view(20, 2), torch.ones(20, 2)
    fn, calls = _fragile(limit=6)
    with pytest.warns(UserWarning, match="out of memory on a batch chunk of 20; retrying with chunks of 10"):
        out, extra = run_in_chunks(fn, x, y)
    assert torch.equal(out, x * 2 + y) and torch.equal(extra["sum"], x.sum(dim=1))
    assert max(c for c in calls if c <= 6) == 5  # 20 -> 10 -> 5, then the rest in chunks of 5
    assert sum(c for c in calls if c <= 6) == 20


def test_a_single_sample_that_does_not_fit_re_raises():
    fn, _ = _fragile(limit=0)
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(UserWarning):
        run_in_chunks(fn, torch.ones(4, 2), torch.ones(4, 2))


def test_fixed_chunks_without_errors():
    fn, calls = _fragile(limit=100)
    x = torch.rand(10, 2)
    out, _ = run_in_chunks(fn, x, x, chunk_size=3)
    assert calls == [3, 3, 3, 1] and torch.allclose(out, 3 * x)
