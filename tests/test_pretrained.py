"""One safe loader: hashes, tampering, code in pickles and class paths, wrong architectures, and
released names that agree with their builders."""
import json
import pickle
import subprocess
import sys

import pytest
import torch

import models
from models import CAMNet, CheckpointError, create_model, load_pretrained, save_zoo_checkpoint
from models import pretrained as pretrained_mod
from models.base import InterpretableClassifier


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = CAMNet(num_classes=3, backbone="test_resnet").eval()
    path = save_zoo_checkpoint(model, tmp_path / "tiny.pt", meta={"note": "test"})
    return model, path


def _refused(path, match="refusing", **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        load_pretrained(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_round_trip_same_logits_and_weights_only(tiny):
    model, path = tiny
    x = torch.rand(2, 3, 32, 32)
    loaded = load_pretrained(path)
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    payload = torch.load(path, weights_only=True)
    assert payload["class_path"] == "models.cam.CAMNet" and payload["meta"] == {"note": "test"}


def test_registered_entry_verifies_hash(tiny, tmp_path, monkeypatch):
    _, path = tiny
    monkeypatch.setattr(pretrained_mod, "CHECKPOINT_DIR", tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"checkpoints": {"tiny_test": {"file": path.name, "sha256": pretrained_mod.sha256_of(path)}}}))
    monkeypatch.setattr(pretrained_mod, "MANIFEST", manifest)
    entry = pretrained_mod.PretrainedEntry("tiny_test", "models.cam.CAMNet", "none", "none")
    monkeypatch.setitem(pretrained_mod._ENTRIES, "tiny_test", entry)
    assert isinstance(load_pretrained("tiny_test"), CAMNet)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip one byte: a tampered file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 of .*tiny.pt"):
        load_pretrained("tiny_test")


def test_truncated_file_is_one_clear_error(tiny):
    _, path = tiny
    path.write_bytes(path.read_bytes()[:1000])
    _refused(path, match="cannot load checkpoint .*tiny.pt")


# ------------------------------------------------------------------------- crafted checkpoints
class _Touch:
    """A pickled object whose unpickling runs a command (the classic `__reduce__` payload)."""

    def __init__(self, marker, via="popen"):
        self.marker, self.via = str(marker), via

    def __reduce__(self):
        if self.via == "system":
            import os

            return (os.system, (f"touch {self.marker}",))
        return (subprocess.Popen, (["touch", self.marker],))


def test_reduce_payload_never_runs(tmp_path):
    files = []
    for via in ("popen", "system"):
        for writer in ("torch.save", "pickle.dump"):
            marker = tmp_path / f"EXPLOITED_{via}_{writer}"
            payload = {"format": "interpretable-zoo/1", "class_path": "models.cam.CAMNet", "init_args": {},
                       "state_dict": {}, "meta": _Touch(marker, via)}
            path = tmp_path / f"evil_{via}_{writer}.pt"
            if writer == "torch.save":
                torch.save(payload, path)
            else:
                with open(path, "wb") as fh:
                    pickle.dump(payload, fh, protocol=2)
            _refused(path, match="cannot load checkpoint .*evil_")
            assert not marker.exists()
            files.append((path, marker))
    # The files are live: an unrestricted unpickler runs each command (in a child process, which
    # waits for a Popen'd one, so nothing runs in this process).
    unsafe = "import os, sys, torch\nfor path in sys.argv[1:]:\n    try:\n        torch.load(path, weights_only=False)\n" \
             "    except Exception:\n        pass\ntry:\n    while True:\n        os.wait()\nexcept ChildProcessError:\n    pass\n"
    subprocess.run([sys.executable, "-c", unsafe, *(str(p) for p, _ in files)], capture_output=True, timeout=120)
    assert all(marker.exists() for _, marker in files)


def _zoo(class_path, init_args, state_dict=None):
    return {"format": "interpretable-zoo/1", "class_path": class_path, "init_args": init_args,
            "state_dict": state_dict or {}, "meta": {}}


def _lightning(key, class_path, hparams, state_dict=None):
    """A Lightning checkpoint naming its class where the zoo (zoo_class_path), LightningCLI
    (hyper_parameters._class_path) or jsonargparse (class_path) would."""
    ckpt = {"state_dict": state_dict or {}, "hyper_parameters": dict(hparams), "epoch": 0, "global_step": 0}
    if key == "_class_path":
        ckpt["hyper_parameters"]["_class_path"] = class_path
    else:
        ckpt[key] = class_path
    return ckpt


def _crafted(marker):
    """(label, checkpoint dict) of files that name code outside the zoo; each would touch `marker`."""
    touch = ["touch", str(marker)]
    command = f"touch {marker}"
    source = f"open({str(marker)!r}, 'w').close()"
    linear = torch.nn.Linear(2, 2)
    return [
        ("zoo Popen", _zoo("subprocess.Popen", {"args": touch})),
        ("zoo os.system", _zoo("os.system", {"command": command})),
        ("zoo posix.system", _zoo("posix.system", {"command": command})),
        ("zoo builtins.exec", _zoo("builtins.exec", {"source": source})),
        ("zoo builtins.eval", _zoo("builtins.eval", {"source": source})),
        ("zoo torch Linear", _zoo("torch.nn.Linear", {"in_features": 2, "out_features": 2}, linear.state_dict())),
        ("zoo dotted into models", _zoo("models.pretrained.os.system", {"command": command})),
        ("zoo models function", _zoo("models.registry.create_model", {"name": "cam_test_resnet"})),
        ("zoo abstract base", _zoo("models.base.InterpretableClassifier", {"num_classes": 3})),
        ("zoo not a string", _zoo(["subprocess", "Popen"], {"args": touch})),
        ("lightning zoo_class_path Popen", _lightning("zoo_class_path", "subprocess.Popen", {"args": touch})),
        ("lightning _class_path os.system", _lightning("_class_path", "os.system", {"command": command})),
        ("lightning class_path exec", _lightning("class_path", "builtins.exec", {"source": source})),
        ("lightning _class_path eval", _lightning("_class_path", "builtins.eval", {"source": source})),
        ("lightning torch Linear", _lightning("_class_path", "torch.nn.Linear", {"in_features": 2, "out_features": 2},
                                              linear.state_dict())),
    ]


def test_class_paths_outside_the_zoo_are_refused_before_import(tmp_path):
    marker = tmp_path / "EXPLOITED"
    for label, ckpt in _crafted(marker):
        path = tmp_path / f"{label.replace(' ', '_')}.pt"
        torch.save(ckpt, path)
        _refused(path, match="refusing to build .*not a model class of the zoo nor a registered builder")
        assert not marker.exists(), label
    # A module that nothing here has imported stays unimported: the class path is looked up, not imported.
    assert "smtplib" not in sys.modules
    torch.save(_zoo("smtplib.SMTP", {"host": "localhost"}), tmp_path / "smtp.pt")
    _refused(tmp_path / "smtp.pt")
    assert "smtplib" not in sys.modules


def test_model_class_argument_goes_through_the_allow_list(tiny, tmp_path):
    model, path = tiny
    marker = tmp_path / "EXPLOITED"
    _refused(path, model_class="subprocess.Popen")
    torch.save(_lightning("_class_path", "models.CAMNet", {"args": ["touch", str(marker)]}), tmp_path / "l.ckpt")
    _refused(tmp_path / "l.ckpt", model_class="subprocess.Popen")
    assert not marker.exists()


class _OutsideModel(CAMNet):
    """A subclass of a zoo class defined outside the `models` package."""


def test_subclass_outside_the_package_is_refused(tmp_path):
    classes = pretrained_mod.zoo_classes()
    assert _OutsideModel not in classes.values()
    for cls in (CAMNet, models.ProtoPNet, models.ProtoTree, models.InterpretableCNN, models.PlainClassifier):
        assert classes[f"{cls.__module__}.{cls.__qualname__}"] is cls and classes[f"models.{cls.__name__}"] is cls
    assert all(issubclass(c, InterpretableClassifier) and c is not InterpretableClassifier for c in classes.values())
    torch.save(_zoo(f"{__name__}._OutsideModel", {"num_classes": 3, "backbone": "test_resnet"}), tmp_path / "o.pt")
    _refused(tmp_path / "o.pt")


def test_hub_names_are_refused_and_trunk_weights_come_from_the_file(tiny, tmp_path):
    model, path = tiny
    payload = torch.load(path, weights_only=True)
    hub = dict(payload, init_args=dict(payload["init_args"], backbone="hf-hub:timm/resnet18.a1_in1k"))
    torch.save(hub, tmp_path / "hub.pt")
    _refused(tmp_path / "hub.pt", match="refusing init argument backbone='hf-hub:timm.*would fetch weights")
    # timm arguments that read another file, even nested in a plain classifier's model_args.
    plain = _zoo("models.PlainClassifier", {"num_classes": 3, "model_args": {"checkpoint_path": str(path)}})
    torch.save(plain, tmp_path / "second_file.pt")
    _refused(tmp_path / "second_file.pt", match="refusing init argument checkpoint_path=")
    overlay = _zoo("models.PlainClassifier", {"num_classes": 3, "model_args": {"pretrained_cfg_overlay": {"file": "x"}}})
    torch.save(overlay, tmp_path / "overlay.pt")
    _refused(tmp_path / "overlay.pt", match="refusing init argument pretrained_cfg_overlay=")
    # A recorded trunk-weights path is not read (the state dict replaces those weights anyway).
    elsewhere = dict(payload, init_args=dict(payload["init_args"], pretrained_backbone=str(tmp_path / "absent.pt")))
    torch.save(elsewhere, tmp_path / "elsewhere.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_pretrained(tmp_path / "elsewhere.pt")(x), model(x))


def test_registered_builder_as_class_path(tmp_path):
    torch.manual_seed(0)
    model = create_model("cam_test_resnet", num_classes=3).eval()
    torch.save(_zoo("cam_test_resnet", {"num_classes": 3}, model.state_dict()), tmp_path / "b.pt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_pretrained(tmp_path / "b.pt")(x), model(x))


def test_lightning_checkpoint_without_a_class_needs_model_class(tiny, tmp_path):
    model, _ = tiny
    hparams = dict(model.hparams)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, tmp_path / "anon.ckpt")
    _refused(tmp_path / "anon.ckpt", match="does not name its model class.*pass model_class=")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(load_pretrained(tmp_path / "anon.ckpt", model_class="models.CAMNet")(x), model(x))


def test_wrong_architecture_names_the_first_key_and_both_shapes(tiny, tmp_path):
    _, path = tiny
    payload = torch.load(path, weights_only=True)
    payload["init_args"]["num_classes"] = 5
    torch.save(payload, tmp_path / "wrong.pt")
    message = _refused(tmp_path / "wrong.pt", match="does not fit CAMNet")
    first = next(k for k, v in CAMNet(num_classes=5, backbone="test_resnet").state_dict().items()
                 if v.shape != payload["state_dict"][k].shape)
    assert f"{first} has shape (3, " in message and "in the file, (5, " in message
    payload["init_args"]["num_classes"] = 3
    del payload["state_dict"][first]
    torch.save(payload, tmp_path / "missing.pt")
    assert f"1 missing key(s), first {first}" in _refused(tmp_path / "missing.pt", match="does not fit CAMNet")


def test_unknown_name_lists_what_exists():
    with pytest.raises(CheckpointError, match="no pretrained checkpoint named 'nope'"):
        load_pretrained("nope")
    assert isinstance(models.list_pretrained(), list)


def test_url_is_downloaded_once_and_hash_checked(tiny, tmp_path, monkeypatch):
    model, path = tiny
    sha = pretrained_mod.sha256_of(path)
    served = tmp_path / "served"
    served.mkdir()
    (served / f"tiny-{sha[:10]}.pt").write_bytes(path.read_bytes())
    (served / "tiny-0123456789.pt").write_bytes(path.read_bytes())
    real, calls = torch.hub.download_url_to_file, []

    def from_disk(url, dst, hash_prefix=None, progress=True):  # the real download, of a file:// URL
        calls.append(url)
        real(url.replace("https://example.org", served.as_uri()), dst, hash_prefix=hash_prefix, progress=False)

    monkeypatch.setattr(torch.hub, "download_url_to_file", from_disk)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    x = torch.rand(2, 3, 32, 32)
    url = f"https://example.org/tiny-{sha[:10]}.pt"
    assert torch.equal(load_pretrained(url)(x), model(x))
    assert torch.equal(load_pretrained(url)(x), model(x)) and calls == [url]  # cached
    with pytest.raises(CheckpointError, match="cannot download https://example.org/tiny-0123456789.pt"):
        load_pretrained("https://example.org/tiny-0123456789.pt")


# ------------------------------------------------------------------------- names that agree
def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


@pytest.mark.parametrize("name", models.list_pretrained())
def test_released_name_is_its_builder_with_the_manifest_overrides(name):
    entry = models.pretrained_entry(name)
    assert entry.file is not None and entry.file.is_file(), f"{name}: no released file"
    assert entry.manifest.get("builder") == entry.builder and models.is_model(entry.builder)
    payload = models.read_checkpoint(entry.file)
    assert payload["class_path"] == entry.class_path
    torch.manual_seed(0)
    built = create_model(entry.builder, **entry.overrides).eval()
    assert f"{type(built).__module__}.{type(built).__qualname__}" == entry.class_path
    hparams = dict(built.hparams)
    differ = {k: (hparams.get(k, "<absent>"), v) for k, v in payload["init_args"].items()
              if not _same(hparams.get(k, "<absent>"), v)}
    assert not differ, f"{name}: {entry.builder}(**overrides) differs from the file in {differ}"
    ours = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in payload["state_dict"].items()}
    assert ours == theirs
    # timm style: the builder with pretrained=<tag> is the released model, to the logit.
    released = create_model(entry.builder, pretrained=entry.tag)
    built.load_state_dict(payload["state_dict"])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(released(x), built(x))


def test_pretrained_true_is_the_first_declared_tag_and_bad_tags_are_clear():
    name = "protopnet_resnet18"
    assert pretrained_mod.pretrained_tags(name)[0] == "synthparts"
    default = create_model(name, pretrained=True)
    assert default.hparams.prototype_dim == 64 and not default.training  # the release, not the builder's D = 128
    tagged = create_model(name, pretrained="synthparts", lr=0.5)  # a training argument may change
    assert tagged.hparams.lr == 0.5
    for a, b in zip(default.state_dict().values(), tagged.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match=r"no released checkpoint protopnet_resnet18.nope; released tags of "
                                              r"protopnet_resnet18: synthparts"):
        create_model(name, pretrained="nope")
    with pytest.raises(CheckpointError, match=r"no released checkpoint cam_test_resnet.<default>; .*: none"):
        create_model("cam_test_resnet", pretrained=True)
    with pytest.raises(CheckpointError, match="does not fit ProtoPNet: .* in the file"):
        create_model(name, pretrained=True, prototype_dim=32)  # the architecture may not


def test_entry_names_must_be_builder_dot_tag():
    for bad in ("nobuilder.synthparts", "cam_resnet18", "cam_resnet18."):
        with pytest.raises(ValueError, match="is not '<builder>.<tag>' of a registered builder"):
            pretrained_mod.register_pretrained(pretrained_mod.PretrainedEntry(bad, "models.CAMNet", "-", "-"))
    assert not set(pretrained_mod._ENTRIES) & {"nobuilder.synthparts", "cam_resnet18", "cam_resnet18."}
