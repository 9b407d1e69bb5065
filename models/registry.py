"""Model names -> builders, timm style: each family file registers its builders with `@register_model`."""
from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name; names must be unique."""
    name = fn.__name__
    if name in _MODEL_BUILDERS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODEL_BUILDERS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _MODEL_BUILDERS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODEL_BUILDERS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; keyword arguments override the builder's defaults."""
    if name not in _MODEL_BUILDERS:
        close = fnmatch.filter(_MODEL_BUILDERS, f"*{name.split('_')[0]}*")
        hint = f"; similar: {', '.join(sorted(close)[:8])}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see models.list_models())")
    return _MODEL_BUILDERS[name](**kwargs)
