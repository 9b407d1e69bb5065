"""Forward hooks that are removed however the block they guard ends."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

from torch import nn

__all__ = ["forward_hooks"]


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register ``module.register_forward_hook(fn)`` for each (module, fn) pair for the ``with`` block."""
    handles = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()
