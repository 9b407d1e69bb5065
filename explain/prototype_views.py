"""Figures of prototype models, through the prototype interface (`models.prototype_model`): the gallery,
"this looks like that", the global analysis, and a ProtoTree's tree and decision path.

They read only the interface and its stored records, so a new prototype family gets them without an
edit here. Re-exported by `explain.viz`.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from models.prototypes import fetch_images

from .prototype_localisation import localise_prototypes, localise_sources
from .viz import (
    ACTIVATION_COLOR,
    PANEL_SIZE,
    RF_COLOR,
    WRONG_COLOR,
    _class_name,
    _draw_box,
    _evaluating,
    _finish,
    _panels,
    _require,
    _show,
    overlay_heatmap,
    plt,
    to_numpy_image,
)

__all__ = ["is_prototype_model", "prototype_gallery", "this_looks_like_that", "global_analysis", "tree_dot",
           "render_tree", "tree_figure", "tree_path_figure"]


# ------------------------------------------------------------------------------------ prototypes
def is_prototype_model(model) -> bool:
    """Whether `model` implements the prototype interface (`models.prototype_model`) that these views use."""
    return all(callable(getattr(model, name, None)) for name in
               ("similarity_maps", "prototype_active", "prototype_class_connection", "nearest_patches"))


def _prototype_records(model) -> list[dict]:
    """Per active prototype of any prototype model: patch, name, class (None = none), weights, source, boxes."""
    if not is_prototype_model(model):
        raise TypeError(f"{type(model).__name__} has no stored prototypes (not a prototype model)")
    classes = model.prototype_classes.cpu()
    weights = model.prototype_class_connection().detach().cpu()
    records = []
    for j in model.prototype_active().nonzero().squeeze(1).tolist():
        has_class = int(classes[j]) >= 0
        records.append({"id": j, "patch": model.prototype_patch[j], "class": int(classes[j]) if has_class else None,
                        "weights": weights[j] if has_class else None, "source": int(model.prototype_source_index[j]),
                        "box": model.prototype_box[j].tolist(), "rf_box": model.prototype_rf_box[j].tolist(),
                        "label": model.prototype_name(j)})
    return records


def _source_images(source, indices: Sequence[int]) -> torch.Tensor:
    """Images of the given sample indices from a tensor (N, 3, H, W), a Dataset, or a loader of dict batches."""
    unique, inverse = torch.unique(torch.as_tensor(list(indices), dtype=torch.long), return_inverse=True)
    if isinstance(source, torch.Tensor):
        images = source[unique]
    elif not isinstance(source, torch.utils.data.Dataset):
        images = fetch_images(source, unique)  # a loader, or any iterable of dict batches
    else:
        items = [source[int(i)] for i in unique]
        images = torch.stack([torch.as_tensor(it["image"] if isinstance(it, dict) else it[0]).float() for it in items])
    return images.cpu()[inverse]


def prototype_gallery(model, max_prototypes: int = 200, class_names: Sequence[str] | None = None, columns: int = 10,
                      source=None, top_weights: int = 2, maximize_steps: int = 0, maximize_size: int | None = None,
                      localisation: str = "upsampling", part_labels: Mapping[int, str] | None = None,
                      because: Mapping[int, Mapping[str, float]] | None = None) -> Figure:
    """Every stored prototype patch with its class and largest last-layer weights.

    Reads only the prototype interface's records (``prototype_patch``, ``prototype_source_index``, the
    boxes, `prototype_classes`, `prototype_class_connection`), so a checkpoint alone draws its prototypes;
    inactive (pruned, bypassed) prototypes are left out. With `source` (the push images as a
    tensor, loader or dataset, indexed by sample index) each patch gets its source image beside it,
    with the receptive field (cyan) and the high-activation box (yellow). With `maximize_steps` > 0 each
    prototype also gets the image that maximises its similarity (`explain.maximize`, Simonyan et al.'s
    class-model visualisation applied to a prototype), `maximize_size` px square (default: the source
    images' size, else 64). `localisation` other than "upsampling" (see
    `explain.prototype_localisation`) draws each source image with that method's map of the prototype
    at its stored position, and that map's box in place of the stored high-activation box.
    `part_labels` (prototype id -> the part it shows, `explain.prototype_parts.part_labels`) are added
    to the captions; `because` (prototype id -> {modification: score}, `explain.because.BecauseScores.as_dict`)
    is written under each patch, largest score first.
    """
    records = _prototype_records(model)[:max_prototypes]
    pushed = [r for r in records if r["source"] >= 0]
    sources = {}
    if source is not None and pushed:
        ids = sorted({r["source"] for r in pushed})
        sources = dict(zip(ids, _source_images(source, ids)))
    localised = {}
    if sources and localisation != "upsampling":
        with _evaluating(model):
            loc = localise_sources(model, torch.stack([sources[r["source"]] for r in pushed]),
                                   torch.tensor([r["id"] for r in pushed]), localisation)
        localised = {r["id"]: (m[0].cpu(), b[0].tolist()) for r, m, b in zip(pushed, loc.maps, loc.boxes)}
    maximized = {}
    if maximize_steps > 0 and records:
        from explain.maximize import maximize, prototype_similarity  # noqa: PLC0415 (maximize imports viz's neighbours)

        size = maximize_size or (next(iter(sources.values())).shape[-1] if sources else 64)
        ids = [r["id"] for r in records]
        result = maximize(model, prototype_similarity(ids), image_size=size, batch_size=len(ids), steps=maximize_steps)
        maximized = dict(zip(ids, result.image.cpu()))
    extra = [kind for kind, present in (("source", sources), ("maximized", maximized)) if present]
    per = 1 + len(extra)
    n = max(len(records), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    weights_shown = top_weights > 0 and bool(records) and records[0]["weights"] is not None
    height = (2.1 if weights_shown else 1.6) + (0.2 if part_labels else 0) + (0.5 if because else 0)
    fig, axes = _panels(rows, cols * per, 1.4, height)
    for ax in axes.flat:
        ax.axis("off")
    for k, r in enumerate(records):
        row, col = divmod(k, cols)
        ax = axes[row, col * per]
        ax.axis("on")
        caption = r["label"] + (f" · {_class_name(r['class'], class_names)}" if r["class"] is not None else "")
        caption += f"\n{part_labels[r['id']]}" if part_labels and r["id"] in part_labels else ""
        _show(ax, r["patch"], caption if r["source"] >= 0 else caption + " (not pushed)")
        notes = []
        if weights_shown:
            top = r["weights"].topk(min(top_weights, len(r["weights"])))
            notes += [f"w {_class_name(c, class_names)} {v:+.2f}" for v, c in zip(top.values.tolist(), top.indices.tolist())]
        if because and r["id"] in because:
            notes += [f"{m} {v:+.2f}" for m, v in sorted(because[r["id"]].items(), key=lambda kv: -kv[1])]
        if notes:
            ax.set_xlabel("\n".join(notes), fontsize=6)
        if r["source"] in sources:
            src = axes[row, col * per + 1 + extra.index("source")]
            src.axis("on")
            if r["id"] in localised:
                heat, box = localised[r["id"]]
                _show(src, overlay_heatmap(sources[r["source"]], heat), f"source #{r['source']} · {localisation}")
            else:
                box = r["box"]
                _show(src, sources[r["source"]], f"source #{r['source']}")
            _draw_box(src, r["rf_box"], RF_COLOR)
            _draw_box(src, box, ACTIVATION_COLOR)
        if r["id"] in maximized:
            ax = axes[row, col * per + 1 + extra.index("maximized")]
            ax.axis("on")
            _show(ax, maximized[r["id"]], "maximised")
    box = "high activation" if localisation == "upsampling" else f"{localisation} map and its box"
    what = "prototype patches" + (f" with source images (cyan: receptive field, yellow: {box})" if sources else "")
    what += " and the images that maximise them" if maximized else ""
    return _finish(fig, f"{type(model).__name__}: {len(records)} {what}")


def this_looks_like_that(model, images: torch.Tensor, explanation=None, index: int = 0, top_k: int = 5,
                         class_names: Sequence[str] | None = None, source=None, localisation: str = "upsampling") -> Figure:
    """The local analysis of one image ("this looks like that"): its top-k prototypes, then the class scores.

    Row i: the test image with the region most similar to prototype i (yellow box), its similarity
    map, the prototype's patch (and its source image when `source` is given), and similarity x weight
    = contribution to the explained class. The last row sums similarity x weight per class over all
    prototypes and over the k shown (for a linear last layer, the first is the logit). `localisation`
    other than "upsampling" (`explain.prototype_localisation`) draws that method's maps and boxes, on
    the test image and on the source images.
    """
    image = images[index] if images.dim() == 4 else images
    if explanation is None:
        with _evaluating(model):
            explanation = model.explain(image[None].to(model.device), top_k=top_k, localisation=localisation)
        index = 0
    ev = explanation.evidence
    if "prototype_ids" not in ev:
        raise ValueError("this_looks_like_that needs a prototype model's explanation (evidence without 'prototype_ids')")
    ids = ev["prototype_ids"][index][:top_k].cpu()
    k = len(ids)
    target = int(explanation.target[index])
    maps, boxes, source_boxes = ev["activation_map"][index], ev["box"][index], ev["prototype_box"][index]
    if localisation != ev.get("localisation", "upsampling"):
        with _evaluating(model):
            loc = localise_prototypes(model, image[None], ids[None], localisation)
        maps, boxes = loc.maps[0].cpu(), loc.boxes[0].cpu()
    src = _source_images(source, [int(model.prototype_source_index[j]) for j in ids]) if source is not None else None
    if src is not None and localisation != "upsampling":
        with _evaluating(model):
            source_boxes = localise_sources(model, src, ids, localisation).boxes[:, 0].cpu()
    cols = 4 + (src is not None)
    fig = plt.figure(figsize=(1.9 * cols, 1.9 * (k + 1.3)))
    grid = fig.add_gridspec(k + 1, cols, height_ratios=[1] * k + [1.3])
    for i, j in enumerate(ids.tolist()):
        axes = [fig.add_subplot(grid[i, c]) for c in range(cols)]
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        _show(axes[0], image, "test image: this ..." if i == 0 else None)
        _draw_box(axes[0], boxes[i].tolist())
        title = "similarity map" if localisation == "upsampling" else f"{localisation} map"
        _show(axes[1], overlay_heatmap(image, maps[i]), title if i == 0 else None)
        cls = _class_name(int(ev["prototype_class"][index, i]), class_names)
        _show(axes[2], ev["prototype_patch"][index, i], f"... looks like {model.prototype_name(j)} ({cls})")
        if src is not None:
            _show(axes[3], src[i], f"source #{int(model.prototype_source_index[j])}")
            _draw_box(axes[3], ev["prototype_rf_box"][index, i].tolist(), RF_COLOR)
            _draw_box(axes[3], source_boxes[i].tolist(), ACTIVATION_COLOR)
        s, w, c = (float(ev[key][index, i]) for key in ("similarity", "weight", "contribution"))
        axes[-1].axis("off")
        axes[-1].text(0.0, 0.5, f"similarity {s:.3f}\n× weight {w:+.3f}\n= {c:+.3f}", fontsize=8, va="center",
                      family="monospace")
    ax = fig.add_subplot(grid[k, :])
    logits = explanation.logits[index].detach().float().cpu()
    sims = ev["similarity"][index][:top_k].detach().float().cpu()
    shown = (sims[None] * model.prototype_class_connection().detach().cpu().T[:, ids]).sum(dim=1)
    order = logits.argsort(descending=True)[: min(5, len(logits))].tolist()[::-1]
    y = np.arange(len(order))
    ax.barh(y - 0.18, logits[order].numpy(), height=0.36, color="0.35", label="model (logit)")
    ax.barh(y + 0.18, shown[order].numpy(), height=0.36, color="tab:orange", label=f"top {k} shown")
    ax.set_yticks(y, [_class_name(c, class_names) + (" (explained)" if c == target else "") for c in order], fontsize=7)
    ax.set_xlabel("Σ similarity × weight per class", fontsize=7)
    ax.legend(fontsize=6, loc="lower right")
    return _finish(fig, f"This looks like that: image explained as {_class_name(target, class_names)}")


def _as_loader(loader):
    """DataLoaders pass through; a dict batch or a tensor of images becomes a one-batch list."""
    if isinstance(loader, torch.Tensor):
        loader = {"image": loader, "label": torch.full((len(loader),), -1)}
    if isinstance(loader, dict):
        n = len(loader["image"])
        return [{"index": torch.arange(n), **{k: v for k, v in loader.items() if k in ("image", "label", "index")}}]
    return loader


@torch.no_grad()
def global_analysis(model, loader, test_loader=None, prototypes: Sequence[int] | None = None, k: int = 4,
                    class_names: Sequence[str] | None = None, names: tuple[str, str] = ("train", "test")) -> Figure:
    """The global analysis of ProtoPNet for any prototype model: for each prototype, its patch and its k
    nearest images (one patch each)
    in `loader` (e.g. the push data) and optionally `test_loader`, with the patch's high-activation box.

    Neighbours of another class than the prototype's are titled in red (what pruning removes).
    Loaders give dict batches with "image", "label", "index"; a dict of tensors works too. `names`
    label the two sets in titles.
    """
    if not is_prototype_model(model):
        raise TypeError(f"global_analysis needs a prototype model, got {type(model).__name__}")
    ids = list(prototypes) if prototypes is not None else model.prototype_active().nonzero().squeeze(1)[:8].tolist()
    splits = [(names[0], _as_loader(loader))] + ([(names[1], _as_loader(test_loader))] if test_loader is not None else [])
    columns = []  # per split: name, found (P, k), the found neighbours' images and boxes, labels, distances, indices
    for name, ldr in splits:
        near = model.nearest_patches(ldr, k=k)
        sel = near.sample_index[ids].cpu()
        found = sel >= 0
        images = _source_images(ldr, sel[found].tolist())
        with _evaluating(model):
            maps = model.similarity_maps(images.to(model.device))
        rows = torch.arange(len(ids))[:, None].expand_as(sel)[found]
        proto = torch.as_tensor(ids)[rows]
        boxes = model.push_boxes(maps[torch.arange(len(images)), proto.to(maps.device)], tuple(images.shape[-2:])).cpu()
        columns.append((name, found, images, boxes, near.label[ids].cpu(), near.distance[ids].cpu(), sel))
    fig, axes = _panels(len(ids), 1 + k * len(columns), 1.4, 1.55)
    classes = model.prototype_classes.cpu()
    for r, j in enumerate(ids):
        _show(axes[r, 0], model.prototype_patch[j], f"{model.prototype_name(j)} · {_class_name(classes[j], class_names)}")
    for s, (name, found, images, boxes, labels, dists, sel) in enumerate(columns):
        n = 0
        for r in range(len(ids)):
            for c in range(k):
                ax = axes[r, 1 + s * k + c]
                if not found[r, c]:
                    ax.axis("off")
                    continue
                wrong = int(labels[r, c]) >= 0 and int(classes[ids[r]]) >= 0 and int(labels[r, c]) != int(classes[ids[r]])
                _show(ax, images[n], f"{name} #{int(sel[r, c])} d={float(dists[r, c]):.2f}", WRONG_COLOR if wrong else "black")
                _draw_box(ax, boxes[n].tolist())
                n += 1
    what = f"nearest {names[0]}" + (f" and {names[1]}" if test_loader is not None else "") + " patches per prototype"
    return _finish(fig, f"Global analysis: {what} (red: another class)")


# ------------------------------------------------------------------------------------------ ProtoTree
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
    rendered file, or the ``.dot`` file when Graphviz's `dot` is not installed (`tree_figure` draws
    the tree with matplotlib alone).
    """
    path = Path(path)
    if path.suffix not in (".svg", ".png", ".pdf"):
        path = path.with_suffix(".svg")
    image_dir = path.with_name(path.stem + "_patches")
    image_dir.mkdir(parents=True, exist_ok=True)
    for node in model.structure().internal:
        if int(model.prototype_source_index[node]) >= 0:  # projected: a real image patch is stored
            plt.imsave(image_dir / f"node_{node}.png", to_numpy_image(model.prototype_patch[node]))
    dot_path = path.with_suffix(".dot")
    dot_path.write_text(tree_dot(model, class_names, image_dir))
    dot = shutil.which("dot")
    if dot is None:
        return dot_path
    subprocess.run([dot, f"-T{path.suffix[1:]}", str(dot_path), "-o", str(path)], check=True, capture_output=True)
    return path


def tree_figure(model, class_names: Sequence[str] | None = None) -> Figure:
    """The whole (pruned) ProtoTree with matplotlib alone: each decision node's prototype patch, each
    leaf's class distribution (grey bars) and argmax class; dashed edges = absent (left), solid = present."""
    _require(model, "node_prototype", "a ProtoTree", "tree_figure")
    s = model.structure()
    dists = model.leaf_distributions().detach().float().cpu()
    pos: dict[int, tuple[float, float]] = {}
    counter = iter(range(len(s.leaves)))

    def place(node: int, level: int) -> float:
        if node in s.children:
            x = (place(s.children[node][0], level + 1) + place(s.children[node][1], level + 1)) / 2
        else:
            x = float(next(counter))
        pos[node] = (x, -1.6 * level)
        return x

    place(s.internal[0] if s.internal else s.leaves[0], 0)
    depth = int(-min(y for _, y in pos.values()) / 1.6)
    fig, ax = plt.subplots(figsize=(min(40.0, 1.25 * len(s.leaves) + 1), 1.5 * (depth + 1) + 0.6))
    for node, (left, right) in s.children.items():
        (x, y) = pos[node]
        for child, style, text in ((left, "--", "absent"), (right, "-", "present")):
            cx, cy = pos[child]
            ax.plot([x, cx], [y - 0.45, cy + 0.45], style, color="0.4", linewidth=1, zorder=1)
            ax.text((x + cx) / 2, (y + cy) / 2, text, fontsize=6, ha="center", color="0.3",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    for node in s.internal:
        x, y = pos[node]
        ax.imshow(to_numpy_image(model.prototype_patch[node]), extent=(x - 0.45, x + 0.45, y - 0.45, y + 0.45), zorder=2)
        projected = int(model.prototype_source_index[node]) >= 0
        ax.text(x, y + 0.5, f"node {node}" + ("" if projected else " (not projected)"), fontsize=6, ha="center", va="bottom")
    for node in s.leaves:
        x, y = pos[node]
        dist = dists[node - s.num_internal]
        width = 0.9 / len(dist)
        for c, p in enumerate(dist.tolist()):
            ax.add_patch(Rectangle((x - 0.45 + c * width, y - 0.3), width * 0.9, 0.7 * p, color="0.3", zorder=2))
        ax.add_patch(Rectangle((x - 0.45, y - 0.3), 0.9, 0.7, fill=False, edgecolor="0.6", zorder=2))
        top = int(dist.argmax())
        ax.text(x, y - 0.38, f"leaf {node - s.num_internal}\n{_class_name(top, class_names)}\n{float(dist[top]):.2f}",
                fontsize=6, ha="center", va="top")
    xs = [x for x, _ in pos.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(-1.6 * depth - 1.2, 0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    return _finish(fig, f"ProtoTree: {len(s.internal)} decision nodes, {len(s.leaves)} leaves")


def tree_path_figure(model, image: torch.Tensor, explanation, index: int = 0,
                     class_names: Sequence[str] | None = None) -> Figure:
    """Local explanation of one image: its greedy path, node by node, then the leaf's distribution.

    Top row: the prototype patch of each decision node. Bottom row: the image with the box of its
    best-matching patch and "Present, similarity s", or the plain image and "Absent". The last column
    shows the path's heatmap and the leaf distribution with the predicted class.
    """
    _require(model, "node_prototype", "a ProtoTree", "tree_path_figure")
    if "path" not in explanation.evidence:
        raise ValueError("tree_path_figure needs a ProtoTree explanation (evidence without 'path')")
    steps = explanation.evidence["path"][index]
    n = len(steps) + 1
    fig, axes = _panels(2, n, 2.0, 2.2)
    for col, step in enumerate(steps):
        projected = int(model.prototype_source_index[step["node"]]) >= 0
        _show(axes[0, col], model.prototype_patch[step["node"]],
              f"node {step['node']}" + ("" if projected else " (not projected)"))
        if step["present"]:
            _show(axes[1, col], image, f"Present, similarity {step['similarity']:.2f}")
            _draw_box(axes[1, col], step["box"])
        else:
            _show(axes[1, col], image, f"Absent, similarity {step['similarity']:.2f}", "0.4")
    dist = explanation.evidence["leaf_distribution"][index].detach().float().cpu().numpy()
    pred = int(dist.argmax())
    _show(axes[0, -1], overlay_heatmap(image, explanation.heatmap[index]), "path heatmap")
    axes[1, -1].bar(np.arange(len(dist)), dist, color="0.35")
    axes[1, -1].set_ylim(0, 1)
    axes[1, -1].set_title(f"leaf {int(explanation.evidence['leaf'][index])}: {_class_name(pred, class_names)}",
                          fontsize=PANEL_SIZE)
    return _finish(fig, f"ProtoTree decision path: {len(steps)} decisions to class {_class_name(pred, class_names)}")
