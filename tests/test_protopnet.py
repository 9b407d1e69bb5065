"""ProtoPNet: forward maths, losses by hand, push records, explanations, schedule, phases, pruning."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import ProtoPNet, ProtoPNetEnsemble, create_model, list_models
from models.protopnet import protopnet_schedule


def _model(**kw):
    torch.manual_seed(0)
    kw = {"num_classes": 3, "stage": 2, **kw}  # test_resnet cut at stage 2: 4x4 latent maps at 32 px
    return create_model("protopnet_test_resnet", **kw).eval()


def _data(n=12, k=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    labels = torch.arange(n) % k
    return images, labels


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def _loader(images, labels, batch_size=5):
    return torch.utils.data.DataLoader(_Dataset(images, labels), batch_size=batch_size)


# ------------------------------------------------------------------------------------ architecture
def test_builders_and_paper_dimensions():
    assert {"protopnet_vgg19", "protopnet_resnet34", "protopnet_densenet121", "protopnet_resnet18",
            "protopnet_test_resnet"} <= set(list_models("protopnet_*"))
    m = _model()
    assert m.prototype_vectors.shape == (6, 16, 1, 1) and isinstance(m.prototype_vectors, torch.nn.Parameter)
    assert m.last_layer.bias is None and m.last_layer.weight.shape == (3, 6)
    # identity: prototypes ordered by class; last layer 1 to the own class, -0.5 elsewhere
    assert m.prototype_class_identity.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert torch.equal(m.last_layer.weight, torch.where(m.prototype_class_identity.T.bool(), 1.0, -0.5))
    assert isinstance(m.add_on[-1], torch.nn.Sigmoid)
    assert ((m.prototype_vectors >= 0) & (m.prototype_vectors < 1)).all()  # U[0, 1)


@pytest.mark.parametrize("builder, rf, dim", [("protopnet_vgg19", 268, 128), ("protopnet_resnet34", 899, 256)])
def test_paper_backbones_receptive_field_at_224(builder, rf, dim):
    m = create_model(builder, num_classes=2, prototypes_per_class=1)
    field = m.receptive_field(224)
    assert (field.size, field.jump, field.rf) == (7, 32, rf)
    assert m.prototype_vectors.shape[1] == dim


def test_bottleneck_add_on_halves_down_to_dim():
    m = _model(add_on="bottleneck", prototype_dim=8)  # 48 trunk channels -> 24 -> 12 -> 8
    convs = [(c.in_channels, c.out_channels) for c in m.add_on if isinstance(c, torch.nn.Conv2d)]
    assert convs == [(48, 24), (24, 24), (24, 12), (12, 12), (12, 8), (8, 8)]
    assert isinstance(m.add_on[-1], torch.nn.Sigmoid)
    assert sum(isinstance(a, torch.nn.Sigmoid) for a in m.add_on) == 1


def test_distances_and_forward_by_hand():
    m = _model()
    x, _ = _data(4)
    z = m.latent(x)
    d = m.distances(x)
    patches = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    ref = torch.cdist(patches.double(), m.prototype_vectors.flatten(1).double()).pow(2)
    torch.testing.assert_close(d.permute(0, 2, 3, 1).reshape(-1, 6).double(), ref, atol=1e-5, rtol=1e-5)
    logits, min_d = m.forward_with_distances(x)
    torch.testing.assert_close(min_d, d.flatten(2).min(dim=2).values)
    torch.testing.assert_close(logits, torch.log((min_d + 1) / (min_d + 1e-4)) @ m.last_layer.weight.T)
    torch.testing.assert_close(m(x), logits)
    linear = _model(similarity="linear")
    torch.testing.assert_close(linear(x), -linear.forward_with_distances(x)[1] @ linear.last_layer.weight.T)


# ------------------------------------------------------------------------------------------ losses
def test_each_loss_term_by_hand():
    m = _model(num_classes=2)  # 4 prototypes: 0, 1 of class 0; 2, 3 of class 1
    min_d = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    labels = torch.tensor([0, 1])
    t = m.prototype_losses(min_d, labels)
    assert t["cluster"].item() == pytest.approx((1 + 7) / 2)  # nearest own-class: 1 (image 0), 7 (image 1)
    assert t["separation"].item() == pytest.approx((3 + 5) / 2)  # nearest other-class: 3, 5
    assert t["avg_separation"].item() == pytest.approx(((3 + 4) / 2 + (5 + 6) / 2) / 2)
    assert t["l1"].item() == pytest.approx(4 * 0.5)  # four wrong-class weights of -0.5
    # The official max_dist trick gives the same numbers while every d <= D (= 16 here).
    own = m.prototype_class_identity[:, labels].T
    max_dist = 16.0
    official = (max_dist - ((max_dist - min_d) * own).max(dim=1).values).mean()
    assert t["cluster"].item() == pytest.approx(official.item())


def test_total_loss_uses_paper_coefficients():
    m = _model()
    assert (m.hparams.cross_entropy_weight, m.hparams.cluster_weight, m.hparams.separation_weight,
            m.hparams.l1_weight) == (1.0, 0.8, -0.08, 1e-4)
    x, y = _data(6)
    logits, terms = m.compute_losses(x, y)
    ce = (torch.logsumexp(logits, 1) - logits[torch.arange(6), y]).mean()  # by hand, not F.cross_entropy
    torch.testing.assert_close(terms["cross_entropy"], ce)
    total = ce + 0.8 * terms["cluster"] - 0.08 * terms["separation"] + 1e-4 * terms["l1"]
    torch.testing.assert_close(terms["loss"], total)


# -------------------------------------------------------------------------------------------- push
def test_push_records_and_patches():
    m = _model()
    x, y = _data(12)
    m.push(_loader(x, y), epoch=7)
    assert int(m.push_epoch) == 7
    z = m.latent(x)
    own = m.prototype_class_identity.argmax(1)
    for j in range(m.num_prototypes):
        b, (r, c) = int(m.prototype_source_index[j]), m.prototype_position[j].tolist()
        assert y[b] == own[j]
        torch.testing.assert_close(m.prototype_vectors[j, :, 0, 0], z[b, :, r, c], atol=1e-6, rtol=0)
        d_own = ((z[y == own[j]] - m.prototype_vectors[j]) ** 2).sum(1)  # prototype now sits on a patch
        assert d_own.min() < 1e-10
        rf = m.receptive_field(32)
        y0, y1, x0, x1 = rf.box(r, c)
        assert m.prototype_rf_box[j].tolist() == [x0, y0, x1, y1]
        bx0, by0, bx1, by1 = m.prototype_box[j].tolist()
        assert 0 <= bx0 < bx1 <= 32 and 0 <= by0 < by1 <= 32
    assert m.prototype_patch.dtype == torch.uint8 and m.prototype_patch.shape == (6, 3, 32, 32)
    assert (m.prototype_patch > 0).any()
    assert m.prototype_image_size.tolist() == [32, 32]


def test_push_records_equal_a_recomputation_and_do_not_depend_on_batching():
    """Boxes and patches are made while each source image is in its batch; made again afterwards from the
    dataset they are the same, for any batch size and order of the push data."""
    from models.prototypes import crop_patches, high_activation_boxes, similarity

    x, y = _data(12, size=40)
    ref = None
    for batch_size, order in ((5, torch.arange(12)), (1, torch.arange(12)), (12, torch.randperm(12, generator=torch.Generator().manual_seed(1)))):
        m = _model()
        dataset = torch.utils.data.Subset(_Dataset(x, y), order.tolist())
        m.push(torch.utils.data.DataLoader(dataset, batch_size=batch_size))
        sources = m.prototype_source_index
        maps = ((m.latent(x[sources]) - m.prototype_vectors) ** 2).sum(dim=1)  # own map on own source
        boxes = high_activation_boxes(similarity(maps), (40, 40))[0]
        assert torch.equal(m.prototype_box, boxes)
        assert torch.equal(m.prototype_patch, crop_patches(x[sources], torch.arange(6), boxes, 32))
        assert m.prototype_image_size.tolist() == [40, 40]
        state = {k: v for k, v in m.state_dict().items() if k.startswith("prototype_")}
        if ref is None:
            ref = state
        for k, v in ref.items():
            torch.testing.assert_close(state[k], v, atol=1e-6, rtol=0, msg=k)


def test_push_with_mixed_image_sizes_raises_before_changing_anything():
    m = _model(num_classes=2, prototypes_per_class=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    batches = [{"image": torch.rand(1, 3, 32, 32), "label": torch.tensor([0]), "index": torch.tensor([0])},
               {"image": torch.rand(1, 3, 30, 30), "label": torch.tensor([1]), "index": torch.tensor([1])}]
    with pytest.raises(ValueError, match="sizes"):
        m.push(batches)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_push_patch_is_the_high_activation_crop():
    # A constant-colour image makes the crop's colour known whatever the box.
    m = _model(num_classes=2, prototypes_per_class=1)
    x = torch.stack([torch.full((3, 32, 32), 0.2), torch.full((3, 32, 32), 0.6)])
    m.push(_loader(x, torch.tensor([0, 1])))
    assert (m.prototype_patch[0] == 51).all() and (m.prototype_patch[1] == 153).all()


def test_push_without_a_class_raises_before_changing_anything():
    m = _model()
    x, y = _data(12)
    keep = y != 2
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"no image of class\(es\) \[2\]"):
        m.push(_loader(x[keep], y[keep]))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_alone_restores_prototype_records():
    m = _model()
    x, y = _data(12)
    m.push(_loader(x, y))
    fresh = _model()
    fresh.load_state_dict(m.state_dict())
    for name in ("prototype_patch", "prototype_box", "prototype_rf_box", "prototype_source_index", "prototype_position"):
        assert torch.equal(getattr(fresh, name), getattr(m, name))
    from explain.viz import prototype_gallery

    fig = prototype_gallery(fresh)
    assert len([a for a in fig.axes if a.images]) == 6


# ------------------------------------------------------------------------------------- explanation
def test_explain_top_k_heatmap_and_contributions():
    m = _model()
    x, y = _data(12)
    m.push(_loader(x, y))
    e = m.explain(x[:4], top_k=6)
    sims = torch.log((m.forward_with_distances(x[:4])[1] + 1) / (m.forward_with_distances(x[:4])[1] + 1e-4))
    ev = e.evidence
    assert torch.equal(e.target, e.logits.argmax(1))
    assert (ev["similarity"][:, :-1] >= ev["similarity"][:, 1:]).all()  # sorted, most activated first
    torch.testing.assert_close(ev["similarity"], sims.gather(1, ev["prototype_ids"]))
    torch.testing.assert_close(ev["contribution"], ev["similarity"] * ev["weight"])
    # With all prototypes, the contributions add up to the explained logit.
    torch.testing.assert_close(ev["contribution"].sum(1), e.logits.gather(1, e.target[:, None])[:, 0])
    # Heatmap by hand: weighted sum of the upsampled maps of the target class's prototypes.
    d = m.distances(x[:4])
    for i in range(4):
        c = int(e.target[i])
        ref = torch.zeros(32, 32)
        for j in (2 * c, 2 * c + 1):
            up = F.interpolate(torch.log((d[i, j] + 1) / (d[i, j] + 1e-4))[None, None], size=(32, 32),
                               mode="bicubic", align_corners=False)[0, 0]
            ref += m.last_layer.weight[c, j] * up
        torch.testing.assert_close(e.heatmap[i], ref, atol=1e-4, rtol=1e-4)
    assert ev["prototype_patch"].shape == (4, 6, 3, 32, 32) and ev["activation_map"].shape == (4, 6, 32, 32)
    assert ev["box"].shape == (4, 6, 4) and ev["boxes"].shape == (4, 4)
    forced = m.explain(x[:2], target=1, top_k=2)
    assert forced.target.tolist() == [1, 1] and forced.evidence["prototype_ids"].shape == (2, 2)


# ---------------------------------------------------------------------------------- phases, lr, bn
def test_official_schedule_table():
    # Defaults: warm 0-4, joint 5-10, push after official epoch 10 then 20 last-layer epochs (11-30),
    # official epoch 11 is Lightning epoch 31, the next push after official 20 (Lightning 40).
    plan = [protopnet_schedule(e) for e in range(62)]
    assert [p.phase for p in plan[:5]] == ["warm"] * 5
    assert [p.phase for p in plan[5:11]] == ["joint"] * 6
    assert [p.phase for p in plan[11:31]] == ["last"] * 20 and plan[11].push and not plan[12].push
    assert (plan[31].phase, plan[31].epoch) == ("joint", 11)
    assert (plan[40].epoch, plan[41].phase, plan[41].push) == (20, "last", True)
    assert [e for e, p in enumerate(plan) if p.push] == [11, 41]
    # num_train_epochs=11: after the last-layer epochs of the push at 10, last layer only.
    assert [protopnet_schedule(e, num_train_epochs=11).phase for e in (30, 31, 99)] == ["last"] * 3
    with pytest.raises(ValueError, match="must end with a push epoch"):
        _model(num_train_epochs=12)
    assert _model(num_train_epochs=31).schedule_length() == 31 + 3 * 20


def test_joint_lr_follows_official_scheduler_offset():
    m = _model()
    # StepLR(5, 0.1) stepped before each joint epoch: official epochs 5-8 x1, 9-13 x0.1, 14-18 x0.01.
    factors = [m._lr_factor(protopnet_schedule(e).joint_epochs) for e in range(5, 11)]
    assert factors == pytest.approx([1, 1, 1, 1, 0.1, 0.1])
    assert m._lr_factor(protopnet_schedule(31).joint_epochs) == pytest.approx(0.1)  # official epoch 11
    assert m._lr_factor(10) == pytest.approx(0.01)  # official epoch 14
    corrected = _model(official_lr_offset=False)
    assert corrected._lr_factor(5) == 1 and corrected._lr_factor(6) == pytest.approx(0.1)


def _trainable(m):
    return {n.split(".")[0] if not n.startswith("prototype") else "prototypes"
            for n, p in m.named_parameters() if p.requires_grad}


def test_phase_switching_freezes_exactly_the_right_parameters():
    m = _model()
    m.set_phase("warm")
    assert _trainable(m) == {"add_on", "prototypes"}
    m.set_phase("joint")
    assert _trainable(m) == {"backbone", "add_on", "prototypes"}
    m.set_phase("last")
    assert _trainable(m) == {"last_layer"}
    with pytest.raises(ValueError, match="unknown phase 'push'"):
        m.set_phase("push")
    # The optimisers hold the official groups: the last layer is in neither warm nor joint.
    warm, joint, last = m.configure_optimizers()
    ids = lambda opt: {id(p) for g in opt.param_groups for p in g["params"]}  # noqa: E731
    assert ids(warm) == {id(p) for p in [*m.add_on.parameters(), m.prototype_vectors]}
    assert ids(joint) == {id(p) for p in [*m.backbone.parameters(), *m.add_on.parameters(), m.prototype_vectors]}
    assert ids(last) == {id(m.last_layer.weight)}
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in joint.param_groups}
    assert lrs == {"backbone": (1e-4, 1e-3), "add_on": (3e-3, 1e-3), "prototypes": (3e-3, 0)}


def test_bn_statistics_follow_official_unless_frozen():
    official, frozen = _model(), _model(freeze_bn_stats=True)
    for m in (official, frozen):
        m.train()
        m.set_phase("warm")
    bn = lambda m: [x.training for x in m.backbone.modules() if isinstance(x, torch.nn.BatchNorm2d)]  # noqa: E731
    assert all(bn(official)) and bn(official)
    assert not any(bn(frozen))
    frozen.set_phase("joint")
    assert all(bn(frozen))


# ------------------------------------------------------------------------------ pruning, ensemble
def test_pruning_by_nearest_patch_classes():
    m = _model()
    x, y = _data(12)
    loader = _loader(x, y)
    m.push(loader)
    k, tau = 4, 3
    # Brute force: k nearest images by nearest patch, ties to the smaller index.
    per_image = m.distances(x).flatten(2).amin(2)  # (N, P)
    expected = []
    for j in range(m.num_prototypes):
        order = np.lexsort((np.arange(12), per_image[:, j].detach().numpy()))[:k]
        if (y[order] == j // 2).sum() < tau:
            expected.append(j)
    pruned = m.prune(loader, k=k, threshold=tau)
    assert pruned.tolist() == expected
    keep = m.prototype_mask
    assert (m.last_layer.weight[:, ~keep] == 0).all()
    # Masked logits equal those of a model with the pruned prototypes sliced out.
    min_d = m.forward_with_distances(x)[1][:, keep]
    sliced = torch.log((min_d + 1) / (min_d + 1e-4)) @ m.last_layer.weight[:, keep].T
    torch.testing.assert_close(m(x), sliced)
    assert (~torch.isin(m.explain(x[:2], top_k=20).evidence["prototype_ids"], torch.nonzero(~keep))).all()


def test_ensemble_sums_logits():
    a, b = _model(), _model(similarity="linear")
    x, _ = _data(3)
    ens = ProtoPNetEnsemble([a, b])
    torch.testing.assert_close(ens(x), a(x) + b(x))
    with pytest.raises(ValueError, match="disagree on num_classes"):
        ProtoPNetEnsemble([a, _model(num_classes=4)])


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown add_on 'wide'"):
        _model(add_on="wide")
    with pytest.raises(ValueError, match="unknown similarity 'cos'"):
        _model(similarity="cos")
    with pytest.raises(ValueError, match="num_classes >= 2"):
        _model(num_classes=1)
    with pytest.raises(ValueError, match="not group_lr"):
        _model(group_lr={"backbone": 1.0}).configure_optimizers()


@pytest.mark.parametrize("schedule, message", [
    (dict(num_warm_epochs=5, push_start=3), "push_start=3 < num_warm_epochs=5"),
    (dict(num_warm_epochs=5, push_start=10, num_train_epochs=5), "num_train_epochs=5 <= num_warm_epochs=5"),
    (dict(num_warm_epochs=-1), "num_warm_epochs=-1 must be >= 0"),
    (dict(push_every=0), "push_every=0 must be >= 1"),
    (dict(last_layer_epochs=-2), "last_layer_epochs=-2 must be >= 1"),
    (dict(push_start=20, num_train_epochs=11), "num_train_epochs=11 must end with a push epoch"),
    (dict(push_start=2.5), "push_start=2.5 must be an integer"),
])
def test_impossible_schedules_are_one_line_errors(schedule, message):
    with pytest.raises(ValueError, match=message) as error:
        _model(**schedule)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message):  # the pure schedule function rejects them too
        protopnet_schedule(0, **schedule)
    with pytest.raises(ValueError, match="lightning_epoch=-1"):
        protopnet_schedule(-1)


# ------------------------------------------------------------------------------ speed switches
@pytest.mark.parametrize("builder", ["protopnet_test_resnet", "cam_test_resnet"])
def test_channels_last_gives_the_same_logits(builder):
    images = _data(n=4)[0]
    models = {}
    for flag in (False, True):
        torch.manual_seed(0)
        models[flag] = create_model(builder, num_classes=3, stage=2, channels_last=flag).eval()
        models[flag].apply_speed_options()
    fast = models[True]
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.normalize(images).is_contiguous(memory_format=torch.channels_last)
    assert not next(m for m in models[False].modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast(images), models[False](images), atol=1e-5, rtol=1e-5)
    fast.apply_speed_options()  # idempotent
    assert fast.state_dict().keys() == models[False].state_dict().keys()


def test_trainer_applies_the_speed_options():
    import lightning.pytorch as pl

    model = _model(channels_last=True)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.predict(model, dataloaders=_loader(*_data(n=4), batch_size=4))
    conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert model.normalize.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)


_compile_ok = hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


@pytest.mark.skipif(not _compile_ok, reason="torch.compile is not available here")
def test_compile_backbone_is_applied_in_place():
    model, plain = _model(compile_backbone=True), _model()
    model.apply_speed_options()
    assert model.backbone._compiled_call_impl is not None and plain.backbone._compiled_call_impl is None
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged (no _orig_mod.)
    compiled = model.backbone._compiled_call_impl
    model.apply_speed_options()
    assert model.backbone._compiled_call_impl is compiled  # idempotent


@pytest.mark.skipif(not _compile_ok, reason="torch.compile is not available here")
def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("InductorError: no C++ compiler\nlong trace")
        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    model, plain = _model(compile_backbone=True), _model()
    model.apply_speed_options()
    images = _data(n=3)[0]
    with pytest.warns(UserWarning, match="torch.compile of Backbone failed .*no C\\+\\+ compiler.*running it eagerly"):
        with torch.no_grad():
            logits = model(images)
    assert model.backbone._compiled_call_impl is None  # later calls go straight to eager
    with torch.no_grad():
        torch.testing.assert_close(logits, plain(images))
        torch.testing.assert_close(model(images), plain(images))


@pytest.mark.slow
@pytest.mark.skipif(not _compile_ok, reason="torch.compile is not available here")
def test_compiled_backbone_gives_the_same_logits():
    model, plain = _model(compile_backbone=True), _model()
    model.apply_speed_options()
    images = _data(n=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_keeps_distances_and_push_in_float32():
    images, labels = _data(n=24, k=3)
    reference, mixed = _model(), _model()
    with torch.no_grad():
        exact = reference.distances(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approx = mixed.distances(images)
            plain_bf16 = reference.backbone(reference.normalize(images))
    assert plain_bf16.dtype == torch.bfloat16  # autocast is really on for the trunk ...
    assert approx.dtype == torch.float32  # ... but the distances are not in bf16
    # bf16 trunk: relative error ~2^-8 of the latent values, so distances within ~1% of D-scale values.
    torch.testing.assert_close(approx, exact, atol=0.02 * exact.max().item(), rtol=0.02)

    reference.push(_loader(images, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed.push(_loader(images, labels))
    assert mixed.prototype_vectors.dtype == mixed.prototype_distance.dtype == torch.float32
    # Every bf16-pushed prototype is a latent patch of its own class whose float32 distance is within
    # float tolerance of the float32 optimum (a near-tie may pick another patch, never a far one).
    with torch.no_grad():
        z = reference.latent(images)  # float32 latent maps
    for j in range(mixed.num_prototypes):
        b, (r, c) = int(mixed.prototype_source_index[j]), mixed.prototype_position[j].tolist()
        assert labels[b] == mixed.prototype_classes[j]
        patch = z[b, :, r, c]
        torch.testing.assert_close(mixed.prototype_vectors[j, :, 0, 0], patch, atol=2e-2, rtol=2e-2)
        original = _model().prototype_vectors[j, :, 0, 0]
        chosen = (patch - original).pow(2).sum()
        assert chosen <= reference.prototype_distance[j] + 0.02 * reference.prototype_distance[j] + 1e-3
    same = (mixed.prototype_source_index == reference.prototype_source_index) & \
        (mixed.prototype_position == reference.prototype_position).all(dim=1)
    assert same.float().mean() >= 0.5
