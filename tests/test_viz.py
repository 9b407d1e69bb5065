"""Figures of every family from tiny models: panel counts, titles, drawn boxes and pixels checked against
the models' own tensors (and brute force where the figure computes something)."""
import re
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle

from explain import viz
from models import create_model
from train.data import SyntheticParts

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny convolutions on a shared 2-core machine run far faster on one thread than on two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    plt.close("all")


@pytest.fixture(scope="module")
def data():
    """12 SyntheticParts images (label i % 3) as a dataset of dict items, and the same as stacked tensors."""
    dataset = SyntheticParts(num_classes=3, image_size=32, train_size=12, val_size=3, test_size=3, augment=False).push_dataset
    items = [dataset[i] for i in range(len(dataset))]
    return SimpleNamespace(dataset=dataset, images=torch.stack([it["image"] for it in items]),
                           labels=torch.stack([it["label"] for it in items]))


@pytest.fixture(scope="module")
def loader(data):
    return torch.utils.data.DataLoader(data.dataset, batch_size=5)


@pytest.fixture(scope="module")
def protopnet(loader):
    torch.manual_seed(0)
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2).eval()
    model.push(loader)
    return model


@pytest.fixture(scope="module")
def tree(loader):
    torch.manual_seed(0)
    model = create_model("prototree_test_resnet", num_classes=3, depth=3, stage=2).eval()  # 4x4 latent cells
    with torch.no_grad():
        model.leaves.copy_(torch.randn(model.leaves.shape, generator=torch.Generator().manual_seed(1)) * 3)
    model.push(loader)
    return model


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


def _rects(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _rect_box(rect):
    """(x0, y0, x1, y1) of a box drawn by viz._draw_box."""
    x, y = rect.get_xy()
    return (round(x + 0.5), round(y + 0.5), round(x + 0.5 + rect.get_width()), round(y + 0.5 + rect.get_height()))


def _suptitle(fig):
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


# ------------------------------------------------------------------------------------------ basics
def test_overlay_keeps_the_image_where_the_heatmap_is_zero_and_tints_it_elsewhere():
    image = torch.rand(3, 16, 16)
    heat = torch.zeros(16, 16)
    heat[:, 8:] = torch.linspace(0.1, 2.0, 8)  # zero on the left half, positive on the right
    out = viz.overlay_heatmap(image, heat, alpha=0.6)
    img = image.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out[:, :8], img[:, :8], atol=1e-6)
    assert (np.abs(out[:, 8:] - img[:, 8:]).sum(axis=2) > 1e-3).all()
    # the strongest pixel by hand: h = 1 -> 0.4 image + 0.6 jet(1)
    jet_top = np.array(plt.get_cmap("jet")(1.0)[:3])
    np.testing.assert_allclose(out[0, 15], 0.4 * img[0, 15] + 0.6 * jet_top, atol=1e-6)
    np.testing.assert_allclose(viz.overlay_heatmap(image, torch.full((16, 16), 3.0)), img, atol=1e-6)
    # constant up to float rounding (an upsampled 1x1 map): drawn as constant, not as amplified noise
    np.testing.assert_allclose(viz.overlay_heatmap(image, 3.0 + 1e-7 * torch.rand(16, 16)), img, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        viz.overlay_heatmap(image, torch.zeros(8, 8))


def test_to_numpy_image_scales_uint8_tensors():
    patch = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    np.testing.assert_allclose(viz.to_numpy_image(patch)[0, 0], [0.0, 0.2, 1.0], atol=1e-6)
    assert viz.to_numpy_image(torch.rand(3, 5, 7)).shape == (5, 7, 3)


def test_heatmap_figure_panels_and_box():
    image, heat = torch.rand(3, 20, 20), torch.rand(20, 20)
    fig = viz.heatmap_figure(image, heat, box=(2, 3, 10, 12), title="CAM of class ant")
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == ["image", "heatmap", "overlay"]
    assert _suptitle(fig) == "CAM of class ant"
    np.testing.assert_allclose(fig.axes[2].images[0].get_array(), viz.overlay_heatmap(image, heat))
    assert [_rect_box(r) for r in _rects(fig.axes[2])] == [(2, 3, 10, 12)]
    assert not _rects(fig.axes[0])
    plt.close(fig)


def test_explanation_grid_rows_titles_and_wrong_predictions_in_red():
    images, heat = torch.rand(3, 3, 16, 16), torch.rand(3, 16, 16)
    fig = viz.explanation_grid(images, heat, labels=[0, 1, 2], predictions=[0, 2, 2], class_names=CLASSES,
                               boxes=torch.tensor([[0, 0, 4, 4]] * 3), title="T")
    assert len(fig.axes) == 6 and len(_image_axes(fig)) == 6
    assert _titles(fig)[:3] == ["true ant\npred ant", "true bee\npred cat", "true cat\npred cat"]
    colours = [fig.axes[i].title.get_color() for i in range(3)]
    assert colours[1] == viz.WRONG_COLOR and colours[0] != viz.WRONG_COLOR
    assert all(len(_rects(ax)) == 1 for ax in fig.axes[3:])
    plt.close(fig)


# ------------------------------------------------------------------------------------ prototypes
def test_prototype_gallery_is_drawn_from_the_checkpoint_alone(protopnet):
    fresh = create_model("protopnet_test_resnet", num_classes=3, stage=2)
    fresh.load_state_dict(protopnet.state_dict())  # no data: only the buffers
    fig = viz.prototype_gallery(fresh, class_names=CLASSES)
    tiles = _image_axes(fig)
    assert len(tiles) == 6
    for j, ax in enumerate(tiles):
        np.testing.assert_allclose(ax.images[0].get_array(), protopnet.prototype_patch[j].permute(1, 2, 0).numpy() / 255.0,
                                   atol=1e-6)
        assert ax.get_title() == f"p{j} · {CLASSES[j // 2]}"
        # top weights: own class +1, then -0.5 (the initial last layer)
        assert ax.get_xaxis().get_label().get_text().startswith(f"w {CLASSES[j // 2]} +1.00\nw ")
    assert "6 prototype patches" in _suptitle(fig)
    plt.close(fig)


def test_prototype_gallery_shows_each_prototypes_maximising_image(protopnet, data):
    from explain.maximize import prototype_similarity

    fig = viz.prototype_gallery(protopnet, source=data.images, columns=3, maximize_steps=5)
    tiles = _image_axes(fig)
    assert len(tiles) == 3 * 6  # patch, source, maximised image per prototype
    grey = protopnet.normalize.mean.reshape(1, 3, 1, 1).expand(6, 3, 32, 32)  # maximize's start: the mean colour
    start = prototype_similarity(list(range(6)))(protopnet, grey)
    for j, ax in enumerate(tiles[2::3]):
        assert ax.get_title() == "maximised"
        shown = torch.from_numpy(np.asarray(ax.images[0].get_array())).permute(2, 0, 1).float()[None]
        assert shown.shape[-1] == data.images.shape[-1]  # the source images' size
        # the drawn image (as shown, 8-bit) scores its prototype higher than the start image
        assert prototype_similarity(j)(protopnet, shown)[0] > start[j]
    assert "maximise" in _suptitle(fig)
    plt.close(fig)


def test_prototype_gallery_with_source_images_and_pruning(protopnet, data, loader):
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2)
    model.load_state_dict(protopnet.state_dict())
    model.prototype_mask[1] = False
    for source in (data.images, data.dataset, loader):  # a tensor, a dataset, a loader
        fig = viz.prototype_gallery(model, source=source, columns=3)
        tiles = _image_axes(fig)
        assert len(tiles) == 2 * 5  # patch + source per unpruned prototype
        assert not any(t.startswith("p1 ") for t in _titles(fig))
        for patch_ax, src_ax in zip(tiles[::2], tiles[1::2]):
            j = int(re.match(r"p(\d+)", patch_ax.get_title()).group(1))
            i = int(model.prototype_source_index[j])
            assert src_ax.get_title() == f"source #{i}"
            np.testing.assert_allclose(src_ax.images[0].get_array(), data.images[i].permute(1, 2, 0).numpy(), atol=1e-6)
            drawn = {r.get_edgecolor()[:3]: _rect_box(r) for r in _rects(src_ax)}
            assert drawn[plt.matplotlib.colors.to_rgb(viz.RF_COLOR)] == tuple(model.prototype_rf_box[j].tolist())
            assert drawn[plt.matplotlib.colors.to_rgb(viz.ACTIVATION_COLOR)] == tuple(model.prototype_box[j].tolist())
        plt.close(fig)


def test_prototype_gallery_marks_unpushed_prototypes_and_draws_tree_prototypes(tree):
    fig = viz.prototype_gallery(create_model("protopnet_test_resnet", num_classes=3, stage=2))
    assert all(t.endswith("(not pushed)") for t in _titles(fig) if t)
    plt.close(fig)
    fig = viz.prototype_gallery(tree)
    assert [t for t in _titles(fig) if t] == [f"node {n}" for n in tree.structure().internal]
    plt.close(fig)
    with pytest.raises(TypeError, match="no stored prototypes"):
        viz.prototype_gallery(create_model("cam_test_resnet", num_classes=3))


def test_this_looks_like_that_rows_contributions_and_class_sums(protopnet, data):
    k = 3
    fig = viz.this_looks_like_that(protopnet, data.images[:2], index=1, top_k=k, class_names=CLASSES, source=data.dataset)
    explanation = protopnet.explain(data.images[1:2], top_k=k)
    ev = explanation.evidence
    assert len(_image_axes(fig)) == 4 * k  # test image, similarity map, prototype patch, source image
    texts = [t.get_text() for ax in fig.axes for t in ax.texts if "similarity" in t.get_text()]
    assert len(texts) == k
    for i, text in enumerate(texts):
        s, w, c = (float(v) for v in re.findall(r"[-+]?\d+\.\d+", text))
        assert s == pytest.approx(float(ev["similarity"][0, i]), abs=1e-3)
        assert c == pytest.approx(s * w, abs=2e-3)
    patch_titles = [t for t in _titles(fig) if t.startswith("... looks like")]
    assert patch_titles == [f"... looks like p{j} ({CLASSES[int(protopnet.prototype_classes[j])]})"
                            for j in ev["prototype_ids"][0].tolist()]
    # The bars: all-prototype sums are the logits; the orange ones sum the k shown, by hand.
    bars = fig.axes[-1]
    grey, orange = bars.containers
    logits = explanation.logits[0]
    order = logits.argsort(descending=True).tolist()[::-1]
    np.testing.assert_allclose([b.get_width() for b in grey], logits[order].numpy(), rtol=1e-5)
    _, min_d = protopnet.forward_with_distances(data.images[1:2])
    sims = torch.log((min_d[0] + 1) / (min_d[0] + 1e-4))
    ids = ev["prototype_ids"][0]
    shown = (protopnet.last_layer.weight[:, ids] * sims[ids]).sum(dim=1).detach()
    np.testing.assert_allclose([b.get_width() for b in orange], shown[order].numpy(), rtol=1e-4)
    assert "explained as" in _suptitle(fig)
    plt.close(fig)
    cam = create_model("cam_test_resnet", num_classes=3).eval()
    with pytest.raises(ValueError, match="prototype model.s explanation"):
        viz.this_looks_like_that(cam, data.images[:1], cam.explain(data.images[:1]))


def test_global_analysis_shows_brute_force_nearest_images(protopnet, data, loader):
    k, protos = 3, [0, 3, 5]
    fig = viz.global_analysis(protopnet, loader, {"image": data.images[:6], "label": data.labels[:6]},
                              prototypes=protos, k=k, class_names=CLASSES)
    assert len(fig.axes) == len(protos) * (1 + 2 * k)
    with torch.no_grad():
        per_image = protopnet.distances(data.images).flatten(2).amin(dim=2)  # (N, P)
    titles = np.array(_titles(fig)).reshape(len(protos), 1 + 2 * k)
    for r, j in enumerate(protos):
        assert titles[r, 0] == f"p{j} · {CLASSES[int(protopnet.prototype_classes[j])]}"
        train = [int(re.match(r"train #(\d+)", t).group(1)) for t in titles[r, 1:1 + k]]
        assert train == per_image[:, j].argsort()[:k].tolist()
        test = [int(re.match(r"test #(\d+)", t).group(1)) for t in titles[r, 1 + k:]]
        assert test == per_image[:6, j].argsort()[:k].tolist()
        for c, i in enumerate(train):
            ax = fig.axes[r * (1 + 2 * k) + 1 + c]
            wrong = int(data.labels[i]) != int(protopnet.prototype_classes[j])
            assert (ax.title.get_color() == viz.WRONG_COLOR) == wrong
            assert len(_rects(ax)) == 1
    plt.close(fig)


# ------------------------------------------------------------------------------------------ ProtoTree
def test_tree_figure_draws_every_kept_node(tree):
    fig = viz.tree_figure(tree, CLASSES)
    ax = fig.axes[0]
    s = tree.structure()
    assert len(ax.images) == len(s.internal) == 7
    texts = [t.get_text() for t in ax.texts]
    assert sum(t.startswith("leaf ") for t in texts) == len(s.leaves) == 8
    assert texts.count("absent") == texts.count("present") == len(s.internal)
    dist = tree.leaf_distributions()[0]
    assert f"leaf 0\n{CLASSES[int(dist.argmax())]}\n{float(dist.max()):.2f}" in texts
    plt.close(fig)
    pruned = create_model("prototree_test_resnet", num_classes=3, depth=3, stage=2)
    pruned.load_state_dict(tree.state_dict())
    pruned.forced_route[1] = 1  # node 1 always goes right: node 1 and its left subtree (node 3) leave the tree
    fig = viz.tree_figure(pruned)
    assert len(fig.axes[0].images) == len(pruned.structure().internal) == 5
    assert "5 decision nodes, 6 leaves" in _suptitle(fig)  # leaves 0, 1 (below node 3) are gone
    plt.close(fig)


def test_tree_path_figure_follows_the_greedy_path(tree, data):
    explanation = tree.explain(data.images[:2])
    steps = explanation.evidence["path"][1]
    fig = viz.tree_path_figure(tree, data.images[1], explanation, index=1, class_names=CLASSES)
    n = len(steps) + 1
    assert len(fig.axes) == 2 * n
    for col, step in enumerate(steps):
        assert fig.axes[col].get_title() == f"node {step['node']}"
        bottom = fig.axes[n + col]
        assert bottom.get_title().startswith("Present" if step["present"] else "Absent")
        assert [_rect_box(r) for r in _rects(bottom)] == ([tuple(step["box"])] if step["present"] else [])
    leaf_class = int(explanation.evidence["leaf_distribution"][1].argmax())
    assert fig.axes[-1].get_title().endswith(CLASSES[leaf_class])
    assert len(fig.axes[-1].patches) == 3  # one bar per class
    plt.close(fig)


def test_tree_dot_and_render(tree, tmp_path):
    dot = viz.tree_dot(tree, CLASSES)
    s = tree.structure()
    assert all(f"n{n} [label=" in dot for n in s.internal + s.leaves)
    assert dot.count('label="Absent"') == dot.count('label="Present"') == len(s.children)
    out = viz.render_tree(tree, tmp_path / "tree.svg", CLASSES)
    assert out.is_file() and out.suffix in (".svg", ".dot")
    assert len(list((tmp_path / "tree_patches").glob("node_*.png"))) == len(s.internal)


# ---------------------------------------------------------------------------------- Interpretable CNN
def test_icnn_filter_gallery_rows_are_filters_of_each_category(data):
    torch.manual_seed(0)
    model = create_model("icnn_test_resnet", num_classes=3).eval()
    with torch.no_grad():  # give each filter a category: filter f -> class f % 3
        model.interpretable[-1].class_activation.copy_(torch.eye(3).repeat(16, 1))
        model.interpretable[-1].class_seen.fill_(True)
    categories = model.filter_categories()
    fig = viz.icnn_filter_gallery(model, data.images, k=4, class_names=CLASSES)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert len(labels) == 3 and len(fig.axes) == 3 * 4
    _, maps = model.layer_maps(data.images)
    peaks = maps[-1].masked.flatten(2).amax(dim=2)
    for c, label in enumerate(labels):
        f = int(re.match(r"filter (\d+) → (\w+)", label).group(1))
        assert label.endswith(CLASSES[c]) and int(categories[f]) == c
        assert f == int(torch.where(categories == c, peaks.mean(0), -torch.inf).argmax())
        shown = [int(re.match(r"#(\d+)", ax.get_title()).group(1)) for ax in fig.axes[c * 4:(c + 1) * 4]]
        assert shown == peaks[:, f].argsort(descending=True)[:4].tolist()
        assert all(len(_rects(ax)) == 1 for ax in fig.axes[c * 4:(c + 1) * 4])  # receptive-field box
    assert "Interpretable CNN" in _suptitle(fig)
    plt.close(fig)


# ---------------------------------------------------------------------------------- CAM and post-hoc
def test_cam_grid_shows_the_top_classes_with_their_probabilities(data):
    torch.manual_seed(0)
    model = create_model("cam_test_resnet", num_classes=3).eval()
    images = data.images[:2]
    fig = viz.cam_grid(model, images, top=2, class_names=CLASSES, labels=data.labels[:2])
    assert len(fig.axes) == 2 * 3
    probs = model(images).softmax(1).detach()
    ranked = probs.topk(2, dim=1).indices
    heats = [model.explain(images, target=ranked[:, rank]).heatmap for rank in range(2)]
    for i in range(2):
        order = probs[i].argsort(descending=True)[:2].tolist()
        assert fig.axes[i * 3].get_title() == f"true {CLASSES[int(data.labels[i])]}"
        for rank, c in enumerate(order):
            ax = fig.axes[i * 3 + 1 + rank]
            assert ax.get_title() == f"{CLASSES[c]} p={float(probs[i, c]):.2f}"
            np.testing.assert_allclose(ax.images[0].get_array(), viz.overlay_heatmap(images[i], heats[rank][i]), atol=1e-6)
    assert "top 2 classes" in _suptitle(fig)
    plt.close(fig)


def test_drawing_leaves_a_training_model_untouched(protopnet, data, loader):
    """Figures run the model in eval mode: BatchNorm statistics do not move, the mode is restored."""
    torch.manual_seed(0)
    cam = create_model("cam_test_resnet", num_classes=3).train()
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2)
    model.load_state_dict(protopnet.state_dict())
    model.train()
    for m, draw in ((cam, lambda: viz.cam_grid(cam, data.images[:2], top=2)),
                    (model, lambda: viz.global_analysis(model, loader, prototypes=[0], k=2)),
                    (model, lambda: viz.this_looks_like_that(model, data.images[:1], top_k=2))):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        plt.close(draw())
        assert m.training
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_method_grid_columns_are_methods():
    images = torch.rand(3, 3, 16, 16)
    maps = {"gradcam": torch.rand(3, 16, 16), "rise": torch.rand(3, 16, 16)}
    fig = viz.method_grid(images, maps, max_images=2)
    assert len(fig.axes) == 2 * 3
    assert _titles(fig)[:3] == ["image", "gradcam", "rise"]
    np.testing.assert_allclose(fig.axes[5].images[0].get_array(), viz.overlay_heatmap(images[1], maps["rise"][1]))
    assert _suptitle(fig).startswith("Post-hoc explanations")
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one image and one method"):
        viz.method_grid(images, {})


# ---------------------------------------------------------------------------------- output, logging
def test_log_figure_sends_images_to_loggers_or_writes_png(tmp_path):
    class ImageLogger:
        def __init__(self):
            self.calls = []

        def log_image(self, key, images, step=None):
            self.calls.append((key, images, step))

    class MetricsOnly:
        pass

    def figure():
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.imshow(np.zeros((4, 8, 3)))
        return fig

    taker = ImageLogger()
    assert viz.log_figure(figure(), "push/prototypes", [MetricsOnly(), taker], tmp_path, step=7) == []
    (key, images, step), = taker.calls
    assert key == "push/prototypes" and step == 7
    assert images[0].dtype == np.uint8 and images[0].ndim == 3 and images[0].shape[2] == 3
    written = viz.log_figure(figure(), "push/prototypes", [MetricsOnly()], tmp_path)
    assert written == [tmp_path / "push_prototypes.png"] and written[0].stat().st_size > 0
    assert viz.save_figure(figure(), tmp_path / "a" / "f.svg").read_text().lstrip().startswith("<?xml")


def test_push_callback_sends_the_gallery_to_an_image_logger_and_writes_the_png(tmp_path, data):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

    from train.phases import Phases

    class ImageLogger(Logger):  # stands in for WandbLogger: any logger with log_image gets the figure
        name, version = "images", 0

        def __init__(self):
            super().__init__()
            self.images = []

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_image(self, key, images, step=None):
            self.images.append((key, images[0]))

    class Data(pl.LightningDataModule):
        num_classes, class_names = 3, CLASSES

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data.dataset, batch_size=6)

        val_dataloader = push_dataloader = train_dataloader

    torch.manual_seed(0)
    # Lightning epoch 0 trains jointly; the push runs at the start of epoch 1.
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2, num_warm_epochs=0, push_start=0,
                         push_every=1, last_layer_epochs=1, num_train_epochs=1)
    logger, push = ImageLogger(), Phases()
    trainer = pl.Trainer(max_epochs=2, logger=logger, callbacks=[push], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, Data())
    (key, image), = logger.images
    assert key == "push/prototypes" and image.dtype == np.uint8 and image.shape[2] == 3 and image.std() > 0
    assert push.saved == [tmp_path / "figures" / "prototypes_epoch0.png"] and push.saved[0].stat().st_size > 0


def test_figures_of_another_family_fail_with_one_clear_line(protopnet, tree, data):
    cam = create_model("cam_test_resnet", num_classes=3).eval()
    x = data.images[:2]
    with pytest.raises(TypeError, match="global_analysis needs a prototype model, got CAMNet"):
        viz.global_analysis(cam, {"image": x})
    with pytest.raises(TypeError, match="tree_figure needs a ProtoTree, got ProtoPNet"):
        viz.tree_figure(protopnet)
    with pytest.raises(ValueError, match="needs a ProtoTree explanation"):
        viz.tree_path_figure(tree, x[0], cam.explain(x))
    with pytest.raises(TypeError, match="icnn_filter_gallery needs an InterpretableCNN, got CAMNet"):
        viz.icnn_filter_gallery(cam, x)
