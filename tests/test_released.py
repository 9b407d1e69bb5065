"""Every released checkpoint in checkpoints/ loads in one line, verifies its hash, and reaches the
accuracy its manifest records on the SyntheticParts test split."""
import importlib
import json

import pytest
import torch

import models
from models.pretrained import MANIFEST

RELEASED = json.loads(MANIFEST.read_text())["checkpoints"] if MANIFEST.is_file() else {}


def test_manifest_lists_declared_entries_with_small_files():
    for name, record in RELEASED.items():
        assert name in models.list_pretrained(), f"{name} is in the manifest but not declared next to its model"
        assert record["size_bytes"] < 15e6
        assert {"command", "seed", "sha256", "metrics", "config"} <= set(record)
    assert sum(r["size_bytes"] for r in RELEASED.values()) < 130e6  # eighteen releases (nine at 128 px); each under 15 MB


def test_releases_record_the_overlays_they_were_trained_with():
    for name, record in RELEASED.items():
        entry = models.pretrained_entry(name)
        assert record.get("overlays", []) == list(entry.overlays), name
        flags = record["command"].split()
        configs = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--config"]
        assert configs == [entry.config, *entry.overlays], name
        assert [p.name for p in entry.config_files] == [c.rpartition("/")[2] for c in configs]
        if "configs/overlays/synthparts_128.yaml" in entry.overlays:
            assert record["data"]["init_args"]["image_size"] == 128 and entry.tag == "synthparts128", name


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_checkpoint_reaches_its_manifest_accuracy(name):
    record = RELEASED[name]
    model = models.load_pretrained(name)  # verifies the sha256 against the manifest
    assert not model.training
    module_name, _, cls_name = record["data"]["class_path"].rpartition(".")
    data = getattr(importlib.import_module(module_name), cls_name)(**record["data"]["init_args"])
    correct = total = 0
    with torch.no_grad():
        for batch in data.test_dataloader():
            correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    assert abs(correct / total - record["metrics"]["test_acc"]) <= 0.005


def _is_prototype_model(class_path: str) -> bool:
    from models.prototype_model import PrototypeModel

    module_name, _, cls_name = class_path.rpartition(".")
    return issubclass(getattr(importlib.import_module(module_name), cls_name), PrototypeModel)


PROTOTYPE_RELEASES = [n for n in sorted(RELEASED) if _is_prototype_model(RELEASED[n]["class_path"])]


@pytest.mark.parametrize("name", PROTOTYPE_RELEASES)
def test_every_released_prototype_is_a_training_patch_with_its_records(name):
    """What is released is what the recipe ends with: each active prototype's records name a real push-set
    patch, of a class it may take, nearest to the prototype (under its push distance) in that image, and
    boxes and patch are that patch's. Where the push moves prototypes (a squared L2 search: ProtoPNet, ...)
    the prototype is (to 1e-5) that latent patch; channel prototypes (PIP-Net) are not moved and their
    record is the top patch of their top image, their distance the negated score there."""
    from models.prototypes import SQUARED_L2, crop_patches, receptive_field_boxes

    record = RELEASED[name]
    model = models.load_pretrained(name)
    module_name, _, cls_name = record["data"]["class_path"].rpartition(".")
    data = getattr(importlib.import_module(module_name), cls_name)(**record["data"]["init_args"])
    data.setup("fit")
    push_set = data.push_dataloader().dataset
    active = model.prototype_active().nonzero().squeeze(1)
    sources = model.prototype_source_index[active]
    assert (sources >= 0).all(), f"{name}: prototypes {active[sources < 0].tolist()} were never pushed"
    unique, inverse = torch.unique(sources, return_inverse=True)
    items = [push_set[int(i)] for i in unique]
    assert all(int(item["index"]) == int(i) for item, i in zip(items, unique))
    images = torch.stack([item["image"] for item in items]).float()
    labels = torch.tensor([int(item["label"]) for item in items])
    with torch.no_grad(), model.push_latent() as latent:
        z = latent(images)
    size = tuple(images.shape[-2:])
    assert tuple(model.prototype_image_size.tolist()) == size
    vectors, allowed = model.prototype_tensor().detach(), model.push_classes()
    positions = model.prototype_position[active]
    rf = receptive_field_boxes(model.receptive_field(size[0]), model.receptive_field(size[1]), positions)
    for n, j in enumerate(active.tolist()):
        r, c = positions[n].tolist()
        assert allowed is None or bool(allowed[j, labels[inverse[n]]]), (name, j)
        own = model.push_distance.paired(z[inverse[n]][None].clone(), vectors[j][None])
        assert float(own[0, r, c]) <= float(own.min()) + 1e-6, (name, j)  # the nearest patch of its source image
        if model.push_distance is SQUARED_L2:
            assert torch.allclose(z[inverse[n], :, r, c], vectors[j], atol=1e-5), (name, j)
        else:
            assert float(own[0, r, c]) == pytest.approx(float(model.prototype_distance[j]), abs=1e-5), (name, j)
        box = model.push_boxes(model.similarity(own), size)
        assert model.prototype_box[j].tolist() == box[0].tolist(), (name, j)
        assert model.prototype_rf_box[j].tolist() == rf[n].tolist(), (name, j)
        patch = crop_patches(images, inverse[n:n + 1], box, model.patch_size)[0]
        assert (patch.int() - model.prototype_patch[j].int()).abs().max() <= 1, (name, j)
