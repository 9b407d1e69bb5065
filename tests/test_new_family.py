"""A prototype family that exists only here, built on the prototype interface alone.

Every view, application helper and metric below knows nothing of it: the gallery, "this looks like that",
the global analysis, the report section, a comparison row, the prototype metrics, activation maximisation,
the push and the phase callback all go through `models.prototype_model.PrototypeModel`.
"""
from __future__ import annotations

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explain import viz
from explain.compare import evaluate
from explain.maximize import maximize, prototype_similarity
from explain.metrics import prototype_consistency, prototype_stability
from explain.report import model_figures, render_section
from models.backbones import Backbone
from models.base import Explanation
from models.phases import EpochPlan
from models.prototype_model import PrototypeModel
from models.prototypes import l2_distances, upsample_maps
from train.data import SyntheticParts
from train.phases import Phases


class GaussianPrototypes(PrototypeModel):
    """trunk -> 1x1 conv + sigmoid -> exp(-||z - p||^2) to P prototypes -> max pool -> linear layer."""

    def __init__(self, num_classes: int = 3, per_class: int = 2, dim: int = 8, **kwargs) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.backbone = Backbone("test_resnet", stage=2)
        self.add_on = nn.Conv2d(self.backbone.out_channels, dim, 1)
        num = num_classes * per_class
        self.prototype_vectors = nn.Parameter(torch.rand(num, dim))
        self.register_buffer("identity", F.one_hot(torch.arange(num) // per_class, num_classes).float())
        self.last_layer = nn.Linear(num, num_classes, bias=False)
        self.last_layer.weight.data.copy_(self.identity.T)
        self.register_prototype_records(num, patch_size=16)

    def latent(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.add_on(self.backbone(self.normalize(images))))

    def prototype_tensor(self) -> Tensor:
        return self.prototype_vectors

    def assign_prototypes(self, ids: Tensor, vectors: Tensor) -> None:
        self.prototype_vectors.data[ids] = vectors

    def distances(self, images: Tensor) -> Tensor:
        return l2_distances(self.latent(images), self.prototype_vectors)

    def similarity(self, distances: Tensor) -> Tensor:
        return torch.exp(-distances)

    def prototype_class_connection(self) -> Tensor:
        return self.last_layer.weight.T

    def prototype_active(self) -> Tensor:
        return torch.ones(self.num_prototypes, dtype=torch.bool, device=self.identity.device)

    def push_classes(self) -> Tensor:
        return self.identity.bool()

    def plan(self, epoch=None):
        epoch = self.current_epoch if epoch is None else epoch
        return EpochPlan("train" if epoch < 1 else "last_layer", epoch, ("push",) if epoch == 1 else ())

    def enter_phase(self, plan: EpochPlan) -> None:
        # After the push only the last layer trains, on a trunk whose BatchNorm statistics stay fixed.
        self.pushed_phase = plan.epoch >= 1
        for p in [*self.backbone.parameters(), *self.add_on.parameters(), self.prototype_vectors]:
            p.requires_grad_(not self.pushed_phase)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "pushed_phase", False):
            self.backbone.eval()
        return self

    def action_done(self, action, epoch):
        return int(self.push_epoch) == epoch

    def run_action(self, action, loader, epoch):
        return self.push(loader, epoch=epoch)

    def forward(self, images: Tensor) -> Tensor:
        return self.last_layer(self.similarity_maps(images).amax(dim=(2, 3)))

    def explain(self, images: Tensor, target=None, top_k: int = 4) -> Explanation:
        sims = self.similarity_maps(images)
        logits = self.last_layer(sims.amax(dim=(2, 3)))
        target = self._target(logits, target)
        weights = self.last_layer.weight[target]
        size = tuple(images.shape[-2:])
        heatmap = upsample_maps(torch.einsum("bp,bphw->bhw", weights, sims), size)
        evidence = self.prototype_evidence(sims, weights, self.top_prototypes(sims, top_k), size)
        return Explanation(logits, target, heatmap, evidence)


@pytest.fixture(scope="module")
def data():
    return SyntheticParts(num_classes=3, image_size=32, train_size=24, val_size=6, test_size=12, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def pushed(data, tmp_path_factory):
    """Trained for one epoch, then pushed by the phase callback at the start of the second."""
    torch.manual_seed(0)
    model = GaussianPrototypes(lr=1e-2)
    data.setup("fit")
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=tmp_path_factory.mktemp("fit"),
                         callbacks=[Phases(figures=False, final_checkpoint=False)])
    trainer.fit(model, datamodule=data)
    return model.eval()


def _push_images(data):
    batches = list(data.push_dataloader())
    return (torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches]),
            torch.cat([b["index"] for b in batches]))


def test_the_push_puts_every_prototype_on_a_latent_patch_of_its_class(pushed, data):
    images, labels, index = _push_images(data)
    assert int(pushed.push_epoch) == 1
    with torch.no_grad():
        latent = pushed.latent(images)
    for j in range(pushed.num_prototypes):
        src = int(pushed.prototype_source_index[j])
        row = int((index == src).nonzero())
        r, c = pushed.prototype_position[j].tolist()
        assert int(labels[row]) == int(pushed.identity[j].argmax())
        assert torch.allclose(pushed.prototype_vectors[j], latent[row, :, r, c], atol=1e-6)
        # The brute-force nearest patch among images of its class is that one.
        own = latent[labels == labels[row]]
        d = ((own - pushed.prototype_vectors[j].detach()[None, :, None, None]) ** 2).sum(1)
        assert float(d.min()) <= float(d.flatten()[0]) and float(d.min()) < 1e-10
        assert pushed.prototype_patch[j].float().std() > 0 and (pushed.prototype_rf_box[j] >= 0).all()


def test_gallery_local_and_global_views(pushed, data):
    images, labels, _ = _push_images(data)
    fig = viz.prototype_gallery(pushed, source=data.push_dataloader().dataset)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title() and not ax.get_title().startswith("source")]
    assert titles == [f"p{j} · {int(pushed.prototype_classes[j])}" for j in range(pushed.num_prototypes)]
    plt.close(fig)
    fig = viz.this_looks_like_that(pushed, images[:1], top_k=3)
    explanation = pushed.explain(images[:1], top_k=3)
    ev = explanation.evidence
    assert [t for t in (ax.get_title() for ax in fig.axes) if t.startswith("... looks like")] == [
        f"... looks like p{j} ({int(pushed.prototype_classes[j])})" for j in ev["prototype_ids"][0].tolist()]
    # The grey bars are the logits: the model's own sum of similarity x weight.
    grey = fig.axes[-1].containers[0]
    logits = explanation.logits[0]
    order = logits.argsort(descending=True).tolist()[::-1]
    torch.testing.assert_close(torch.tensor([b.get_width() for b in grey], dtype=torch.float32), logits[order].detach().float())
    plt.close(fig)
    fig = viz.global_analysis(pushed, data.push_dataloader(), k=2)
    assert sum(1 for ax in fig.axes if ax.get_title().startswith("train #")) == 2 * pushed.num_prototypes
    plt.close(fig)


def test_report_section_and_comparison_row(pushed, data):
    images, labels, _ = _push_images(data)
    figures = model_figures(pushed, images[:8], labels[:8], num_images=2)
    captions = [c for c, _ in figures]
    assert any(c.startswith("Prototypes") for c in captions) and any(c.startswith("This looks like that") for c in captions)
    html = render_section("gaussian", "memory", pushed, {"test": 1.0}, figures)
    assert html.count("<img") == len(figures) and "GaussianPrototypes" in html
    rows, kept = evaluate({"gaussian": pushed}, {"image": images[:4], "label": labels[:4]}, ["intrinsic"],
                          ["deletion"], keep_heatmaps=4)
    assert {r["method"] for r in rows} == {"intrinsic"} and len([r for r in rows if r["metric"] == "deletion"]) == 4
    torch.testing.assert_close(kept["gaussian"]["intrinsic"], pushed.explain(images[:4], labels[:4]).heatmap)


def test_prototype_metrics_and_maximisation(pushed, data):
    images, labels, _ = _push_images(data)
    keypoints = torch.cat([data.push_dataloader().dataset[i]["keypoints"][None] for i in range(len(images))])
    consistency = prototype_consistency(pushed.similarity_maps, images, keypoints, labels, pushed.prototype_classes)
    stability = prototype_stability(pushed.similarity_maps, images, keypoints, labels, pushed.prototype_classes)
    assert consistency.shape == stability.shape == (pushed.num_prototypes,)
    assert set(consistency.unique().tolist()) <= {0.0, 1.0} and ((stability >= 0) & (stability <= 1)).all()
    result = maximize(pushed, prototype_similarity([0, 1]), image_size=32, batch_size=2, steps=5)
    with torch.no_grad():
        end = pushed.similarity_maps(result.image).amax(dim=(2, 3))[[0, 1], [0, 1]]
    torch.testing.assert_close(end, result.scores[-1], rtol=1e-4, atol=1e-6)  # the objective is the interface's
    assert (result.scores[-1] > result.scores[0]).all()
