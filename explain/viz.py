"""Figures (matplotlib, no OpenCV). Every function returns a Figure; `save_figure` writes PNG/SVG."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

__all__ = ["HEATMAP_CMAP", "to_numpy_image", "overlay_heatmap", "explanation_grid", "save_figure"]

HEATMAP_CMAP = "jet"


def to_numpy_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) tensor in [0, 1] or (H, W, 3) uint8/float array -> (H, W, 3) float array in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    if image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.clip(image, 0.0, 1.0)


def _normalise_heatmap(heatmap: torch.Tensor | np.ndarray) -> np.ndarray:
    hm = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap, float)
    lo, hi = np.nanmin(hm), np.nanmax(hm)
    return (hm - lo) / (hi - lo) if hi > lo else np.zeros_like(hm)


def overlay_heatmap(image, heatmap, alpha: float = 0.5) -> np.ndarray:
    """Blend a min-max normalised heatmap (jet) over an image: (1 - alpha) image + alpha colour.

    Where the normalised heatmap is 0 the colour is jet's dark blue, so only a constant map leaves
    the image unchanged.
    """
    img = to_numpy_image(image)
    hm = _normalise_heatmap(heatmap)
    if hm.shape != img.shape[:2]:
        raise ValueError(f"heatmap shape {hm.shape} does not match image shape {img.shape[:2]}")
    if hm.max() == 0:
        return img
    colour = plt.get_cmap(HEATMAP_CMAP)(hm)[..., :3]
    return (1 - alpha) * img + alpha * colour


def _draw_box(ax, box, color: str = "yellow") -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))


def explanation_grid(
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    labels: Sequence[int] | torch.Tensor | None = None,
    predictions: Sequence[int] | torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    boxes: torch.Tensor | None = None,
    title: str = "Explanations",
) -> Figure:
    """Two rows per image batch: the images, then their heatmaps overlaid (with optional boxes)."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.8), squeeze=False)

    def name(c) -> str:
        c = int(c)
        return class_names[c] if class_names is not None and c < len(class_names) else str(c)

    for i in range(n):
        top, bottom = axes[0, i], axes[1, i]
        top.imshow(to_numpy_image(images[i]))
        caption = []
        if labels is not None:
            caption.append(f"true {name(labels[i])}")
        if predictions is not None:
            caption.append(f"pred {name(predictions[i])}")
        top.set_title("\n".join(caption), fontsize=8)
        bottom.imshow(overlay_heatmap(images[i], heatmaps[i]))
        if boxes is not None:
            _draw_box(bottom, boxes[i])
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("heatmap", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save a figure (format from the suffix), creating folders, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
