"""A static HTML report of zoo checkpoints: accuracy, prototypes or filter parts, example explanations,
and for a ProtoTree the tree.

    python -m explain.report CHECKPOINT [CHECKPOINT ...] --out report/ [--data synthetic] [--num-images 4]

CHECKPOINT is a zoo file (`models.save_zoo_checkpoint`, `models.load_pretrained`) or a Lightning
checkpoint of `train.py`. Every figure is embedded as a base64 PNG, so ``<out>/index.html`` is one file
that opens anywhere. The prototypes (and the tree) come from the checkpoint's own buffers; example
explanations and filter parts need images: ``--data synthetic`` draws SyntheticParts' test split (the
run's data config when the checkpoint sits in a run folder); ``auto`` does so when the checkpoint was
trained on SyntheticParts. Accuracy is what the checkpoint records (zoo metadata, the best score of a
ModelCheckpoint monitoring an accuracy, a ProtoTree run's ``prototree.json``), else it is evaluated on
``--eval-images`` test images when there is data.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from explain import viz
from explain.compare import _default_name, _run_config, load_model, load_synthetic
from models.pretrained import FORMAT, load_pretrained, _read as read_checkpoint

__all__ = ["load_checkpoint", "recorded_accuracy", "model_figures", "write_report", "main"]

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


# ----------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on the CPU, the raw checkpoint dict) from a zoo file or a Lightning checkpoint."""
    path = Path(path)
    payload = read_checkpoint(path)  # weights only; a missing or unreadable file is one CheckpointError line
    if payload.get("format") == FORMAT or payload.get("zoo_class_path"):
        return load_pretrained(path), payload
    return load_model(path), payload


def recorded_accuracy(payload: dict[str, Any], path: str | Path | None = None) -> dict[str, float]:
    """Accuracies a checkpoint records: zoo ``meta`` (its ``metrics`` too), the best score of every
    ModelCheckpoint that monitors an accuracy, and the last stage of a ProtoTree run's ``prototree.json``."""
    found: dict[str, float] = {}
    meta = payload.get("meta") or {}
    for key, value in {**meta, **(meta.get("metrics") or {})}.items():
        if "acc" in str(key) and isinstance(value, (int, float)):
            found[str(key)] = float(value)
    for state in (payload.get("callbacks") or {}).values():
        monitor, score = (state or {}).get("monitor"), (state or {}).get("best_model_score")
        if monitor and "acc" in monitor and score is not None and float(score) >= 0:  # -1: not pushed yet
            found[f"{monitor} (best checkpoint)"] = float(score)
    tree_json = Path(path).resolve().parent.parent / "prototree.json" if path is not None else None
    if tree_json is not None and tree_json.is_file():
        stages = {k: v for k, v in json.loads(tree_json.read_text()).items() if isinstance(v, dict)}
        if stages:
            stage, results = list(stages.items())[-1]
            found.update({f"test {k} ({stage})": float(v) for k, v in results.items() if k.startswith("acc")})
    return found


def _synthetic_args(model: nn.Module, checkpoint: Path, payload: dict[str, Any], image_size: int | None) -> dict | None:
    """SyntheticParts arguments of the run's data config, or a default that fits the model; None if the
    run's data is something else."""
    data = (_run_config(checkpoint).get("data") or {})
    if data:
        if not str(data.get("class_path", "")).endswith("SyntheticParts"):
            return None
        args = dict(data.get("init_args") or {})
    else:
        args = {"num_classes": getattr(model, "num_classes", 10)}
        pushed_size = getattr(model, "prototype_image_size", None)  # ProtoPNet remembers its push images
        meta_size = (payload.get("meta") or {}).get("image_size")
        args["image_size"] = int(meta_size or (pushed_size[0] if pushed_size is not None and pushed_size[0] > 0 else 64))
    if image_size:
        args["image_size"] = image_size
    return args


def _uses_synthetic(checkpoint: Path, payload: dict[str, Any]) -> bool:
    data = _run_config(checkpoint).get("data") or {}
    meta = payload.get("meta") or {}
    return str(data.get("class_path", "")).endswith("SyntheticParts") or "synthetic" in str(meta.get("dataset", "")).lower()


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


# ----------------------------------------------------------------------------------------- figures
def model_figures(model: nn.Module, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  class_names: Sequence[str] | None = None, num_images: int = 4) -> list[tuple[str, Any]]:
    """(caption, Figure) pairs for one model: what it learned (from its buffers), then, with images,
    the filter parts and example explanations."""
    kind = type(model).__name__
    figures: list[tuple[str, Any]] = []
    examples = images[:num_images] if images is not None else None
    if kind == "ProtoPNet":
        size = images.shape[-1] if images is not None else None
        figures.append(("Prototypes, drawn from the checkpoint's stored patches, with their class, largest "
                        "last-layer weights and the image that maximises each one's similarity (100 steps).",
                        viz.prototype_gallery(model, class_names=class_names, max_prototypes=60, maximize_steps=100,
                                              maximize_size=size)))
    if kind == "ProtoTree":
        figures.append(("The whole tree: each decision node's prototype, each leaf's class distribution.",
                        viz.tree_figure(model, class_names)))
    if images is None:
        return figures
    if kind == "ProtoPNet":
        figures.append(("This looks like that: the first test image's most similar prototypes and their "
                        "contributions.", viz.this_looks_like_that(model, examples, index=0, top_k=4, class_names=class_names)))
        data = {"image": images, "label": labels}
        figures.append(("Nearest test patches of the first prototypes (red titles: another class).",
                        viz.global_analysis(model, data, prototypes=None, k=4, class_names=class_names, names=("test", ""))))
    elif kind == "ProtoTree":
        explanation = model.explain(examples[:1])
        figures.append(("Decision path of the first test image.",
                        viz.tree_path_figure(model, examples[0], explanation, 0, class_names)))
    elif kind == "InterpretableCNN":
        figures.append(("Filter parts: per class, the filter of that category with the highest mean peak, on its "
                        "top test images.", viz.icnn_filter_gallery(model, images[:32], k=4, class_names=class_names)))
    else:
        figures.append(("The model's explanations of each image's top-3 classes.",
                        viz.cam_grid(model, examples, top=3, class_names=class_names, labels=labels)))
    explanation = model.explain(examples)
    figures.append(("Example explanations of the predicted class.", viz.explanation_grid(
        examples, explanation.heatmap, labels=labels[:num_images], predictions=explanation.prediction,
        class_names=class_names, boxes=explanation.evidence.get("boxes"), title=f"{kind}: explanations of test images")))
    return figures


def _embed(fig, dpi: int = 80) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    viz.plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _section(name: str, path: Path, model: nn.Module, accuracy: dict[str, float], figures: list[tuple[str, Any]],
             note: str | None) -> str:
    params = sum(p.numel() for p in model.parameters())
    rows = [("model", type(model).__name__), ("checkpoint", str(path)), ("classes", str(getattr(model, "num_classes", "?"))),
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


# ------------------------------------------------------------------------------------- command line
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m explain.report", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="zoo files or Lightning checkpoints ([NAME=]PATH)")
    p.add_argument("--out", default="report", help="folder of index.html")
    p.add_argument("--data", choices=["auto", "synthetic", "none"], default="auto",
                   help="images for explanations: SyntheticParts' test split, none, or auto (if trained on it)")
    p.add_argument("--num-images", type=int, default=4, help="example images explained per model")
    p.add_argument("--eval-images", type=int, default=200, help="test images to evaluate accuracy when none is recorded")
    p.add_argument("--evaluate", action="store_true", help="evaluate accuracy even when the checkpoint records one")
    p.add_argument("--image-size", type=int, default=None, help="SyntheticParts image size (default: the run's or 64)")
    p.add_argument("--title", default="interpretable-zoo report")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Build the report; returns the path of index.html."""
    args = _parse_args(argv)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    sections = []
    for spec in args.checkpoints:
        # NAME=PATH, unless the whole argument is a file (Lightning names files like "epoch=3-step=9.ckpt")
        name, path = spec.split("=", 1) if "=" in spec and not Path(spec).is_file() else (None, spec)
        path = Path(path)
        name = name or _default_name(path)
        model, payload = load_checkpoint(path)
        accuracy, note = recorded_accuracy(payload, path), None
        images = labels = class_names = None
        use_data = args.data == "synthetic" or (args.data == "auto" and _uses_synthetic(path, payload))
        data_args = _synthetic_args(model, path, payload, args.image_size) if use_data else None
        if data_args is not None:
            n = max(args.num_images, args.eval_images if (args.evaluate or not accuracy) else 32)
            data_args["test_size"] = max(int(data_args.get("test_size", 0)), n)
            data = load_synthetic(data_args, n)
            if len(data["class_names"]) != model.num_classes:
                raise ValueError(f"{path}: the model has {model.num_classes} classes but the synthetic data has "
                                 f"{len(data['class_names'])}; pass a checkpoint of a SyntheticParts run or --data none")
            images, labels, class_names = data["image"], data["label"], data["class_names"]
            if args.evaluate or not accuracy:
                accuracy[f"evaluated on {n} SyntheticParts test images"] = _accuracy(model, images, labels)
        else:
            note = "No images given (--data none, or not a SyntheticParts run): example explanations are left out."
        figures = model_figures(model, images, labels, class_names, args.num_images)
        sections.append(_section(name, path, model, accuracy, figures, note))
    path = write_report(sections, args.out, args.title)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
