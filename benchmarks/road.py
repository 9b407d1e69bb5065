"""ROAD's noisy linear imputation (explain.perturbation_metrics.road_impute): its sparse LU solve and its
batched conjugate gradients against the reference's way, one ``lil_matrix`` built pixel by pixel and
``scipy.sparse.linalg.spsolve`` per image.

Images of random pixels; the removed pixels are the top fraction of a smooth random map (one or a few
blobs, the hard case for CG), seven fractions per image as ROAD's MoRF curve. Prints seconds per
image and fraction, images per second, peak memory and the largest difference to the reference.

    python benchmarks/road.py                       # 8 images at 64 and 128 px, one thread
    python benchmarks/road.py --sizes 224 --images 2
    python benchmarks/road.py --quick               # 1 image at 32 px
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.sparse import lil_matrix  # noqa: E402
from scipy.sparse.linalg import spsolve  # noqa: E402

from benchmarks.common import timed  # noqa: E402
from explain.perturbation_metrics import road_impute  # noqa: E402

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9)


def reference_impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """One image: the system assembled entry by entry, then one spsolve (the reference's structure)."""
    channels, height, width = image.shape
    flat = image.reshape(channels, -1)
    index = np.flatnonzero(removed.ravel())
    unknown = -np.ones(height * width, dtype=int)
    unknown[index] = np.arange(len(index))
    matrix, rhs = lil_matrix((len(index), len(index))), np.zeros((len(index), channels))
    for row, p in enumerate(index):
        y, x = divmod(int(p), width)
        total = 0.0
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy or dx) and 0 <= y + dy < height and 0 <= x + dx < width:
                    weight = 1 / 6 if dy == 0 or dx == 0 else 1 / 12
                    q = (y + dy) * width + x + dx
                    total += weight
                    if unknown[q] >= 0:
                        matrix[row, unknown[q]] = -weight
                    else:
                        rhs[row] += weight * flat[:, q]
        matrix[row, row] = total
    out = flat.copy()
    out[:, index] = spsolve(matrix.tocsc(), rhs).T
    return out.reshape(image.shape)


def masks(images: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(F * B, H, W): the top fraction of a bicubic-upsampled 4 x 4 random map, for each fraction."""
    smooth = F.interpolate(torch.rand(images, 1, 4, 4, generator=generator), size=(size, size), mode="bicubic")
    ranks = smooth.flatten(1).argsort(1, descending=True).argsort(1).view(images, size, size)
    return torch.cat([ranks < round(f * size * size) for f in FRACTIONS])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="one image at 32 px")
    a = p.parse_args()
    if a.quick:
        a.sizes, a.images = [32], 1
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    print("| size | variant | s per image and fraction | images x fractions / s | peak MiB | max abs diff |")
    print("|---|---|---|---|---|---|")
    for size in a.sizes:
        removed = masks(a.images, size, generator)
        images = torch.rand(a.images, 3, size, size, generator=generator).repeat(len(FRACTIONS), 1, 1, 1)
        n = len(removed)
        wall, _, peak, ref = timed(lambda: np.stack([reference_impute(x, m) for x, m in
                                                     zip(images.double().numpy(), removed.numpy())]), device)
        rows = [("reference (lil_matrix + spsolve, per image)", wall, peak, 0.0)]
        for solver in ("direct", "cg"):
            wall, _, peak, out = timed(lambda s=solver: road_impute(images, removed, solver=s), device)
            rows.append((f"road_impute solver={solver}", wall, peak, float(np.abs(out.double().numpy() - ref).max())))
        base = rows[0][1]
        for name, wall, peak, diff in rows:
            print(f"| {size} | {name} | {wall / n:.4f} ({base / wall:.1f}x) | {n / wall:.1f} | {peak:.0f} | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
