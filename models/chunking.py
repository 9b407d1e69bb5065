"""Batched work that shrinks its batches when the device runs out of memory, and says so.

Two shapes of work:

* `AdaptiveChunks` splits the inputs of a function along their first dimension (a push batch, the
  perturbed copies a post-hoc method evaluates). On a CUDA out-of-memory error the chunk is halved,
  a warning says so once, the failed slice is computed again, and the smaller size is kept for every
  later call of the same object. `run_in_chunks` is a one-off use.
* `retry_with_smaller_batch` calls ``fn(batch_size)`` again with half the size when a whole call
  fails (a library call that batches internally, e.g. captum's ``internal_batch_size``, where the
  backward pass can run out of memory too).

A function that updates state must do all its allocating work before its first write, so that a
failed call leaves the state as it was and the retry is exact.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["AdaptiveChunks", "OUT_OF_MEMORY", "retry_with_smaller_batch", "run_in_chunks"]

OUT_OF_MEMORY: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if first is None:  # a function that only updates state
        return None
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate chunk outputs of type {type(first).__name__}")


def _out_of_memory(what: str, size: int, smaller: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the failed attempt's blocks back before the retry
    # stacklevel=1: attributed to this module, so callers that silence a library's warnings
    # (explain.posthoc silences captum's) still show it.
    warnings.warn(f"CUDA out of memory in {what} at batch size {size}; retrying with {smaller}", stacklevel=1)


class AdaptiveChunks:
    """Calls ``fn(*inputs)`` over slices of the first dimension and concatenates the outputs.

    Args:
        chunk_size: the first slice size (None = the whole batch).
        what: names the work in the warning ("push", "occlusion", ...).

    The size that fits is kept (`size`), so a long loop warns once, not once per batch. Outputs may
    be tensors, tuples/lists/dicts of tensors, or None. A single sample that does not fit re-raises.
    """

    def __init__(self, chunk_size: int | None = None, what: str = "batch") -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.size, self.what = chunk_size, what

    def __call__(self, fn: Callable[..., Any], *inputs: Tensor) -> Any:
        n = inputs[0].shape[0]
        if n == 0:
            return fn(*inputs)
        parts, start = [], 0
        while start < n:
            stop = min(start + (self.size or n), n)
            try:
                parts.append(fn(*(x[start:stop] for x in inputs)))
            except OUT_OF_MEMORY:
                if stop - start == 1:
                    raise
                self.size = (stop - start) // 2
                _out_of_memory(self.what, stop - start, self.size)
                continue
            start = stop
        return _concat(parts)


def run_in_chunks(fn: Callable[..., Any], *inputs: Tensor, chunk_size: int | None = None, what: str = "batch") -> Any:
    """``fn(*inputs)`` over slices of the first dimension, halving them on out-of-memory (see `AdaptiveChunks`)."""
    return AdaptiveChunks(chunk_size, what)(fn, *inputs)


def retry_with_smaller_batch(fn: Callable[[int], Any], batch_size: int, what: str = "batch", minimum: int = 1) -> Any:
    """``fn(batch_size)``; on out-of-memory, warn and call again with half the size, down to `minimum`."""
    if not 1 <= minimum <= batch_size:
        raise ValueError(f"need 1 <= minimum <= batch_size, got minimum={minimum}, batch_size={batch_size}")
    while True:
        try:
            return fn(batch_size)
        except OUT_OF_MEMORY:
            if batch_size == minimum:
                raise
            smaller = max(minimum, batch_size // 2)
            _out_of_memory(what, batch_size, smaller)
            batch_size = smaller
