"""Running batched work in chunks that shrink when the device runs out of memory."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["run_in_chunks", "OUT_OF_MEMORY"]

OUT_OF_MEMORY: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot concatenate chunk outputs of type {type(first).__name__}")


def run_in_chunks(fn: Callable[..., Any], *inputs: Tensor, chunk_size: int | None = None, what: str = "batch") -> Any:
    """``fn(*inputs)`` computed over slices of the first dimension, concatenated.

    Starts with `chunk_size` (None = the whole batch). On a CUDA out-of-memory error the chunk is
    halved, a warning says so, and the failed slice is computed again; a single sample that still
    does not fit re-raises the error. Outputs may be tensors or tuples/lists/dicts of tensors.
    """
    n = inputs[0].shape[0]
    size = n if chunk_size is None else max(1, min(chunk_size, n))
    parts, start = [], 0
    while start < n:
        stop = min(start + size, n)
        try:
            parts.append(fn(*(x[start:stop] for x in inputs)))
        except OUT_OF_MEMORY:
            if size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = max(1, size // 2)
            warnings.warn(f"out of memory on a {what} chunk of {stop - start}; retrying with chunks of {size}", stacklevel=2)
            continue
        start = stop
    return _concat(parts)
