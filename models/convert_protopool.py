"""Import of official ProtoPool checkpoints (gmum/ProtoPool), without that code.

The official ``main.py`` saves ``{"model_state_dict": model.state_dict(), "epoch": e}`` (``best_model.pth``,
``best_model_push.pth``); the file is read by the restricted unpickler of `models.convert` (tensors and plain
containers only) and its ``PrototypeChooser`` state is mapped onto the zoo's `ProtoPool`:

==================================  ===================================
official key                        zoo key
==================================  ===================================
``features.*`` (ResNet_features)    ``backbone.body.*`` (timm ResNet)
``add_on_layers.0.*``               ``add_on.0.*``
``prototype_vectors`` (P, D, 1, 1)  ``prototype_vectors``
``proto_presence`` (C, P, S)        ``slot_logits``
``last_layer.weight`` (C, C S)      ``last_layer.weight``
``ones``, ``alfa``                  (all ones, checked; unused by the official forward)
==================================  ===================================

The converted model evaluates with the one-hot slot map argmax Π (`ProtoPool.slot_map`), which is what the
official evaluation after training (Gumbel-softmax at scale 1e4) gives up to noise on near-ties.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .convert import _build, _check_classes, _finish, _map_trunk
from .pretrained import CheckpointError
from .protopool import ProtoPool

__all__ = ["convert_protopool"]

_RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
            ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
            ("bottleneck", (3, 8, 36, 3)): "resnet152"}


def _state(official: Any, source: Path) -> dict[str, Tensor]:
    state = official.get("model_state_dict", official) if isinstance(official, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{source} is not an official ProtoPool checkpoint (a dict with 'model_state_dict', "
                              "as main.py's save_model writes)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel, should a file carry it
    missing = [k for k in ("proto_presence", "prototype_vectors", "add_on_layers.0.weight") if k not in state]
    if missing:
        raise CheckpointError(f"{source}: official ProtoPool keys {missing} missing (is it a ProtoPool checkpoint?)")
    return state


def _infer_resnet(trunk: dict[str, Tensor], source: Path) -> str:
    blocks = tuple(len({m.group(1) for k in trunk if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5))
    kind = "bottleneck" if any(".conv3." in k for k in trunk) else "basic"
    name = _RESNETS.get((kind, blocks))
    if name is None:
        raise CheckpointError(f"{source}: cannot tell the zoo backbone of the official trunk ({kind} blocks {blocks}); "
                              "pass --backbone")
    return name


def convert_protopool(official: Any, backbone: str | None = None, num_classes: int | None = None,
                      source: str | Path = "<official>") -> tuple[ProtoPool, dict[str, Any]]:
    """A zoo `ProtoPool` with the weights of an official ``PrototypeChooser`` state, and facts for the file's meta."""
    source = Path(source)
    state = _state(official, source)
    protos, presence = state["prototype_vectors"].float(), state["proto_presence"].float()
    if protos.ndim != 4 or protos.shape[2:] != (1, 1):
        raise CheckpointError(f"{source}: prototypes of shape {tuple(protos.shape)}; the zoo supports 1x1 prototypes only")
    if presence.ndim != 3 or presence.shape[1] != protos.shape[0]:
        raise CheckpointError(f"{source}: proto_presence of shape {tuple(presence.shape)} does not fit "
                              f"{protos.shape[0]} prototypes (expected (C, P, S))")
    ones = state.get("ones")
    if ones is not None and not bool((ones == 1).all()):
        raise CheckpointError(f"{source}: the official 'ones' tensor is not all ones; the zoo's distance assumes it is")
    c, p, s = presence.shape
    _check_classes(num_classes, c, source)
    last = state.get("last_layer.weight")
    if last is not None and tuple(last.shape) != (c, c * s):
        raise CheckpointError(f"{source}: last_layer.weight of shape {tuple(last.shape)}, expected ({c}, {c * s})")
    trunk = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    backbone = backbone or _infer_resnet(trunk, source)
    model = _build(ProtoPool, source, num_classes=c, backbone=backbone, num_prototypes=p, slots_per_class=s,
                   prototype_dim=protos.shape[1], use_last_layer=last is not None)
    mapped = _map_trunk(trunk, model.state_dict(), "backbone.body.", backbone, source)
    mapped.update({"add_on.0.weight": state["add_on_layers.0.weight"], "add_on.0.bias": state["add_on_layers.0.bias"],
                   "prototype_vectors": protos, "slot_logits": presence, "slots_hardened": torch.tensor(True)})
    if last is not None:
        mapped["last_layer.weight"] = last.float()
    epoch = official.get("epoch") if isinstance(official, dict) else None
    meta = {"official_epoch": int(epoch) if isinstance(epoch, (int, Tensor)) else None}
    return _finish(model, mapped, source), meta
