"""TCAV of SyntheticParts' part variants for released checkpoints: a Markdown table (``docs/tcav.md``).

    python -m train.tcav                                  # the five released SyntheticParts checkpoints
    python -m train.tcav --checkpoint plain_resnet18_half.synthparts --concept-images 30 --out /tmp/tcav.md

Every part variant (slot s, variant v) is a concept with ground truth: its examples are training-split
scenes whose four parts all get random variants except slot s, which shows v; the random sets are
scenes with all four parts random (so a concept set differs from a random set only in slot s). The
examples of a class are its test-split images. A class's *own* variants (the four that define it)
should get significant TCAV scores above the random ones; a *random* concept (one more random set)
should not be significant. The scores and the test come from `explain.tcav.run_tcav`.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from explain.posthoc import find_layer
from explain.tcav import run_tcav
from models.pretrained import load_pretrained

from .apps import _SYNTHETIC_ARGS, synthetic_recipe
from .data import SyntheticParts
from .errors import run_main
from .synthetic import NUM_VARIANTS, PART_NAMES

__all__ = ["concept_images", "main"]

RELEASED = ("plain_resnet18_half.synthparts", "cam_resnet18.synthparts", "protopnet_resnet18.synthparts",
            "prototree_resnet10t.synthparts", "icnn_resnet18.synthparts")


def concept_images(generator, n: int, slot: int | None, variant: int | None, start: int, seed: int,
                   return_recipes: bool = False):
    """(n, 3, H, W) float images in [0, 1] of training scenes `start`.. with every part's variant drawn at
    random, except `slot` showing `variant` (slot None: a random set). With `return_recipes`, also the
    (recipe, replace) pairs that render them."""
    rng = np.random.default_rng([seed, start])
    images, recipes = [], []
    for i in range(n):
        recipe = generator.recipe(start + i, "train")
        replace = {name: int(rng.integers(NUM_VARIANTS)) for name in PART_NAMES}
        if slot is not None:
            replace[PART_NAMES[slot]] = int(variant)
        image = generator.render(recipe, replace=replace).image
        images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0)
        recipes.append((recipe, replace))
    out = torch.stack(images)
    return (out, recipes) if return_recipes else out


def _default_layers(model: torch.nn.Module, image_size: int) -> list[str]:
    """The last trunk stage (a module named ``layer<k>``) whose output is not the last 4-D map, and that
    map (`find_layer`); a stage that only passes the map on (an identity after it) does not count."""
    names = {module: name for name, module in model.named_modules()}
    x = torch.rand(1, 3, image_size, image_size, device=next(model.parameters()).device)
    last = find_layer(model, x)
    stages = [m for m, name in names.items() if re.search(r"(^|\.)layer\d+$", name)]
    outputs: dict[torch.nn.Module, torch.Tensor] = {}

    def keep(module: torch.nn.Module, inputs, output) -> None:
        outputs.setdefault(module, output)

    hooks = [m.register_forward_hook(keep) for m in [*stages, last]]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    final = outputs[last]
    earlier = [m for m in stages if m in outputs and outputs[m].data_ptr() != final.data_ptr()]
    return [names[m] for m in earlier[-1:]] + [names[last]]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.tcav", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", default=list(RELEASED), help="released names, zoo files or Lightning checkpoints")
    p.add_argument("--layers", nargs="*", default=[], help="NAME=layer1,layer2 (dotted module names) per checkpoint")
    p.add_argument("--concept-images", type=int, default=40, help="examples per concept and per random set")
    p.add_argument("--random-sets", type=int, default=8, help="random sets (the official default is 5)")
    p.add_argument("--class-images", type=int, default=20, help="test images per class")
    p.add_argument("--objective", choices=["logit", "cross_entropy"], default="logit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/tcav.md")
    return p.parse_args(argv)


def _summary(name: str, rows: list[dict], class_variants: np.ndarray) -> list[str]:
    lines = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        groups: dict[str, list[dict]] = {"own variants": [], "other variants": [], "random concept": []}
        for r in (r for r in rows if r["layer"] == layer):
            if r["concept"] == "random":
                groups["random concept"].append(r)
            else:
                slot, variant = r["concept"].split("=")
                own = class_variants[r["target"], PART_NAMES.index(slot)] == int(variant)
                groups["own variants" if own else "other variants"].append(r)
        for group, rs in groups.items():
            up = sum(r["significant"] and r["mean"] > r["null_mean"] for r in rs)
            down = sum(r["significant"] and r["mean"] < r["null_mean"] for r in rs)
            lines.append(f"| {name} | {layer} | {group} | {len(rs)} | {np.mean([r['mean'] for r in rs]):.3f} | "
                         f"{np.mean([r['null_mean'] for r in rs]):.3f} | {up / len(rs):.0%} | {down / len(rs):.0%} | "
                         f"{np.mean([r['cav_accuracy'] for r in rs]):.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run TCAV for every checkpoint and write the Markdown page to ``--out``; returns all rows."""
    args = _parse_args(argv)
    layer_args = dict(item.split("=", 1) for item in args.layers)
    summary, detail, all_rows = [], [], []
    started = time.perf_counter()
    for source in args.checkpoint:
        recipe = synthetic_recipe(source)
        if recipe is None:
            raise ValueError(f"{source}: was not trained on SyntheticParts; TCAV here needs its part concepts")
        gen = SyntheticParts(**{k: v for k, v in recipe.items() if k in _SYNTHETIC_ARGS}, cache=False, augment=False).generator
        model = load_pretrained(source).to(args.device).eval()
        layers = layer_args[source].split(",") if source in layer_args else _default_layers(model, gen.image_size)
        n = args.concept_images
        concepts = {f"{PART_NAMES[s]}={v}": concept_images(gen, n, s, v, (1 + s * NUM_VARIANTS + v) * n, args.seed)
                    for s in range(len(PART_NAMES)) for v in range(NUM_VARIANTS)}
        base = (1 + len(PART_NAMES) * NUM_VARIANTS) * n
        concepts["random"] = concept_images(gen, n, None, None, base, args.seed)
        randoms = [concept_images(gen, n, None, None, base + (i + 1) * n, args.seed) for i in range(args.random_sets)]
        targets = {c: torch.stack([gen_image(gen, c + k * gen.num_classes) for k in range(args.class_images)])
                   for c in range(gen.num_classes)}
        tic = time.perf_counter()
        rows = run_tcav(model, layers, targets, concepts, randoms, objective=args.objective, seed=args.seed)
        print(f"[tcav] {source}: {len(rows)} rows, {time.perf_counter() - tic:.0f} s", flush=True)
        for r in rows:
            r["checkpoint"] = source
        all_rows += rows
        summary += _summary(source, rows, gen.class_variants)
        if source == args.checkpoint[0]:
            last = layers[-1]
            for r in rows:
                if r["layer"] == last and r["concept"] != "random":
                    slot, variant = r["concept"].split("=")
                    if gen.class_variants[r["target"], PART_NAMES.index(slot)] == int(variant):
                        detail.append(f"| {gen.class_names[r['target']]} | {r['concept']} | {r['mean']:.2f} ± {r['std']:.2f} | "
                                      f"{r['null_mean']:.2f} | {r['p_value']:.1e} | {'yes' if r['significant'] else 'no'} |")
            detail += [f"| {gen.class_names[r['target']]} | random | {r['mean']:.2f} ± {r['std']:.2f} | {r['null_mean']:.2f} | "
                       f"{r['p_value']:.1e} | {'yes' if r['significant'] else 'no'} |"
                       for r in rows if r["layer"] == last and r["concept"] == "random"]
    seconds = time.perf_counter() - started
    page = _page(args, summary, detail, seconds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(page)
    print(page)
    return all_rows


def gen_image(generator, index: int) -> torch.Tensor:
    """Test-split image `index` as a (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(generator.sample(index, "test").image).permute(2, 0, 1).float() / 255.0


def _page(args: argparse.Namespace, summary: list[str], detail: list[str], seconds: float) -> str:
    head = ("| checkpoint | layer | concepts | pairs | mean TCAV | mean random TCAV | significant above | "
            "significant below | CAV accuracy |\n|---|---|---|---|---|---|---|---|---|")
    command = "python -m train.tcav" + ("" if list(args.checkpoint) == list(RELEASED) else " --checkpoint " + " ".join(args.checkpoint))
    return f"""# TCAV of SyntheticParts part variants

TCAV (Kim et al. 2018; `explain/tcav.py`) for the released SyntheticParts checkpoints, written by
`{command}` ({seconds:.0f} s on {args.device}).

**Concepts.** Each of the 4 x 5 part variants (slot=variant, e.g. `wing=3`) is a concept: {args.concept_images}
training-split scenes whose parts all get random variants except that slot, which shows the variant.
The {args.random_sets} random sets (and the extra `random` concept) are {args.concept_images} scenes each with all parts random, so a
concept set differs from a random set only in its slot. The examples of a class are its first
{args.class_images} test images. A class's **own variants** are the 4 that define it (10 classes: 40
pairs), the **other variants** the 16 others (160 pairs).

**Scores and test** (as the official code): a CAV per concept and random set (SGD linear SVM, alpha
0.01, 33% held out), the TCAV score = the fraction of the class's images whose {args.objective}
derivative along the CAV is positive; the null distribution = every random set against every other
({args.random_sets * (args.random_sets - 1)} runs); two-sided t-test, significant at p <= 0.05, no
Bonferroni correction. "Significant above/below": the share of pairs with p <= 0.05 and a mean score
above/below the random mean. Layers: the last 4-D map of each model (`explain.posthoc.find_layer`) and the trunk stage before it.

{head}
{chr(10).join(summary)}

## Per class: {args.checkpoint[0]}, last layer

| class | concept | TCAV (mean ± std over random sets) | random TCAV | p | significant |
|---|---|---|---|---|---|
{chr(10).join(detail)}
"""


if __name__ == "__main__":
    run_main(main)
