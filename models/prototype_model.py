"""The interface every prototype family implements, and what it gives every family for free.

A prototype model compares latent patches z (B, D, h, w) of an image with P prototypes and decides from
those comparisons. Everything outside the family (gallery, "this looks like that", global analysis,
report, comparison, prototype metrics, activation maximisation, dissection) uses only this interface:

======================================  ===============================================================
a family provides                        meaning
======================================  ===============================================================
``latent(images)``                       (B, D, h, w) latent maps of images in [0, 1]
``prototype_tensor()``                   (P, D) prototype vectors, in interface order
``assign_prototypes(ids, vectors)``      overwrite the vectors of prototypes `ids` (the push)
``distances(images)``                    (B, P, h, w) the family's own distance (lower = closer)
``similarity(distances)``                the family's similarity of a distance (higher = more similar)
``prototype_class_connection()``         (P, K) how each prototype votes for each class (weights, or 0/1)
``prototype_active()``                   (P,) bool: prototypes in use (not pruned, not bypassed)
``push_classes()``                       (P, K) bool: classes whose images a prototype may be pushed onto
``receptive_field(size)``                receptive field of one latent cell at an input size
``prototype_name(j)``                    how views name prototype j (default ``p<j>``)
======================================  ===============================================================

and gets ``similarity_maps``, ``prototype_classes`` (a property), one ``push`` (every prototype at once, on the model's
device, DDP-merged; see `models.prototypes.push_prototypes`), ``nearest_patches`` and the prototype part of
``Explanation.evidence`` (`prototype_evidence`) in one format. The push search runs in the family's
`push_distance` (squared L2 by default; the nearest patch under L2 is the nearest under squared L2).

Every family stores the same records under the same names, so that a checkpoint alone can draw its
prototypes: ``prototype_source_index`` (P,) sample index of the source image (-1 = not pushed),
``prototype_position`` (P, 2) latent (row, col), ``prototype_distance`` (P,), ``prototype_rf_box`` and
``prototype_box`` (P, 4) receptive-field and high-activation boxes (x0, y0, x1, y1) in the source image,
``prototype_patch`` (P, 3, S, S) uint8, ``prototype_image_size`` (2,) (H, W) of the push images and
``push_epoch`` (the epoch of the last push, -1 = never).

Every family's ``explain(images, ..., localisation="upsampling", localisation_options=None)`` takes the
localisation method of its prototype evidence: the default keeps the family's own maps and boxes
(the bicubically upsampled similarity); any other method registered with `register_localisation`
(``explain.prototype_localisation`` registers "smoothgrad", "randgrads" and "prp" when imported)
replaces ``activation_map`` and ``box`` of the evidence. The argument is added to a family's
``explain`` when the class is defined, so a family writes nothing for it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .activation_boxes import high_activation_boxes, upsample_maps
from .backbones import ReceptiveField
from .base import InterpretableClassifier
from .prototypes import (
    SQUARED_L2,
    NearestPatches,
    PushDistance,
    PushResult,
    crop_patches,
    nearest_patches,
    push_prototypes,
    receptive_field_boxes,
)

__all__ = ["PrototypeModel", "RECORD_NAMES", "register_localisation"]

RECORD_NAMES = ("prototype_source_index", "prototype_position", "prototype_distance", "prototype_rf_box",
                "prototype_box", "prototype_patch", "prototype_image_size", "push_epoch")


# name -> localise(model, images, ids (B, k), **options) -> (maps (B, k, H, W), boxes (B, k, 4))
_LOCALISATIONS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}


def register_localisation(name: str, localise: Callable[..., tuple[Tensor, Tensor]]) -> None:
    """Make `name` a value of every prototype family's ``explain(..., localisation=name)``."""
    _LOCALISATIONS[name] = localise


def _with_localisation(explain: Callable) -> Callable:
    """A family's ``explain`` with the ``localisation`` argument (see the module docstring)."""

    @functools.wraps(explain)
    def wrapped(self, images: Tensor, *args: Any, localisation: str = "upsampling",
                localisation_options: dict[str, Any] | None = None, **kwargs: Any):
        explanation = explain(self, images, *args, **kwargs)
        if localisation == "upsampling":
            return explanation
        if localisation not in _LOCALISATIONS:
            raise ValueError(f"unknown localisation {localisation!r}; known: {['upsampling', *_LOCALISATIONS]} "
                             "(import explain.prototype_localisation for smoothgrad, randgrads and prp)")
        ev = explanation.evidence
        ev["activation_map"], ev["box"] = _LOCALISATIONS[localisation](self, images, ev["prototype_ids"],
                                                                      **(localisation_options or {}))
        ev["localisation"] = localisation
        return explanation

    wrapped._localised = True
    return wrapped


class PrototypeModel(InterpretableClassifier):
    """Base class of the prototype families (see the module docstring for the interface).

    Subclasses call `register_prototype_records(P, patch_size)` in their ``__init__`` and implement the
    methods of the interface table; the rest is shared.
    """

    push_distance: PushDistance = SQUARED_L2
    push_percentile: float = 95.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        explain = cls.__dict__.get("explain")
        if explain is not None and not getattr(explain, "_localised", False):
            cls.explain = _with_localisation(explain)

    # ------------------------------------------------------------------ to be provided by a family
    def latent(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        """(B, D, h, w) latent maps of images (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    def prototype_tensor(self) -> Tensor:  # pragma: no cover - abstract
        """(P, D) prototype vectors, in interface order."""
        raise NotImplementedError

    def assign_prototypes(self, ids: Tensor, vectors: Tensor) -> None:  # pragma: no cover - abstract
        """Overwrite the vectors (n, D) of prototypes `ids` (n,) (the push)."""
        raise NotImplementedError

    def distances(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        """(B, P, h, w) the family's distance of every latent patch to every prototype (lower = closer)."""
        raise NotImplementedError

    def similarity(self, distances: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The family's similarity of distances (higher = more similar), elementwise."""
        raise NotImplementedError

    def prototype_class_connection(self) -> Tensor:  # pragma: no cover - abstract
        """(P, K) how each prototype votes for each class (weights, or 0/1)."""
        raise NotImplementedError

    def prototype_active(self) -> Tensor:  # pragma: no cover - abstract
        """(P,) bool: prototypes in use (not pruned, not bypassed)."""
        raise NotImplementedError

    def push_classes(self) -> Tensor | None:
        """(P, K) bool: the classes whose images each prototype may be pushed onto (None = any)."""
        return None

    def prototype_name(self, j: int) -> str:
        """How views name prototype `j`."""
        return f"p{j}"

    def receptive_field(self, image_size: int) -> ReceptiveField:
        """Of one latent cell (the add-on layers of the zoo's families are 1x1, so the trunk's)."""
        return self.backbone.receptive_field(image_size)

    def push_boxes(self, similarity_maps: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(n, 4) high-activation boxes of similarity maps (n, h, w) on images of `image_size`:
        the `push_percentile` box of the bicubically upsampled map (ProtoPNet's rule)."""
        return high_activation_boxes(similarity_maps, image_size, self.push_percentile)[0]

    @contextlib.contextmanager
    def push_latent(self) -> Iterator[Callable[[Tensor], Tensor]]:
        """The latent function the push searches with (a family may change precision or autocast here)."""
        yield self.latent

    def on_push(self, result: PushResult) -> None:
        """Called after a push changed the prototypes (a family drops what depended on them)."""

    # ------------------------------------------------------------------ shared
    @property
    def num_prototypes(self) -> int:
        """P, the number of prototype records."""
        return int(self.prototype_source_index.shape[0])

    @property
    def patch_size(self) -> int:
        """Side S of the stored prototype patches (P, 3, S, S)."""
        return int(self.prototype_patch.shape[-1])

    def similarity_maps(self, images: Tensor) -> Tensor:
        """(B, P, h, w) similarity of every latent patch to every prototype (higher = more similar)."""
        return self.similarity(self.distances(images))

    @property
    def prototype_classes(self) -> Tensor:
        """(P,) the class each prototype votes for most (-1 where it votes for none)."""
        connection = self.prototype_class_connection()
        best = connection.argmax(dim=1)
        return torch.where(connection.amax(dim=1) > 0, best, torch.full_like(best, -1))

    def register_prototype_records(self, num_prototypes: int, patch_size: int) -> None:
        """The push records, pre-registered with fixed shapes so that `load_state_dict` works."""
        p = num_prototypes
        self.register_buffer("push_epoch", torch.tensor(-1))
        self.register_buffer("prototype_source_index", torch.full((p,), -1))
        self.register_buffer("prototype_position", torch.full((p, 2), -1))
        self.register_buffer("prototype_distance", torch.full((p,), float("inf")))
        self.register_buffer("prototype_rf_box", torch.full((p, 4), -1))
        self.register_buffer("prototype_box", torch.full((p, 4), -1))
        self.register_buffer("prototype_patch", torch.zeros(p, 3, patch_size, patch_size, dtype=torch.uint8))
        self.register_buffer("prototype_image_size", torch.zeros(2, dtype=torch.long))

    def _eval_mode(self) -> dict[nn.Module, bool]:
        modes = {m: m.training for m in self.modules()}
        self.eval()
        return modes

    @staticmethod
    def _restore_mode(modes: dict[nn.Module, bool]) -> None:
        for module, training in modes.items():
            module.training = training

    @torch.no_grad()
    def push(self, loader: Iterable, epoch: int | None = None) -> PushResult:
        """Replace every prototype by its nearest latent patch from an image of an allowed class.

        `loader` gives un-augmented dict batches with "image", "label", "index" (e.g. the datamodule's
        `push_dataloader()`). Records per prototype the source index, latent position, distance,
        receptive-field box, high-activation box (`push_boxes`) and patch, while each source image is in
        its batch. Raises ValueError, before changing anything, if an active prototype with allowed classes
        finds no image, or if the push images differ in size.
        """
        records = {"box": torch.full_like(self.prototype_box, -1), "patch": self.prototype_patch.clone(),
                   "image_size": torch.full_like(self.prototype_box[:, :2], -1)}
        allowed = self.push_classes()
        modes = self._eval_mode()
        try:
            with self.push_latent() as latent:
                result = push_prototypes(latent, self.prototype_tensor(), loader, allowed_classes=allowed,
                                         device=self.device, records=records, describe=self.push_record,
                                         distance=self.push_distance)
        finally:
            self._restore_mode(modes)
        required = self.prototype_active() if allowed is None else self.prototype_active() & allowed.any(dim=1)
        missing = ~result.found & required
        if missing.any():
            wanted = allowed[missing].any(dim=0).nonzero().squeeze(1).tolist() if allowed is not None else []
            raise ValueError(f"push: no image of class(es) {wanted[:20]} in the push data for prototypes "
                             f"{missing.nonzero().squeeze(1).tolist()[:20]}; prototypes left unchanged")
        found = result.found
        sizes = result.records["image_size"][found].unique(dim=0)
        if len(sizes) > 1:
            raise ValueError(f"push: the push data has images of sizes {sizes.tolist()}; boxes need one size "
                             "(resize in the push dataset); prototypes left unchanged")
        size = tuple(sizes[0].tolist()) if len(sizes) else tuple(self.prototype_image_size.tolist())
        rf_boxes = receptive_field_boxes(self.receptive_field(size[0]), self.receptive_field(size[1]), result.position.cpu())
        ids = found.nonzero().squeeze(1)
        self.assign_prototypes(ids, result.vectors[ids])
        keep = lambda new, old: torch.where(found.view(-1, *[1] * (old.ndim - 1)).to(old.device), new.to(old), old)  # noqa: E731
        self.prototype_source_index.copy_(keep(result.sample_index, self.prototype_source_index))
        self.prototype_position.copy_(keep(result.position, self.prototype_position))
        self.prototype_distance.copy_(keep(result.distance, self.prototype_distance))
        self.prototype_rf_box.copy_(keep(rf_boxes, self.prototype_rf_box))
        self.prototype_box.copy_(keep(result.records["box"], self.prototype_box))
        self.prototype_patch.copy_(keep(result.records["patch"], self.prototype_patch))
        self.prototype_image_size.copy_(torch.tensor(size))
        self.push_epoch.fill_(self.current_epoch if epoch is None else epoch)
        self.on_push(result)
        return result

    def push_record(self, images: Tensor, image_ids: Tensor, maps: Tensor) -> dict[str, Tensor]:
        """What the push keeps of new prototypes' source patches: from a batch's images (B, C, H, W), the
        source image of each new prototype (n,) and their self-distance maps (n, h, w), "box" (n, 4),
        "patch" (n, C, S, S) uint8 crops of the box and "image_size" (n, 2).

        Called on every improvement of the search while the images are at hand, like the official
        ProtoPNet box; the box is that of the pushed prototype's own map on its source image.
        """
        size = tuple(images.shape[-2:])
        boxes = self.push_boxes(self.similarity(maps), size)
        patches = crop_patches(images, image_ids, boxes, self.patch_size)
        return {"box": boxes, "patch": patches, "image_size": torch.tensor(size, device=images.device).expand(len(maps), 2)}

    @torch.no_grad()
    def nearest_patches(self, loader: Iterable, k: int = 6) -> NearestPatches:
        """The k nearest images (by their nearest patch, in `push_distance`) of every prototype in `loader`."""
        modes = self._eval_mode()
        try:
            with self.push_latent() as latent:
                return nearest_patches(latent, self.prototype_tensor(), loader, k=k, device=self.device,
                                       distance=self.push_distance)
        finally:
            self._restore_mode(modes)

    def prototype_evidence(self, sim_maps: Tensor, weights: Tensor, ids: Tensor, image_size: tuple[int, int],
                           percentile: float = 95.0) -> dict[str, Tensor]:
        """The prototype part of `Explanation.evidence`, the same for every family.

        Args:
            sim_maps: (B, P, h, w) similarity maps of the explained images.
            weights: (B, P) each prototype's weight towards the explained class of each image.
            ids: (B, k) the prototypes to report per image.

        Returns ``prototype_ids`` (B, k), ``similarity`` (B, k) max similarity on the image, ``weight``,
        ``contribution`` (similarity x weight), ``prototype_class`` (-1 = none), ``prototype_patch``
        (B, k, 3, S, S), ``prototype_box``, ``prototype_rf_box`` and ``prototype_source_index`` (records of
        the source patch), ``activation_map`` (B, k, H, W) upsampled similarity on the image and ``box``
        (B, k, 4) its `percentile` box.
        """
        b, _, h, w = sim_maps.shape
        k = ids.shape[1]
        act = sim_maps.gather(1, ids[:, :, None, None].expand(b, k, h, w))
        sims = act.flatten(2).amax(dim=2)
        take = lambda t: t.to(ids.device).gather(1, ids)  # noqa: E731
        return {
            "prototype_ids": ids,
            "similarity": sims,
            "weight": take(weights),
            "contribution": sims * take(weights),
            "prototype_class": self.prototype_classes[ids],
            "prototype_patch": self.prototype_patch[ids],
            "prototype_box": self.prototype_box[ids],
            "prototype_rf_box": self.prototype_rf_box[ids],
            "prototype_source_index": self.prototype_source_index[ids],
            "activation_map": upsample_maps(act.flatten(0, 1), image_size).view(b, k, *image_size),
            "box": high_activation_boxes(act.flatten(0, 1), image_size, percentile)[0].view(b, k, 4),
        }

    def top_prototypes(self, sim_maps: Tensor, top_k: int) -> Tensor:
        """(B, k) the k active prototypes most similar to each image."""
        active = self.prototype_active().to(sim_maps.device)
        k = min(top_k, int(active.sum()))
        return sim_maps.flatten(2).amax(dim=2).masked_fill(~active, float("-inf")).topk(k, dim=1).indices
