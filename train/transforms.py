"""Training augmentations (``torchvision.transforms.v2``): the zoo's mild default and the papers' recipes.

Every transform moves images, masks, boxes and keypoints together (uint8 images in, uint8 out).

* ``"default"``: mild random-resized crop, flip, rotation and colour jitter.
* ``"protopnet"``: the official ProtoPNet training set is augmented offline with Augmentor
  (``img_aug.py``): each cropped training image gives 10 rotated (+-15 deg), 10 skewed (magnitude
  0.2) and 10 sheared (+-10 deg) images, each flipped left-right with probability 0.5. The three
  pipelines are written here as warps that draw their parameters as Augmentor does. With
  ``epoch_repeats: 30`` one epoch shows every image 30 times, view r through pipeline r % 3, so an
  epoch has the offline set's size and composition; the draws differ each epoch where the offline
  set is fixed. The warps run after the resize to the network's input size (Augmentor warped the
  crops at full resolution, then the loader resized them): the geometry is the same up to rounding,
  and each warp resamples once (bilinear) where Augmentor resamples twice (bicubic).
* ``"prototree_cub"`` / ``"prototree_cars"``: ProtoTree's online augmentation (``util/data.py``).
* ``"pipnet_cub"`` / ``"pipnet_cars"``: PIP-Net's two views (``util/data.py``, ``TwoAugSupervisedDataset``):
  a shape pipeline T1 once (resize, TrivialAugment-Wide restricted to shear / translate / rotate, flip,
  random-resized crop), then a colour pipeline T2 (TrivialAugment-Wide restricted to colour ops, random
  crop) twice, independently: the item carries ``"image"`` and ``"image2"``. Pixel sizes are the official
  ones at 224 px, scaled by image_size / 224 for other sizes.

A recipe with several pipelines is an `Augmentation`; view r of a repeated epoch uses
``for_view(r, views)``. Facts: ProtoPNet ``img_aug.py`` and Augmentor 0.2.12 ``Operations.py``
(RotateRange, Skew, Shear); ProtoTree ``util/data.py``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "AugmentorRotate",
    "AugmentorShear",
    "AugmentorSkew",
    "TrivialAugmentSubset",
    "build_train_transform",
    "pick_view",
    "train_augmentation",
]


# ------------------------------------------------------------------------------------------ tensors
def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """uint8 (3, H, W)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def to_float(image: torch.Tensor) -> torch.Tensor:
    return image.as_subclass(torch.Tensor).to(torch.float32).div_(255.0).contiguous()


def apply_transform(
    transform: Callable | None,
    image: torch.Tensor,
    part_map: torch.Tensor | None = None,
    keypoints: torch.Tensor | None = None,
    box: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run a v2 transform on an image and its annotations; returns plain tensors.

    ``part_map``: uint8 (H, W), 0 = no part, s + 1 = part s (nearest-neighbour resampled).
    ``keypoints``: (K, 3) (x, y, visible); points that leave the canvas become invisible.
    ``box``: (4,) XYXY.
    """
    if transform is None:
        return image, part_map, keypoints, box
    h, w = image.shape[-2:]
    inputs: dict[str, Any] = {"image": tv_tensors.Image(image)}
    if part_map is not None:
        inputs["part_map"] = tv_tensors.Mask(part_map[None])
    if keypoints is not None:
        inputs["keypoints"] = tv_tensors.KeyPoints(keypoints[:, :2].clone(), canvas_size=(h, w))
    if box is not None:
        inputs["box"] = tv_tensors.BoundingBoxes(box[None], format="XYXY", canvas_size=(h, w))
    out = transform(inputs)
    image = out["image"].as_subclass(torch.Tensor)
    nh, nw = image.shape[-2:]
    if part_map is not None:
        part_map = out["part_map"].as_subclass(torch.Tensor)[0]
    if keypoints is not None:
        xy = out["keypoints"].as_subclass(torch.Tensor).to(torch.float32)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] <= nw - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= nh - 1)
        keypoints = torch.cat([xy, (keypoints[:, 2] > 0).logical_and(inside)[:, None].float()], dim=1)
    if box is not None:
        box = out["box"].as_subclass(torch.Tensor)[0].to(torch.float32)
    return image, part_map, keypoints, box


# ---------------------------------------------------------------------------------- the zoo's default
def build_train_transform(
    image_size: int,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    degrees: float = 10.0,
    jitter: float = 0.1,
) -> v2.Transform:
    """Mild augmentation that moves masks, boxes and keypoints with the image (uint8 in, uint8 out)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomAffine(degrees=degrees)], p=0.5),
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
        ]
    )


# ------------------------------------------------------------------------------- Augmentor as warps
def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both included (Python's ``random.randint``), from torch's generator."""
    return int(torch.randint(low, high + 1, (1,)))


def _homography(src: Sequence[Sequence[float]], dst: Sequence[Sequence[float]]) -> list[float]:
    """The 8 coefficients (a..h) of the perspective map that sends each point of ``src`` to ``dst``:
    x' = (a x + b y + c) / (g x + h y + 1), y' = (d x + e y + f) / (g x + h y + 1)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)).tolist()


class _Warp(v2.Transform):
    """A warp given by the coefficients that map each output pixel to the input point it shows
    (PIL's convention); boxes and keypoints are moved by the inverse map."""

    def __init__(self, fill: float = 0.0) -> None:
        super().__init__()
        self.fill = fill

    def draw(self) -> dict[str, Any]:
        """The random parameters of one application."""
        raise NotImplementedError

    @staticmethod
    def coefficients(width: int, height: int, **params: Any) -> list[float]:
        """Output pixel -> input point (PIL's 8 perspective coefficients) for drawn ``params``."""
        raise NotImplementedError

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        return {"coefficients": self.coefficients(width, height, **self.draw())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = 0 if isinstance(inpt, tv_tensors.Mask) else self.fill
        return self._call_kernel(F.perspective, inpt, startpoints=None, endpoints=None, fill=fill,
                                 coefficients=params["coefficients"], interpolation=v2.InterpolationMode.BILINEAR)


def _affine(a: float, b: float, c: float, d: float, e: float, f: float) -> list[float]:
    return [a, b, c, d, e, f, 0.0, 0.0]


class AugmentorRotate(_Warp):
    """Augmentor's ``rotate(probability=1, max_left_rotation=m, max_right_rotation=m)``.

    A whole-degree angle: a fair coin picks a side, then ``randint(-m, 0)`` or ``randint(0, m)``
    (so 0 is drawn more often). The image is rotated counter-clockwise on an expanded canvas,
    Augmentor's crop ``(E, A, X - E, Y - A)`` of that canvas removes the empty corners, and the crop is
    resized back to the input size.
    """

    def __init__(self, max_degrees: int = 15, fill: float = 0.0) -> None:
        super().__init__(fill)
        self.max_degrees = int(max_degrees)

    def draw(self) -> dict[str, Any]:
        m = self.max_degrees
        return {"angle": _randint(-m, 0) if _randint(0, 1) == 0 else _randint(0, m)}

    @staticmethod
    def coefficients(width: int, height: int, angle: float = 0.0) -> list[float]:
        theta = math.radians(angle)
        cos, sin = math.cos(theta), math.sin(theta)
        # The expanded canvas as PIL sizes it: whole pixels around the rotated corners.
        half_x, half_y = (width * abs(cos) + height * abs(sin)) / 2, (width * abs(sin) + height * abs(cos)) / 2
        big_x = math.ceil(round(width / 2 + half_x, 9)) - math.floor(round(width / 2 - half_x, 9))
        big_y = math.ceil(round(height / 2 + half_y, 9)) - math.floor(round(height / 2 - half_y, 9))
        t = math.tan(abs(theta))
        e = t * (big_y - big_x * t) - t * t  # Augmentor's formula for the crop margins
        a = t * (big_x - e)
        e, a = round(e), round(a)
        sx, sy = (big_x - 2 * e) / width, (big_y - 2 * a) / height
        # output (u, v) -> canvas (e + u sx, a + v sy) -> input: rotate the offset from the canvas centre
        # back by -angle (image axes, y down: a counter-clockwise turn maps (x, y) to (x cos + y sin, -x sin + y cos)).
        ox, oy = e - big_x / 2, a - big_y / 2
        return _affine(cos * sx, -sin * sy, cos * ox - sin * oy + width / 2,
                       sin * sx, cos * sy, sin * ox + cos * oy + height / 2)


class AugmentorShear(_Warp):
    """Augmentor's ``shear(probability=1, max_shear_left=m, max_shear_right=m)``.

    The angle is Augmentor's draw, ``int(uniform(-m - 1, m + 1))`` then +1 unless it is -1 (so it
    lies in [-(m - 1), m + 1] and is never 0); the direction is x or y with equal odds. The sheared
    image is cropped to the part without empty triangles and resized back to the input size.
    """

    def __init__(self, max_degrees: int = 10, fill: float = 0.0) -> None:
        super().__init__(fill)
        self.max_degrees = int(max_degrees)

    def draw(self) -> dict[str, Any]:
        m = self.max_degrees
        angle = int(torch.empty(()).uniform_(-m - 1, m + 1))
        return {"angle": angle if angle == -1 else angle + 1, "along_x": _randint(0, 1) == 0}

    @staticmethod
    def coefficients(width: int, height: int, angle: float = 1.0, along_x: bool = True) -> list[float]:
        phi = math.tan(math.radians(angle))
        if along_x:  # rows slide sideways: x_in = shift + u (w - shift) / w + phi v - offset
            shift = phi * height
            shift = math.ceil(shift) if shift > 0 else math.floor(shift)
        else:
            shift = phi * width
        offset = shift if angle > 0 else 0.0
        shift = abs(shift)
        if along_x:
            return _affine((width - shift) / width, phi, shift - offset, 0.0, 1.0, 0.0)
        return _affine(1.0, 0.0, 0.0, phi, (height - shift) / height, shift - offset)


# (corner, axis) pairs that Augmentor's Skew moves outwards: corners TL, TR, BR, BL; axis 0 = x, 1 = y.
_TILTS = (((0, 1), (3, 1)), ((1, 1), (2, 1)), ((0, 0), (1, 0)), ((2, 0), (3, 0)))  # left, right, forward, backward
_CORNER_SKEWS = tuple(((k // 2, k % 2),) for k in range(8))
_OUTWARD = ((-1, -1), (1, -1), (1, 1), (-1, 1))


class AugmentorSkew(_Warp):
    """Augmentor's ``skew(probability=1, magnitude=g)`` (skew type RANDOM).

    The amount is ``randint(1, ceil(max(w, h) g))`` pixels; the kind is one of TILT (any of 4 edges),
    TILT_LEFT_RIGHT, TILT_TOP_BOTTOM or CORNER (one of 8 corner-axis moves), equally likely. The chosen
    corners of the image move outwards by the amount (a perspective warp, no crop).
    """

    def __init__(self, magnitude: float = 0.2, fill: float = 0.0) -> None:
        super().__init__(fill)
        self.magnitude = float(magnitude)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)  # the amount is relative to the image size
        return {"coefficients": self.coefficients(width, height, **self.draw(max(width, height)))}

    def draw(self, side: int = 224) -> dict[str, Any]:
        kind = _randint(0, 3)  # TILT, TILT_LEFT_RIGHT, TILT_TOP_BOTTOM, CORNER
        if kind == 3:
            moves = _CORNER_SKEWS[_randint(0, 7)]
        else:
            moves = _TILTS[_randint(*((0, 3), (0, 1), (2, 3))[kind])]
        return {"amount": _randint(1, math.ceil(side * self.magnitude)), "moves": moves}

    @staticmethod
    def coefficients(width: int, height: int, amount: int = 1, moves: tuple = ((0, 0),)) -> list[float]:
        original = [[0.0, 0.0], [float(width), 0.0], [float(width), float(height)], [0.0, float(height)]]
        moved = [list(p) for p in original]
        for corner, axis in moves:
            moved[corner][axis] += _OUTWARD[corner][axis] * amount
        return _homography(moved, original)  # output pixel at a moved corner shows the original corner


# ------------------------------------------------------------------------------------------ recipes
def pick_view(view: int, views: int, count: int) -> int:
    """Which of ``count`` alternatives view ``view`` of ``views`` uses: ``view % count`` when ``views``
    is a multiple of ``count`` (each alternative equally often per epoch), else a random one."""
    if count == 1:
        return 0
    if views % count == 0:
        return view % count
    return _randint(0, count - 1)


@dataclass(frozen=True)
class Augmentation:
    """A recipe's training augmentation.

    Attributes:
        name: the recipe's name.
        pipelines: transforms; view r of ``views`` uses ``pipelines[pick_view(r, views, len(pipelines))]``.
        resize: side the image is resized to before the pipelines (None = the model's input size).
        view_transform: applied after the pipeline, independently for each of two views (PIP-Net); the
            datasets then return the second view as ``"image2"`` (annotations follow the first).
    """

    name: str
    pipelines: tuple[Callable, ...]
    resize: int | None = None
    view_transform: Callable | None = None

    def for_view(self, view: int, views: int) -> Callable:
        """The pipeline of view `view` out of `views` per image."""
        return self.pipelines[pick_view(view, views, len(self.pipelines))]

    def __call__(self, inputs: Any) -> Any:  # outside a repeated epoch: a random pipeline
        return self.for_view(0, 1)(inputs)


def _protopnet(image_size: int) -> Augmentation:
    flip = v2.RandomHorizontalFlip(p=0.5)
    return Augmentation("protopnet", tuple(v2.Compose([op, flip]) for op in
                                           (AugmentorRotate(15), AugmentorSkew(0.2), AugmentorShear(10))))


def _prototree_cub(image_size: int) -> Augmentation:
    return Augmentation("prototree_cub", (v2.RandomOrder([
        v2.RandomPerspective(distortion_scale=0.2, p=0.5),
        v2.ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4), hue=(-0.02, 0.02)),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, shear=(-2, 2), translate=(0.05, 0.05)),
    ]),))


def _prototree_cars(image_size: int) -> Augmentation:
    # Official: Resize(256) -> RandomOrder[...] -> RandomCrop(224), i.e. 32 px of margin at 224.
    order = v2.RandomOrder([
        v2.RandomPerspective(distortion_scale=0.5, p=0.5),
        v2.ColorJitter(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4), hue=(-0.4, 0.4)),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=15, shear=(-2, 2)),
    ])
    return Augmentation("prototree_cars", (v2.Compose([order, v2.RandomCrop(image_size)]),), resize=image_size + 32)


# TrivialAugment-Wide's op subsets of PIP-Net (util/data.py): op -> (magnitudes over 31 bins, signed).
_SHAPE_OPS = {"Identity": (None, False), "ShearX": ((0.0, 0.5), True), "ShearY": ((0.0, 0.5), True),
              "TranslateX": ((0.0, 16.0), True), "TranslateY": ((0.0, 16.0), True), "Rotate": ((0.0, 60.0), True)}
_COLOUR_OPS = {"Identity": (None, False), "Brightness": ((0.0, 0.5), True), "Color": ((0.0, 0.02), True),
               "Contrast": ((0.0, 0.5), True), "Sharpness": ((0.0, 0.5), True), "Posterize": ("bits", False),
               "AutoContrast": (None, False), "Equalize": (None, False)}
_COLOUR_OPS_CARS = {**_COLOUR_OPS, "Color": ((0.0, 0.5), True), "Solarize": ((255.0, 0.0), False)}


class TrivialAugmentSubset(v2.Transform):
    """TrivialAugment-Wide (Mueller & Hutter) over a subset of its ops, drawn as torchvision's v1 class does
    (one op, one of `bins` magnitudes, a random sign for signed ops), on uint8 images.

    Unlike torchvision's class it takes annotations: geometric ops move masks, boxes and keypoints with the
    image; colour ops leave them alone. ``translate_scale`` scales the translation magnitudes (pixels at 224 px).
    """

    def __init__(self, ops: dict[str, tuple[Any, bool]], bins: int = 31, translate_scale: float = 1.0) -> None:
        super().__init__()
        self.ops, self.bins, self.translate_scale = dict(ops), int(bins), float(translate_scale)

    def _magnitudes(self, op: str) -> torch.Tensor | None:
        space = self.ops[op][0]
        if space is None:
            return None
        if space == "bits":
            return 8 - (torch.arange(self.bins) / ((self.bins - 1) / 6)).round().int()
        return torch.linspace(float(space[0]), float(space[1]), self.bins)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        names = list(self.ops)
        op = names[int(torch.randint(len(names), ()))]
        magnitudes = self._magnitudes(op)
        magnitude = 0.0 if magnitudes is None else float(magnitudes[int(torch.randint(self.bins, ()))])
        if self.ops[op][1] and int(torch.randint(2, ())):
            magnitude = -magnitude
        if op.startswith("Translate"):
            magnitude = float(int(magnitude * self.translate_scale))
        return {"op": op, "magnitude": magnitude}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        op, m = params["op"], params["magnitude"]
        image = isinstance(inpt, tv_tensors.Image) or (isinstance(inpt, torch.Tensor) and type(inpt) is torch.Tensor)
        nearest = v2.InterpolationMode.NEAREST
        if op == "Identity":
            return inpt
        if op in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
            shear = [math.degrees(math.atan(m)), 0.0] if op == "ShearX" else [0.0, math.degrees(math.atan(m))]
            translate = [int(m), 0] if op == "TranslateX" else [0, int(m)]
            shear = shear if op.startswith("Shear") else [0.0, 0.0]
            translate = translate if op.startswith("Translate") else [0, 0]
            kwargs = {"center": [0, 0]} if op.startswith("Shear") else {}
            return self._call_kernel(F.affine, inpt, angle=0.0, translate=translate, scale=1.0, shear=shear,
                                     interpolation=nearest, fill=0, **kwargs)
        if op == "Rotate":
            return self._call_kernel(F.rotate, inpt, angle=m, interpolation=nearest, fill=0)
        if not image:  # colour ops: annotations unchanged
            return inpt
        colour = {"Brightness": lambda x: F.adjust_brightness(x, 1.0 + m), "Color": lambda x: F.adjust_saturation(x, 1.0 + m),
                  "Contrast": lambda x: F.adjust_contrast(x, 1.0 + m), "Sharpness": lambda x: F.adjust_sharpness(x, 1.0 + m),
                  "Posterize": lambda x: F.posterize(x, bits=int(m)), "Solarize": lambda x: F.solarize(x, threshold=m),
                  "AutoContrast": F.autocontrast, "Equalize": F.equalize}
        return colour[op](inpt)


def _pipnet(name: str, pre_resize: int, colour_ops: dict) -> Callable[[int], Augmentation]:
    """PIP-Net's T1 (shape, once) and T2 (colour and crop, per view) at the official pixel sizes x image_size / 224."""

    def build(image_size: int) -> Augmentation:
        scale = image_size / 224
        t1 = v2.Compose([
            v2.Resize((image_size + round(pre_resize * scale),) * 2, antialias=True),
            TrivialAugmentSubset(_SHAPE_OPS, translate_scale=scale),
            v2.RandomHorizontalFlip(),
            v2.RandomResizedCrop(image_size + round(4 * scale), scale=(0.95, 1.0), antialias=True),
        ])
        t2 = v2.Compose([TrivialAugmentSubset(colour_ops), v2.RandomCrop(image_size)])
        return Augmentation(name, (t1,), view_transform=t2)

    return build


def _default(image_size: int) -> Augmentation:
    return Augmentation("default", (build_train_transform(image_size),))


def _imagenet(image_size: int) -> Augmentation:
    # torchvision's ImageNet training crop (scale 0.08-1, ratio 3/4-4/3) and flip, on images resized to 8/7 x side.
    crop = v2.RandomResizedCrop(image_size, antialias=True)
    return Augmentation("imagenet", (v2.Compose([crop, v2.RandomHorizontalFlip()]),), resize=round(image_size * 8 / 7))


AUGMENTATIONS: dict[str, Callable[[int], Augmentation]] = {
    "default": _default,
    "protopnet": _protopnet,
    "prototree_cub": _prototree_cub,
    "prototree_cars": _prototree_cars,
    "imagenet": _imagenet,
    "pipnet_cub": _pipnet("pipnet_cub", 8, _COLOUR_OPS),  # birds: Resize(232), T2 without strong colour
    "pipnet_cars": _pipnet("pipnet_cars", 32, _COLOUR_OPS_CARS),  # cars: Resize(256), T2 with colour and solarize
}


def train_augmentation(augment: bool | str, image_size: int) -> Augmentation | None:
    """The training augmentation named by a datamodule's ``augment`` (True = "default", False = none)."""
    if augment is False or augment is None:
        return None
    name = "default" if augment is True else str(augment)
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}: expected true, false or one of {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](int(image_size))
