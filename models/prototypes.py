"""Prototype machinery shared by every prototype family.

Distances between latent patches and prototypes, similarity functions, the vectorised push
(prototype projection), receptive-field and high-activation boxes, and the k nearest patches of
every prototype (global analysis, pruning).

The push searches in a `PushDistance` (lower = closer). The default, `SQUARED_L2`, is the squared L2
distance between 1x1 latent patches z (D,) and prototypes p (D,), computed through the expansion
||z||^2 - 2 z.p + ||p||^2 so that no (B, P, D, h, w) tensor is ever built. The nearest patch under squared
L2 is the nearest under L2, so ProtoPNet (squared L2) and ProtoTree (L2) share it; a family whose
similarity is not a distance gives its own (e.g. the negated similarity).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import cpu_kernels
from .activation_boxes import high_activation_boxes, upsample_maps
from .backbones import ReceptiveField
from .chunking import AdaptiveChunks

__all__ = [
    "SQUARED_L2",
    "NearestPatches",
    "PushDistance",
    "PushResult",
    "PushSearch",
    "crop_patches",
    "fetch_images",
    "high_activation_boxes",
    "l2_distances",
    "log_similarity",
    "linear_similarity",
    "nearest_patches",
    "per_image_min",
    "push_prototypes",
    "receptive_field_boxes",
    "similarity",
    "upsample_maps",
]

# Index sentinel while searching: larger than any sample index, so "found" candidates always win a tie.
_NO_INDEX = torch.iinfo(torch.int64).max


def l2_distances(latent: Tensor, prototypes: Tensor) -> Tensor:
    """Squared L2 distance of every 1x1 latent patch to every prototype.

    Args:
        latent: (B, D, h, w) feature maps.
        prototypes: (P, D) or (P, D, 1, 1) prototype vectors.

    Returns:
        (B, P, h, w), clamped at 0 (the expansion can go slightly negative by rounding; the
        official code applies a ReLU for the same reason). A view of a (B, h, w, P) tensor: the
        expansion is one GEMM, -2 z.p + ||p||^2 (bias fused), plus ||z||^2 and the clamp in place,
        so no temporary of that size is made (the official 1x1 convolutions need four).
    """
    if latent.ndim != 4:
        raise ValueError(f"latent must be (B, D, h, w), got shape {tuple(latent.shape)}")
    weight = prototypes.reshape(prototypes.shape[0], -1)
    b, dim, h, w = latent.shape
    if weight.shape[1] != dim:
        raise ValueError(f"prototype dimension {weight.shape[1]} does not match latent channels {dim}")
    z = latent.permute(0, 2, 3, 1).reshape(b * h * w, dim)
    d = torch.addmm(weight.pow(2).sum(dim=1), z, weight.T, alpha=-2)
    d = d.add_(z.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0)
    return d.view(b, h, w, -1).permute(0, 3, 1, 2)


def per_image_min(distances: Tensor) -> tuple[Tensor, Tensor]:
    """Min over positions of (B, P, h, w) maps: values and flat positions (row * w + col), both (B, P).

    Reads `l2_distances`' (B, h, w, P) layout without a copy; the first minimum (smallest row, col) wins ties.
    """
    b, p, h, w = distances.shape
    return distances.permute(0, 2, 3, 1).reshape(b, h * w, p).min(dim=1)


def log_similarity(distances: Tensor, eps: float = 1e-4) -> Tensor:
    """ProtoPNet's similarity log((d + 1) / (d + eps)): log(1/eps) at d = 0, decreasing to 0."""
    return torch.log((distances + 1) / (distances + eps))


def linear_similarity(distances: Tensor) -> Tensor:
    """The paper's alternative similarity -d."""
    return -distances


def similarity(distances: Tensor, kind: Literal["log", "linear"] = "log") -> Tensor:
    """Similarity by name (names keep the model's init arguments plain YAML)."""
    if kind == "log":
        return log_similarity(distances)
    if kind == "linear":
        return linear_similarity(distances)
    raise ValueError(f"unknown similarity {kind!r}; expected 'log' or 'linear'")


# --------------------------------------------------------------------------------------------- push
class PushDistance:
    """What the push and the nearest-patch search minimise, between latents and prototypes.

    `maps(latent (B, D, h, w), prototypes (P, D)) -> (B, P, h, w)` and the paired form
    `paired(latents (n, D, h, w), prototypes (n, D)) -> (n, h, w)` (latent i against prototype i; may
    overwrite `latents`, which is a copy). Subclass it for another distance.
    """

    def maps(self, latent: Tensor, prototypes: Tensor) -> Tensor:
        """(B, P, h, w) distances of latent (B, D, h, w) to prototypes (P, D)."""
        return l2_distances(latent, prototypes)

    def paired(self, latents: Tensor, prototypes: Tensor) -> Tensor:
        """(n, h, w) distances of latent i (n, D, h, w) to prototype i (n, D); may overwrite `latents`."""
        # In place: no more (n, D, h, w) buffers than the copy the caller made.
        return latents.sub_(prototypes[:, :, None, None]).square_().sum(dim=1)


SQUARED_L2 = PushDistance()


@dataclass
class PushResult:
    """Nearest latent patch of every prototype.

    Attributes:
        vectors: (P, D) nearest latent vectors (the new prototypes; the old prototype where none found).
        distance: (P,) distance of the nearest patch (inf where no allowed patch was seen).
        sample_index: (P,) int64, the batch["index"] of the source sample (-1 if none).
        position: (P, 2) int64 latent (row, col) of the patch (-1 if none).
        found: (P,) bool.
        distance_map: (P, h, w) squared distances from the new prototype to every patch of its source
            image (its self-activation map; inf where none found).
        records: what `describe` said of each prototype's patch when it was found (see `PushSearch`).
    """

    vectors: Tensor
    distance: Tensor
    sample_index: Tensor
    position: Tensor
    found: Tensor
    distance_map: Tensor | None = None
    records: dict[str, Tensor] = field(default_factory=dict)


def _unpack_indexed(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(batch, dict):
        missing = [k for k in ("image", "label", "index") if k not in batch]
        if missing:
            raise KeyError(f"push batches need keys 'image', 'label', 'index'; missing {missing}")
        return batch["image"], batch["label"], batch["index"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 3:
        return batch[0], batch[1], batch[2]
    raise TypeError("push batches must be dicts with 'image', 'label', 'index' or (image, label, index) tuples")


def _lex_less(d_a: Tensor, i_a: Tensor, q_a: Tensor, d_b: Tensor, i_b: Tensor, q_b: Tensor) -> Tensor:
    """(d, sample index, flat position) of a strictly before that of b, lexicographically."""
    return (d_a < d_b) | ((d_a == d_b) & ((i_a < i_b) | ((i_a == i_b) & (q_a < q_b))))


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather(t: Tensor) -> Tensor:
    """(world, *t.shape) stack of `t` from every rank."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


class PushSearch:
    """The running, class-restricted nearest-patch search of `push_prototypes`, one batch at a time.

    For custom loops and benchmarks: `update` with each batch's latent maps, then `result()`. Only
    the prototypes that may use some image of the batch are compared (with the official unshuffled,
    class-sorted push loader that is a few classes' prototypes per batch), so distances are computed
    for those alone. Ties go to the smallest sample index, then the smallest (row, col).

    `describe(images, image_ids, maps) -> {name: (n, ...)}` is called on every improvement, while the
    images are at hand (as the official push does; nothing is read again afterwards): the batch's
    images (B, C, H, W), the source image of each improved prototype (n,) and their new
    self-distance maps (n, h, w). What it returns is kept in `records[name]`, which the caller
    allocates with one row per prototype.
    """

    def __init__(self, prototypes: Tensor, allowed_classes: Tensor | None = None,
                 records: dict[str, Tensor] | None = None,
                 describe: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]] | None = None,
                 distance: PushDistance = SQUARED_L2) -> None:
        self.protos = prototypes.detach().reshape(prototypes.shape[0], -1)
        self.distance_fn = distance
        num, device = self.protos.shape[0], self.protos.device
        if (records is None) != (describe is None):
            raise ValueError("records and describe go together")
        for name, value in (records or {}).items():
            if len(value) != num:
                raise ValueError(f"record {name!r} has {len(value)} rows but there are {num} prototypes")
        self.records, self.describe = dict(records or {}), describe
        # (K, P): row k says which prototypes may use an image of class k.
        self.allowed_t = None if allowed_classes is None else allowed_classes.to(device=device, dtype=torch.bool).T.contiguous()
        if self.allowed_t is not None and self.allowed_t.shape[1] != num:
            raise ValueError(f"allowed_classes has {self.allowed_t.shape[1]} rows but there are {num} prototypes")
        self.distance = torch.full((num,), float("inf"), device=device)
        self.index = torch.full((num,), _NO_INDEX, dtype=torch.long, device=device)
        self.flat_pos = torch.full((num,), _NO_INDEX, dtype=torch.long, device=device)
        self.vectors = self.protos.clone()
        self.dmap: Tensor | None = None
        self.width: int | None = None

    @torch.no_grad()
    def update(self, latent: Tensor, labels: Tensor, index: Tensor, images: Tensor | None = None) -> None:
        """latent (B, D, h, w) of a batch, its labels and sample indices (B,), and its images (for `describe`)."""
        device = self.protos.device
        labels, index = labels.to(device).long(), index.to(device).long()
        if latent.shape[1] != self.protos.shape[1]:
            raise ValueError(f"latent_fn gives {latent.shape[1]} channels but prototypes have {self.protos.shape[1]}")
        h, w = latent.shape[-2:]
        if self.dmap is None:
            self.dmap, self.width = torch.full((len(self.protos), h, w), float("inf"), device=device), w
        elif (h, w) != self.dmap.shape[1:]:
            raise ValueError(f"latent maps changed size from {tuple(self.dmap.shape[1:])} to {(h, w)} during the push")
        if self.allowed_t is None:
            ids, may_use = torch.arange(len(self.protos), device=device), None
        else:
            if labels.max() >= self.allowed_t.shape[0] or labels.min() < 0:
                raise ValueError(f"label out of range [0, {self.allowed_t.shape[0]}) in the push data")
            may_use = self.allowed_t.index_select(0, labels)  # (B, P)
            ids = may_use.any(dim=0).nonzero().squeeze(1)
            if len(ids) == 0:
                return
            may_use = may_use.index_select(1, ids)
        per_image, pos = per_image_min(self.distance_fn.maps(latent, self.protos.index_select(0, ids)))  # (B, n)
        if may_use is not None:
            per_image = per_image.masked_fill(~may_use, float("inf"))
        # Rows in sample-index order, so that the first minimum over images is the smallest index.
        order = torch.argsort(index)
        cand_d, cand_row = per_image.index_select(0, order).min(dim=0)  # (n,)
        cand_b = order[cand_row]
        cand_pos = pos[cand_b, torch.arange(len(ids), device=device)]
        cand_idx = index[cand_b]
        better = torch.isfinite(cand_d) & _lex_less(
            cand_d, cand_idx, cand_pos, self.distance[ids], self.index[ids], self.flat_pos[ids])
        local = better.nonzero().squeeze(1)
        if len(local) == 0:
            return
        sel = ids[local]
        src = latent.index_select(0, cand_b[local])  # (n, D, h, w), a copy
        new = src.flatten(2)[torch.arange(len(sel), device=device), :, cand_pos[local]]  # (n, D), a copy
        new_map = self.distance_fn.paired(src, new)
        described = {}
        if self.describe is not None:
            if images is None:
                raise ValueError("PushSearch.update: describe needs the batch images")
            described = self.describe(images, cand_b[local], new_map)
            if set(described) != set(self.records):
                raise ValueError(f"describe returned {sorted(described)} but the records are {sorted(self.records)}")
            described = {name: value.to(self.records[name]) for name, value in described.items()}
            for name, value in described.items():
                if value.shape != (len(sel), *self.records[name].shape[1:]):
                    raise ValueError(f"describe gave {name!r} of shape {tuple(value.shape)} for {len(sel)} prototypes")
        # Every allocation is above: an out-of-memory error leaves the search as it was, so the
        # batch can be split and searched again (`push_prototypes`).
        self.vectors[sel], self.dmap[sel] = new, new_map
        self.distance[sel], self.index[sel], self.flat_pos[sel] = cand_d[local], cand_idx[local], cand_pos[local]
        for name, value in described.items():
            self.records[name][sel] = value

    def result(self) -> PushResult:
        """The minima so far; under torch.distributed, merged over all ranks (a collective call)."""
        best_d, best_idx, best_pos, vectors, dmap, width, records = (
            self.distance, self.index, self.flat_pos, self.vectors, self.dmap, self.width, self.records)
        if _world() > 1:
            best_d, best_idx, best_pos, vectors, dmap, width, records = _merge_ranks(
                best_d, best_idx, best_pos, vectors, dmap, width, records)
        found = torch.isfinite(best_d)
        width = width or 1
        position = torch.stack([best_pos // width, best_pos % width], dim=1)
        position[~found] = -1
        return PushResult(
            vectors=vectors,
            distance=best_d,
            sample_index=torch.where(found, best_idx, torch.full_like(best_idx, -1)),
            position=position,
            found=found,
            distance_map=dmap,
            records=records,
        )


@torch.no_grad()
def push_prototypes(
    latent_fn: Callable[[Tensor], Tensor],
    prototypes: Tensor,
    loader: Iterable,
    allowed_classes: Tensor | None = None,
    device: torch.device | str | None = None,
    records: dict[str, Tensor] | None = None,
    describe: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]] | None = None,
    distance: PushDistance = SQUARED_L2,
) -> PushResult:
    """Nearest latent patch of every prototype over one pass of `loader`, all prototypes at once.

    Args:
        latent_fn: images (B, 3, H, W) -> latent maps (B, D, h, w); called in the caller's mode
            (put the model in eval mode first).
        prototypes: (P, D) or (P, D, 1, 1).
        loader: dict batches with "image", "label", "index" (or (image, label, index) tuples).
        allowed_classes: (P, K) bool; prototype j may only take patches from images whose label k
            has allowed_classes[j, k] (None = any image).
        device: where the search runs (default: the prototypes' device).
        records, describe: what to record of each prototype's source patch while its image is at
            hand (see `PushSearch`), e.g. the boxes and patch images.
        distance: what is minimised (default squared L2).

    Under torch.distributed each rank searches its shard and the minima are all-gathered, so every
    rank ends with identical results. Ties are broken by the smallest sample index, then the
    smallest (row, col), independently of batch size, data order and sharding; so a batch that runs
    out of CUDA memory is split in halves and searched again (with a warning, once), same result.
    """
    device = torch.device(device) if device is not None else prototypes.device
    search = PushSearch(prototypes.detach().to(device), allowed_classes, records, describe, distance)

    def search_batch(images: Tensor, labels: Tensor, index: Tensor) -> None:
        images = images.to(device, non_blocking=True)
        search.update(latent_fn(images), labels, index, images)

    chunks = AdaptiveChunks(what="push")
    for batch in loader:
        chunks(search_batch, *_unpack_indexed(batch))
    return search.result()


def _merge_ranks(best_d, best_idx, best_pos, vectors, dmap, width, records):
    """All-gather every rank's minima and keep, per prototype, the lexicographic smallest."""
    # Ranks whose shard was empty have no map yet; agree on the map size first.
    shape = torch.tensor(list(dmap.shape[1:]) if dmap is not None else [0, 0], device=best_d.device)
    shape = _all_gather(shape).amax(dim=0)
    if dmap is None:
        dmap = torch.full((best_d.shape[0], int(shape[0]), int(shape[1])), float("inf"), device=best_d.device)
        width = int(shape[1])
    all_d, all_i, all_q = _all_gather(best_d), _all_gather(best_idx), _all_gather(best_pos)
    all_v, all_m = _all_gather(vectors), _all_gather(dmap)
    winner = torch.zeros_like(best_idx)
    for r in range(1, all_d.shape[0]):
        ids = torch.arange(all_d.shape[1], device=all_d.device)
        w_d, w_i, w_q = all_d[winner, ids], all_i[winner, ids], all_q[winner, ids]
        take = torch.isfinite(all_d[r]) & _lex_less(all_d[r], all_i[r], all_q[r], w_d, w_i, w_q)
        winner = torch.where(take, torch.full_like(winner, r), winner)
    ids = torch.arange(all_d.shape[1], device=all_d.device)
    records = {name: _all_gather(value.to(best_d.device))[winner, ids].to(value.device) for name, value in records.items()}
    return all_d[winner, ids], all_i[winner, ids], all_q[winner, ids], all_v[winner, ids], all_m[winner, ids], width, records


def fetch_images(loader: Iterable, indices: Tensor) -> Tensor:
    """The images (N, C, H, W) of the given sample indices, in that order.

    Reads ``loader.dataset[i]`` when its items are dicts whose "index" is i (cheap: no model pass);
    otherwise scans the loader once, merging ranks under torch.distributed.
    """
    wanted = [int(i) for i in indices.tolist()]
    dataset = getattr(loader, "dataset", None)
    if wanted and dataset is not None and hasattr(dataset, "__getitem__"):
        try:
            items = [dataset[i] for i in wanted]
        except Exception:  # not indexable by sample index: fall back to scanning
            items = []
        if items and all(isinstance(it, dict) and int(it.get("index", -1)) == i for it, i in zip(items, wanted)):
            return torch.stack([torch.as_tensor(it["image"]).float() for it in items])
    slot = {i: n for n, i in enumerate(wanted)}
    out, seen = None, torch.zeros(len(wanted))
    for batch in loader:
        images, _, index = _unpack_indexed(batch)
        if out is None:
            out = torch.zeros(len(wanted), *images.shape[1:])
        for b, i in enumerate(index.tolist()):
            if i in slot:
                out[slot[i]], seen[slot[i]] = images[b].float().cpu(), 1
    if out is None:
        raise ValueError("fetch_images: the loader is empty")
    if _world() > 1:  # gloo reduces CPU tensors; other backends want them on their device
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else out.device
        out, seen = out.to(device), seen.to(device)
        dist.all_reduce(out)
        dist.all_reduce(seen)
        out, seen = (out / seen.clamp_min(1)[:, None, None, None]).cpu(), seen.cpu()
    if (seen == 0).any():
        raise ValueError(f"fetch_images: sample indices {[i for i, s in zip(wanted, seen) if s == 0][:10]} not in the loader")
    return out


# -------------------------------------------------------------------------------------------- boxes
def receptive_field_boxes(rf_rows: ReceptiveField, rf_cols: ReceptiveField, positions: Tensor) -> Tensor:
    """Receptive-field box (x0, y0, x1, y1) of each latent (row, col); (-1, -1, -1, -1) where row < 0."""
    boxes = []
    for row, col in positions.tolist():
        if row < 0:
            boxes.append((-1, -1, -1, -1))
            continue
        y0, y1, _, _ = rf_rows.box(row, col)
        _, _, x0, x1 = rf_cols.box(row, col)
        boxes.append((x0, y0, x1, y1))
    return torch.tensor(boxes, dtype=torch.long).reshape(-1, 4)


def crop_patches(images: Tensor, image_ids: Tensor, boxes: Tensor, size: int = 32) -> Tensor:
    """Crop `boxes` (x0, y0, x1, y1) from `images[image_ids]`, resized to size x size, as uint8 (N, C, size, size).

    torchvision's roi_align (2 x 2 bilinear samples per output pixel), or on a CPU the same arithmetic
    compiled (`models.cpu_kernels`; same bytes, ~2x faster on one thread, and it uses torch's threads).
    """
    if len(boxes) == 0:
        return torch.zeros(0, images.shape[1], size, size, dtype=torch.uint8)
    h, w = images.shape[-2:]
    inside = bool(((boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 3] <= h)
                   & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all())
    if cpu_kernels.AVAILABLE and images.device.type == "cpu" and inside and not boxes.is_floating_point():
        return cpu_kernels.crop_boxes(images, image_ids.cpu(), boxes.cpu(), size)
    from torchvision.ops import roi_align

    # aligned=True: box edges are pixel edges (pixel i spans [i, i + 1)). Shrinking the box by half a
    # pixel keeps every bilinear sample between the centres of the box's own pixels (no bleeding in
    # of the pixels around it), like resizing the crop alone.
    images = images.float()
    inner = boxes.to(images) + torch.tensor([0.5, 0.5, -0.5, -0.5], device=images.device)
    rois = torch.cat([image_ids[:, None].to(images), inner], dim=1)
    crops = roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return (crops.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------- nearest patches
@dataclass
class NearestPatches:
    """The k nearest images of every prototype, one patch (its nearest) per image.

    Attributes:
        distance: (P, k) in the search's distance (default squared L2), ascending (inf where fewer than k images were seen).
        sample_index: (P, k) int64 batch["index"] of each neighbour (-1 where none).
        position: (P, k, 2) int64 latent (row, col) of the nearest patch in that image.
        label: (P, k) int64 label of that image (-1 where none).
    """

    distance: Tensor
    sample_index: Tensor
    position: Tensor
    label: Tensor


def _top_k(d: Tensor, idx: Tensor, extra: list[Tensor], k: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Per row, the k smallest (distance, sample index) pairs, deterministic on ties."""
    by_idx = torch.argsort(idx, dim=1, stable=True)
    d, idx, extra = d.gather(1, by_idx), idx.gather(1, by_idx), [e.gather(1, by_idx) for e in extra]
    by_d = torch.argsort(d, dim=1, stable=True)[:, :k]
    return d.gather(1, by_d), idx.gather(1, by_d), [e.gather(1, by_d) for e in extra]


@torch.no_grad()
def nearest_patches(
    latent_fn: Callable[[Tensor], Tensor],
    prototypes: Tensor,
    loader: Iterable,
    k: int = 6,
    device: torch.device | str | None = None,
    distance: PushDistance = SQUARED_L2,
) -> NearestPatches:
    """k nearest images (by their nearest patch) of every prototype over one pass, vectorised.

    This is ProtoPNet's `find_nearest` (global analysis and pruning) without its Python double loop;
    `distance` as in `push_prototypes`.
    Under torch.distributed the per-rank lists are gathered and merged. A batch that runs out of CUDA
    memory is split in halves (with a warning, once); the lists do not depend on batch size.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = torch.device(device) if device is not None else prototypes.device
    protos = prototypes.detach().reshape(prototypes.shape[0], -1).to(device)
    num_protos = protos.shape[0]
    inf = float("inf")
    d = torch.full((num_protos, k), inf, device=device)
    idx = torch.full((num_protos, k), _NO_INDEX, dtype=torch.long, device=device)
    pos = torch.full((num_protos, k), -1, dtype=torch.long, device=device)
    lab = torch.full((num_protos, k), -1, dtype=torch.long, device=device)
    width = 1

    def merge_batch(images: Tensor, labels: Tensor, index: Tensor) -> None:
        nonlocal d, idx, pos, lab, width
        latent = latent_fn(images.to(device, non_blocking=True))
        per_image, where = per_image_min(distance.maps(latent, protos))  # (B, P)
        n = per_image.shape[0]
        merged = _top_k(
            torch.cat([d, per_image.T], 1),
            torch.cat([idx, index.to(device).long()[None].expand(num_protos, n)], 1),
            [torch.cat([pos, where.T], 1), torch.cat([lab, labels.to(device).long()[None].expand(num_protos, n)], 1)],
            k,
        )
        (d, idx, (pos, lab)), width = merged, latent.shape[-1]  # written last: a failed batch changes nothing

    chunks = AdaptiveChunks(what="nearest patches")
    for batch in loader:
        chunks(merge_batch, *_unpack_indexed(batch))
    if _world() > 1:
        width = int(_all_gather(torch.tensor(width, device=device)).max())
        cat = lambda t: _all_gather(t).permute(1, 0, 2).reshape(num_protos, -1)  # noqa: E731
        d, idx, (pos, lab) = _top_k(cat(d), cat(idx), [cat(pos), cat(lab)], k)
    seen = torch.isfinite(d)
    position = torch.stack([pos // width, pos % width], dim=-1)
    position[~seen] = -1
    return NearestPatches(
        distance=d,
        sample_index=torch.where(seen, idx, torch.full_like(idx, -1)),
        position=position,
        label=torch.where(seen, lab, torch.full_like(lab, -1)),
    )
