"""Concept bottleneck models: what each training mode trains and feeds, the joint loss, test-time
intervention and its curve, the explanation, per-concept accuracy, SyntheticParts' concepts and CUB's
attribute filter and class-level majority vote."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from explain.interventions import intervention_curve, random_group_orders
from explain.posthoc import attribute
from models.cbm import ConceptBottleneck
from models.phases import EpochPlan
from train.data import CUB200, SyntheticParts
from train.synthetic import NUM_VARIANTS, PART_NAMES

GROUPS = [0, 0, 1, 1, 2, 2]


def tiny(mode: str = "joint", **kw) -> ConceptBottleneck:
    torch.manual_seed(0)
    kw.setdefault("concept_epochs", 0 if mode == "joint" else 1)
    return models.create_model("cbm_test_resnet", num_classes=4, num_concepts=6, concept_groups=GROUPS, mode=mode, **kw)


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g), torch.randint(0, 2, (n, 6), generator=g).float()


def enter(model: ConceptBottleneck, phase: str) -> None:
    model.plan = lambda epoch=None: EpochPlan(phase, 0)  # what the phase callback reads at that epoch
    model.enter_phase(model.plan())
    model.train()


def grads(model: ConceptBottleneck, images, labels, concepts) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model.compute_losses(images, labels, concepts)[1]["loss"].backward()
    return {"trunk": model.backbone.body.stem_conv1.weight.grad if hasattr(model.backbone.body, "stem_conv1")
            else next(model.backbone.parameters()).grad,
            "concept_layer": model.concept_layer.weight.grad, "predictor": model.predictor.weight.grad}


def bce_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Mean over the batch of -[c log s + (1 - c) log(1 - s)], one concept at a time."""
    out = []
    for j in range(logits.shape[1]):
        terms = [-(c * math.log(1 / (1 + math.exp(-l))) + (1 - c) * math.log(1 - 1 / (1 + math.exp(-l))))
                 for l, c in zip(logits[:, j].tolist(), targets[:, j].tolist())]
        out.append(sum(terms) / len(terms))
    return out


# ------------------------------------------------------------------------------------------ training modes
def test_joint_loss_is_task_plus_lambda_concepts_over_its_normaliser():
    model = tiny("joint", concept_loss_weight=0.3).eval()
    images, labels, concepts = batch()
    model.concept_weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0]))
    _, losses = model.compute_losses(images, labels, concepts)
    with torch.no_grad():
        concept_logits = model.concept_logits(images)
        ce = F.cross_entropy(model.predictor(concept_logits), labels).item()  # joint feeds f the logits
    concept = sum(w * b for w, b in zip(model.concept_weight.tolist(), bce_by_hand(concept_logits, concepts)))
    assert losses["concept_loss"].item() == pytest.approx(concept, rel=1e-5)
    assert losses["loss"].item() == pytest.approx((ce + 0.3 * concept) / (1 + 0.3 * 6), rel=1e-5)
    unnormalised = tiny("joint", concept_loss_weight=0.3, normalize_loss=False).eval()
    unnormalised.load_state_dict(model.state_dict())
    assert unnormalised.compute_losses(images, labels, concepts)[1]["loss"].item() == pytest.approx(ce + 0.3 * concept, rel=1e-5)
    g = grads(tiny("joint").train(), images, labels, concepts)
    assert all(v is not None and v.abs().sum() > 0 for v in g.values())  # joint trains everything


def test_sequential_trains_g_on_concepts_then_f_on_predicted_logits():
    model = tiny("sequential")
    images, labels, concepts = batch()
    assert [model.plan(e).phase for e in (0, 1, 5)] == ["concepts", "predictor", "predictor"]
    enter(model, "concepts")
    g = grads(model, images, labels, concepts)
    assert g["predictor"] is None and g["trunk"].abs().sum() > 0 and g["concept_layer"].abs().sum() > 0
    _, losses = model.compute_losses(images, labels, concepts)
    assert losses["loss"].item() == pytest.approx(sum(bce_by_hand(model.concept_logits(images).detach(), concepts)) / 6,
                                                  rel=1e-4)
    enter(model, "predictor")
    assert not model.backbone.training and not model.dropout.training and model.predictor.training
    assert not any(p.requires_grad for p in model.parameter_groups()["concepts"])
    seen = []
    hook = model.predictor.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    g = grads(model, images, labels, concepts)
    hook.remove()
    with torch.no_grad():
        predicted = model.concept_logits(images)  # g in eval mode, as the extracted x -> c model
    assert all(torch.allclose(x, predicted, atol=1e-6) for x in seen)  # f reads g's logits, never the truth
    assert g["trunk"] is None and g["concept_layer"] is None
    reference = model.predictor.weight.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(F.linear(predicted, reference, model.predictor.bias), labels), reference)
    assert torch.allclose(g["predictor"], expected, atol=1e-6)


def test_independent_trains_f_on_true_concepts_and_tests_on_probabilities():
    model = tiny("independent")
    assert model.use_sigmoid
    with pytest.raises(ValueError, match="independent"):
        tiny("independent", use_sigmoid=False)
    images, labels, concepts = batch()
    enter(model, "concepts")
    g = grads(model, images, labels, concepts)
    assert g["predictor"] is None and g["trunk"].abs().sum() > 0  # the x -> c stage trains g alone
    # g's gradient is that of the concept loss alone: the same whatever the class labels
    g_other = grads(model, images, (labels + 1) % 4, concepts)
    assert torch.allclose(g["trunk"], g_other["trunk"]) and torch.allclose(g["concept_layer"], g_other["concept_layer"])
    enter(model, "predictor")
    g = grads(model, images, labels, concepts)
    assert g["trunk"] is None and g["concept_layer"] is None
    # f's gradient is that of CE(f(c_true)): the same whatever the images
    g_noise = grads(model, torch.rand_like(images), labels, concepts)
    assert torch.allclose(g["predictor"], g_noise["predictor"])
    reference = model.predictor.weight.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(F.linear(concepts, reference, model.predictor.bias), labels), reference)
    assert torch.allclose(g["predictor"], expected, atol=1e-6)
    model.eval()
    with torch.no_grad():  # at test time f reads sigmoid(l)
        assert torch.allclose(model(images), model.predictor(torch.sigmoid(model.concept_logits(images))), atol=1e-6)


def test_bad_arguments_and_batches_fail_in_one_line():
    with pytest.raises(ValueError, match="concept_epochs"):
        tiny("sequential", concept_epochs=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        tiny("both")
    with pytest.raises(ValueError, match="concept_groups"):
        models.create_model("cbm_test_resnet", num_classes=4, num_concepts=6, concept_groups=[0, 1])
    import types

    model = tiny()
    model._trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(concept_groups=[0, 0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"concept_groups differ from the data's .*\[0, 0, 0, 1, 1, 2\]"):
        model.setup("fit")
    model._trainer.datamodule.concept_groups = [5, 5, 7, 7, 1, 1]  # the same partition, other ids: accepted
    model.setup("fit")
    images, labels, _ = batch()
    with pytest.raises(ValueError, match="needs 'concepts'"):
        tiny().batch_losses({"image": images, "label": labels}, "train")
    with pytest.raises(ValueError, match=r"concepts must be \(B, 6\)"):
        tiny().compute_losses(images, labels, torch.zeros(6, 5))


# ------------------------------------------------------------------------------------------ intervention
def test_intervening_on_every_group_is_the_predictor_on_true_concepts():
    images, _, concepts = batch(8)
    everything = torch.ones(8, 3, dtype=torch.bool)
    independent = tiny("independent").eval()
    with torch.no_grad():
        logits = independent.concept_logits(images)
        assert torch.allclose(independent.intervene(logits, concepts, everything), independent.predictor(concepts))
        nothing = torch.zeros_like(everything)
        assert torch.allclose(independent.intervene(logits, concepts, nothing), independent.predict_from_concepts(logits))
        joint = tiny("joint").eval()  # f reads logits: 0 / 1 become the 5th / 95th percentile of each concept's logits
        logits = joint.concept_logits(images)
        sorted_logits = logits.sort(0).values
        position = 0.05 * 7  # np.percentile's linear rule over 8 values
        low = sorted_logits[0] + position * (sorted_logits[1] - sorted_logits[0])
        high = sorted_logits[6] + (0.95 * 7 - 6) * (sorted_logits[7] - sorted_logits[6])
        truth = torch.where(concepts > 0.5, high, low)
        assert torch.allclose(joint.intervene(logits, concepts, everything), joint.predictor(truth), atol=1e-6)
        one = torch.tensor([[False, True, False]] * 8)  # only group 1 = concepts 2, 3
        mixed = logits.clone()
        mixed[:, 2:4] = truth[:, 2:4]
        assert torch.allclose(joint.intervene(logits, concepts, one), joint.predictor(mixed), atol=1e-6)


def test_random_group_orders_are_permutations():
    rank = random_group_orders(50, 4, torch.Generator().manual_seed(0))
    assert (rank.sort(1).values == torch.arange(4)).all()
    assert len({tuple(r) for r in rank.tolist()}) > 5  # each image its own order


def test_intervention_curve_is_monotone_where_every_replaced_group_can_only_help():
    """Classes are combinations of one variant per group, f scores +1 per matching group and -1 per other:
    replacing a group's prediction by the truth never lowers the true class's margin over any class, so
    with nested random orders every image's correctness, and each trial's accuracy, can only rise, to 1."""
    model = models.create_model("cbm_test_resnet", num_classes=8, num_concepts=6, concept_groups=GROUPS,
                                mode="independent", concept_epochs=1).eval()
    classes = torch.tensor([[(c >> g) & 1 for g in range(3)] for c in range(8)])  # variant per group
    code = F.one_hot(classes, 2).flatten(1).float()  # (8 classes, 6 concepts)
    with torch.no_grad():
        model.predictor.weight.copy_(2 * code - 1)
        model.predictor.bias.zero_()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 8, (200,), generator=g)
    wrong = classes[torch.randint(0, 8, (200,), generator=g)]  # the predicted variants: another class's, mostly
    concept_logits = 20 * (2 * F.one_hot(wrong, 2).flatten(1).float() - 1)
    curve = intervention_curve(model, concept_logits, code[labels], labels, trials=3, seed=0)
    assert curve["groups"] == [0, 1, 2, 3]
    for trial in curve["accuracy_trials"]:
        assert all(b >= a for a, b in zip(trial, trial[1:])), trial
        assert trial[-1] == 1.0 and trial[0] < 0.3
    assert curve["accuracy"] == [max(t[n] for t in curve["accuracy_trials"]) for n in range(4)]
    assert curve["accuracy_mean"][0] == pytest.approx(curve["accuracy"][0])  # no intervention: no randomness


# ------------------------------------------------------------------------------------------ explanation
def test_explain_contributions_and_heatmap_are_gradcam_through_the_bottleneck():
    images, _, _ = batch(3)
    for model in (tiny("joint").eval(), tiny("independent").eval()):
        e = model.explain(images)
        ev = e.evidence
        assert ev["concepts"].shape == (3, 6) and ev["concept_maps"].shape == (3, 6, 32, 32)
        assert torch.allclose(ev["contributions"].sum(1) + model.predictor.bias[e.target],
                              e.logits.gather(1, e.target[:, None])[:, 0], atol=1e-5)
        # reference: Grad-CAM of the target class logit at the trunk output by autograd (before its ReLU)
        feats = []
        hook = model.backbone.register_forward_hook(lambda m, i, o: feats.append(o))
        x = images.clone().requires_grad_(True)
        score = model(x).gather(1, e.target[:, None]).sum()
        hook.remove()
        (grad,) = torch.autograd.grad(score, feats[0])
        h, w = feats[0].shape[-2:]
        cam = (grad.mean(dim=(2, 3), keepdim=True) * feats[0]).sum(1, keepdim=True).detach()
        reference = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
        assert torch.allclose(e.heatmap / (h * w), reference, atol=1e-5)


def test_explain_takes_any_posthoc_method_on_the_concept_logit():
    model = tiny("joint").eval()
    images, _, _ = batch(2)
    e = model.explain(images, target=1, attribution=functools.partial(attribute, method="saliency"))
    for j in range(6):
        expected = attribute(model.concept_logit_model(), images, j, method="saliency")
        assert torch.allclose(e.evidence["concept_maps"][:, j], expected, atol=1e-6)
    assert (e.target == 1).all()
    assert torch.allclose(e.heatmap, torch.einsum("bk,bkhw->bhw", model.predictor.weight[e.target], e.evidence["concept_maps"]),
                          atol=1e-6)
    intrinsic = attribute(model, images, 1, method="intrinsic")  # what train.compare scores
    assert torch.allclose(intrinsic, model.explain(images, 1).heatmap)


# ------------------------------------------------------------------------------------------ data and logging
def test_synthetic_concepts_are_the_class_part_variants():
    dm = SyntheticParts(image_size=32, train_size=20, val_size=10, test_size=10, batch_size=10)
    assert len(dm.concept_names) == len(PART_NAMES) * NUM_VARIANTS and dm.concept_groups[:6] == [0] * 5 + [1]
    dm.setup("fit")
    b = next(iter(dm.val_dataloader()))
    for concepts, label in zip(b["concepts"], b["label"].tolist()):
        variants = dm.generator.class_variants[label]
        on = [s * NUM_VARIANTS + int(v) for s, v in enumerate(variants)]
        assert concepts.nonzero().flatten().tolist() == on
    positives, total = dm.concept_positive_counts()
    labels = [dm.generator.label_of(i) for i in range(20)]
    assert total == 20 and positives[0] == sum(dm.generator.class_variants[c][0] == 0 for c in labels)


def test_concept_accuracy_is_logged_per_concept_and_weights_come_from_the_data():
    dm = SyntheticParts(image_size=32, train_size=16, val_size=8, test_size=8, batch_size=8)
    model = models.create_model("cbm_test_resnet", num_classes=10, num_concepts=20, concept_groups=dm.concept_groups,
                                concept_names=dm.concept_names, weighted_loss=True)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    positives, total = dm.concept_positive_counts()
    assert torch.allclose(model.concept_weight, total / torch.tensor(positives).clamp_min(1) - 1)
    model.eval()
    val = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        predicted = torch.sigmoid(model.concept_logits(val["image"])) >= 0.5
    per_concept = (predicted == val["concepts"].bool()).float().mean(0)
    logged = trainer.callback_metrics
    for j, name in enumerate(dm.concept_names):
        assert logged[f"val/concept_acc/{name}"].item() == pytest.approx(per_concept[j].item(), abs=1e-6)
    assert logged["val/concept_acc"].item() == pytest.approx(per_concept.mean().item(), abs=1e-6)


def _write_cub_attributes(root: Path, num_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """attributes.txt (names in runs of 3 sharing their first 10 characters) and image_attribute_labels.txt."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=(num_images, 312))
    certainties = rng.integers(1, 5, size=(num_images, 312))
    names = [f"has_p{g // 3:03d}::value{g % 3}" for g in range(312)]  # "has_p007::" is the 10-char prefix
    (root / "attributes").mkdir(exist_ok=True)
    (root.parent / "attributes.txt").write_text("".join(f"{a + 1} {n}\n" for a, n in enumerate(names)))
    lines = [f"{i + 1} {a + 1} {labels[i, a]} {certainties[i, a]} {rng.uniform(0, 20):.3f}" + (" 0" if a == 7 else "")
             for i in range(num_images) for a in range(312)]  # a few lines carry an extra field, as the official file
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    return labels, certainties, names


def test_cub_attributes_filter_and_class_majority_vote_by_hand(tmp_path):
    from test_data import make_cub

    root = tmp_path / "CUB_200_2011"
    truth = make_cub(root, classes=3, per_class=6)
    labels, certainties, names = _write_cub_attributes(root, 18)
    dm = CUB200(str(root), image_size=16, batch_size=4, attributes="recomputed", min_class_count=2)
    table = dm.concept_table()
    # by hand, one (class, attribute) at a time over the train images
    train_ids = truth["train"]
    majority = np.zeros((3, 312), dtype=int)
    for c in range(3):
        for a in range(312):
            ones = zeros = 0
            for i in train_ids:
                if truth["labels"][i] != c:
                    continue
                if labels[i - 1, a] == 1:
                    ones += 1
                elif certainties[i - 1, a] != 1:  # a 0 that is "not visible" does not vote
                    zeros += 1
            majority[c, a] = 1 if ones >= zeros else 0  # ties (and no votes) -> 1
    kept = [a for a in range(312) if majority[:, a].sum() >= 2]
    assert table["indices"].tolist() == kept
    assert (table["class_concepts"] == majority[:, kept]).all()
    assert dm.concept_names == [names[a] for a in kept]
    prefixes = list(dict.fromkeys(names[a][:10] for a in kept))
    assert dm.concept_groups == [prefixes.index(names[a][:10]) for a in kept]
    dm.setup("fit")
    b = next(iter(dm.test_dataloader()))  # every split takes its class's vector
    assert torch.equal(b["concepts"], torch.tensor(majority[:, kept][b["label"].numpy()], dtype=torch.float32))
    published = CUB200(str(root), image_size=16, attributes="published").concept_table()
    assert len(published["indices"]) == 112 and published["indices"][7] == 20  # has_wing_color::black
    assert (published["class_concepts"] == majority[:, published["indices"]]).all()
    with pytest.raises(ValueError, match="attributes must be"):
        CUB200(str(root), attributes="all")


def test_cub_attribute_file_errors_name_file_and_line(tmp_path):
    from test_data import make_cub
    from train.data import DataFormatError

    root = tmp_path / "CUB_200_2011"
    make_cub(root)
    _write_cub_attributes(root, 12)
    path = root / "attributes" / "image_attribute_labels.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["1 4 2 3 1.0"] + lines[4:]) + "\n")
    with pytest.raises(DataFormatError, match=r"image_attribute_labels.txt:4: expected attribute"):
        CUB200(str(root), attributes="published").concept_table()
    path.write_text("\n".join(lines[:10 * 312 + 311] + lines[11 * 312:]) + "\n")  # image 11 (train), attribute 312
    with pytest.raises(DataFormatError, match="no entry for image 11, attribute 312"):
        CUB200(str(root), attributes="published").concept_table()


# ------------------------------------------------------------------------------------------ applications
SYNTH = {"num_classes": 10, "image_size": 32, "seed": 0, "test_size": 12}


def _run_checkpoint(tmp_path: Path) -> tuple[ConceptBottleneck, Path]:
    """A small joint CBM saved as train.py saves it, in a run folder whose config.yaml holds the data recipe."""
    import yaml

    dm = SyntheticParts(**SYNTH)
    torch.manual_seed(0)
    model = models.create_model("cbm_test_resnet", num_classes=10, num_concepts=20, concept_groups=dm.concept_groups,
                                concept_names=dm.concept_names)
    run = tmp_path / "runs" / "tiny_cbm" / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    path = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "zoo_class_path": "models.cbm.ConceptBottleneck"}, path)
    config = {"data": {"class_path": "train.data.SyntheticParts", "init_args": SYNTH}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return model.eval(), path


def test_intervene_command_writes_the_curve_of_the_checkpoint(tmp_path):
    from explain.interventions import concept_outputs
    from train.apps import load_synthetic
    from train.intervene import main

    model, path = _run_checkpoint(tmp_path)
    out = tmp_path / "out"
    curves = main(["--checkpoint", f"joint={path}", "--num-images", "12", "--trials", "2", "--device", "cpu", "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"curves.csv", "table.md", "intervention.png"}
    data = load_synthetic(SYNTH, 12)
    expected = intervention_curve(model, concept_outputs(model, data["image"]), data["concepts"], data["label"], trials=2)
    assert curves["joint"] == expected and len(expected["groups"]) == 5  # 0..4 part slots
    assert "| joint |" in (out / "table.md").read_text()
    with pytest.raises(ValueError, match="no concepts to intervene on"):
        main(["--checkpoint", "cam_resnet18.synthparts", "--out", str(out)])


def test_compare_scores_its_own_explanation_and_the_report_draws_its_concepts(tmp_path):
    from explain.report import model_figures
    from train.compare import main as compare

    model, path = _run_checkpoint(tmp_path)
    summary = compare(["--checkpoint", f"cbm={path}", "--methods", "intrinsic", "gradcam", "--metrics", "deletion",
                       "pointing_game", "--num-images", "2", "--device", "cpu", "--out", str(tmp_path / "cmp")])
    assert {(s["method"], s["metric"]) for s in summary} >= {("intrinsic", "deletion"), ("gradcam", "pointing_game")}
    images = torch.rand(2, 3, 32, 32)
    captions = [c for c, _ in model_figures(model, images, torch.tensor([0, 1]), num_images=2)]
    assert any("through its concepts" in c for c in captions)


@pytest.mark.parametrize("recipe", ["cub_joint", "cub_sequential", "cub_independent", "synthetic"])
def test_recipes_build_the_papers_model(recipe):
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "cbm" / f"{recipe}.yaml").read_text())
    args = dict(config["model"]["init_args"], backbone="test_resnet", pretrained_backbone=False)
    model = ConceptBottleneck(**args)
    assert model.num_groups == (28 if recipe.startswith("cub") else 4)
    if recipe.startswith("cub"):  # the official effective input normalisation: sigma_c (x - 0.5) + 2 mu_c - 1
        x = torch.rand(1, 3, 4, 4)
        mu, sigma = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        assert torch.allclose(model.normalize(x), sigma * (x - 0.5) + 2 * mu - 1, atol=1e-4)
        assert config["data"]["init_args"]["attributes"] == "published" and config["model"]["init_args"]["weighted_loss"]
    total = config["trainer"]["max_epochs"]
    assert {model.plan(e).phase for e in range(total)} == ({"joint"} if args["mode"] == "joint" else {"concepts", "predictor"})


@pytest.mark.slow
def test_synthetic_recipe_reaches_90_percent_with_accurate_concepts(tmp_path):
    from train.cli import main

    cli = main(["fit", "--config", "configs/cbm/synthetic.yaml", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--runs_root", str(tmp_path), "--name", "cbm"])
    metrics = cli.trainer.callback_metrics  # after test_after_fit: the best checkpoint on the test split
    assert metrics["test/acc"] >= 0.9 and metrics["test/concept_acc"] >= 0.9
