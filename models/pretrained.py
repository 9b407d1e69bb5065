"""Pretrained interpretable checkpoints: declared next to each model, loaded safely in one line.

A family file declares what a released checkpoint *is* (`register_pretrained`: name, model class,
constructor arguments, dataset, recipe); `checkpoints/manifest.json`, written by
`checkpoints/build.py`, records what training *measured* (file, sha256, accuracy, command, seed).

A zoo file is one ``torch.save`` of a dict holding only tensors and plain values::

    {"format": "interpretable-zoo/1", "class_path": "models.CAMNet", "init_args": {...},
     "state_dict": {...}, "meta": {...}}

so it loads with ``torch.load(weights_only=True)``: nothing in a file can execute code.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "pretrained_entry",
    "CheckpointError",
    "PretrainedEntry",
    "register_pretrained",
    "list_pretrained",
    "load_pretrained",
    "save_zoo_checkpoint",
    "sha256_of",
    "MANIFEST",
]

FORMAT = "interpretable-zoo/1"
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
MANIFEST = CHECKPOINT_DIR / "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, tampered, or of another architecture."""


@dataclass
class PretrainedEntry:
    """What a released checkpoint is. Measured facts (file, hash, metrics) come from the manifest."""

    name: str
    class_path: str
    dataset: str
    config: str
    url: str | None = None
    notes: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> Path | None:
        rel = self.manifest.get("file")
        return CHECKPOINT_DIR / rel if rel else None

    @property
    def sha256(self) -> str | None:
        return self.manifest.get("sha256")

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest.get("metrics", {})


_ENTRIES: dict[str, PretrainedEntry] = {}


def register_pretrained(entry: PretrainedEntry) -> PretrainedEntry:
    if entry.name in _ENTRIES:
        raise ValueError(f"pretrained entry {entry.name!r} is declared twice")
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


def list_pretrained(print_table: bool = False) -> list[str]:
    """Names of the declared pretrained checkpoints; optionally print them as a table."""
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
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _import_model_class(class_path: str) -> type:
    """Import a model class by dotted path, only from this package: a file cannot name other code."""
    from .base import InterpretableClassifier

    module_name, _, cls_name = class_path.rpartition(".")
    if not (module_name == "models" or module_name.startswith("models.")):
        raise CheckpointError(f"refusing class {class_path!r}: only classes of the 'models' package can be built")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name, None)
    except ImportError:
        raise CheckpointError(f"{class_path!r} is not a model class of the zoo: no module {module_name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, InterpretableClassifier)):
        raise CheckpointError(f"{class_path!r} is not a model class of the zoo")
    return cls


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {reason[:300]}") from None


def _load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches (file vs model) {shapes[:3]}")
        raise CheckpointError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def _model_from_payload(payload: dict[str, Any], source: Path) -> nn.Module:
    if payload.get("format") == FORMAT:
        class_path, init_args, state = payload["class_path"], payload["init_args"], payload["state_dict"]
    elif "state_dict" in payload and "hyper_parameters" in payload:  # a Lightning checkpoint of the zoo
        class_path = payload.get("zoo_class_path")
        if class_path is None:
            raise CheckpointError(f"{source} is a Lightning checkpoint without 'zoo_class_path'; use Model.load_from_checkpoint")
        init_args = {k: v for k, v in payload["hyper_parameters"].items() if not k.startswith("_")}
        state = payload["state_dict"]
    else:
        raise CheckpointError(f"{source} is neither a zoo checkpoint nor a Lightning checkpoint of the zoo")
    cls = _import_model_class(class_path)
    model = cls(**init_args)
    _load_state(model, state, source)
    return model


def _download(url: str, sha256: str | None) -> Path:
    cache = Path(torch.hub.get_dir()) / "interpretable-zoo"
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / Path(url.split("?")[0]).name
    if not dst.is_file():
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=sha256, progress=True)
    return dst


def load_pretrained(name_or_path: str | os.PathLike, check_hash: bool = True, map_location: str = "cpu") -> nn.Module:
    """A ready model in eval mode from a registered name, a local file or an https URL.

    Registered names verify the file's sha256 against the manifest; a Lightning checkpoint written
    by `train.py` works too. Only tensors and plain values are read from any file.
    """
    name_or_path = str(name_or_path)
    expected = None
    if name_or_path in _ENTRIES:
        entry = pretrained_entry(name_or_path)
        expected = entry.sha256
        if entry.file is not None and entry.file.is_file():
            path = entry.file
        elif entry.url:
            path = _download(entry.url, expected)
        else:
            raise CheckpointError(f"pretrained {name_or_path!r} has no local file (run checkpoints/build.py) and no URL")
    elif name_or_path.startswith(("https://", "http://")):
        path = _download(name_or_path, None)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            available = ", ".join(sorted(_ENTRIES)) or "none declared"
            raise CheckpointError(f"no pretrained checkpoint named {name_or_path!r} (available: {available}) and no such file")
    if check_hash and expected:
        actual = sha256_of(path)
        if actual != expected:
            raise CheckpointError(f"sha256 of {path} is {actual[:16]}..., the manifest expects {expected[:16]}...: file changed or corrupt")
    model = _model_from_payload(_read(Path(path)), Path(path))
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
    _import_model_class(payload["class_path"])  # the file must name a class load_pretrained accepts
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path
