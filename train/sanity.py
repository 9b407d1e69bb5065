"""Sanity checks of prototype localisations (Xu-Darme et al., CVPRW 2023) for released prototype models:
a Markdown table of methods x families x checks.

    python -m train.sanity [--checkpoint protopnet_resnet18.synthparts ...] [--methods upsampling prp] \\
        [--num-images 32] [--top-k 3] --out docs/prototype_sanity.md

Each SOURCE is a released name, a zoo file or a Lightning checkpoint of ``train.py`` (default: every
released prototype model), loaded with `models.load_pretrained`. The test images are SyntheticParts'
test split of each checkpoint's recipe; a prototype's source image is its sample of the train split
(the push data). The maps come from `explain.prototype_localisation`, the checks from
`explain.sanity_checks`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from explain import sanity_checks as S
from explain.prototype_localisation import METHODS, localise_prototypes, localise_sources
from models.pretrained import list_pretrained, load_pretrained

from .apps import _SYNTHETIC_ARGS, default_name, load_synthetic, synthetic_recipe
from .data import SyntheticParts
from .errors import run_main

__all__ = ["main", "model_sanity_rows", "sanity_rows", "to_markdown"]

COLUMNS = [
    ("images/s", "test images localised per second (top-k prototypes each)"),
    ("fidelity", "similarity at the closest cell after deleting the map's top pixels / before, mean over areas (lower = more faithful)"),
    ("relevance", "share of the map's top 5% pixels on the image's parts (higher = on the object)"),
    ("energy", "share of the map's energy on the image's parts"),
    ("rand. prototypes", "Spearman correlation with the original map after randomising the prototypes (lower = passes)"),
    ("rand. all", "Spearman correlation after randomising every layer of the latent too (lower = passes)"),
    ("SSIM all", "SSIM with the original map after randomising everything (lower = passes)"),
    ("source fidelity", "fidelity of each prototype's map on its own source image, at its stored position"),
    ("source relevance", "relevance of each prototype's map on its source image"),
]


def _is_prototype_model(model) -> bool:
    return all(callable(getattr(model, n, None)) for n in ("latent", "prototype_tensor", "prototype_active"))


def _source_data(args: dict, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and part masks (any part) of train-split samples `indices` (the push data)."""
    dataset = SyntheticParts(**{k: v for k, v in args.items() if k in _SYNTHETIC_ARGS}, cache=False, augment=False).dataset("train")
    items = [dataset[int(i)] for i in indices]
    return torch.stack([it["image"] for it in items]), torch.stack([it["part_masks"].any(0) for it in items])


def _mean(t: torch.Tensor) -> float:
    return float(torch.nan_to_num(t.float(), nan=0.0).mean()) if t.numel() else float("nan")


def sanity_rows(name: str, model, data: dict, methods: Sequence[str], top_k: int, groups: int, random_images: int,
                sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> list[dict]:
    """One row per method for one model: the figures of `COLUMNS`."""
    images = data["image"].to(model.device)
    parts = data["part_masks"].any(1).to(model.device)
    with torch.no_grad():
        ids = model.top_prototypes(model.similarity_maps(images), top_k)
    rows = []
    for method in methods:
        torch.manual_seed(0)
        start = time.perf_counter()
        loc = localise_prototypes(model, images, ids, method)
        speed = len(images) / (time.perf_counter() - start)
        row = {"family": type(model).__name__, "checkpoint": name, "method": method, "images/s": speed,
               "fidelity": _mean(S.prototype_fidelity(model, images, loc).nanmean(2)),
               "relevance": _mean(S.mask_relevance(loc.maps, parts)), "energy": _mean(S.energy_relevance(loc.maps, parts))}
        n = min(random_images, len(images))
        sub = type(loc)(loc.maps[:n], loc.boxes[:n], loc.prototypes[:n], loc.cells[:n], method)
        rand = S.prototype_randomisation(model, images[:n], ids[:n], method, groups=groups, reference=sub)
        row["rand. prototypes"] = _mean(rand["spearman"][..., 0])
        row["rand. all"] = _mean(rand["spearman"][..., -1])
        row["SSIM all"] = _mean(rand["ssim"][..., -1])
        if sources is not None:
            proto, src_images, src_parts = sources
            src = localise_sources(model, src_images.to(model.device), proto, method)
            row["source fidelity"] = _mean(S.prototype_fidelity(model, src_images, src).nanmean(2))
            row["source relevance"] = _mean(S.mask_relevance(src.maps, src_parts.to(model.device)))
        rows.append(row)
    return rows


def model_sanity_rows(name: str, source: str, model, methods: Sequence[str], *, num_images: int = 32, top_k: int = 3,
                      random_images: int = 8, groups: int = 4, sources: int = 16) -> list[dict]:
    """`sanity_rows` of one prototype model on SyntheticParts' test split of its recipe (`source` names the
    checkpoint, whose release or run records the recipe), with up to `sources` pushed prototypes on their
    source images of the train split."""
    recipe = synthetic_recipe(source) or {"num_classes": model.num_classes}
    if "image_size" not in recipe and int(model.prototype_image_size[0]) > 0:  # the size of the push images
        recipe["image_size"] = int(model.prototype_image_size[0])
    data = load_synthetic(recipe, num_images)
    pushed = (model.prototype_active().cpu() & (model.prototype_source_index >= 0).cpu()).nonzero().squeeze(1)[:sources]
    found = (pushed, *_source_data(recipe, model.prototype_source_index[pushed].cpu())) if len(pushed) else None
    return sanity_rows(name, model, data, methods, top_k, groups, random_images, found)


def to_markdown(rows: list[dict]) -> str:
    """The rows of `sanity_rows` as a Markdown table and the legend of its columns."""
    header = ["family", "method"] + [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["family"], r["method"]] + [("—" if c not in r else f"{r[c]:.1f}" if c == "images/s" else f"{r[c]:.3f}")
                                             for c, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.sanity", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="*", default=None, help="[NAME=]SOURCE (default: every released prototype model)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--num-images", type=int, default=32, help="SyntheticParts test images per model")
    p.add_argument("--top-k", type=int, default=3, help="most similar prototypes localised per image")
    p.add_argument("--random-images", type=int, default=8, help="images of the randomisation cascade")
    p.add_argument("--groups", type=int, default=4, help="groups of layers of the randomisation cascade")
    p.add_argument("--sources", type=int, default=16, help="prototypes localised on their source images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="docs/prototype_sanity.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Write the table (and how it was made) to ``--out``; returns the rows."""
    args = _parse_args(argv)
    if args.num_images < 1 or args.top_k < 1:
        raise ValueError(f"--num-images and --top-k must be >= 1, got {args.num_images} and {args.top_k}")
    if args.checkpoint is None:
        specs = [(n, n) for n in list_pretrained()]
    else:
        specs = [s.split("=", 1) if "=" in s and not Path(s).is_file() else (default_name(s), s) for s in args.checkpoint]
    rows, used = [], []
    for name, source in specs:
        model = load_pretrained(source).to(args.device).eval()
        if not _is_prototype_model(model):
            if args.checkpoint is not None:
                raise ValueError(f"{source} is not a prototype model ({type(model).__name__})")
            continue
        rows += model_sanity_rows(name, source, model, args.methods, num_images=args.num_images, top_k=args.top_k,
                                  random_images=args.random_images, groups=args.groups, sources=args.sources)
        used.append(f"`{source}` ({type(model).__name__})")
    if not rows:
        raise ValueError("no prototype model among the checkpoints")
    command = "python -m train.sanity " + " ".join(argv if argv is not None else sys.argv[1:])
    text = ["# Sanity checks of prototype localisations", "",
            "Generated by `" + command.strip() + "` (explain/sanity_checks.py, explain/prototype_localisation.py; "
            "Xu-Darme et al., CVPRW 2023). "
            f"{args.num_images} SyntheticParts test images per model, their {args.top_k} most similar prototypes; "
            f"randomisation on {args.random_images} images, cascade of the prototypes then {args.groups} groups of layers "
            f"of the latent from the top; fidelity areas {list(S.FIDELITY_AREAS)}; up to {args.sources} prototypes "
            "on their source images. Checkpoints: " + ", ".join(used) + f". Timings on {args.device}"
            + (f" with {torch.get_num_threads()} torch threads" if args.device == "cpu" else "") + ".", "",
            to_markdown(rows), "", *[f"- **{c}**: {d}" for c, d in COLUMNS], ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))
    print(to_markdown(rows))
    return rows


if __name__ == "__main__":
    run_main(main)
