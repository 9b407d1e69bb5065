"""A gallery of the released checkpoints: what each one learned (prototypes, tree, filter parts) and a few
explained test images, as small PNGs and one Markdown page for the documentation site.

    python -m train.gallery --out docs/gallery [--num-images 4] [--dpi 60] [NAME ...]

Every release of `models.list_pretrained()` (or the names given) is loaded with `models.load_pretrained`;
its figures are `explain.report.model_figures`, so a family is drawn through the interfaces it offers
(the prototype interface, ``structure()``, ``filter_categories()``, else ``explain()``), never by its class.
The explained images are the first test images of the SyntheticParts recipe the release records.
Writes ``<out>/index.md`` and ``<out>/<name>/<n>.png``; stale PNGs of a regenerated release are removed.
"""
from __future__ import annotations

import argparse
import io
import re
from pathlib import Path
from typing import Sequence

from PIL import Image

from explain import viz
from explain.posthoc import attribute
from explain.report import model_figures
from models.pretrained import list_pretrained, load_pretrained, pretrained_entry

from .apps import load_synthetic, synthetic_recipe
from .errors import run_main

__all__ = ["gallery_section", "main", "small_png"]

POSTHOC = ("gradcam", "integrated_gradients", "smoothgrad")  # for models without an explanation of their own


def _slug(caption: str) -> str:
    words = re.findall(r"[a-z]+", caption.lower())[:4]
    return "-".join(words) or "figure"


def small_png(png: bytes) -> bytes:
    """The PNG with a 256-colour adaptive palette: about a third of the bytes, no visible change on figures."""
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    return out.getvalue()


def _save_small(fig, file: Path, dpi: int) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    viz.plt.close(fig)
    file.write_bytes(small_png(buffer.getvalue()))


def gallery_section(name: str, out: Path, num_images: int = 4, dpi: int = 60) -> str:
    """Draw one release's figures into ``out/<name>/`` and return its Markdown section (links relative to `out`)."""
    entry = pretrained_entry(name)
    model = load_pretrained(name)
    recipe = synthetic_recipe(name)
    images = labels = class_names = None
    if recipe is not None:  # a SyntheticParts release: explain its first test images
        data = load_synthetic(recipe, max(num_images, 32))
        images, labels, class_names = data["image"], data["label"], data["class_names"]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    accuracy = entry.metrics.get("test_acc")
    lines = [f"## `{name}`", "",
             f"{type(model).__name__} trained on {entry.dataset} by `{' + '.join((entry.config, *entry.overlays))}`"
             + (f", {100 * accuracy:.1f}% test accuracy." if accuracy is not None else "."), ""]
    try:
        figures = model_figures(model, images, labels, class_names, num_images)
    except NotImplementedError:  # no explanation of its own (the plain baseline): post-hoc methods instead
        figures = [] if images is None else [(f"Post-hoc explanations of the predicted class ({', '.join(POSTHOC)}).",
                                              viz.method_grid(images[:num_images], {m: attribute(model, images[:num_images], method=m)
                                                                                    for m in POSTHOC}))]
    for i, (caption, fig) in enumerate(figures):
        file = folder / f"{i}-{_slug(caption)}.png"
        _save_small(fig, file, dpi)
        lines += [f"![{caption}]({name}/{file.name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.gallery", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="released names (default: every release of models.list_pretrained())")
    p.add_argument("--out", default="docs/gallery", help="folder of index.md and the PNGs")
    p.add_argument("--num-images", type=int, default=4, help="explained test images per release")
    p.add_argument("--dpi", type=int, default=60, help="PNG resolution (small files for the repository)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Write the gallery; returns the path of its index.md."""
    args = _parse_args(argv)
    names = args.names or list_pretrained()
    unknown = [n for n in names if n not in list_pretrained()]
    if unknown:
        raise ValueError(f"not released: {', '.join(unknown)}; released names: {', '.join(list_pretrained())}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [gallery_section(name, out, args.num_images, args.dpi) for name in names]
    command = "python -m train.gallery --out " + str(args.out) + (" " + " ".join(args.names) if args.names else "")
    page = ["# Gallery of the released checkpoints", "",
            f"Generated by `{command}` from the released checkpoints (`models.list_pretrained()`) and the first "
            "test images of the SyntheticParts recipe each one records. Every figure is drawn by "
            "`explain.report.model_figures`, the figures of the HTML report (`python -m train.report`).", "",
            *sections]
    path = out / "index.md"
    path.write_text("\n".join(page).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_main(main)
