"""SyntheticParts: a 2-D scene generator with ground-truth parts (the zoo's built-in dataset).

A scene is a *recipe* of plain values (background, body pose, part variants, distractors, occluder,
shortcut cue, colour jitter) drawn from ``np.random.default_rng([seed, split_id, index])``; the image is
rendered from the recipe, so any image can be rebuilt, and re-rendered with parts removed or replaced
(FunnyBirds-style interventions) without changing anything else in the scene.

Coordinates: keypoints use the pixel-index convention of ``torchvision.tv_tensors.KeyPoints`` (the centre
of pixel (row i, column j) is (x=j, y=i)), boxes use pixel edges (x0, y0, x1, y1) with x1 exclusive, as
``BoundingBoxes`` in XYXY format. A horizontal flip maps a keypoint x to W - 1 - x and a box x to W - x.

Bitwise reproducibility: per-pixel work uses only +, -, *, /, comparisons, floor and mod on float32, all
exactly rounded under IEEE 754, so the bytes do not depend on the CPU's SIMD paths (transcendental
functions such as sin/exp have vectorised implementations that differ between machines by an ulp; they
are only evaluated on Python scalars here).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SyntheticPartsError",
    "PART_NAMES",
    "NUM_VARIANTS",
    "PART_SHAPES",
    "PART_COLORS",
    "PATTERNS",
    "DISTRACTOR_SHAPES",
    "SPLIT_IDS",
    "GENERATOR_VERSION",
    "SceneRecipe",
    "RenderedSample",
    "SyntheticPartsGenerator",
]

# Bump when the rendering of a recipe changes, so that on-disk caches keyed by it are invalidated.
GENERATOR_VERSION = 1

PART_NAMES: tuple[str, ...] = ("head", "wing", "tail", "marking")
NUM_VARIANTS = 5
PART_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon")
# Saturated colours for parts; backgrounds and bodies are muted, so parts stand out.
PART_COLORS = np.array(
    [[225, 40, 40], [40, 175, 60], [45, 90, 235], [245, 205, 20], [205, 50, 205]], dtype=np.float32
)
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")
# Distractors share the part colours but never the part shapes and are smaller, so they are truly
# class-independent clutter that a model must learn to ignore.
DISTRACTOR_SHAPES: tuple[str, ...] = ("ring", "cross", "bar")
BODY_COLORS = np.array(
    [[150, 128, 105], [165, 165, 155], [120, 108, 96], [190, 172, 145]], dtype=np.float32
)
# Multiplier for the second colour of striped / dotted parts.
PATTERN_SHADE = 0.45

SPLIT_IDS: dict[str, int] = {"train": 0, "push": 0, "val": 1, "test": 2}

# Geometry, in fractions of the image side (before the per-image scale).
BODY_A = 0.20  # body ellipse semi-axis along its length
BODY_B = 0.12  # semi-axis across
PART_R = 0.07  # part "radius": a part spans about 14% of the image side
DISTRACTOR_R = (0.03, 0.045)
OBJECT_EXTENT = 0.30  # farthest object pixel from the body centre, used to keep the object inside
# Part anchors in the body frame, in units of (BODY_A, BODY_B); y points down (image rows).
PART_ANCHORS = np.array([[0.95, -0.15], [-0.05, -1.0], [-1.0, 0.10], [0.0, 0.45]], dtype=np.float64)
PART_RADIUS_FACTOR = np.array([1.0, 1.1, 1.0, 0.8], dtype=np.float64)
MAX_BODY_ANGLE = 30.0  # degrees
MAX_PART_ANGLE = 15.0

# Owner ids in the per-pixel ownership map (parts are 0..S-1).
_BACKGROUND, _DISTRACTOR, _BODY, _SHORTCUT, _OCCLUDER = -1, 10, 11, 12, 13
_SQRT3 = math.sqrt(3.0)


def variant_appearance(slot: int, variant: int) -> tuple[str, int, str]:
    """(shape, colour index, pattern) of a part variant.

    Colour = variant and shape = (variant + slot) mod 5, so inside a slot variants differ in shape and
    colour, and no (shape, colour) pair occurs in two slots: a bag of part appearances is enough to tell
    classes apart, which a small CNN with global pooling learns quickly.
    """
    return (
        PART_SHAPES[(variant + slot) % len(PART_SHAPES)],
        variant % len(PART_COLORS),
        PATTERNS[(variant + 2 * slot) % len(PATTERNS)],
    )


class SyntheticPartsError(ValueError):
    """An invalid generator setting, split, index or intervention."""


@dataclass(frozen=True)
class SceneRecipe:
    """Everything needed to render one image; plain Python values (picklable, printable)."""

    index: int
    split: str
    label: int
    image_size: int
    variants: tuple[int, ...]  # variant per part slot (the class's combination)
    background: dict  # kind, colors, kind-specific parameters
    body: dict  # cx, cy, a, b, angle (deg), mirror, color
    parts: tuple[dict, ...]  # per slot: offset (dx, dy) in pixels, angle (deg), radius
    distractors: tuple[dict, ...]  # shape, color, cx, cy, r, angle
    occluder: dict | None  # slot, cx, cy, half_w, half_h, angle, grey
    shortcut: tuple[float, ...] | None  # RGB of the class-correlated corner cue
    jitter: tuple[float, ...] | None  # (brightness, dr, dg, db)


@dataclass
class RenderedSample:
    """One rendered image and its ground truth."""

    image: np.ndarray  # uint8 (H, W, 3)
    part_masks: np.ndarray  # bool (S, H, W), visible pixels of each part, mutually disjoint
    keypoints: np.ndarray  # float32 (S, 3): x, y (part centre), visible in {0, 1}
    body_box: np.ndarray  # float32 (4,): x0, y0, x1, y1 of the visible object (body and parts)
    label: int
    recipe: SceneRecipe = field(repr=False)
    body_mask: np.ndarray | None = field(default=None, repr=False)  # bool (H, W), visible body pixels
    distractor_mask: np.ndarray | None = field(default=None, repr=False)  # bool (H, W), visible distractor pixels

    @property
    def part_map(self) -> np.ndarray:
        """int8 (H, W): part index at each pixel, -1 where no part is visible."""
        out = np.full(self.part_masks.shape[1:], -1, dtype=np.int8)
        for s in range(self.part_masks.shape[0]):
            out[self.part_masks[s]] = s
        return out


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test for a unit-size shape in local coordinates (u right, v down); areas roughly equal."""
    au, av = np.abs(u), np.abs(v)
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "square":
        return (au <= 0.87) & (av <= 0.87)
    if kind == "diamond":
        return au + av <= 1.2
    if kind == "triangle":
        # Equilateral, pointing up (towards -v), centroid at the origin, scaled to match the others.
        s = 1.3
        return (v <= 0.5 * s) & (v >= _SQRT3 * au - s)
    if kind == "hexagon":
        s = 1.05
        return (av <= 0.5 * _SQRT3 * s) & (_SQRT3 * au + av <= _SQRT3 * s)
    if kind == "ring":
        d = u * u + v * v
        return (d <= 1.0) & (d >= 0.4)
    if kind == "cross":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if kind == "bar":
        return (au <= 1.1) & (av <= 0.3)
    if kind == "rect":  # occluder; u, v already normalised by the half sizes
        return (au <= 1.0) & (av <= 1.0)
    raise SyntheticPartsError(f"unknown shape {kind!r}")


def _hsv_color(hue: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, 0.9, 0.95)
    return (round(r * 255.0, 3), round(g * 255.0, 3), round(b * 255.0, 3))


class SyntheticPartsGenerator:
    """Deterministic generator of SyntheticParts scenes.

    Args:
        num_classes: number of classes K (2 <= K <= 125); each is a combination of part variants.
        image_size: side of the square images in pixels.
        seed: seeds both the class definitions and every scene.
        clutter: number of class-independent distractor shapes per image.
        occlusion: probability that a grey occluder hides part of one part slot.
        color_jitter: strength in [0, 1] of a per-image brightness and colour shift.
        shortcut: probability that a class-coloured square is drawn in the top-left corner (a cue a
            model can cheat with; explanations should reveal it).
        scale_range: range of the per-image object scale.
    """

    part_names: tuple[str, ...] = PART_NAMES
    num_variants: int = NUM_VARIANTS

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 128,
        seed: int = 0,
        clutter: int = 3,
        occlusion: float = 0.0,
        color_jitter: float = 0.0,
        shortcut: float = 0.0,
        scale_range: tuple[float, float] = (0.8, 1.2),
    ) -> None:
        max_classes = NUM_VARIANTS ** (len(PART_NAMES) - 1)
        if not 2 <= num_classes <= max_classes:
            raise SyntheticPartsError(f"num_classes must be in [2, {max_classes}], got {num_classes}")
        if image_size < 16:
            raise SyntheticPartsError(f"image_size must be >= 16, got {image_size}")
        if clutter < 0:
            raise SyntheticPartsError(f"clutter must be >= 0, got {clutter}")
        for name, p in (("occlusion", occlusion), ("color_jitter", color_jitter), ("shortcut", shortcut)):
            if not 0.0 <= p <= 1.0:
                raise SyntheticPartsError(f"{name} must be in [0, 1], got {p}")
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0.3 <= lo <= hi <= 1.2:
            # Above 1.2 the object no longer fits in the image.
            raise SyntheticPartsError(f"scale_range must satisfy 0.3 <= lo <= hi <= 1.2, got {scale_range}")
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.clutter = int(clutter)
        self.occlusion = float(occlusion)
        self.color_jitter = float(color_jitter)
        self.shortcut = float(shortcut)
        self.scale_range = (lo, hi)
        self.class_variants = self._make_class_variants()
        # Pixel-centre coordinates (pixel-index convention), float32 for speed.
        self._coords = np.arange(self.image_size, dtype=np.float32)
        self._noise_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------------ classes
    @property
    def params(self) -> dict:
        """The constructor arguments (used e.g. as a cache key)."""
        return {
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "seed": self.seed,
            "clutter": self.clutter,
            "occlusion": self.occlusion,
            "color_jitter": self.color_jitter,
            "shortcut": self.shortcut,
            "scale_range": list(self.scale_range),
            "version": GENERATOR_VERSION,
        }

    def _make_class_variants(self) -> np.ndarray:
        """K distinct codewords of a distance-2 code, so every pair of classes differs in >= 2 slots.

        The code {(a, b, c, a+b+c mod V)} has minimum Hamming distance 2; relabelling the symbols of
        each slot with a seeded permutation keeps the distances and mixes which variants are used.
        """
        v, s = NUM_VARIANTS, len(PART_NAMES)
        rng = np.random.default_rng([self.seed, 0x5EED, self.num_classes])
        for _ in range(1000):
            words = rng.choice(v ** (s - 1), size=self.num_classes, replace=False)
            digits = np.stack([(words // v**k) % v for k in range(s - 1)], axis=1)
            code = np.concatenate([digits, digits.sum(axis=1, keepdims=True) % v], axis=1)
            perms = np.stack([rng.permutation(v) for _ in range(s)])
            code = perms[np.arange(s)[None, :], code]
            # Every slot must matter for some pair, i.e. not be constant over the classes.
            if all(len(np.unique(code[:, k])) > 1 for k in range(s)):
                return code.astype(np.int64)
        raise RuntimeError("could not draw class combinations in which every slot matters")

    def distinguishing_parts(self, c1: int, c2: int) -> list[str]:
        """Names of the part slots whose variants differ between classes c1 and c2."""
        a, b = self.class_variants[c1], self.class_variants[c2]
        return [PART_NAMES[s] for s in range(len(PART_NAMES)) if a[s] != b[s]]

    def describe_class(self, c: int) -> dict[str, tuple[str, int, str]]:
        """Part name -> (shape, colour index, pattern) for class c."""
        return {PART_NAMES[s]: variant_appearance(s, int(v)) for s, v in enumerate(self.class_variants[c])}

    @property
    def class_names(self) -> list[str]:
        """Readable names built from the part variants, e.g. 'c03_h1w4t0m2'."""
        return [
            f"c{c:02d}_" + "".join(f"{n[0]}{int(v)}" for n, v in zip(PART_NAMES, self.class_variants[c]))
            for c in range(self.num_classes)
        ]

    def label_of(self, index: int) -> int:
        """Label of sample ``index`` in any split: balanced, ``index % num_classes``."""
        return int(index) % self.num_classes

    # ------------------------------------------------------------------ recipes
    def recipe(self, index: int, split: str = "train") -> SceneRecipe:
        """The scene recipe of sample ``index`` of ``split`` ('train', 'val', 'test'; 'push' = 'train').

        Every random component is always drawn, in a fixed order, whatever the knobs; only the
        distractors (whose count is ``clutter``) come last. So changing ``occlusion``, ``shortcut`` or
        ``color_jitter`` changes nothing else in a scene.
        """
        if split not in SPLIT_IDS:
            raise SyntheticPartsError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
        if index < 0:
            raise SyntheticPartsError(f"index must be >= 0, got {index}")
        size = float(self.image_size)
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], int(index)])
        label = self.label_of(index)

        # Background: two muted colours mixed by a texture map.
        kind = ("noise", "stripes", "blobs")[int(rng.integers(3))]
        grey = rng.uniform(85.0, 195.0)
        c0 = grey + rng.uniform(-20.0, 20.0, size=3)
        contrast = rng.uniform(20.0, 45.0) * (1.0 if grey < 140 else -1.0)
        c1 = c0 + contrast + rng.uniform(-10.0, 10.0, size=3)
        bg: dict = {"kind": kind, "colors": (tuple(float(x) for x in c0), tuple(float(x) for x in c1))}
        # Draw the parameters of all three kinds so the stream does not depend on the kind.
        noise_grid = int(rng.integers(4, 9))
        noise = rng.random((9, 9))
        stripe_angle = rng.uniform(0.0, 180.0)
        stripe_period = rng.uniform(0.06, 0.16) * size
        stripe_phase = rng.random()
        blob_xy = rng.uniform(0.0, size, size=(5, 2))
        blob_r = rng.uniform(0.12, 0.35, size=5) * size
        if kind == "noise":
            bg.update(grid=noise_grid, values=noise[: noise_grid + 1, : noise_grid + 1].round(6).tolist())
        elif kind == "stripes":
            bg.update(angle=float(stripe_angle), period=float(stripe_period), phase=float(stripe_phase))
        else:
            bg.update(centers=blob_xy.tolist(), radii=blob_r.tolist())

        # Body pose: the whole object stays inside the image.
        scale = rng.uniform(*self.scale_range)
        extent = OBJECT_EXTENT * scale * size
        cx, cy = rng.uniform(extent, size - extent, size=2)
        body = {
            "cx": float(cx),
            "cy": float(cy),
            "a": float(BODY_A * scale * size),
            "b": float(BODY_B * scale * size),
            "angle": float(rng.uniform(-MAX_BODY_ANGLE, MAX_BODY_ANGLE)),
            "mirror": bool(rng.random() < 0.5),
            "color": tuple(float(x) for x in BODY_COLORS[int(rng.integers(len(BODY_COLORS)))]),
        }
        offsets = rng.uniform(-0.12, 0.12, size=(len(PART_NAMES), 2)) * PART_R * scale * size
        part_angles = rng.uniform(-MAX_PART_ANGLE, MAX_PART_ANGLE, size=len(PART_NAMES))
        parts = tuple(
            {
                "offset": (float(offsets[s, 0]), float(offsets[s, 1])),
                "angle": float(part_angles[s]),
                "radius": float(PART_R * PART_RADIUS_FACTOR[s] * scale * size),
            }
            for s in range(len(PART_NAMES))
        )

        # Colour jitter, shortcut and occluder: always drawn, used only if their knob says so.
        jit = rng.uniform(-1.0, 1.0, size=4)
        jitter = None
        if self.color_jitter > 0:
            jitter = (
                float(1.0 + 0.4 * self.color_jitter * jit[0]),
                *(float(40.0 * self.color_jitter * j) for j in jit[1:]),
            )
        u_shortcut = rng.random()
        shortcut = _hsv_color(label / self.num_classes) if u_shortcut < self.shortcut else None
        u_occ = rng.random()
        occ_slot = int(rng.integers(len(PART_NAMES)))
        occ_dir = rng.uniform(0.0, 2.0 * math.pi)
        occ_half = rng.uniform(0.6, 0.9, size=2)
        occ_angle = rng.uniform(0.0, 90.0)
        occ_grey = rng.uniform(100.0, 160.0)
        occluder = None
        if u_occ < self.occlusion:
            pc = self._part_centers(body, parts)[occ_slot]
            r = parts[occ_slot]["radius"]
            # Offset by about one radius so the occluder hides roughly a third to a half of the part.
            occluder = {
                "slot": occ_slot,
                "cx": float(pc[0] + 1.0 * r * math.cos(occ_dir)),
                "cy": float(pc[1] + 1.0 * r * math.sin(occ_dir)),
                "half_w": float(occ_half[0] * r),
                "half_h": float(occ_half[1] * r),
                "angle": float(occ_angle),
                "grey": float(occ_grey),
            }

        # Distractors, away from the body where possible (a few rejection tries, then accept).
        distractors = []
        keep_out = (BODY_A + PART_R) * scale * size
        for _ in range(self.clutter):
            r = rng.uniform(*DISTRACTOR_R) * size
            for _try in range(8):
                x, y = rng.uniform(r, size - r, size=2)
                if math.hypot(x - cx, y - cy) > keep_out + r:
                    break
            distractors.append(
                {
                    "shape": DISTRACTOR_SHAPES[int(rng.integers(len(DISTRACTOR_SHAPES)))],
                    "color": tuple(float(c) for c in PART_COLORS[int(rng.integers(len(PART_COLORS)))]),
                    "cx": float(x),
                    "cy": float(y),
                    "r": float(r),
                    "angle": float(rng.uniform(0.0, 180.0)),
                }
            )

        return SceneRecipe(
            index=int(index),
            split=split,
            label=label,
            image_size=self.image_size,
            variants=tuple(int(v) for v in self.class_variants[label]),
            background=bg,
            body=body,
            parts=parts,
            distractors=tuple(distractors),
            occluder=occluder,
            shortcut=shortcut,
            jitter=jitter,
        )

    @staticmethod
    def _part_centers(body: dict, parts: Sequence[dict]) -> np.ndarray:
        """(S, 2) part centres in pixels: anchors in the (possibly mirrored) rotated body frame."""
        t = math.radians(body["angle"])
        c, s = math.cos(t), math.sin(t)
        sign = -1.0 if body["mirror"] else 1.0
        out = np.empty((len(parts), 2), dtype=np.float64)
        for k, p in enumerate(parts):
            lx = sign * PART_ANCHORS[k, 0] * body["a"] + p["offset"][0]
            ly = PART_ANCHORS[k, 1] * body["b"] + p["offset"][1]
            out[k] = (body["cx"] + c * lx - s * ly, body["cy"] + s * lx + c * ly)
        return out

    # ------------------------------------------------------------------ rendering
    def sample(self, index: int, split: str = "train") -> RenderedSample:
        """``render(recipe(index, split))``."""
        return self.render(self.recipe(index, split))

    def render(
        self,
        recipe: SceneRecipe,
        remove: Sequence[str] = (),
        replace: Mapping[str, int] | None = None,
    ) -> RenderedSample:
        """Render a recipe, optionally with interventions.

        Args:
            recipe: from :meth:`recipe`.
            remove: part names to leave out (what lies behind shows through and their masks are empty),
                and/or ``"distractors"``, ``"occluder"``, ``"shortcut"``, ``"body"``.
            replace: part name -> variant index to draw instead of the class's variant.
        """
        valid = set(PART_NAMES) | {"distractors", "occluder", "shortcut", "body"}
        if isinstance(remove, str):
            remove = (remove,)
        unknown = set(remove) - valid
        if unknown:
            raise SyntheticPartsError(f"cannot remove {sorted(unknown)}; valid names: {sorted(valid)}")
        variants = list(recipe.variants)
        for name, v in (replace or {}).items():
            if name not in PART_NAMES:
                raise SyntheticPartsError(f"cannot replace {name!r}; part names: {PART_NAMES}")
            if not 0 <= int(v) < NUM_VARIANTS:
                raise SyntheticPartsError(f"variant for {name!r} must be in [0, {NUM_VARIANTS}), got {v}")
            variants[PART_NAMES.index(name)] = int(v)

        n = recipe.image_size
        img = self._background(recipe.background, n)
        owner = np.full((n, n), _BACKGROUND, dtype=np.int8)

        if "distractors" not in remove:
            for d in recipe.distractors:
                self._draw(img, owner, d["shape"], d["cx"], d["cy"], d["r"], d["r"], d["angle"], False,
                           np.asarray(d["color"], dtype=np.float32), _DISTRACTOR)
        body = recipe.body
        if "body" not in remove:
            self._draw(img, owner, "circle", body["cx"], body["cy"], body["a"], body["b"], body["angle"],
                       False, np.asarray(body["color"], dtype=np.float32), _BODY)
        centers = self._part_centers(body, recipe.parts)
        present = [name not in remove for name in PART_NAMES]
        for s, p in enumerate(recipe.parts):
            if not present[s]:
                continue
            shape, color, pattern = variant_appearance(s, variants[s])
            self._draw(img, owner, shape, centers[s, 0], centers[s, 1], p["radius"], p["radius"],
                       body["angle"] + p["angle"], body["mirror"], PART_COLORS[color], s, pattern)
        if recipe.shortcut is not None and "shortcut" not in remove:
            half = 0.045 * n
            self._draw(img, owner, "rect", 0.02 * n + half, 0.02 * n + half, half, half, 0.0, False,
                       np.asarray(recipe.shortcut, dtype=np.float32), _SHORTCUT)
        occ = recipe.occluder
        if occ is not None and "occluder" not in remove:
            self._draw(img, owner, "rect", occ["cx"], occ["cy"], occ["half_w"], occ["half_h"], occ["angle"],
                       False, np.full(3, occ["grey"], dtype=np.float32), _OCCLUDER)
        if recipe.jitter is not None:
            img *= np.float32(recipe.jitter[0])
            img += np.asarray(recipe.jitter[1:], dtype=np.float32)
        image = np.clip(img + np.float32(0.5), 0.0, 255.0).astype(np.uint8)

        num_parts = len(PART_NAMES)
        part_masks = owner[None, :, :] == np.arange(num_parts, dtype=np.int8)[:, None, None]
        visible = part_masks.reshape(num_parts, -1).any(axis=1)
        keypoints = np.concatenate([centers, visible[:, None]], axis=1).astype(np.float32)
        return RenderedSample(
            image=image,
            part_masks=part_masks,
            keypoints=keypoints,
            body_box=self._object_box(owner, num_parts),
            label=recipe.label,
            recipe=recipe,
            body_mask=owner == _BODY,
            distractor_mask=owner == _DISTRACTOR,
        )

    @staticmethod
    def _object_box(owner: np.ndarray, num_parts: int) -> np.ndarray:
        """Tight box (edge convention) around the visible body and part pixels; zeros if none."""
        obj = (owner == _BODY) | ((owner >= 0) & (owner < num_parts))
        rows, cols = np.flatnonzero(obj.any(axis=1)), np.flatnonzero(obj.any(axis=0))
        if rows.size == 0:
            return np.zeros(4, dtype=np.float32)
        return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)

    def _noise_index(self, grid: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell index and fraction of each pixel for bilinear upsampling of a (grid+1)^2 lattice."""
        if grid not in self._noise_cache:
            pos = (self._coords + np.float32(0.5)) * np.float32(grid / n)
            i0 = np.minimum(np.floor(pos).astype(np.int64), grid - 1)
            self._noise_cache[grid] = (i0, (pos - i0).astype(np.float32))
        return self._noise_cache[grid]

    def _background(self, bg: dict, n: int) -> np.ndarray:
        x = self._coords
        if bg["kind"] == "noise":
            g = bg["grid"]
            lattice = np.asarray(bg["values"], dtype=np.float32)
            i0, f = self._noise_index(g, n)
            rows = lattice[i0] * (1 - f)[:, None] + lattice[i0 + 1] * f[:, None]  # (n, g+1)
            t = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
        elif bg["kind"] == "stripes":
            a = math.radians(bg["angle"])
            cx, cy = np.float32(math.cos(a) / bg["period"]), np.float32(math.sin(a) / bg["period"])
            d = x[None, :] * cx + x[:, None] * cy + np.float32(bg["phase"])
            t = np.abs(np.mod(d, np.float32(1.0)) * 2 - 1)  # triangle wave, no sin
        else:
            t = np.zeros((n, n), dtype=np.float32)
            for (bx, by), r in zip(bg["centers"], bg["radii"]):
                dx2 = (x - np.float32(bx)) ** 2 * np.float32(1.0 / (r * r))
                dy2 = (x - np.float32(by)) ** 2 * np.float32(1.0 / (r * r))
                np.maximum(t, 1 - (dy2[:, None] + dx2[None, :]), out=t)
            t = np.clip(t, 0, 1)
        c0 = np.asarray(bg["colors"][0], dtype=np.float32)
        c1 = np.asarray(bg["colors"][1], dtype=np.float32)
        return c0 + t.astype(np.float32)[:, :, None] * (c1 - c0)

    def _draw(
        self,
        img: np.ndarray,
        owner: np.ndarray,
        shape: str,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        angle: float,
        mirror: bool,
        color: np.ndarray,
        owner_id: int,
        pattern: str = "solid",
    ) -> None:
        """Paint one shape in place, on the window around it only (the speed comes from that)."""
        n = img.shape[0]
        reach = 1.45 * max(rx, ry)  # bounds every shape's farthest point (the diamond's tips: 1.2)
        i0, i1 = max(0, int(math.floor(cy - reach))), min(n, int(math.ceil(cy + reach)) + 1)
        j0, j1 = max(0, int(math.floor(cx - reach))), min(n, int(math.ceil(cx + reach)) + 1)
        if i0 >= i1 or j0 >= j1:
            return
        t = math.radians(angle)
        c, s = np.float32(math.cos(t)), np.float32(math.sin(t))
        dx = self._coords[j0:j1][None, :] - np.float32(cx)
        dy = self._coords[i0:i1][:, None] - np.float32(cy)
        # Inverse rotation of the grid into the shape's frame.
        u = (dx * c + dy * s) * np.float32(1.0 / rx)
        v = (dy * c - dx * s) * np.float32(1.0 / ry)
        if mirror:
            u = -u
        inside = _shape_mask(shape, u, v)
        win_img, win_owner = img[i0:i1, j0:j1], owner[i0:i1, j0:j1]
        if pattern == "solid":
            win_img[inside] = color
        else:
            if pattern == "striped":
                dark = np.mod(np.floor((u + v + np.float32(4.0)) * np.float32(1.6)), np.float32(2.0)) == 1
            elif pattern == "dotted":
                fu = np.mod(u * np.float32(1.8), np.float32(1.0)) - np.float32(0.5)
                fv = np.mod(v * np.float32(1.8), np.float32(1.0)) - np.float32(0.5)
                dark = fu * fu + fv * fv < np.float32(0.09)
            else:
                raise SyntheticPartsError(f"unknown pattern {pattern!r}")
            shade = (color * np.float32(PATTERN_SHADE)).astype(np.float32)
            win_img[inside & ~dark] = color
            win_img[inside & dark] = shade
        win_owner[inside] = owner_id
