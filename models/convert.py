"""Import checkpoints saved by the official ProtoPNet, ProtoTree and PIP-Net code (and ProtoPool's state dicts,
`models.convert_protopool`), without that code.

The official ProtoPNet (cfchen-duke/ProtoPNet) saves a whole pickled ``PPNet`` module
(``torch.save(model)``, sometimes wrapped in ``DataParallel``); the official ProtoTree
(M-Nauta/ProtoTree) saves a pickled ``ProtoTree`` module as ``<dir>/model.pth`` and a plain pickle
of it as ``<dir>/tree.pkl``. Unpickling either would normally import and run their classes. Here a
restricted unpickler rebuilds only tensors and plain state: every official class and every torch.nn
layer named in the file becomes an inert `OfficialObject` that merely records its ``__dict__``, and
any other global (``os.system``, ``builtins.eval``, ...) is refused with a `CheckpointError`.
The inert tree is then mapped onto the zoo's `ProtoPNet` / `ProtoTree` and written with
`save_zoo_checkpoint`, so the result loads with ``models.load_pretrained(path)``. The official PIP-Net
(M-Nauta/PIPNet) saves a dict of state dicts (``net_trained``: ``{"model_state_dict": ...}``, keys with
DataParallel's ``module.`` prefix), read by the same restricted unpickler and mapped onto `PIPNet`.

    python -m models.convert official.pth --arch protopnet [--backbone resnet34] --out zoo.pt

Official models take ImageNet-normalised images; the zoo's take [0, 1] images and normalise inside
(ImageNet mean and std), so ``zoo(x) == official(normalize(x))``.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import functools
import io
import math
import pickle
import sys
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .pretrained import CheckpointError, save_zoo_checkpoint, sha256_of
from .pipnet import PIPNet
from .protopnet import ProtoPNet
from .prototree import ProtoTree

__all__ = [
    "OFFICIAL_CLASSES",
    "OfficialObject",
    "convert_checkpoint",
    "convert_pipnet",
    "convert_protopnet",
    "convert_prototree",
    "load_official",
    "main",
    "official_state_dict",
]

_FEATURES = {
    "resnet_features": ("ResNet_features", "BasicBlock", "Bottleneck"),
    "vgg_features": ("VGG_features",),
    "densenet_features": ("DenseNet_features", "_DenseLayer", "_DenseBlock", "_Transition"),
}
# ProtoPNet's files sit at the top level of its repository; ProtoTree keeps copies under features/.
OFFICIAL_CLASSES: frozenset[str] = frozenset(
    ["model.PPNet", "prototree.prototree.ProtoTree", "prototree.branch.Branch", "prototree.leaf.Leaf",
     "prototree.node.Node", "util.l2conv.L2Conv2D"]
    + [f"{pkg}{mod}.{cls}" for mod, classes in _FEATURES.items() for cls in classes for pkg in ("", "features.")]
)
_PROTOPNET, _PROTOTREE = "model.PPNet", "prototree.prototree.ProtoTree"


# ------------------------------------------------------------------------------ restricted loading
class OfficialObject:
    """Inert stand-in for a class named in an official file: it only records the pickled state.

    ``official_class`` is the dotted name from the file. No code of the original class runs; its
    sub-modules, parameters and buffers are reachable as attributes, as on an ``nn.Module``.
    """

    official_class = "?"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __getattr__(self, name: str) -> Any:
        for table in ("_modules", "_parameters", "_buffers"):
            entries = self.__dict__.get(table)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"official {self.official_class} object has no attribute {name!r}")

    @property
    def kind(self) -> str:
        """The class name without its module (``"Conv2d"``, ``"PPNet"``)."""
        return self.official_class.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"<inert {self.official_class}>"


_STAND_INS: dict[str, type] = {}


def _stand_in(qualname: str) -> type:
    if qualname not in _STAND_INS:
        name = qualname.rsplit(".", 1)[-1]
        _STAND_INS[qualname] = type(name, (OfficialObject,), {"official_class": qualname, "__module__": __name__})
    return _STAND_INS[qualname]


@functools.lru_cache(maxsize=1)
def _torch_safe_globals() -> dict[str, Any]:
    """Exactly what ``torch.load(weights_only=True)`` accepts: rebuild functions, dtypes, storages."""
    from torch import _weights_only_unpickler  # private, but it is torch's own definition of "safe"

    return dict(_weights_only_unpickler._get_allowed_globals())


def _resolve(module: str, name: str, source: str, load_bytes: Callable[[bytes], Any]) -> Any:
    # Protocol-2 pickles (torch.save's default) use Python 2 names such as __builtin__.set.
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    qualname = f"{module}.{name}"
    safe = _torch_safe_globals()
    if qualname in safe:
        return safe[qualname]
    if qualname == "torch.storage._load_from_bytes":  # storages inside a plain pickle (tree.pkl)
        return load_bytes
    if qualname in OFFICIAL_CLASSES:
        return _stand_in(qualname)
    if module.startswith("torch.nn."):
        # Only classes of torch.nn modules that torch has already imported: nothing new is imported.
        obj = getattr(sys.modules.get(module), name, None)
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            return _stand_in(qualname)
    raise CheckpointError(
        f"refusing {source}: it names the global {qualname!r}, which is neither a tensor, a torch.nn layer "
        "nor a class of the official ProtoPNet/ProtoTree code"
    )


def _pickle_module(source: str) -> types.ModuleType:
    """A ``pickle``-like module whose Unpickler resolves globals with `_resolve` (for ``torch.load``)."""
    module = types.ModuleType("restricted_pickle")

    class Unpickler(pickle.Unpickler):
        def find_class(self, mod: str, name: str) -> Any:
            return _resolve(mod, name, source, load_bytes)

    def load(file: Any, **kwargs: Any) -> Any:
        return Unpickler(file, **kwargs).load()

    def load_bytes(data: bytes) -> Any:
        return _torch_load(io.BytesIO(data), module)

    module.Unpickler, module.load, module.UnpicklingError = Unpickler, load, pickle.UnpicklingError
    return module


def _torch_load(file: Any, module: types.ModuleType) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy files warn that the stand-ins have no source code
        return torch.load(file, map_location="cpu", weights_only=False, pickle_module=module)


def _resolve_path(path: Path) -> Path:
    if path.is_dir():  # an official ProtoTree checkpoint directory
        for name in ("model.pth", "tree.pkl"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a directory without model.pth or tree.pkl (an official ProtoTree checkpoint directory)")
    if not path.is_file():
        raise CheckpointError(f"official checkpoint not found: {path}")
    return path


def load_official(path: str | Path) -> Any:
    """Unpickle an official checkpoint into inert objects and tensors; never runs code from the file.

    Accepts torch zip files, legacy (pre-1.6) torch files and plain pickles (ProtoTree's tree.pkl);
    a ProtoTree checkpoint directory resolves to its model.pth (or tree.pkl).
    """
    path = _resolve_path(Path(path))
    module = _pickle_module(str(path))
    try:
        if zipfile.is_zipfile(path):
            return _torch_load(path, module)
        with open(path, "rb") as fh:
            if fh.read(2) == b"PK":
                raise CheckpointError(f"cannot read official checkpoint {path}: truncated or corrupt zip archive")
            fh.seek(0)
            first = module.Unpickler(fh).load()
        # A legacy torch file starts with its magic number; anything else is a plain pickle.
        if isinstance(first, int) and first == torch.serialization.MAGIC_NUMBER:
            return _torch_load(path, module)
        return first
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read official checkpoint {path}: {type(exc).__name__}: {reason[:200]}") from None


# ------------------------------------------------------------------------------ inert module trees
def _table(obj: Any, name: str) -> dict:
    return (obj.__dict__.get(name) or {}) if isinstance(obj, OfficialObject) else {}


def official_state_dict(obj: OfficialObject, prefix: str = "") -> dict[str, Tensor]:
    """The flat ``state_dict`` an official module would have (parameters and persistent buffers)."""
    state = {prefix + k: v.detach() for k, v in _table(obj, "_parameters").items() if v is not None}
    skip = obj.__dict__.get("_non_persistent_buffers_set") or set()
    state.update({prefix + k: v for k, v in _table(obj, "_buffers").items() if v is not None and k not in skip})
    for name, child in _table(obj, "_modules").items():
        if child is not None:
            state.update(official_state_dict(child, f"{prefix}{name}."))
    return state


def _layers(obj: OfficialObject) -> list[OfficialObject]:
    """Leaf modules in registration order."""
    children = [c for c in _table(obj, "_modules").values() if c is not None]
    return [obj] if not children else [m for c in children for m in _layers(c)]


def _unwrap(obj: Any, source: Path) -> OfficialObject:
    while isinstance(obj, OfficialObject) and obj.kind in ("DataParallel", "DistributedDataParallel"):
        obj = obj.module
    if not isinstance(obj, OfficialObject):
        what = "a state dict" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{source} holds {what}, not a pickled official model: convert the file written by torch.save(model) "
            "(ProtoPNet's <epoch>push<acc>.pth, ProtoTree's model.pth or tree.pkl)"
        )
    return obj


def _expect(obj: OfficialObject, expected: str, arch: str, source: Path) -> None:
    if obj.official_class != expected:
        family = {_PROTOPNET: "protopnet", _PROTOTREE: "prototree"}.get(obj.official_class)
        hint = f": use --arch {family}" if family else ""
        raise CheckpointError(f"{source} holds an official {obj.official_class}, not a {arch} checkpoint ({expected}){hint}")


def _tensor(obj: OfficialObject, name: str, source: Path) -> Tensor:
    value = getattr(obj, name, None)
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{source}: official {obj.kind} has no tensor {name!r}")
    return value.detach().float()


# ------------------------------------------------------------------------------ trunks
_RESNETS = {("BasicBlock", (2, 2, 2, 2)): "resnet18", ("BasicBlock", (3, 4, 6, 3)): "resnet34",
            ("Bottleneck", (3, 4, 6, 3)): "resnet50", ("Bottleneck", (3, 4, 23, 3)): "resnet101",
            ("Bottleneck", (3, 8, 36, 3)): "resnet152"}
_VGGS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}
_DENSENETS = {(6, 12, 24, 16): "densenet121", (6, 12, 32, 32): "densenet169", (6, 12, 48, 32): "densenet201",
              (6, 12, 36, 24): "densenet161"}


def _infer_backbone(features: OfficialObject, source: Path) -> str:
    """The timm name of an official trunk, from its class and block structure."""
    name = None
    if features.kind == "ResNet_features":
        block = features.__dict__.get("block")
        kind = getattr(block, "official_class", "?").rsplit(".", 1)[-1]
        name = _RESNETS.get((kind, tuple(features.__dict__.get("layers") or ())))
    elif features.kind == "VGG_features":
        convs = sum(m.kind == "Conv2d" for m in _layers(features))
        name = _VGGS.get(convs)
        name = name and name + ("_bn" if features.__dict__.get("batch_norm") else "")
    elif features.kind == "DenseNet_features":
        blocks = [b for n, b in _table(features.features, "_modules").items() if n.startswith("denseblock")]
        name = _DENSENETS.get(tuple(len(_table(b, "_modules")) for b in blocks))
    if name is None:
        raise CheckpointError(f"{source}: cannot tell the zoo backbone of official trunk {features.official_class}; pass --backbone")
    return name


def _trunk_candidates(key: str) -> list[str]:
    """Where an official trunk key can live in a zoo backbone: timm or torchvision module names."""
    head, _, rest = key.partition(".")
    tv_resnet = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    candidates = [key]  # timm ResNet: conv1, bn1, layerN.i.* as in torchvision
    if head == "features":  # VGG / DenseNet: official features.<name>.*
        sub, _, tail = rest.partition(".")
        candidates += [f"features_{sub}.{tail}", rest, f"0.{rest}"]  # timm; torchvision VGG; torchvision DenseNet
    if head in tv_resnet:
        candidates.append(f"{tv_resnet[head]}.{rest}")  # torchvision ResNet cut into a Sequential
    return candidates


def _map_trunk(official: dict[str, Tensor], zoo: dict[str, Tensor], prefix: str, backbone: str, source: Path) -> dict[str, Tensor]:
    """Official trunk tensors under the zoo's backbone names; every zoo trunk tensor must be covered."""
    mapped, unplaced, shapes = {}, [], []
    for key, value in official.items():
        target = next((prefix + c for c in _trunk_candidates(key) if prefix + c in zoo), None)
        if target is None:
            unplaced.append(key)
        elif zoo[target].shape != value.shape:
            shapes.append(f"{key} {tuple(value.shape)} vs {target} {tuple(zoo[target].shape)}")
        else:
            mapped[target] = value
    # Pre-0.4.1 BatchNorm has no num_batches_tracked; the zoo's counter (0) is kept then.
    missing = [k for k in zoo if k.startswith(prefix) and k not in mapped and not k.endswith("num_batches_tracked")]
    if unplaced or shapes or missing:
        parts = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("official keys without a place", unplaced), ("shape mismatches", shapes),
                                      ("zoo keys not covered", missing)) if items]
        raise CheckpointError(f"{source}: the official trunk does not fit zoo backbone {backbone!r}: " + "; ".join(parts))
    return mapped


def _check_classes(num_classes: int | None, found: int, source: Path) -> None:
    if num_classes is not None and num_classes != found:
        raise CheckpointError(f"{source} has {found} classes, but --num_classes {num_classes} was given")


def _build(cls: type, source: Path, **kwargs: Any) -> Any:
    try:
        return cls(**kwargs)
    except ValueError as exc:  # e.g. an unknown --backbone, or arguments the zoo model rejects
        raise CheckpointError(f"{source}: cannot build the zoo {cls.__name__}: {exc}") from None


def _finish(model: nn.Module, state: dict[str, Tensor], source: Path) -> nn.Module:
    own = model.state_dict()
    wrong = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if wrong:
        raise CheckpointError(f"{source}: converted tensors do not fit the zoo {type(model).__name__}: {wrong[:3]}")
    model.load_state_dict({**own, **state})
    return model.eval()


# ------------------------------------------------------------------------------ ProtoPNet
def convert_protopnet(official: Any, backbone: str | None = None, num_classes: int | None = None,
                      source: str | Path = "<official>") -> tuple[ProtoPNet, dict[str, Any]]:
    """A zoo `ProtoPNet` with the weights of an (inert) official ``PPNet``, and facts for the file's meta.

    Prototypes keep their order within each class. A pruned official model (fewer prototypes in
    some classes) fills class slots of P/K = the largest class count; the empty slots are masked
    (``prototype_mask`` False) and have zero last-layer weights, so the logits are unchanged.
    """
    source = Path(source)
    net = _unwrap(official, source)
    _expect(net, _PROTOPNET, "protopnet", source)
    protos = _tensor(net, "prototype_vectors", source)
    if protos.ndim != 4 or protos.shape[2:] != (1, 1):
        raise CheckpointError(f"{source}: prototypes of shape {tuple(protos.shape)}; the zoo supports 1x1 prototypes only")
    ones = getattr(net, "ones", None)
    if isinstance(ones, Tensor) and not bool((ones == 1).all()):
        raise CheckpointError(f"{source}: the official 'ones' tensor is not all ones; the zoo's distance assumes it is")
    identity = net.__dict__.get("prototype_class_identity")
    last = _tensor(net.last_layer, "weight", source)
    if not isinstance(identity, Tensor) or identity.shape != (protos.shape[0], last.shape[0]):
        raise CheckpointError(f"{source}: prototype_class_identity missing or not (P, K) = ({protos.shape[0]}, {last.shape[0]})")
    if not bool(((identity == 0) | (identity == 1)).all() and (identity.sum(dim=1) == 1).all()):
        raise CheckpointError(f"{source}: prototype_class_identity is not one class per prototype")
    epsilon = float(net.__dict__.get("epsilon", 1e-4))
    if not math.isclose(epsilon, 1e-4):  # the zoo's log similarity has epsilon 1e-4 built in
        raise CheckpointError(f"{source}: epsilon {epsilon} differs from the zoo's 1e-4")
    activation = net.__dict__.get("prototype_activation_function", "log")
    if activation not in ("log", "linear"):
        raise CheckpointError(f"{source}: prototype_activation_function {activation!r} is not 'log' or 'linear'")

    k = identity.shape[1]
    _check_classes(num_classes, k, source)
    classes = identity.argmax(dim=1)
    per_class = int(torch.bincount(classes, minlength=k).max())
    rank = torch.zeros_like(classes)  # position of each prototype among those of its class
    for c in range(k):
        members = (classes == c).nonzero().squeeze(1)
        rank[members] = torch.arange(len(members))
    slots = classes * per_class + rank

    features = net.features
    backbone = backbone or _infer_backbone(features, source)
    convs = [m for m in _layers(net.add_on_layers) if m.kind == "Conv2d"]
    model = _build(ProtoPNet, source, num_classes=k, backbone=backbone, prototypes_per_class=per_class,
                   prototype_dim=protos.shape[1], add_on="regular" if len(convs) == 2 else "bottleneck",
                   similarity=activation)
    own = model.state_dict()
    kinds = [m.kind for m in _layers(net.add_on_layers)]
    zoo_kinds = [type(m).__name__ for m in model.add_on]
    if kinds != zoo_kinds:
        raise CheckpointError(f"{source}: official add-on layers {kinds} differ from the zoo's {zoo_kinds}")

    state = _map_trunk(official_state_dict(features), own, "backbone.body.", backbone, source)
    state.update({f"add_on.{k_}": v for k_, v in official_state_dict(net.add_on_layers).items()})
    p = model.num_prototypes
    state["prototype_vectors"] = torch.zeros(p, protos.shape[1], 1, 1).index_copy(0, slots, protos)
    state["last_layer.weight"] = torch.zeros(k, p).index_copy(1, slots, last)
    state["prototype_mask"] = torch.zeros(p, dtype=torch.bool).index_fill(0, slots, True)
    meta = {"official_slots": slots.tolist(), "img_size": net.__dict__.get("img_size"),
            "proto_layer_rf_info": net.__dict__.get("proto_layer_rf_info")}
    return _finish(model, state, source), meta


# ------------------------------------------------------------------------------ ProtoTree
def _leaf_depths(node: OfficialObject, depth: int = 0) -> list[int]:
    if node.kind == "Leaf":
        return [depth]
    return _leaf_depths(node.l, depth + 1) + _leaf_depths(node.r, depth + 1)


def convert_prototree(official: Any, backbone: str | None = None, num_classes: int | None = None,
                      source: str | Path = "<official>") -> tuple[ProtoTree, dict[str, Any]]:
    """A zoo `ProtoTree` with the weights and tree of an (inert) official ``ProtoTree``, and meta facts.

    The official tree is walked from its root: a Branch at zoo node n (breadth-first, children
    2n + 1 = left/absent and 2n + 2 = right/present) puts its prototype, found through the
    official ``_out_map``, into zoo slot n. A pruned official tree has leaves above the bottom
    level; such a leaf is carried down by nodes forced to the left (``forced_route`` 0), so every
    path probability, and the prediction, is unchanged. Forced slots get zero prototypes.
    """
    source = Path(source)
    tree = _unwrap(official, source)
    _expect(tree, _PROTOTREE, "prototree", source)
    if tree.__dict__.get("_kontschieder_normalization"):
        raise CheckpointError(f"{source}: leaves with kontschieder_normalization (c / sum c) are not supported by the zoo's ProtoTree")
    root, out_map = tree._root, tree.__dict__.get("_out_map") or {}
    protos = _tensor(tree.prototype_layer, "prototype_vectors", source)
    if protos.ndim != 4 or protos.shape[2:] != (1, 1):
        raise CheckpointError(f"{source}: prototypes of shape {tuple(protos.shape)}; the zoo supports 1x1 prototypes only")
    add_on = _layers(tree._add_on)
    if [m.kind for m in add_on] != ["Conv2d", "Sigmoid"] or getattr(add_on[0], "bias", None) is not None:
        raise CheckpointError(f"{source}: official add-on {[m.kind for m in add_on]} is not Conv2d(bias=False) + Sigmoid")

    # Depth of the zoo tree: the trained depth (P = 2^h - 1), or the deepest leaf if that is deeper.
    deepest = max(_leaf_depths(root))
    trained = math.log2(protos.shape[0] + 1)
    depth = int(trained) if trained.is_integer() and trained >= deepest else deepest
    num_internal = 2**depth - 1
    first_leaf = next(n for n in _iter_nodes(root) if n.kind == "Leaf")
    k = first_leaf._dist_params.shape[0]
    _check_classes(num_classes, k, source)

    vectors = torch.zeros(num_internal, protos.shape[1])
    forced = torch.full((num_internal,), -1, dtype=torch.long)
    leaves = torch.zeros(2**depth, k)
    official_node = [-1] * (2 * num_internal + 1)  # zoo node id -> official node index
    official_prototype = [-1] * num_internal
    stack = [(root, 0)]
    while stack:
        node, n = stack.pop()
        if node.kind == "Branch" and n < num_internal:
            if node not in out_map:
                raise CheckpointError(f"{source}: branch {node.__dict__.get('_index')} has no prototype in _out_map")
            official_prototype[n] = int(out_map[node])
            vectors[n] = protos[official_prototype[n]].flatten()
            official_node[n] = int(node.__dict__.get("_index", -1))
            stack += [(node.l, 2 * n + 1), (node.r, 2 * n + 2)]
        elif node.kind == "Leaf" and n >= num_internal:
            leaves[n - num_internal] = node._dist_params.detach().float()
            official_node[n] = int(node.__dict__.get("_index", -1))
        elif node.kind == "Leaf":  # a leaf of a pruned tree above the bottom: route it down to the left
            forced[n] = 0
            stack.append((node, 2 * n + 1))
        else:
            raise CheckpointError(f"{source}: unexpected official node {node.official_class} at depth {int(math.log2(n + 1))}")

    features = tree._net
    backbone = backbone or _infer_backbone(features, source)
    model = _build(ProtoTree, source, num_classes=k, depth=depth, num_features=protos.shape[1], backbone=backbone,
                   log_probabilities=bool(tree.__dict__.get("_log_probabilities", False)),
                   derivative_free=not first_leaf._dist_params.requires_grad)
    state = _map_trunk(official_state_dict(features), model.state_dict(), "backbone.body.", backbone, source)
    state.update({"add_on.weight": add_on[0].weight.detach().float(), "prototype_vectors": vectors, "leaves": leaves,
                  "forced_route": forced, "node_prototype": torch.arange(num_internal)})
    meta = {"official_node_index": official_node, "official_prototype_index": official_prototype}
    return _finish(model, state, source), meta


def _iter_nodes(node: OfficialObject):
    yield node
    if node.kind == "Branch":
        yield from _iter_nodes(node.l)
        yield from _iter_nodes(node.r)


# ------------------------------------------------------------------------------ PIP-Net
_PIPNET_RESNETS = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50.tv_in1k",
                   (23, True): "resnet101", (36, True): "resnet152"}


def convert_pipnet(official: Any, backbone: str | None = None, num_classes: int | None = None,
                   source: str | Path = "<official>") -> tuple[PIPNet, dict[str, Any]]:
    """A zoo `PIPNet` with the weights of an official PIP-Net checkpoint (``{"model_state_dict": ...}`` or a bare
    state dict, with or without ``module.``), and facts for the file's meta.

    The trunk is ConvNeXt-tiny when the keys hold ``_net.features``: ``convnext_tiny_26`` unless `backbone`
    says ``convnext_tiny_13`` (the strides are not in the weights); a ResNet is named by its layer3 depth and
    block kind. ``_multiplier`` is the classifier's normalisation multiplier registered a second time.
    """
    source = Path(source)
    state = official.get("model_state_dict", official) if isinstance(official, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{source} is not an official PIP-Net checkpoint (a dict with 'model_state_dict')")
    state = {k.removeprefix("module."): v.detach().float() for k, v in state.items()}
    if "_classification.weight" not in state:
        raise CheckpointError(f"{source}: no '_classification.weight': not an official PIP-Net state dict")
    weight = state["_classification.weight"]
    _check_classes(num_classes, weight.shape[0], source)
    trunk = {k.removeprefix("_net."): v for k, v in state.items() if k.startswith("_net.")}
    if backbone is None:
        if any(k.startswith("features.") for k in trunk):
            backbone = "convnext_tiny_26"
        else:
            blocks = len({k.split(".")[1] for k in trunk if k.startswith("layer3.")})
            backbone = _PIPNET_RESNETS.get((blocks, "layer1.0.conv3.weight" in trunk))
            if backbone is None:
                raise CheckpointError(f"{source}: cannot tell the official PIP-Net trunk; pass --backbone")
    add_on = {k.removeprefix("_add_on."): v for k, v in state.items() if k.startswith("_add_on.")}
    num_features = weight.shape[1] if add_on else 0
    model = _build(PIPNet, source, num_classes=weight.shape[0], backbone=backbone, num_features=num_features,
                   bias="_classification.bias" in state)
    if backbone.startswith("convnext"):
        trunk = {k.removeprefix("features."): v for k, v in trunk.items()}
    own = model.state_dict()
    mapped = _map_trunk(trunk, own, "backbone.body.", backbone, source)
    mapped.update({f"add_on.{k}": v for k, v in add_on.items()})
    mapped["classifier.weight"] = weight
    mapped["classifier.normalization_multiplier"] = state["_classification.normalization_multiplier"]
    if "_classification.bias" in state:
        mapped["classifier.bias"] = state["_classification.bias"]
    multiplier = state.get("_multiplier")
    if multiplier is not None and not torch.equal(multiplier, mapped["classifier.normalization_multiplier"]):
        raise CheckpointError(f"{source}: _multiplier and _classification.normalization_multiplier differ")
    return _finish(model, mapped, source), {"official_backbone": backbone}


# ------------------------------------------------------------------------------ file to file
def _convert_protopool(*args: Any, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    # ProtoPool's official files are state dicts; its mapping lives in models/convert_protopool.py (which imports this file).
    from .convert_protopool import convert_protopool

    return convert_protopool(*args, **kwargs)


_CONVERTERS = {"protopnet": convert_protopnet, "prototree": convert_prototree, "pipnet": convert_pipnet, "protopool": _convert_protopool}


def convert_checkpoint(path: str | Path, arch: str, out: str | Path, backbone: str | None = None,
                       num_classes: int | None = None) -> nn.Module:
    """Convert an official checkpoint file (or ProtoTree directory) into a zoo file at `out`; returns the model."""
    if arch not in _CONVERTERS:
        raise CheckpointError(f"unknown --arch {arch!r}; expected one of {sorted(_CONVERTERS)}")
    path = _resolve_path(Path(path))
    model, facts = _CONVERTERS[arch](load_official(path), backbone=backbone, num_classes=num_classes, source=path)
    meta = {"converted_from": path.name, "source_sha256": sha256_of(path), "official_arch": arch,
            "note": "official models take ImageNet-normalised images; this one takes [0, 1] images", **facts}
    save_zoo_checkpoint(model, out, meta=meta)
    return model


def main(argv: list[str] | None = None) -> int:
    """The command line ``python -m models.convert``: convert an official checkpoint into a zoo file; returns the
    exit status."""
    parser = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="official .pth file (ProtoTree: model.pth, tree.pkl or their directory)")
    parser.add_argument("--arch", required=True, choices=sorted(_CONVERTERS))
    parser.add_argument("--backbone", default=None, help="zoo backbone name (default: inferred from the official trunk)")
    parser.add_argument("--out", required=True, help="zoo checkpoint to write")
    parser.add_argument("--num_classes", type=int, default=None, help="expected number of classes (checked)")
    args = parser.parse_args(argv)
    try:
        model = convert_checkpoint(args.checkpoint, args.arch, args.out, args.backbone, args.num_classes)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    hp = model.hparams
    print(f"wrote {args.out}: {type(model).__name__}({hp.backbone}, {hp.num_classes} classes); "
          f"load it with models.load_pretrained({str(args.out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
