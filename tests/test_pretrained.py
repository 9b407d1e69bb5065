"""Safe one-line loading: hashes, tampering, code in pickles, wrong architectures."""
import json
import pickle

import pytest
import torch

import models
from models import CAMNet, CheckpointError, load_pretrained, save_zoo_checkpoint
from models import pretrained as pretrained_mod


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = CAMNet(num_classes=3, backbone="test_resnet").eval()
    path = save_zoo_checkpoint(model, tmp_path / "tiny.pt", meta={"note": "test"})
    return model, path


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
    with pytest.raises(CheckpointError, match="cannot load checkpoint .*tiny.pt"):
        load_pretrained(path)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED_MARKER",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "interpretable-zoo/1", "x": _Payload()}, fh)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_pretrained(path)
    assert not (tmp_path / "EXPLOITED_MARKER").exists()


def test_class_outside_the_zoo_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "interpretable-zoo/1", "class_path": "subprocess.Popen", "init_args": {}, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="only classes of the 'models' package"):
        load_pretrained(path)


def test_wrong_architecture_names_keys_and_shapes(tiny, tmp_path):
    _, path = tiny
    payload = torch.load(path, weights_only=True)
    payload["init_args"]["num_classes"] = 5
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"wrong.pt does not fit CAMNet: shape mismatches .*classifier.weight"):
        load_pretrained(tmp_path / "wrong.pt")


def test_unknown_name_lists_what_exists():
    with pytest.raises(CheckpointError, match="no pretrained checkpoint named 'nope'"):
        load_pretrained("nope")
    assert isinstance(models.list_pretrained(), list)
