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


# Interpretable CNN
def filter_part_gallery(
    images: torch.Tensor,
    activations: torch.Tensor,
    filters: Sequence[int],
    k: int = 5,
    thresholds: torch.Tensor | None = None,
    receptive_field=None,
    title: str = "Filter parts",
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
    fig, axes = plt.subplots(len(filters), k, figsize=(1.8 * k, 1.9 * len(filters)), squeeze=False)
    for row, f in enumerate(int(f) for f in filters):
        peaks = acts[:, f].flatten(1).max(dim=1)
        top = peaks.values.argsort(descending=True)[:k]
        up = torch.nn.functional.interpolate(acts[top, f][:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        for col, n in enumerate(top.tolist()):
            ax = axes[row, col]
            img = to_numpy_image(images[n])
            level = float(thresholds[f]) if thresholds is not None else 0.5 * float(peaks.values[n])
            region = up[col].numpy() > level
            ax.imshow(np.where(region[..., None], img, 0.35 * img))
            if region.any() and not region.all():
                ax.contour(region.astype(float), levels=[0.5], colors="yellow", linewidths=1.0)
            if receptive_field is not None:
                i, j = divmod(int(peaks.indices[n]), acts.shape[-1])
                y0, y1, x0, x1 = receptive_field.box(i, j)
                _draw_box(ax, (x0, y0, x1, y1), color="cyan")
            ax.set_title(f"#{n}: {float(peaks.values[n]):.2g}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"filter {f}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


__all__.append("filter_part_gallery")


def prototype_gallery(model, max_prototypes: int = 200, class_names: Sequence[str] | None = None, columns: int = 10) -> Figure:
    """The stored patches of a pushed prototype model (ProtoPNet's `prototype_patch` buffer), one tile each.

    Reads only the model's buffers (`prototype_patch`, `prototype_class_identity`, `prototype_source_index`,
    optional `prototype_mask`), so a checkpoint alone can draw its prototypes. Pruned prototypes are left out.
    """
    patches = model.prototype_patch.detach().cpu()
    classes = model.prototype_class_identity.argmax(dim=1).cpu()
    sources = model.prototype_source_index.cpu()
    keep = getattr(model, "prototype_mask", torch.ones(len(patches), dtype=torch.bool)).cpu()
    ids = keep.nonzero().squeeze(1)[:max_prototypes].tolist()
    n = max(len(ids), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, j in zip(axes.flat, ids):
        c = int(classes[j])
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        ax.imshow(to_numpy_image(patches[j]))
        ax.set_title(f"p{j} {name}\nimg {int(sources[j])}", fontsize=6)
    fig.suptitle(f"{type(model).__name__}: {len(ids)} prototype patches", fontsize=9)
    fig.tight_layout()
    return fig


# ProtoTree
def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    return class_names[c] if class_names is not None and c < len(class_names) else str(c)


def tree_dot(model, class_names: Sequence[str] | None = None, image_dir: str | Path | None = None) -> str:
    """Graphviz DOT of a (pruned) ProtoTree: decision nodes, leaves with their class distribution.

    Each decision node shows its prototype patch when ``image_dir/node_<id>.png`` exists (see
    `render_tree`), else its node and prototype ids. Each leaf shows one grey cell per class,
    255 (1 - p) as in the official visualisation, and its argmax class. Edges are labelled "Absent"
    (left) and "Present" (right). Node ids are the model's breadth-first ids (``n<id>``).
    """
    structure = model.structure()
    dists = model.leaf_distributions().detach().float().cpu()
    lines = ["digraph ProtoTree {", '  node [shape=plaintext, fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for node in structure.internal:
        proto = int(model.node_prototype[node])
        text = f"node {node} · prototype {proto}"
        image = Path(image_dir).resolve() / f"node_{node}.png" if image_dir is not None else None
        if image is not None and image.is_file():
            label = f'<<TABLE BORDER="0"><TR><TD><IMG SRC="{image}"/></TD></TR><TR><TD>{text}</TD></TR></TABLE>>'
        else:
            label = f'<<TABLE BORDER="1" CELLBORDER="0"><TR><TD>{text}</TD></TR></TABLE>>'
        lines.append(f"  n{node} [label={label}];")
    for node in structure.leaves:
        dist = dists[node - structure.num_internal]
        top = int(dist.argmax())
        greys = [f"{int(255 * (1 - float(p))):02x}" * 3 for p in dist]
        width = max(1, 120 // len(dist))
        cells = "".join(f'<TD BGCOLOR="#{g}" WIDTH="{width}" HEIGHT="12"></TD>' for g in greys)
        name = _class_name(top, class_names).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        label = (f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="0"><TR>{cells}</TR>'
                 f'<TR><TD COLSPAN="{len(dist)}">leaf {node - structure.num_internal}: {name} ({float(dist[top]):.2f})</TD></TR></TABLE>>')
        lines.append(f"  n{node} [label={label}];")
    for node, (left, right) in structure.children.items():
        lines.append(f'  n{node} -> n{left} [label="Absent"];')
        lines.append(f'  n{node} -> n{right} [label="Present"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_tree(model, path: str | Path, class_names: Sequence[str] | None = None) -> Path:
    """Write the tree as ``<path>.dot`` (with prototype patch PNGs beside it) and render it with `dot`.

    The format follows the suffix of `path` (``.svg`` by default, ``.png``, ``.pdf``). Returns the
    rendered file, or the ``.dot`` file when Graphviz's `dot` is not installed.
    """
    import shutil
    import subprocess

    path = Path(path)
    if path.suffix not in (".svg", ".png", ".pdf"):
        path = path.with_suffix(".svg")
    image_dir = path.with_name(path.stem + "_patches")
    image_dir.mkdir(parents=True, exist_ok=True)
    for node in model.structure().internal:
        proto = int(model.node_prototype[node])
        if int(model.prototype_source[proto]) >= 0:  # projected: a real image patch is stored
            plt.imsave(image_dir / f"node_{node}.png", to_numpy_image(model.prototype_patch[proto]))
    dot_path = path.with_suffix(".dot")
    dot_path.write_text(tree_dot(model, class_names, image_dir))
    dot = shutil.which("dot")
    if dot is None:
        return dot_path
    subprocess.run([dot, f"-T{path.suffix[1:]}", str(dot_path), "-o", str(path)], check=True, capture_output=True)
    return path


def tree_path_figure(model, image: torch.Tensor, explanation, index: int = 0,
                     class_names: Sequence[str] | None = None) -> Figure:
    """Local explanation of one image: its greedy path, node by node, then the leaf's distribution.

    Top row: the prototype patch of each decision node. Bottom row: the image with the box of its
    best-matching patch and "Present, similarity s", or the plain image and "Absent". The last column
    shows the path's heatmap and the leaf distribution with the predicted class.
    """
    steps = explanation.evidence["path"][index]
    n = len(steps) + 1
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.4), squeeze=False)
    img = to_numpy_image(image)
    for col, step in enumerate(steps):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(to_numpy_image(model.prototype_patch[step["prototype"]]))
        projected = int(model.prototype_source[step["prototype"]]) >= 0
        top.set_title(f"node {step['node']}" + ("" if projected else " (not projected)"), fontsize=8)
        bottom.imshow(img)
        if step["present"]:
            _draw_box(bottom, step["box"])
            bottom.set_title(f"Present, similarity {step['similarity']:.2f}", fontsize=7)
        else:
            bottom.set_title("Absent", fontsize=7)
    dist = explanation.evidence["leaf_distribution"][index].detach().float().cpu().numpy()
    pred = int(dist.argmax())
    axes[0, -1].imshow(overlay_heatmap(image, explanation.heatmap[index]))
    axes[0, -1].set_title("path heatmap", fontsize=8)
    axes[1, -1].bar(np.arange(len(dist)), dist, color="0.4")
    axes[1, -1].set_ylim(0, 1)
    axes[1, -1].set_title(f"leaf {int(explanation.evidence['leaf'][index])}: {_class_name(pred, class_names)}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("ProtoTree decision path (left = absent, right = present)", fontsize=9)
    fig.tight_layout()
    return fig


__all__ += ["tree_dot", "render_tree", "tree_path_figure"]


# Post-hoc
def method_grid(images: torch.Tensor, heatmaps_by_method: dict[str, torch.Tensor], max_images: int = 8) -> Figure:
    """One row per image: the image, then its heatmap from every method (columns named after them)."""
    methods = list(heatmaps_by_method)
    n = min(len(images), max_images, *(len(h) for h in heatmaps_by_method.values()))
    if n == 0 or not methods:
        raise ValueError("method_grid needs at least one image and one method")
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(1.9 * (len(methods) + 1), 1.9 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(to_numpy_image(images[i]))
        for j, method in enumerate(methods, start=1):
            axes[i, j].imshow(overlay_heatmap(images[i], heatmaps_by_method[method][i]))
    for j, title in enumerate(["image", *methods]):
        axes[0, j].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


__all__ += ["method_grid"]
