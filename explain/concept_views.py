"""Figures of concept bottleneck models: one image's decision through its concepts, and test-time
intervention curves (task accuracy against the number of concept groups replaced by the truth).

Works with any model whose ``explain()`` evidence holds ``concepts``, ``contributions``,
``concept_maps`` and ``concept_names`` (`models.cbm.ConceptBottleneck`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .viz import PANEL_SIZE, _class_name, _evaluating, _finish, _show, overlay_heatmap, plt

__all__ = ["concept_explanation_figure", "intervention_figure", "is_concept_model"]


def is_concept_model(model: Any) -> bool:
    """Whether the model decides through named concepts (has ``concept_logits`` and ``intervene``)."""
    return callable(getattr(model, "concept_logits", None)) and callable(getattr(model, "intervene", None))


def concept_explanation_figure(model: Any, image: torch.Tensor, target: int | None = None, top_k: int = 6,
                               class_names: Sequence[str] | None = None, concepts: torch.Tensor | None = None,
                               attribution: Any = None) -> Figure:
    """The image with the explained class's heatmap, the `top_k` concepts by |contribution| as signed bars
    (predicted probability in brackets, a tick where the true concept given in `concepts` is 1), and each
    of those concepts' maps (`attribution`: see ``ConceptBottleneck.explain``)."""
    with _evaluating(model):
        e = model.explain(image[None], target, attribution=attribution) if attribution else model.explain(image[None], target)
    ev = e.evidence
    contributions = ev["contributions"][0].cpu()
    order = contributions.abs().argsort(descending=True)[:top_k].tolist()
    names = ev["concept_names"]
    columns = 2 + min(3, len(order))
    fig = plt.figure(figsize=(2.2 * columns + 2.6, 2.6))
    grid = fig.add_gridspec(1, columns, width_ratios=[1, 2.2] + [1] * (columns - 2))
    ax = fig.add_subplot(grid[0, 0])
    cls = int(e.target[0])
    _show(ax, overlay_heatmap(image, e.heatmap[0]), f"{_class_name(cls, class_names)}\nlogit {float(e.logits[0, cls]):.2f}")
    ax.set_xticks([]), ax.set_yticks([])
    bars = fig.add_subplot(grid[0, 1])
    values = [float(contributions[j]) for j in order][::-1]
    labels = []
    for j in order[::-1]:
        mark = " ✓" if concepts is not None and float(concepts[j]) > 0.5 else ""
        labels.append(f"{names[j]} ({float(ev['concepts'][0, j]):.2f}){mark}")
    bars.barh(range(len(values)), values, color=["tab:red" if v >= 0 else "tab:blue" for v in values])
    bars.set_yticks(range(len(values)), labels, fontsize=PANEL_SIZE - 1)
    bars.axvline(0, color="black", linewidth=0.8)
    bars.set_title("contribution to the logit", fontsize=PANEL_SIZE)
    for n, j in enumerate(order[: columns - 2]):
        ax = fig.add_subplot(grid[0, 2 + n])
        _show(ax, overlay_heatmap(image, ev["concept_maps"][0, j]), names[j])
        ax.set_xticks([]), ax.set_yticks([])
    return _finish(fig, f"{type(model).__name__}: the decision through its concepts")


def intervention_figure(curves: dict[str, dict[str, Any]], title: str = "Test-time intervention",
                        mean: bool = True) -> Figure:
    """Task accuracy against the number of intervened concept groups, one line per model: the best of the
    trials (solid, as the paper's figure) and their mean (dashed)."""
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for n, (name, curve) in enumerate(curves.items()):
        colour = f"C{n}"
        ax.plot(curve["groups"], curve["accuracy"], marker="o", markersize=3, color=colour, label=name)
        if mean and "accuracy_mean" in curve:
            ax.plot(curve["groups"], curve["accuracy_mean"], linestyle="--", color=colour, linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("concept groups intervened on")
    ax.set_ylabel("task accuracy")
    ax.set_ylim(min(0.0, *(min(c["accuracy_mean"] if mean else c["accuracy"]) for c in curves.values())), 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=PANEL_SIZE)
    if mean:
        ax.set_title("solid: best of trials; dashed: mean", fontsize=PANEL_SIZE)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


