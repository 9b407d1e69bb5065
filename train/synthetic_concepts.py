"""Concept labels of SyntheticParts for concept bottleneck models: one binary concept per (part slot,
variant), so each part slot is a concept group of `NUM_VARIANTS` mutually exclusive concepts.

Concepts are class-level, as the CUB concepts of Koh et al.: an image's concept vector is its class's
combination of part variants (one-hot per slot), whether or not an occluder hides the part.
"""
from __future__ import annotations

import numpy as np

from .synthetic import NUM_VARIANTS, PART_NAMES, SyntheticPartsGenerator, variant_appearance

__all__ = ["class_concepts", "concept_groups", "concept_names"]


def concept_names() -> list[str]:
    """``"<part>:<shape>"`` per concept, slot-major (concept s * V + v is variant v of slot s)."""
    return [f"{part}:{variant_appearance(s, v)[0]}" for s, part in enumerate(PART_NAMES) for v in range(NUM_VARIANTS)]


def concept_groups() -> list[int]:
    """The group (part slot) of each concept."""
    return [s for s in range(len(PART_NAMES)) for _ in range(NUM_VARIANTS)]


def class_concepts(generator: SyntheticPartsGenerator) -> np.ndarray:
    """(K, S * V) float32 in {0, 1}: the concept vector of each class."""
    variants = generator.class_variants  # (K, S)
    table = np.zeros((len(variants), len(PART_NAMES), NUM_VARIANTS), dtype=np.float32)
    table[np.arange(len(variants))[:, None], np.arange(len(PART_NAMES))[None, :], variants] = 1.0
    return table.reshape(len(variants), -1)
