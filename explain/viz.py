"""Figures of every family (matplotlib on Agg, no OpenCV). Every function returns a titled Figure.

Conventions shared by all figures, so that one family reads like another:
- heatmaps use `HEATMAP_CMAP` (jet), min-max normalised per map and blended with an opacity proportional
  to the normalised value: pixels at the map's minimum keep the image's colour;
- boxes: `ACTIVATION_COLOR` (yellow) marks a high-activation or best-matching region, `RF_COLOR` (cyan)
  a receptive field;
- the figure's suptitle says what it shows (font `TITLE_SIZE`), panel titles use `PANEL_SIZE`.

`save_figure` writes PNG/SVG (format from the suffix); `log_figure` sends a figure to the loggers that
take images (wandb) or else writes a PNG.
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import matplotlib

if "inline" not in os.environ.get("MPLBACKEND", ""):  # Jupyter kernels keep their inline display
    matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


__all__ = [
    "HEATMAP_CMAP", "ACTIVATION_COLOR", "RF_COLOR", "WRONG_COLOR", "to_numpy_image", "overlay_heatmap", "heatmap_figure",
    "explanation_grid", "contribution_grid", "save_figure", "figure_to_array", "log_figure",
    "is_prototype_model", "prototype_gallery", "this_looks_like_that", "global_analysis",
    "tree_dot", "render_tree", "tree_figure", "tree_path_figure",
    "filter_part_gallery", "icnn_filter_gallery", "cam_grid", "method_grid",
]

HEATMAP_CMAP = "jet"
ACTIVATION_COLOR = "yellow"
RF_COLOR = "cyan"
WRONG_COLOR = "red"  # a neighbour or leaf of another class than expected
TITLE_SIZE = 10
PANEL_SIZE = 7


# ------------------------------------------------------------------------------------------ basics
def to_numpy_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) tensor in [0, 1] (or uint8) or (H, W, 3) array -> (H, W, 3) float array in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
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
    finite = np.isfinite(hm)
    if not finite.any():
        return np.zeros_like(hm)
    hm = np.where(finite, hm, hm[finite].min())  # NaN / inf pixels are drawn as no evidence
    lo, hi = hm.min(), hm.max()
    # A map constant up to float rounding (e.g. a 1x1 latent map upsampled) is drawn as constant, not as
    # its amplified rounding noise.
    if hi - lo <= 1e-5 * max(abs(hi), abs(lo), 1e-12):
        return np.zeros_like(hm)
    return (hm - lo) / (hi - lo)


def overlay_heatmap(image, heatmap, alpha: float = 0.6) -> np.ndarray:
    """Blend a heatmap (jet, min-max normalised to h in [0, 1]) over an image: (1 - alpha h) image + alpha h colour.

    The opacity follows h, so pixels at the map's minimum (and every pixel of a constant map) keep
    the image's colour, and the strongest evidence is the most opaque.
    """
    img = to_numpy_image(image)
    hm = _normalise_heatmap(heatmap)
    if hm.shape != img.shape[:2]:
        raise ValueError(f"heatmap shape {hm.shape} does not match image shape {img.shape[:2]}")
    colour = plt.get_cmap(HEATMAP_CMAP)(hm)[..., :3]
    weight = alpha * hm[..., None]
    return (1 - weight) * img + weight * colour


def _box_ok(box) -> bool:
    return box is not None and all(float(v) >= 0 for v in box) and float(box[2]) > float(box[0])


def _draw_box(ax, box, color: str = ACTIVATION_COLOR) -> None:
    """Draw (x0, y0, x1, y1), x1/y1 exclusive pixel edges; boxes with a negative entry (none) are skipped."""
    if not _box_ok(box):
        return
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    c = int(c)
    return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c)


def _panels(rows: int, cols: int, width: float = 1.9, height: float = 1.9) -> tuple[Figure, np.ndarray]:
    """A grid of image panels without ticks (labels stay visible)."""
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _show(ax, image, title: str | None = None, color: str = "black") -> None:
    ax.imshow(image if isinstance(image, np.ndarray) and image.ndim == 3 else to_numpy_image(image))
    if title is not None:
        ax.set_title(title, fontsize=PANEL_SIZE, color=color)


def _require(model, attribute: str, family: str, figure: str) -> None:
    if not hasattr(model, attribute):
        raise TypeError(f"{figure} needs {family}, got {type(model).__name__}")


@contextmanager
def _evaluating(model) -> Iterator[Any]:
    """Eval mode while drawing (BatchNorm statistics must not move), then the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _finish(fig: Figure, title: str) -> Figure:
    fig.suptitle(title, fontsize=TITLE_SIZE)
    fig.tight_layout()
    return fig


def heatmap_figure(image: torch.Tensor, heatmap: torch.Tensor, box=None, title: str = "Heatmap overlay") -> Figure:
    """Three panels: the image, the heatmap alone (jet), and the overlay (with an optional box)."""
    fig, axes = _panels(1, 3, 2.2, 2.4)
    _show(axes[0, 0], image, "image")
    hm = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    axes[0, 1].imshow(hm, cmap=HEATMAP_CMAP)
    axes[0, 1].set_title(f"heatmap [{hm.min():.2g}, {hm.max():.2g}]", fontsize=PANEL_SIZE)
    _show(axes[0, 2], overlay_heatmap(image, heatmap), "overlay")
    _draw_box(axes[0, 2], box)
    return _finish(fig, title)


def explanation_grid(
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    labels: Sequence[int] | torch.Tensor | None = None,
    predictions: Sequence[int] | torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    boxes: torch.Tensor | None = None,
    title: str = "Explanations",
) -> Figure:
    """Two rows: the images (true / predicted class), then their heatmaps overlaid (with optional boxes)."""
    n = len(images)
    fig, axes = _panels(2, n, 2.2, 2.4)
    for i in range(n):
        caption = []
        if labels is not None:
            caption.append(f"true {_class_name(labels[i], class_names)}")
        if predictions is not None:
            caption.append(f"pred {_class_name(predictions[i], class_names)}")
        wrong = labels is not None and predictions is not None and int(labels[i]) != int(predictions[i])
        _show(axes[0, i], images[i], "\n".join(caption), WRONG_COLOR if wrong else "black")
        _show(axes[1, i], overlay_heatmap(images[i], heatmaps[i]))
        if boxes is not None:
            _draw_box(axes[1, i], boxes[i])
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("heatmap", fontsize=9)
    return _finish(fig, title)


def contribution_grid(
    images: torch.Tensor,
    contributions: torch.Tensor,
    colour: torch.Tensor | None = None,
    labels: Sequence[int] | torch.Tensor | None = None,
    predictions: Sequence[int] | torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    percentile: float = 99.5,
    title: str = "Contribution maps",
) -> Figure:
    """Rows: the images; signed contribution maps (bwr, symmetric range clipped at the `percentile` of
    |map|, as B-cos' ``plot_contribution_map``); with `colour` (B, H, W, 4) RGBA explanations (B-cos'
    colour coding), drawn on black."""
    n, rows = len(images), 3 if colour is not None else 2
    fig, axes = _panels(rows, n, 2.2, 2.4)
    for i in range(n):
        caption = [f"true {_class_name(labels[i], class_names)}"] if labels is not None else []
        if predictions is not None:
            caption.append(f"pred {_class_name(predictions[i], class_names)}")
        _show(axes[0, i], images[i], "\n".join(caption) or None)
        cmap = contributions[i].detach().float().cpu().numpy()
        vrange = float(np.percentile(np.abs(cmap), percentile)) or 1.0
        axes[1, i].imshow(np.clip(cmap, -vrange, vrange), cmap="bwr", vmin=-vrange, vmax=vrange)
        if colour is not None:
            axes[2, i].set_facecolor("black")
            axes[2, i].imshow(colour[i].detach().float().cpu().numpy())
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("contributions", fontsize=9)
    if colour is not None:
        axes[2, 0].set_ylabel("colour coding", fontsize=9)
    return _finish(fig, title)


# ------------------------------------------------------------------------------------ output, logging
def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save a figure (format from the suffix), creating folders, and close it.

    Written to a temporary file, then renamed: a crash while drawing never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same suffix: matplotlib picks the format from it
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def figure_to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    buffer.seek(0)
    return (plt.imread(buffer)[..., :3] * 255).round().astype(np.uint8)


def log_figure(fig: Figure, key: str, loggers: Iterable[Any] = (), directory: str | Path | None = None,
               step: int | None = None, close: bool = True) -> list[Path]:
    """Send a figure to every logger that takes images (``log_image``, e.g. WandbLogger); when none does
    and `directory` is given, save it as ``<directory>/<key with / as _>.png``. Returns the files written."""
    takers = [lg for lg in loggers if hasattr(lg, "log_image")]
    written: list[Path] = []
    if takers:
        array = figure_to_array(fig)
        for logger in takers:
            logger.log_image(key=key, images=[array], step=step)
    elif directory is not None:
        path = Path(directory) / f"{key.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    if close:
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------- Interpretable CNN
def filter_part_gallery(
    images: torch.Tensor,
    activations: torch.Tensor,
    filters: Sequence[int],
    k: int = 5,
    thresholds: torch.Tensor | None = None,
    receptive_field=None,
    title: str = "Filter parts",
    row_labels: Sequence[str] | None = None,
) -> Figure:
    """One row per filter: its top-k images by max activation, with the filter's region drawn on them.

    The region is the bilinearly upsampled activation above the filter's threshold (`thresholds` (C,),
    e.g. from `explain.filter_metrics.activation_thresholds`; default half of the image's peak), drawn as
    a yellow contour over a dimmed outside. With a `receptive_field` (``.box(i, j)``, e.g.
    ``model.receptive_field(H)``) the receptive field of the peak cell is boxed in cyan.

    Args:
        images: (N, 3, H, W) in [0, 1].
        activations: (N, C, h, w) of the layer, for the same images.
        filters: filter indices, one row each.
        k: images per filter (at most N).
        row_labels: one label per row (default "filter f").
    """
    if images.dim() != 4 or activations.dim() != 4 or len(images) != len(activations):
        raise ValueError(
            f"need images (N, 3, H, W) and activations (N, C, h, w) for the same N, got {tuple(images.shape)} "
            f"and {tuple(activations.shape)}"
        )
    num_filters = activations.shape[1]
    bad = [f for f in filters if not 0 <= int(f) < num_filters]
    if bad or not len(filters):
        raise ValueError(f"filters must be a non-empty list of indices in [0, {num_filters}), got {list(filters)}")
    k = max(1, min(int(k), len(images)))
    acts = activations.detach().float().cpu()
    size = images.shape[-2:]
    fig, axes = _panels(len(filters), k, 1.8, 1.9)
    for row, f in enumerate(int(f) for f in filters):
        peaks = acts[:, f].flatten(1).max(dim=1)
        top = peaks.values.argsort(descending=True)[:k]
        up = torch.nn.functional.interpolate(acts[top, f][:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        for col, n in enumerate(top.tolist()):
            ax = axes[row, col]
            img = to_numpy_image(images[n])
            level = float(thresholds[f]) if thresholds is not None else 0.5 * float(peaks.values[n])
            region = up[col].numpy() > level
            _show(ax, np.where(region[..., None], img, 0.35 * img), f"#{n}: {float(peaks.values[n]):.2g}")
            if region.any() and not region.all():
                ax.contour(region.astype(float), levels=[0.5], colors=ACTIVATION_COLOR, linewidths=1.0)
            if receptive_field is not None:
                i, j = divmod(int(peaks.indices[n]), acts.shape[-1])
                y0, y1, x0, x1 = receptive_field.box(i, j)
                _draw_box(ax, (x0, y0, x1, y1), color=RF_COLOR)
        axes[row, 0].set_ylabel(row_labels[row] if row_labels is not None else f"filter {f}", fontsize=8)
    return _finish(fig, title)


@torch.no_grad()
def icnn_filter_gallery(model, images: torch.Tensor, filters: Sequence[int] | None = None, k: int = 4,
                        class_names: Sequence[str] | None = None, max_filters: int = 6) -> Figure:
    """`filter_part_gallery` of an InterpretableCNN's last interpretable layer (masked maps), each row
    labelled with the filter's category. Default filters: per class, the filter of that category with the
    highest mean peak activation over `images` (at most `max_filters` rows)."""
    _require(model, "filter_categories", "an InterpretableCNN", "icnn_filter_gallery")
    with _evaluating(model):
        _, maps = model.layer_maps(images.to(model.device))
    acts = maps[-1].masked.cpu()
    categories = model.filter_categories().cpu()
    if filters is None:
        peak = acts.flatten(2).amax(dim=2).mean(dim=0)
        filters = [int(torch.where(categories == c, peak, -torch.inf).argmax())
                   for c in categories.unique().tolist()][:max_filters]
    labels = [f"filter {f} → {_class_name(categories[f], class_names)}" for f in filters]
    return filter_part_gallery(images.cpu(), acts, filters, k=k, receptive_field=model.receptive_field(images.shape[-1]),
                               title="Interpretable CNN: top images of each filter (yellow: part region, cyan: receptive field)",
                               row_labels=labels)


# ---------------------------------------------------------------------------------- CAM, post-hoc
def cam_grid(model, images: torch.Tensor, top: int = 3, class_names: Sequence[str] | None = None,
             labels: Sequence[int] | torch.Tensor | None = None) -> Figure:
    """One row per image: the image, then the model's own explanation (a CAM for CAMNet) of each of its
    `top` most probable classes, titled with the class and its probability."""
    images = images.to(model.device)
    with _evaluating(model):
        with torch.no_grad():
            probs = model(images).softmax(dim=1)
        top = min(top, probs.shape[1])
        ranked = probs.topk(top, dim=1)
        maps = [model.explain(images, target=ranked.indices[:, rank]).heatmap for rank in range(top)]
    fig, axes = _panels(len(images), top + 1, 1.9, 2.0)
    for i in range(len(images)):
        _show(axes[i, 0], images[i], f"true {_class_name(labels[i], class_names)}" if labels is not None else "image")
        for rank in range(top):
            c, p = int(ranked.indices[i, rank]), float(ranked.values[i, rank])
            _show(axes[i, rank + 1], overlay_heatmap(images[i], maps[rank][i]), f"{_class_name(c, class_names)} p={p:.2f}")
    return _finish(fig, f"{type(model).__name__}: explanations of the top {top} classes")


def method_grid(images: torch.Tensor, heatmaps_by_method: dict[str, torch.Tensor], max_images: int = 8,
                title: str = "Post-hoc explanations: one column per method") -> Figure:
    """One row per image: the image, then its heatmap from every method (columns named after them)."""
    methods = list(heatmaps_by_method)
    n = min(len(images), max_images, *(len(h) for h in heatmaps_by_method.values())) if methods else 0
    if n == 0:
        raise ValueError("method_grid needs at least one image and one method")
    fig, axes = _panels(n, len(methods) + 1, 1.9, 1.9)
    for i in range(n):
        _show(axes[i, 0], images[i], "image" if i == 0 else None)
        for j, method in enumerate(methods, start=1):
            _show(axes[i, j], overlay_heatmap(images[i], heatmaps_by_method[method][i]), method if i == 0 else None)
    return _finish(fig, title)


# The prototype and tree views live in explain/prototype_views.py and are part of this module's API. They
# are resolved on first use, because prototype_views draws with the helpers above (an import at the end
# of this module would make `import explain.prototype_views` on its own circular).
_PROTOTYPE_VIEWS = ("global_analysis", "is_prototype_model", "prototype_gallery", "render_tree",
                    "this_looks_like_that", "tree_dot", "tree_figure", "tree_path_figure")


def __getattr__(name: str):
    if name in _PROTOTYPE_VIEWS:
        from . import prototype_views

        return getattr(prototype_views, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
