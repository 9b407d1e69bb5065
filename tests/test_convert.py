"""Import of official ProtoPNet / ProtoTree checkpoints (models/convert.py).

Official-format files are written by `torch.save` of stand-ins with the official module paths and
attribute names (tests/official_stubs); the stand-ins are importable only while the files are
written, so the conversion runs without any official code. The stand-ins' forward computes the
official maths and is the reference for the converted zoo models.
"""
import argparse
import contextlib
import importlib
import pickle
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import CheckpointError, ProtoPNet, ProtoTree, load_pretrained
from models.convert import OfficialObject, convert_checkpoint, load_official, main

STUBS = Path(__file__).parent / "official_stubs"
STUB_ROOTS = ("model", "resnet_features", "vgg_features", "densenet_features", "prototree", "util", "features")


def _stub_modules() -> list[str]:
    return [n for n in sys.modules if n.split(".")[0] in STUB_ROOTS]


_LOADED: dict = {}  # the stand-in modules, kept between uses so that their classes stay the same objects


@contextlib.contextmanager
def official_code():
    """The stand-ins importable under the official module paths, and forgotten afterwards."""
    saved = {n: sys.modules.pop(n) for n in _stub_modules()}
    sys.path.insert(0, str(STUBS))
    sys.modules.update(_LOADED)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(STUBS))
        for n in _stub_modules():
            _LOADED[n] = sys.modules.pop(n)
        sys.modules.update(saved)


def _randomise(module: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so eval-mode trunks are really compared."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)


@torch.no_grad()
def _ppnet(import_module, trunk="resnet18", num_classes=3, per_class=2, dim=32, add_on="bottleneck", activation="log"):
    feats = {"resnet": "resnet_features", "vgg11_": "vgg_features", "densen": "densenet_features"}[trunk[:6]]
    features = getattr(import_module(feats), f"{trunk}_features")()
    torch.manual_seed(0)
    net = import_module("model").PPNet(features, 64, (num_classes * per_class, dim, 1, 1), [2, 32.0, 435.0, 16.0],
                                       num_classes, prototype_activation_function=activation, add_on_layers_type=add_on)
    _randomise(net, 0)
    nn.init.normal_(net.last_layer.weight)
    net.prototype_vectors.uniform_(0, 1)
    return net.eval()


@torch.no_grad()
def _prototree(import_module, trunk="resnet18", depth=3, num_classes=4, dim=16, log=True):
    args = argparse.Namespace(depth=depth, num_features=dim, W1=1, H1=1, log_probabilities=log, kontschieder_normalization=False,
                              kontschieder_train=False, disable_derivative_free_leaf_optim=False)
    features = getattr(import_module("features.resnet_features"), f"{trunk}_features")()
    add_on = nn.Sequential(nn.Conv2d(features.layer4[-1].bn1.num_features * features.block.expansion, dim, 1, bias=False), nn.Sigmoid())
    torch.manual_seed(1)
    tree = import_module("prototree.prototree").ProtoTree(num_classes, features, args, add_on)
    _randomise(tree, 1)
    tree.prototype_layer.prototype_vectors.uniform_(0, 1)
    for leaf in tree.leaves:
        leaf._dist_params.normal_(0, 3)
    # A branch -> prototype map that is surely not the pre-order: the official one is arbitrary too.
    branches = sorted(tree._out_map, key=lambda b: b.index)
    order = list(range(len(branches)))
    random.Random(0).shuffle(order)
    tree._out_map = {b: i for b, i in zip(branches, order)}
    return tree.eval()


def _bfs_official(root):
    """(zoo node id, official node) of an unpruned official tree, walked by the test itself."""
    out, queue = [], [(root, 0)]
    while queue:
        node, n = queue.pop(0)
        out.append((n, node))
        if hasattr(node, "l"):
            queue += [(node.l, 2 * n + 1), (node.r, 2 * n + 2)]
    return out


@pytest.fixture(scope="module")
def ppnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "10push0.7920.pth"
    with official_code() as imp:
        net = _ppnet(imp)
        torch.save(net, path)
    return net, path


# ---------------------------------------------------------------------------------------- ProtoPNet
def test_protopnet_same_logits_and_distances(ppnet_file, tmp_path):
    net, path = ppnet_file
    out = tmp_path / "zoo.pt"
    convert_checkpoint(path, "protopnet", out)
    assert not _stub_modules(), "the conversion imported official code"
    zoo = load_pretrained(out)
    hp = zoo.hparams
    assert isinstance(zoo, ProtoPNet)
    assert (hp.backbone, hp.num_classes, hp.prototypes_per_class, hp.prototype_dim, hp.add_on) == ("resnet18", 3, 2, 32, "bottleneck")
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_logits, ref_min = net.double()(zoo.double().normalize(x.double()))
        logits, min_d = zoo.forward_with_distances(x.double())
        net.float()
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-9)
    assert torch.allclose(min_d, ref_min, rtol=0, atol=1e-9)
    assert torch.equal(zoo.prototype_class_identity.float(), net.prototype_class_identity)
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["converted_from"] == path.name and meta["official_slots"] == list(range(6))


@pytest.mark.parametrize("trunk,add_on,activation", [("vgg11_bn", "regular", "linear"), ("densenet121", "bottleneck", "log")])
def test_protopnet_vgg_and_densenet_trunks(trunk, add_on, activation, tmp_path):
    """Official torchvision-style VGG and DenseNet names map onto timm's feature modules."""
    with official_code() as imp:
        net = _ppnet(imp, trunk=trunk, num_classes=2, per_class=3, dim=64, add_on=add_on, activation=activation)
        torch.save(net, tmp_path / "official.pth")
    zoo = convert_checkpoint(tmp_path / "official.pth", "protopnet", tmp_path / "zoo.pt")
    assert (zoo.hparams.backbone, zoo.hparams.add_on, zoo.hparams.similarity) == (trunk, add_on, activation)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref_logits, ref_min = net(zoo.normalize(x))
        logits, min_d = zoo.forward_with_distances(x)
    assert torch.allclose(logits, ref_logits, atol=1e-4) and torch.allclose(min_d, ref_min, atol=1e-4)


@pytest.mark.parametrize("variant", ["legacy_format", "dataparallel"])
def test_protopnet_legacy_file_and_dataparallel(variant, ppnet_file, tmp_path):
    net, _ = ppnet_file
    path = tmp_path / "official.pth"
    with official_code():
        if variant == "legacy_format":  # what torch < 1.6 (the official code's era) wrote
            torch.save(net, path, _use_new_zipfile_serialization=False)
        else:
            torch.save(nn.DataParallel(net), path)
    zoo = convert_checkpoint(path, "protopnet", tmp_path / "zoo.pt")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(zoo(x), net(zoo.normalize(x))[0], atol=1e-5)


def test_torchvision_backbone_names(ppnet_file, tmp_path):
    """--backbone torchvision/<name>: the trunk is then a torchvision Sequential with index names."""
    net, path = ppnet_file
    zoo = convert_checkpoint(path, "protopnet", tmp_path / "zoo.pt", backbone="torchvision/resnet18")
    assert "backbone.body.4.0.conv1.weight" in zoo.state_dict()  # layer1.0.conv1 of the official file
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(zoo(x), net(zoo.normalize(x))[0], atol=1e-5)


def test_pruned_protopnet_keeps_logits(tmp_path):
    """prune.py removes prototypes; the zoo masks the emptied class slots instead."""
    with official_code() as imp:
        net = _ppnet(imp, num_classes=3, per_class=3)
        net.prune_prototypes([1, 3, 4])  # class 0 keeps 2, class 1 keeps 1, class 2 keeps 3
        torch.save(net, tmp_path / "pruned.pth")
    zoo = convert_checkpoint(tmp_path / "pruned.pth", "protopnet", tmp_path / "zoo.pt")
    # kept official prototypes 0, 2 | 5 | 6, 7, 8 -> class slots of 3: 0, 1 | 3 | 6, 7, 8
    meta = torch.load(tmp_path / "zoo.pt", weights_only=True)["meta"]
    assert meta["official_slots"] == [0, 1, 3, 6, 7, 8]
    assert zoo.prototype_mask.tolist() == [True, True, False, True, False, False, True, True, True]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref_logits, ref_min = net(zoo.normalize(x))
        logits, min_d = zoo.forward_with_distances(x)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(min_d[:, zoo.prototype_mask], ref_min, atol=1e-5)


# ---------------------------------------------------------------------------------------- ProtoTree
@pytest.mark.parametrize("trunk,log,file", [("resnet18", True, "model.pth"), ("resnet18", False, "tree.pkl"),
                                            ("resnet50", True, "model.pth")])
def test_prototree_same_prediction(trunk, log, file, tmp_path):
    with official_code() as imp:
        tree = _prototree(imp, trunk=trunk, depth=3 if trunk == "resnet18" else 2, log=log)
        tree.save(str(tmp_path / "ckpt"))
        tree.save_state(str(tmp_path / "ckpt"))  # model_state.pth + tree.pkl (a plain pickle)
    out = tmp_path / "zoo.pt"
    source = tmp_path / "ckpt" if file == "model.pth" else tmp_path / "ckpt" / file  # a directory means model.pth
    converted = convert_checkpoint(source, "prototree", out)
    assert not _stub_modules()
    zoo = load_pretrained(out) if trunk == "resnet18" else converted  # (spares a second ResNet-50)
    assert isinstance(zoo, ProtoTree)
    assert (zoo.hparams.backbone, zoo.depth, zoo.log_probabilities, zoo.derivative_free) == (trunk, 3 if trunk == "resnet18" else 2, log, True)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref, ref_min = tree(zoo.normalize(x))
        got = zoo.tree_forward(x)
    assert torch.allclose(got.y, ref, atol=1e-5)  # log y_hat (log mode) or y_hat
    # Node n of the zoo's breadth-first order carries the prototype the official _out_map gave it.
    for n, node in _bfs_official(tree._root):
        if n < zoo.num_internal:
            assert torch.allclose(got.min_distances[:, n], ref_min[:, tree._out_map[node]], atol=1e-5)
        else:
            assert torch.equal(zoo.leaves[n - zoo.num_internal], node._dist_params)
    assert sorted(zoo.node_prototype.tolist()) == list(range(zoo.num_internal))


def test_pruned_prototree_keeps_prediction(tmp_path):
    """Official pruning hangs a sibling subtree on the grandparent; the zoo forces nodes instead."""
    with official_code() as imp:
        tree = _prototree(imp, depth=3, log=True)
        parent = tree._root.l  # prune its left subtree: its right child takes its place
        tree._root.l = parent.r
        tree._parents[parent.r] = tree._root
        tree.save(str(tmp_path / "pruned"))
    zoo = convert_checkpoint(tmp_path / "pruned", "prototree", tmp_path / "zoo.pt")
    structure = zoo.structure()
    assert len(structure.leaves) == len(tree.leaves) == 6 and len(structure.internal) == len(tree.branches) == 5
    assert zoo.forced_route.tolist() == [-1, -1, -1, 0, 0, -1, -1]  # the moved subtree's leaves are carried down
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        ref, _ = tree(zoo.normalize(x))
        assert torch.allclose(zoo(x), ref, atol=1e-5)
        modes = zoo.predict_modes(x)
    assert set(modes["greedy_leaf"].tolist()) <= {leaf - zoo.num_internal for leaf in structure.leaves}


# ---------------------------------------------------------------------------------------- safety
class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.check_call"])
def test_reduce_payload_is_refused_without_side_effect(kind, ppnet_file, tmp_path):
    import os

    marker = tmp_path / "EXPLOITED"
    payload = {"os.system": _Payload(os.system, f"touch {marker}"),
               "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
               "subprocess.check_call": _Payload(subprocess.check_call, ["touch", str(marker)])}[kind]
    net, _ = ppnet_file
    path = tmp_path / "evil.pth"
    with official_code():
        net.img_size = payload  # an innocent-looking attribute of the official module
        try:
            torch.save(net, path)
        finally:
            net.img_size = 64
    expected = {"os.system": "posix.system", "builtins.eval": "builtins.eval", "subprocess.check_call": "subprocess.check_call"}
    with pytest.raises(CheckpointError, match=f"refusing .*evil.pth.*{expected[kind]}") as err:
        convert_checkpoint(path, "protopnet", tmp_path / "zoo.pt")
    assert "\n" not in str(err.value)
    assert not marker.exists() and not (tmp_path / "zoo.pt").exists()


def test_official_and_torch_classes_are_never_instantiated(ppnet_file, tmp_path, monkeypatch):
    """Stand-ins replace PPNet and every torch.nn layer: no __setstate__/__init__ of theirs runs."""
    net, path = ppnet_file

    def trap(*args, **kwargs):
        raise AssertionError("code of a class named in the file ran")

    with official_code() as imp:
        monkeypatch.setattr(imp("model").PPNet, "__setstate__", trap, raising=False)
        monkeypatch.setattr(imp("model").PPNet, "__init__", trap)
        monkeypatch.setattr(nn.Conv2d, "__setstate__", trap)
        monkeypatch.setattr(nn.Module, "__setstate__", trap)
        obj = load_official(path)
    assert isinstance(obj, OfficialObject) and obj.official_class == "model.PPNet"
    assert obj.features.conv1.official_class == "torch.nn.modules.conv.Conv2d"
    assert torch.equal(obj.prototype_vectors, net.prototype_vectors)


def test_truncated_file_is_one_line_error(ppnet_file, tmp_path):
    _, path = ppnet_file
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read official checkpoint .*cut.pth") as err:
        convert_checkpoint(cut, "protopnet", tmp_path / "zoo.pt")
    assert "\n" not in str(err.value)


def test_wrong_arch_and_backbone_are_one_line_cli_errors(ppnet_file, tmp_path, capsys):
    _, path = ppnet_file
    assert main([str(path), "--arch", "prototree", "--out", str(tmp_path / "zoo.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.PPNet" in err and "use --arch protopnet" in err
    assert main([str(path), "--arch", "protopnet", "--backbone", "resnet34", "--out", str(tmp_path / "zoo.pt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit zoo backbone 'resnet34'" in err and "layer1.2" in err
    assert main([str(path), "--arch", "protopnet", "--num_classes", "5", "--out", str(tmp_path / "zoo.pt")]) == 1
    assert "has 3 classes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--arch", "protonet", "--out", str(tmp_path / "zoo.pt")])
    assert exit_.value.code == 2 and "invalid choice: 'protonet'" in capsys.readouterr().err
    assert not (tmp_path / "zoo.pt").exists()


def _activation(d):
    return -d


@pytest.mark.parametrize("change,message", [
    ("epsilon", "epsilon 1e-05 differs from the zoo's 1e-4"),
    ("callable_activation", "refusing .*test_convert._activation"),
    ("state_dict", "holds a state dict, not a pickled official model"),
])
def test_unsupported_official_variants_are_clear_errors(change, message, ppnet_file, tmp_path):
    net, _ = ppnet_file
    path = tmp_path / "variant.pth"
    with official_code():
        if change == "state_dict":
            torch.save(net.state_dict(), path)
        else:
            attr, value = ("epsilon", 1e-5) if change == "epsilon" else ("prototype_activation_function", _activation)
            old = getattr(net, attr)
            setattr(net, attr, value)
            try:
                torch.save(net, path)
            finally:
                setattr(net, attr, old)
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(path, "protopnet", tmp_path / "zoo.pt")


def test_command_line_entry_point(ppnet_file, tmp_path, monkeypatch, capsys):
    """``python -m models.convert`` (run in-process with runpy, sparing a second interpreter)."""
    net, path = ppnet_file
    out = tmp_path / "zoo.pt"
    argv = ["models.convert", str(path), "--arch", "protopnet", "--backbone", "resnet18", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "models.convert")  # runpy runs a fresh copy as __main__
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("models.convert", run_name="__main__")
    assert exit_.value.code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload["class_path"] == "models.protopnet.ProtoPNet"
    assert torch.equal(payload["state_dict"]["prototype_vectors"], net.prototype_vectors)
