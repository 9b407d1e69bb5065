"""Pretrained interpretable checkpoints: declared next to each model, loaded safely in one line.

A family file declares what a released checkpoint *is* (`register_pretrained`: ``<builder>.<tag>``
name, model class, dataset, recipe); `checkpoints/manifest.json`, written by `checkpoints/build.py`,
records what training *measured* (file, sha256, accuracy, command, seed) and the builder overrides
that rebuild its architecture: ``create_model(builder, **overrides)``.

A zoo file is one ``torch.save`` of a dict holding only tensors and plain values::

    {"format": "interpretable-zoo/1", "class_path": "models.cam.CAMNet", "init_args": {...},
     "state_dict": {...}, "meta": {...}}

`load_pretrained` is the one function that turns a file into a model. It reads every file with
``torch.load(weights_only=True)`` (a pickle that would call code is refused by the unpickler) and
builds only classes on an allow-list: model classes of this package and registered builders. The
class a file names is looked up in that list, never imported, so a file cannot name other code.

The released files and configs are package data (the ``checkpoints`` and ``configs`` packages),
found through `importlib.resources`: a source checkout, an editable install and a wheel alike.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .registry import builder_of, is_model

__all__ = [
    "CheckpointError",
    "PretrainedEntry",
    "register_pretrained",
    "pretrained_entry",
    "pretrained_tags",
    "list_pretrained",
    "load_pretrained",
    "read_checkpoint",
    "zoo_classes",
    "save_zoo_checkpoint",
    "sha256_of",
    "config_file",
    "CHECKPOINT_DIR",
    "MANIFEST",
]

FORMAT = "interpretable-zoo/1"
_PACKAGE = __name__.rpartition(".")[0]  # "models"


def _package_dir(package: str) -> Path:
    """The folder of a data package, wherever it is installed (pip installs wheels unzipped)."""
    return Path(str(importlib.resources.files(package)))


CHECKPOINT_DIR = _package_dir("checkpoints")
MANIFEST = CHECKPOINT_DIR / "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, tampered, refused, or of another architecture."""


def config_file(config: str | os.PathLike) -> Path:
    """A recipe of the ``configs`` package: ``configs/cam/synthetic.yaml`` or ``cam/synthetic.yaml``."""
    parts = Path(config).parts
    return _package_dir("configs").joinpath(*(parts[1:] if parts[:1] == ("configs",) else parts))


@dataclass
class PretrainedEntry:
    """What a released checkpoint is. Measured facts (file, hash, metrics, overrides) come from the manifest."""

    name: str
    class_path: str
    dataset: str
    config: str
    url: str | None = None
    notes: str = ""
    overlays: tuple[str, ...] = ()  # configs applied over `config`, in order (``train.py fit --config A --config B``)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def builder(self) -> str:
        """The registered builder of ``<builder>.<tag>``."""
        return self.name.partition(".")[0]

    @property
    def tag(self) -> str:
        """The part of the name after the builder (``synthparts``)."""
        return self.name.partition(".")[2]

    @property
    def overrides(self) -> dict[str, Any]:
        """Keyword arguments with which ``create_model(builder, **overrides)`` builds the released model."""
        return dict(self.manifest.get("overrides", {}))

    @property
    def file(self) -> Path | None:
        """The released file in ``checkpoints/`` (None if the manifest names none)."""
        rel = self.manifest.get("file")
        return CHECKPOINT_DIR / rel if rel else None

    @property
    def config_file(self) -> Path:
        """The recipe's YAML file (package data of ``configs``)."""
        return config_file(self.config)

    @property
    def config_files(self) -> list[Path]:
        """The recipe's YAML file and its overlays, in the order ``train.py fit --config ...`` takes them."""
        return [config_file(c) for c in (self.config, *self.overlays)]

    @property
    def sha256(self) -> str | None:
        """The recorded sha256 of the released file."""
        return self.manifest.get("sha256")

    @property
    def metrics(self) -> dict[str, float]:
        """The recorded metrics (``test_acc``: accuracy on the recipe's test split)."""
        return self.manifest.get("metrics", {})


_ENTRIES: dict[str, PretrainedEntry] = {}


def register_pretrained(entry: PretrainedEntry) -> PretrainedEntry:
    """Declare a released checkpoint; its name is ``<builder>.<tag>`` of an already registered builder."""
    if entry.name in _ENTRIES:
        raise ValueError(f"pretrained entry {entry.name!r} is declared twice")
    if not entry.tag or not is_model(entry.builder):
        raise ValueError(f"pretrained entry {entry.name!r} is not '<builder>.<tag>' of a registered builder")
    _ENTRIES[entry.name] = entry
    return entry


def _manifest() -> dict[str, Any]:
    if not MANIFEST.is_file():
        return {}
    return json.loads(MANIFEST.read_text()).get("checkpoints", {})


def pretrained_entry(name: str) -> PretrainedEntry:
    """The declared entry of a released checkpoint, with its manifest record (file, sha256, metrics, data)."""
    if name not in _ENTRIES:
        raise CheckpointError(f"no pretrained checkpoint named {name!r}; available: {', '.join(sorted(_ENTRIES)) or 'none'}")
    entry = _ENTRIES[name]
    entry.manifest = _manifest().get(name, {})
    return entry


def pretrained_tags(builder: str) -> list[str]:
    """Tags released for a builder in declaration order; the first is its default (``pretrained=True``)."""
    return [e.tag for e in _ENTRIES.values() if e.builder == builder]


def list_pretrained(print_table: bool = False) -> list[str]:
    """Names of the declared pretrained checkpoints; optionally print them as a table.

    Examples:
        >>> "protopnet_resnet18.synthparts" in list_pretrained()
        True
    """
    names = sorted(_ENTRIES)
    if print_table:
        rows = []
        for n in names:
            e = pretrained_entry(n)
            acc = e.metrics.get("test_acc")
            rows.append((n, e.class_path.rsplit(".", 1)[-1], e.dataset, f"{100 * acc:.1f}" if acc is not None else "-",
                         "yes" if e.file and e.file.is_file() else "no"))
        header = ("name", "model", "dataset", "test acc %", "local file")
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    return names


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in `chunk`-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- the allow-list
def zoo_classes() -> dict[str, type]:
    """Model classes a checkpoint may name: subclasses of `InterpretableClassifier` defined in this
    package, by module path (``models.cam.CAMNet``) and, where the package exports them, ``models.CAMNet``.

    Built from the classes already imported (the package imports every family), never by importing.
    """
    from .base import InterpretableClassifier

    package = sys.modules[_PACKAGE]
    found: dict[str, type] = {}
    stack = [InterpretableClassifier]
    while stack:
        for cls in stack.pop().__subclasses__():
            stack.append(cls)
            if cls.__module__.partition(".")[0] == _PACKAGE:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
                if getattr(package, cls.__name__, None) is cls:
                    found[f"{_PACKAGE}.{cls.__name__}"] = cls
    return found


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _constructor(class_path: Any, source: Any) -> Callable[..., nn.Module]:
    """The zoo class or registered builder a checkpoint names; anything else is refused, unimported."""
    if isinstance(class_path, str):
        classes = zoo_classes()
        if class_path in classes:
            return classes[class_path]
        if is_model(class_path):
            return builder_of(class_path)
    raise CheckpointError(f"{source}: refusing to build {_short(class_path)}: not a model class of the zoo "
                          f"nor a registered builder (see models.list_models())")


_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")  # model names with which timm would fetch files
_FETCHING_KEYS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}


def _checked_init_args(init_args: Any, source: Any) -> dict[str, Any]:
    """Constructor arguments from a file: plain keywords that fetch nothing (no hub names, no timm
    weight or checkpoint arguments at any depth); trunk weights come from the file's state dict."""
    if not isinstance(init_args, dict) or not all(isinstance(k, str) for k in init_args):
        raise CheckpointError(f"{source}: init_args must be a dict of keyword arguments, got {_short(init_args)}")

    def check(key: str, value: Any) -> None:
        if key in _FETCHING_KEYS or (isinstance(value, str) and value.startswith(_HUB_PREFIXES)):
            raise CheckpointError(f"{source}: refusing init argument {key}={_short(value)}: it would fetch weights")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
        for k, v in items:
            check(k if isinstance(k, str) else key, v)

    args = {k: v for k, v in init_args.items() if not k.startswith("_")}
    for key, value in args.items():
        check(key, value)
    if "pretrained_backbone" in args:
        args["pretrained_backbone"] = False  # the state dict replaces them: no download, no second file read
    return args


# ----------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in a checkpoint file, read weights-only on the CPU; any failure is one `CheckpointError` line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable or refused file becomes one clear line
        raise CheckpointError(f"cannot load checkpoint {path}: {_first_line(exc)}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
    return payload


_read = read_checkpoint  # the former private name, still imported by the report application


def _model_spec(payload: dict[str, Any], source: Any, model_class: str | None) -> tuple[Any, dict[str, Any], Any]:
    """(class path, init args, state dict) of a zoo file or a Lightning checkpoint of the zoo."""
    hparams = payload.get("hyper_parameters")
    if payload.get("format") == FORMAT or "init_args" in payload:
        class_path, init_args = payload.get("class_path"), payload.get("init_args", {})
    elif isinstance(hparams, dict):
        class_path = payload.get("zoo_class_path") or hparams.get("_class_path") or payload.get("class_path")
        init_args = hparams
    else:
        raise CheckpointError(f"{source} is neither a zoo checkpoint nor a Lightning checkpoint of the zoo")
    class_path = model_class or class_path
    if class_path is None:
        raise CheckpointError(f"{source} does not name its model class (no zoo_class_path, _class_path or "
                              f"class_path); pass model_class=")
    return class_path, init_args, payload.get("state_dict")


def _load_state(model: nn.Module, state_dict: Any, source: Any) -> None:
    """Strict load; a mismatch is one line naming the first differing key (and both shapes)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{source} has no state_dict of tensors")
    own = model.state_dict()
    shapes = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{k} has shape {tuple(state_dict[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                         + (f" ({len(shapes)} keys differ in shape)" if len(shapes) > 1 else ""))
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]}")
        raise CheckpointError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def _download(url: str, sha256: str | None, check_hash: bool) -> Path:
    """A cached copy of `url`; the hash is the manifest's, or the ``-<hex>`` suffix of the file name."""
    cache = Path(torch.hub.get_dir()) / "interpretable-zoo"
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / Path(url.split("?")[0]).name
    if not dst.is_file():
        match = re.search(r"-([a-f0-9]{8,64})\.", dst.name)
        prefix = sha256 or (match.group(1) if match else None)
        try:
            torch.hub.download_url_to_file(url, str(dst), hash_prefix=prefix if check_hash else None, progress=True)
        except Exception as exc:  # noqa: BLE001 - network errors and hash mismatches alike: one line
            raise CheckpointError(f"cannot download {url}: {_first_line(exc)}") from None
    return dst


def _resolve(source: str, check_hash: bool) -> tuple[Path, str | None]:
    """(local file, expected sha256) of a released name, an http(s) URL or a path."""
    if source in _ENTRIES:
        entry = pretrained_entry(source)
        if entry.file is not None and entry.file.is_file():
            return entry.file, entry.sha256
        if entry.url:
            return _download(entry.url, entry.sha256, check_hash), entry.sha256
        raise CheckpointError(f"pretrained {source!r} has no local file (run checkpoints/build.py) and no URL")
    if source.startswith(("https://", "http://")):
        return _download(source, None, check_hash), None
    path = Path(source)
    if not path.is_file():
        available = ", ".join(sorted(_ENTRIES)) or "none declared"
        raise CheckpointError(f"no pretrained checkpoint named {source!r} (available: {available}) and no such file")
    return path, None


def load_pretrained(
    source: str | os.PathLike,
    check_hash: bool = True,
    map_location: str | torch.device = "cpu",
    *,
    model_class: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """A ready model in eval mode from a released name, a local file or an http(s) URL.

    Args:
        source: a released ``<builder>.<tag>`` name (its file's sha256 is checked against the manifest),
            a zoo file (`save_zoo_checkpoint`) or a Lightning checkpoint of the zoo, or a URL of one.
        check_hash: verify the sha256 of released files (and of URLs whose name ends in ``-<hex>``).
        map_location: device the model is moved to.
        model_class: the zoo class (``models.ProtoPNet``) or registered builder to build, for a Lightning
            checkpoint that does not name its class; it takes precedence over what the file names.
        overrides: constructor arguments replacing the file's (``create_model(..., pretrained=...)``
            passes its keywords here); ones that change the architecture fail the strict load.

    Raises:
        CheckpointError: one line, for a missing, unreadable, tampered or refused file, a class outside
            the zoo, or a state dict of another architecture.
    """
    path, expected = _resolve(str(source), check_hash)
    if check_hash and expected:
        actual = sha256_of(path)
        if actual != expected:
            raise CheckpointError(f"sha256 of {path} is {actual[:16]}..., the manifest expects {expected[:16]}...: "
                                  f"file changed or corrupt")
    payload = read_checkpoint(path)
    class_path, init_args, state_dict = _model_spec(payload, path, model_class)
    build = _constructor(class_path, path)
    kwargs = {**_checked_init_args(init_args, path), **(overrides or {})}
    try:
        model = build(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot build {class_path} from its init_args: {_first_line(exc)}") from None
    _load_state(model, state_dict, path)
    return model.to(map_location).eval()


def save_zoo_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write a small weights-only zoo file (atomically: temporary file, then rename)."""
    path = Path(path)
    hparams = dict(getattr(model, "hparams", {}))
    payload = {
        "format": FORMAT,
        "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
        "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    _constructor(payload["class_path"], path)  # the file must name a class load_pretrained accepts
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path
