"""SyntheticParts generation speed on one CPU core: images per second for a few sizes and knobs.

    python benchmarks/synthetic_speed.py [--n 500]
    python benchmarks/synthetic_speed.py --quick    # 20 images at 64 px
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from train.synthetic import SyntheticPartsGenerator  # noqa: E402

CASES = [
    ("default", {}),
    ("clutter=8", {"clutter": 8}),
    ("occl+jitter+shortcut", {"occlusion": 0.5, "color_jitter": 0.5, "shortcut": 0.5}),
]


def measure(gen: SyntheticPartsGenerator, n: int) -> tuple[float, float]:
    """(images/s for recipe + render, images/s for render alone)."""
    t0 = time.perf_counter()
    recipes = [gen.recipe(i, "train") for i in range(n)]
    t1 = time.perf_counter()
    for r in recipes:
        gen.render(r)
    t2 = time.perf_counter()
    return n / (t2 - t0), n / (t2 - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 images at 64 px: a smoke run")
    parser.add_argument("--n", type=int, default=500, help="images per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    args = parser.parse_args()
    if args.quick:
        args.n, args.sizes = 20, [64]
    print(f"SyntheticParts generation, {args.n} images per measurement, one process")
    print("| size | case | images/s (recipe + render) | render images/s | ms/image |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for name, kw in CASES:
            gen = SyntheticPartsGenerator(image_size=size, **kw)
            gen.sample(0)  # warm caches
            total, render = measure(gen, args.n)
            print(f"| {size} | {name} | {total:.0f} | {render:.0f} | {1000 / total:.2f} |")


if __name__ == "__main__":
    main()
