"""A static HTML report of zoo models: what each one learned (prototypes, the tree), example
explanations and filter parts, embedded as base64 PNGs so that ``index.html`` is one file that opens
anywhere.

`model_figures` draws one model's figures from its buffers and, given them, test images;
`render_section` and `write_report` make the page. The command line over checkpoints and datasets is
``python -m train.report``.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from explain import viz
from explain.concept_views import concept_explanation_figure, is_concept_model

__all__ = ["model_figures", "render_section", "write_report"]

CHECK_SCRIPT = """<script>
// Marks how many images decoded (read by tests/test_report.py through the browser's DOM).
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((im) => im.complete && im.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + "/" + images.length;
});
</script>"""

STYLE = """<style>
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { border: 1px solid #ccc; padding: 3px 9px; text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .note { color: #a40; }
</style>"""


# ----------------------------------------------------------------------------------------- figures
def model_figures(model: nn.Module, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  class_names: Sequence[str] | None = None, num_images: int = 4,
                  localisation: str = "upsampling", part_labels: dict[int, str] | None = None,
                  because: dict[int, dict[str, float]] | None = None, evidence_note: str = "") -> list[tuple[str, Any]]:
    """(caption, Figure) pairs for one model: what it learned (from its buffers), then, with images,
    local explanations and example explanations.

    What is drawn follows what the model offers, never its class: every prototype model (the prototype
    interface of `models.prototype_model`) gets the gallery, "this looks like that" and the global
    analysis; a tree (``structure()``) its tree and decision path; filter models (``filter_categories()``)
    their filter parts; concept models (`explain.concept_views.is_concept_model`) the decision through their
    concepts; any other model its explanations of the top-3 classes. `localisation` is the
    method of the prototypes' maps and boxes in "this looks like that" (`explain.prototype_localisation`).
    `part_labels` and `because` label the gallery's prototypes (`viz.prototype_gallery`), and
    `evidence_note` ends its caption.
    """
    figures: list[tuple[str, Any]] = []
    examples = images[:num_images] if images is not None else None
    prototypes, tree = viz.is_prototype_model(model), callable(getattr(model, "structure", None))
    filters = callable(getattr(model, "filter_categories", None))
    if prototypes:
        size = images.shape[-1] if images is not None else None
        figures.append(("Prototypes, drawn from the checkpoint's stored patches, with their class, largest "
                        "class weights and the image that maximises each one's similarity (100 steps)."
                        + (f" {evidence_note}" if evidence_note else ""),
                        viz.prototype_gallery(model, class_names=class_names, max_prototypes=60, maximize_steps=100,
                                              maximize_size=size, part_labels=part_labels, because=because)))
    if tree:
        figures.append(("The whole tree: each decision node's prototype, each leaf's class distribution.",
                        viz.tree_figure(model, class_names)))
    if images is None:
        return figures
    if tree:
        explanation = model.explain(examples[:1])
        figures.append(("Decision path of the first test image.",
                        viz.tree_path_figure(model, examples[0], explanation, 0, class_names)))
    if prototypes:
        method = "" if localisation == "upsampling" else f" (maps and boxes: {localisation})"
        figures.append(("This looks like that: the first test image's most similar prototypes and their "
                        f"contributions{method}.", viz.this_looks_like_that(model, examples, index=0, top_k=4,
                                                                             class_names=class_names, localisation=localisation)))
        data = {"image": images, "label": labels}
        figures.append(("Nearest test patches of the first prototypes (red titles: another class).",
                        viz.global_analysis(model, data, prototypes=None, k=4, class_names=class_names, names=("test", ""))))
    if filters:
        figures.append(("Filter parts: per class, the filter of that category with the highest mean peak, on its "
                        "top test images.", viz.icnn_filter_gallery(model, images[:32], k=4, class_names=class_names)))
    concepts = is_concept_model(model)
    if concepts:
        figures.append(("The first test image's decision through its concepts: the largest contributions to the "
                        "predicted class (probability in brackets) and those concepts' maps.",
                        concept_explanation_figure(model, examples[0], class_names=class_names)))
    if not (prototypes or tree or filters or concepts):
        figures.append(("The model's explanations of each image's top-3 classes.",
                        viz.cam_grid(model, examples, top=3, class_names=class_names, labels=labels)))
    explanation = model.explain(examples)
    figures.append(("Example explanations of the predicted class.", viz.explanation_grid(
        examples, explanation.heatmap, labels=labels[:num_images], predictions=explanation.prediction,
        class_names=class_names, boxes=explanation.evidence.get("boxes"),
        title=f"{type(model).__name__}: explanations of test images")))
    if "colour" in explanation.evidence:  # a dynamic linear model's contributions and their RGBA colour coding
        figures.append(("Contribution maps of the predicted class (red: evidence for it, blue: against) and their "
                        "colour coding.", viz.contribution_grid(
                            examples, explanation.heatmap, explanation.evidence["colour"], labels=labels[:num_images],
                            predictions=explanation.prediction, class_names=class_names,
                            title=f"{type(model).__name__}: contribution maps")))
    return figures


def _embed(fig, dpi: int = 80) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    viz.plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_section(name: str, source: str | Path, model: nn.Module, accuracy: dict[str, float], figures: list[tuple[str, Any]],
                   note: str | None = None) -> str:
    """One model's ``<section>``: a table (class, checkpoint, classes, parameters, accuracies), an
    optional note, and the figures embedded as base64 PNGs (each figure is closed)."""
    params = sum(p.numel() for p in model.parameters())
    rows = [("model", type(model).__name__), ("checkpoint", str(source)), ("classes", str(getattr(model, "num_classes", "?"))),
            ("parameters", f"{params:,}")]
    rows += [(f"accuracy: {k}", f"{100 * v:.1f}%") for k, v in accuracy.items()] or [("accuracy", "not recorded")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    parts = [f'<section id="{html.escape(name)}"><h2>{html.escape(name)}</h2><table>{table}</table>']
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    for caption, fig in figures:
        parts.append(f'<figure><img src="{_embed(fig)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)


def write_report(sections: Sequence[str], out: str | Path, title: str = "interpretable-zoo report") -> Path:
    """Write ``<out>/index.html`` from rendered sections."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"{STYLE}</head>\n<body><h1>{html.escape(title)}</h1><p>Generated {stamp}.</p>\n"
            + "\n".join(sections) + f"\n{CHECK_SCRIPT}\n</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


if __name__ == "__main__":  # the command line is train.report
    raise SystemExit("error: the command line is python -m train.report")
