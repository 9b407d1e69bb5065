"""Model names -> builders, timm style: each family file registers its builders with `@register_model`."""
from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "is_model", "builder_of"]

_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name; names must be unique."""
    name = fn.__name__
    if name in _MODEL_BUILDERS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODEL_BUILDERS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted.

    Examples:
        >>> list_models("cam_*")[:2]
        ['cam_resnet18', 'cam_resnet50']
    """
    return sorted(n for n in _MODEL_BUILDERS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """Whether `name` is a registered builder (``is_model("protopnet_resnet34")`` is True)."""
    return name in _MODEL_BUILDERS


def builder_of(name: str) -> Callable[..., nn.Module]:
    """The registered builder function itself (keyword arguments only, no `pretrained`)."""
    if name not in _MODEL_BUILDERS:
        close = fnmatch.filter(_MODEL_BUILDERS, f"*{name.split('_')[0]}*")
        hint = f"; similar: {', '.join(sorted(close)[:8])}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (see models.list_models())")
    return _MODEL_BUILDERS[name]


def create_model(name: str, pretrained: bool | str = False, **kwargs) -> nn.Module:
    """Build a registered model; keyword arguments override the builder's defaults.

    `pretrained` loads a released checkpoint of this builder, timm style: a tag (``"synthparts"`` loads
    ``<name>.synthparts``) or True for the builder's default tag, the first one declared. The model is
    then the released one in eval mode (`models.load_pretrained`), with `kwargs` replacing its recorded
    constructor arguments; ones that change the architecture fail with a `CheckpointError`.

    Examples:
        >>> import torch
        >>> model = create_model("cam_test_resnet", num_classes=3).eval()
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """
    build = builder_of(name)
    if not pretrained:
        return build(**kwargs)
    from .pretrained import CheckpointError, load_pretrained, pretrained_tags

    tags = pretrained_tags(name)
    tag = (tags[0] if tags else "<default>") if pretrained is True else str(pretrained)
    if tag not in tags:
        raise CheckpointError(f"no released checkpoint {name}.{tag}; released tags of {name}: {', '.join(tags) or 'none'}")
    return load_pretrained(f"{name}.{tag}", overrides=kwargs)
