"""Post-hoc explanation methods behind one signature: ``attribute(model, images, target, method) -> (B, H, W)``.

Any model that maps images (B, 3, H, W) to logits (B, K) works: every zoo model (they take images in
[0, 1] and normalise inside), a plain timm / torchvision classifier (then pass normalised images), and
prototype models (point ``layer`` at the similarity maps to run a CAM method on them).

Pixel methods are captum's (saliency, gradient x input, integrated gradients, guided backprop,
DeepLIFT, occlusion, LIME, Kernel SHAP); the CAM family (Grad-CAM, Grad-CAM++, Score-CAM, Layer-CAM),
RISE and SmoothGrad (its noise scaled per image, which captum's NoiseTunnel cannot) are written here,
batched on the model's device, and need no captum. Maps are returned raw (no min-max
scaling, sign kept where the method has one); metrics normalise what they need.

Notes:
- Call ``model.eval()`` first: in train mode dropout makes maps random and batch norm couples the
  images of a batch (the CAM methods sum the target scores of the batch before differentiating).
- Gradient methods need autograd. Lightning runs ``test``/``predict`` under ``torch.inference_mode``,
  which no code inside can undo for the batch tensors: create the Trainer with
  ``Trainer(inference_mode=False)`` (Lightning then uses ``no_grad``, which is lifted here). Under
  inference mode the gradient methods raise `InferenceModeError`; perturbation methods (occlusion, LIME,
  Kernel SHAP, Score-CAM, RISE) and ``"intrinsic"`` still work.
- Every hook is removed when a method returns or raises.
- Methods that batch work retry with smaller batches on a CUDA out-of-memory error, with a warning
  (``models.chunking``): the perturbation methods (occlusion, LIME, Kernel SHAP, Score-CAM, RISE)
  split the perturbed copies they evaluate, integrated gradients halves its steps per pass. The
  maps are those of one big batch (up to float summation order).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.chunking import AdaptiveChunks, retry_with_smaller_batch

__all__ = [
    "InferenceModeError",
    "attribute",
    "list_methods",
    "describe_method",
    "register_method",
    "find_layer",
    "resolve_layer",
    "baseline_colour",
    "grid_segments",
]

_GRADIENT_METHODS: set[str] = set()
_LAYER_METHODS: set[str] = set()
_METHODS: dict[str, Callable[..., Tensor]] = {}


class InferenceModeError(RuntimeError):
    """A gradient method was called under ``torch.inference_mode``."""


def register_method(name: str, gradient: bool = False, layer: bool = False) -> Callable:
    """Register ``fn(model, images, target, layer, **kw) -> (B, H, W)`` under `name`."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in _METHODS:
            raise ValueError(f"explanation method {name!r} is registered twice")
        _METHODS[name] = fn
        if gradient:
            _GRADIENT_METHODS.add(name)
        if layer:
            _LAYER_METHODS.add(name)
        return fn

    return wrap


def list_methods() -> list[str]:
    """Names accepted by `attribute`, sorted."""
    return sorted(_METHODS)


def describe_method(name: str) -> dict:
    """A registered method: ``fn`` (its function: docstring and options) and whether it needs autograd
    (``gradient``) and a ``layer``."""
    if name not in _METHODS:
        raise ValueError(f"unknown explanation method {name!r}; choose from {list_methods()}")
    return {"fn": _METHODS[name], "gradient": name in _GRADIENT_METHODS, "layer": name in _LAYER_METHODS}


def attribute(
    model: nn.Module,
    images: Tensor,
    target: Tensor | int | None = None,
    method: str = "gradcam",
    layer: nn.Module | str | None = None,
    **kw,
) -> Tensor:
    """Explain the `target` class (default: the prediction) of each image with `method`.

    Args:
        model: maps (B, C, H, W) to logits (B, K).
        images: (B, C, H, W) float, in the space the model takes (zoo models: [0, 1]).
        target: class per image (B,), one class for all, or None for the predicted class.
        method: one of `list_methods()`.
        layer: for CAM methods, a module or dotted module name (``"backbone.body.layer4"``); None takes
            the last module with a 4-D output (see `find_layer`).
        **kw: method options (see each method's docstring in this module).

    Returns:
        (B, H, W) float heatmap on the images' device, higher = more evidence for the target.

    Examples:
        >>> from models import create_model
        >>> model = create_model("cam_test_resnet", num_classes=3).eval()
        >>> attribute(model, torch.rand(2, 3, 32, 32), target=1, method="gradcam").shape
        torch.Size([2, 32, 32])
    """
    if method not in _METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose from {list_methods()}")
    if not (isinstance(images, Tensor) and images.ndim == 4 and images.is_floating_point()):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, C, H, W), got {got}")
    fn = _METHODS[method]
    allowed = set(inspect.signature(fn).parameters) - {"model", "images", "target", "layer"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(f"method {method!r} has no option(s) {sorted(unknown)}; its options are {sorted(allowed)}")
    if method in _GRADIENT_METHODS and torch.is_inference_mode_enabled():
        raise InferenceModeError(
            f"method {method!r} needs gradients but torch.inference_mode is on; in Lightning create the "
            "Trainer with Trainer(inference_mode=False), elsewhere leave the inference_mode block"
        )
    target = _resolve_target(model, images, target)
    module = resolve_layer(model, layer, images) if method in _LAYER_METHODS else None
    if method in _GRADIENT_METHODS:
        context = torch.enable_grad()
    elif method == "intrinsic":  # a family's explain() decides for itself
        context = contextlib.nullcontext()
    else:
        context = torch.no_grad()
    with context, warnings.catch_warnings():
        # captum announces every hook it sets and every per-example surrogate it fits
        warnings.filterwarnings("ignore", category=UserWarning, module=r"captum\.")
        heatmap = fn(model, images, target, module, **kw)
    return heatmap.detach().float()


# ----------------------------------------------------------------------------- shared helpers
def _resolve_target(model: nn.Module, images: Tensor, target: Tensor | int | None) -> Tensor:
    batch = images.shape[0]
    if target is None:
        with torch.no_grad():
            return model(images).argmax(dim=1)
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=images.device)
    target = torch.as_tensor(target, device=images.device).long().reshape(-1)
    if target.shape[0] != batch:
        raise ValueError(f"target must have one class per image ({batch}), got shape {tuple(target.shape)}")
    return target


def resolve_layer(model: nn.Module, layer: nn.Module | str | None, images: Tensor | None = None) -> nn.Module:
    """A module of `model` from a module, a dotted name, or None (see `find_layer`)."""
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][-8:]
            raise ValueError(f"model has no layer {layer!r}; its last module names are {names}") from None
    if layer is None:
        if images is None:
            raise ValueError("layer=None needs images to find the last 4-D layer")
        return find_layer(model, images)
    raise TypeError(f"layer must be a module, a dotted name or None, got {type(layer).__name__}")


def find_layer(model: nn.Module, images: Tensor) -> nn.Module:
    """The last module, in execution order, whose output is a 4-D map larger than 1 x 1.

    For a CNN this is the output of its last convolutional block (ResNet ``layer4``, VGG ``features``),
    the layer Grad-CAM is usually run on, rather than the block's last Conv2d, whose raw output comes
    before batch norm, the residual sum and the ReLU.
    """
    found: list[nn.Module] = []

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(output, Tensor) and output.ndim == 4 and output.shape[-2:].numel() > 1:
            found.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError(f"no module of {type(model).__name__} outputs a 4-D feature map; pass layer=")
    return found[-1]


@contextlib.contextmanager
def _captured(layer: nn.Module) -> Iterator[list[Tensor]]:
    """Keep the output of each call of `layer`; downstream layers get a copy, so an in-place op after
    the layer (``out += identity``) cannot overwrite the activations that are kept."""
    outputs: list[Tensor] = []

    def hook(module: nn.Module, inputs, output):
        if not isinstance(output, Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"layer {type(module).__name__} must output a (B, K, h, w) tensor, got {shape}")
        outputs.append(output)
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def baseline_colour(model: nn.Module, images: Tensor) -> Tensor:
    """(1, C, 1, 1): zero of the model's normalised space, i.e. the dataset mean colour for zoo models
    (``model.normalize.mean``) and 0 for a plain model that takes normalised images."""
    norm = getattr(model, "normalize", None)
    mean = getattr(norm, "mean", None)
    if isinstance(mean, Tensor) and mean.numel() == images.shape[1]:
        return mean.reshape(1, -1, 1, 1).to(images)
    return images.new_zeros(1, images.shape[1], 1, 1)


def grid_segments(height: int, width: int, cells: int = 8, device: torch.device | str | None = None) -> Tensor:
    """(H, W) int64 superpixel ids of a regular `cells` x `cells` grid (the superpixels of LIME / SHAP).

    A plain grid instead of SLIC: no extra dependency, deterministic, and the same for every image.
    """
    rows = torch.arange(height, device=device) * cells // height
    cols = torch.arange(width, device=device) * cells // width
    return rows[:, None] * cells + cols[None, :]


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, H, W) bilinear (align_corners=False, as captum's LayerAttribution.interpolate)."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _activations_and_gradients(model: nn.Module, images: Tensor, target: Tensor, layer: nn.Module):
    """Layer activations A (B, K, h, w) and d(logit of target)/dA, from one forward and one backward."""
    x = images.detach().clone().requires_grad_(True)
    with _captured(layer) as outputs:
        logits = model(x)
    if not outputs:
        raise ValueError(f"layer {type(layer).__name__} was not called in the forward pass")
    activations = outputs[-1]
    score = logits.gather(1, target[:, None]).sum()  # images are independent in eval mode
    (gradients,) = torch.autograd.grad(score, activations)
    return activations.detach(), gradients.detach()


def _target_probability(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return torch.softmax(model(x).float(), dim=1).gather(1, target[:, None])[:, 0]


def _chunked(model: nn.Module, what: str) -> Callable[[Tensor], Tensor]:
    """The model as a forward function that splits its input when it runs out of CUDA memory (for
    captum's perturbation methods, which evaluate many perturbed copies per call)."""
    chunks = AdaptiveChunks(what=what)
    return lambda x: chunks(model, x)


# ----------------------------------------------------------------------------- CAM family (native)
@register_method("gradcam", gradient=True, layer=True)
def _gradcam(model, images, target, layer) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k mean_ij(dy_c/dA_k) A_k), upsampled bilinearly."""
    a, g = _activations_and_gradients(model, images, target, layer)
    weights = g.mean(dim=(2, 3), keepdim=True)
    return _upsample(F.relu((weights * a).sum(1)), images.shape[-2:])


@register_method("gradcampp", gradient=True, layer=True)
def _gradcampp(model, images, target, layer) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018): w_k = sum_ij a_ij ReLU(g_ij), a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3), g = dy_c/dA.

    The paper differentiates Y = exp(y_c); its closed form makes a_ij depend on powers of g only and
    multiplies every weight by exp(y_c), a positive constant per image that is dropped here (as in
    pytorch-grad-cam), since it only rescales the map and overflows for large logits.
    """
    a, g = _activations_and_gradients(model, images, target, layer)
    g2 = g.pow(2)
    denominator = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g.pow(3)
    alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
    weights = (alpha * F.relu(g)).sum(dim=(2, 3), keepdim=True)
    return _upsample(F.relu((weights * a).sum(1)), images.shape[-2:])


@register_method("layercam", gradient=True, layer=True)
def _layercam(model, images, target, layer) -> Tensor:
    """Layer-CAM (Jiang et al. 2021): ReLU(sum_k ReLU(dy_c/dA_k) * A_k) (one layer; no tanh fusion of shallow layers)."""
    a, g = _activations_and_gradients(model, images, target, layer)
    return _upsample(F.relu((F.relu(g) * a).sum(1)), images.shape[-2:])


@register_method("scorecam", layer=True)
def _scorecam(model, images, target, layer, batch_size: int = 64) -> Tensor:
    """Score-CAM (Wang et al. 2020): ReLU(sum_k p_c(x o H_k) Up(A_k)), H_k = min-max scaled Up(A_k), p_c the softmax.

    As in the official code: the mask multiplies the *normalised* input (so masked-out pixels become
    the mean colour, `baseline_colour`), constant channels get weight 0, and the upsampled maps are
    summed before the ReLU. Images are taken one at a time (K upsampled maps each), their masked
    copies `batch_size` at a time.
    """
    size = images.shape[-2:]
    with _captured(layer) as outputs:
        model(images)
    activations = outputs[-1].float()
    base = baseline_colour(model, images)
    chunks = AdaptiveChunks(batch_size, "Score-CAM")
    maps = []
    for b in range(len(images)):
        up = F.interpolate(activations[b:b + 1], size=size, mode="bilinear", align_corners=False)[0]
        lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
        masks = (up - lo) / torch.where(hi > lo, hi - lo, 1.0)
        weights = up.new_zeros(len(up))

        def masked_probability(k: Tensor) -> Tensor:  # the image masked by channels k, scored
            x = base + (images[b] - base) * masks[k][:, None]
            return _target_probability(model, x, target[b].expand(len(k)))

        varying = (hi > lo).flatten().nonzero()[:, 0]
        if len(varying):
            weights[varying] = chunks(masked_probability, varying)
        maps.append(F.relu((weights[:, None, None] * up).sum(0)))
    return torch.stack(maps)


# ----------------------------------------------------------------------------- RISE (native)
def _draw_rise_masks(n: int, cells: int, cell: tuple[int, int], p1: float, generator: torch.Generator, device):
    """The random part of n RISE masks: binary grids (n, 1, s, s) with P[1] = p1 and shifts (dy, dx),
    drawn on the generator's device and moved to `device`."""
    on = generator.device
    grid = (torch.rand(n, 1, cells, cells, generator=generator, device=on) < p1).float()
    dy = torch.randint(0, cell[0], (n,), generator=generator, device=on)
    dx = torch.randint(0, cell[1], (n,), generator=generator, device=on)
    return grid.to(device), dy.to(device), dx.to(device)


def _reflect_linear_weights(n_in: int, n_out: int, device) -> Tensor:
    """(n_out, n_in) matrix of 1-D linear resizing as skimage's ``resize(order=1, mode="reflect")``:
    half-pixel centres (sample i at (i + 0.5) n_in / n_out - 0.5), and taps beyond the border mirrored
    about the edge sample (index -1 -> 1, n_in -> n_in - 2), where ``F.interpolate`` repeats the edge."""
    position = (torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5
    low = position.floor()
    taps = torch.stack([low, low + 1], dim=1).long().abs()
    last = n_in - 1
    taps = torch.where(taps > last, 2 * last - taps, taps).clamp(0, last)  # clamp: n_in = 1
    frac = position - low
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights.scatter_add_(1, taps, torch.stack([1 - frac, frac], dim=1))
    return weights.float().to(device)


def _render_rise_masks(grid: Tensor, dy: Tensor, dx: Tensor, size: tuple[int, int], cell: tuple[int, int]) -> Tensor:
    """Upsample grids (n, 1, s, s) linearly with reflect borders to (s + 1) cells (RISE's skimage
    resize) and crop (H, W) at the shifts: one (H, s) x (s, s) x (s, W) product per mask."""
    cells = grid.shape[-1]
    rows = _reflect_linear_weights(cells, (cells + 1) * cell[0], grid.device)
    cols = _reflect_linear_weights(cells, (cells + 1) * cell[1], grid.device)
    rows = rows[dy[:, None] + torch.arange(size[0], device=grid.device)]  # (n, H, s)
    cols = cols[dx[:, None] + torch.arange(size[1], device=grid.device)]  # (n, W, s)
    return rows @ grid[:, 0] @ cols.transpose(1, 2)


def rise_masks(n: int, size: tuple[int, int], cells: int, p1: float, generator: torch.Generator, device) -> Tensor:
    """(n, H, W) RISE masks: a random binary `cells` x `cells` grid (P[1] = p1), upsampled linearly
    with reflect borders to (cells + 1) x the cell size and cropped at a random shift of less than
    one cell (RISE's ``generate_masks``)."""
    cell = (math.ceil(size[0] / cells), math.ceil(size[1] / cells))
    return _render_rise_masks(*_draw_rise_masks(n, cells, cell, p1, generator, device), size, cell)


@register_method("rise")
def _rise(
    model, images, target, layer, n_masks: int = 6000, cells: int = 8, p1: float = 0.1,
    batch_size: int = 64, seed: int = 0,
) -> Tensor:
    """RISE (Petsiuk et al. 2018): sum_i p_c(x o M_i) M_i / (N p1), all images against the same masks.

    Grids and shifts are drawn from a CPU generator seeded with `seed` (the same masks on every device,
    whatever `batch_size`), and rendered `batch_size // B` at a time on the images' device; masked
    pixels become the mean colour (`baseline_colour`), as RISE multiplies the normalised input.
    RISE's demo uses N = 6000, s = 8, p1 = 0.1.
    """
    batch, _, height, width = images.shape
    generator = torch.Generator().manual_seed(seed)
    cell = (math.ceil(height / cells), math.ceil(width / cells))
    # Draw every mask's grid and shift first (small), so the result does not depend on batch_size.
    grid, dy, dx = _draw_rise_masks(n_masks, cells, cell, p1, generator, images.device)
    base = baseline_colour(model, images)
    saliency = images.new_zeros(batch, height, width, dtype=torch.float32)

    def add_masks(grid: Tensor, dy: Tensor, dx: Tensor) -> None:
        m = _render_rise_masks(grid, dy, dx, (height, width), cell)
        x = base + (images[:, None] - base[:, None]) * m[None, :, None].to(images.dtype)
        probs = _target_probability(model, x.flatten(0, 1), target.repeat_interleave(len(m))).view(batch, len(m))
        saliency.add_(torch.einsum("bn,nhw->bhw", probs, m))  # last: a chunk that fails adds nothing

    AdaptiveChunks(max(1, batch_size // batch), "RISE (masks per pass)")(add_masks, grid, dy, dx)
    return saliency / (n_masks * p1)


# ----------------------------------------------------------------------------- captum methods
def _captum():
    import captum.attr  # lazy: captum is only needed by these methods

    return captum.attr


@register_method("saliency", gradient=True)
def _saliency(model, images, target, layer) -> Tensor:
    """Saliency (Simonyan et al. 2014): max over channels of |d y_c / d x|."""
    return _captum().Saliency(model).attribute(images, target=target, abs=True).amax(dim=1)


@register_method("smoothgrad", gradient=True)
def _smoothgrad(
    model, images, target, layer, n_samples: int = 25, noise_level: float = 0.15, batch_size: int = 25, seed: int = 0
) -> Tensor:
    """SmoothGrad (Smilkov et al. 2017): mean gradient of the target logit over `n_samples` noisy copies
    of each image, sigma = `noise_level` x (max - min) of that image (as PAIR's saliency library, per
    image), then max over channels of its absolute value.

    The standard normal draws come from a CPU generator seeded with `seed`, the same for every image, so
    an image's map depends neither on its batch mates nor on the device. `batch_size` noisy copies of
    every image go through each backward pass.
    """
    if n_samples < 1 or batch_size < 1 or noise_level < 0:
        raise ValueError(f"smoothgrad needs n_samples >= 1, batch_size >= 1 and noise_level >= 0, "
                         f"got {n_samples}, {batch_size}, {noise_level}")
    batch, shape = len(images), images.shape[1:]
    clean = images.detach()
    sigma = noise_level * (clean.flatten(1).amax(1) - clean.flatten(1).amin(1))
    noise = torch.randn((n_samples, *shape), generator=torch.Generator().manual_seed(seed)).to(images)
    total = torch.zeros_like(clean, dtype=torch.float32)
    for chunk in noise.split(batch_size):
        x = (clean[:, None] + sigma.view(-1, 1, 1, 1, 1) * chunk[None]).flatten(0, 1).requires_grad_(True)
        score = model(x).gather(1, target.repeat_interleave(len(chunk))[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x)
        total += grad.float().view(batch, len(chunk), *shape).sum(1)
    return (total / n_samples).abs().amax(dim=1)


@register_method("input_x_gradient", gradient=True)
def _input_x_gradient(model, images, target, layer) -> Tensor:
    """Gradient x input (Shrikumar et al. 2016), summed over channels."""
    return _captum().InputXGradient(model).attribute(images, target=target).sum(dim=1)


@register_method("integrated_gradients", gradient=True)
def _integrated_gradients(
    model, images, target, layer, baselines: Tensor | float = 0.0, n_steps: int = 50, batch_size: int | None = None
) -> Tensor:
    """Integrated gradients (Sundararajan et al. 2017; captum, Gauss-Legendre, `n_steps`), summed over
    channels; default baseline 0 (a black image for zoo models). `batch_size` = captum's
    internal_batch_size (None = all steps of all images in one pass), halved on out-of-memory down to
    one step per pass."""
    ig = _captum().IntegratedGradients(model)
    everything = n_steps * len(images)

    def run(size: int) -> Tensor:
        internal = None if size >= everything else size
        return ig.attribute(images, baselines=baselines, target=target, n_steps=n_steps, internal_batch_size=internal)

    # captum passes at least one step of every image (internal_batch_size >= B)
    start = min(batch_size or everything, everything)
    return retry_with_smaller_batch(run, max(start, len(images)), "integrated gradients", minimum=len(images)).sum(dim=1)


@register_method("guided_backprop", gradient=True)
def _guided_backprop(model, images, target, layer) -> Tensor:
    """Guided backpropagation (Springenberg et al. 2015; captum; needs nn.ReLU modules), summed over channels."""
    return _captum().GuidedBackprop(model).attribute(images, target=target).sum(dim=1)


@register_method("deeplift", gradient=True)
def _deeplift(model, images, target, layer, baselines: Tensor | float = 0.0) -> Tensor:
    """DeepLIFT rescale rule (Shrikumar et al. 2017; captum), summed over channels. captum needs one nn.ReLU module per use
    (a ReLU module called twice, as in torchvision's ResNet blocks, gives wrong maps)."""
    return _captum().DeepLift(model).attribute(images, baselines=baselines, target=target).sum(dim=1)


@register_method("occlusion")
def _occlusion(model, images, target, layer, window: int | None = None, stride: int | None = None, batch_size: int = 64) -> Tensor:
    """Occlusion (Zeiler and Fergus 2014; captum): a `window` square (default H/8) slid by `stride` (default window/2),
    filled with the mean colour; the change of the target logit, averaged over channels."""
    channels, height = images.shape[1], images.shape[2]
    window = window or max(1, height // 8)
    stride = stride or max(1, window // 2)
    base = baseline_colour(model, images).expand_as(images).contiguous()
    out = _captum().Occlusion(_chunked(model, "occlusion")).attribute(
        images, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride),
        baselines=base, target=target, perturbations_per_eval=batch_size,
    )
    return out.mean(dim=1)


def _superpixel_method(cls_name: str, model, images, target, cells, n_samples, batch_size, **extra) -> Tensor:
    segments = grid_segments(images.shape[2], images.shape[3], cells, images.device)[None, None]
    base = baseline_colour(model, images).expand_as(images).contiguous()
    explainer = getattr(_captum(), cls_name)(_chunked(model, {"Lime": "LIME"}.get(cls_name, "Kernel SHAP")), **extra)
    out = explainer.attribute(
        images, baselines=base, target=target, feature_mask=segments.expand(images.shape[0], images.shape[1], -1, -1),
        n_samples=n_samples, perturbations_per_eval=batch_size,
    )
    return out.mean(dim=1)


def _lime_image_kernel(original, perturbed, interpretable: Tensor, **_) -> float:
    """lime_image's sample weight: sqrt(exp(-d^2 / 0.25^2)), d = cosine distance of the on/off vector
    to all-on (captum's default measures the distance in pixel space instead)."""
    z = interpretable.float().flatten()
    distance = 1.0 - float(z.sum() / (z.norm() * math.sqrt(z.numel()) + 1e-12))
    return math.sqrt(math.exp(-(distance**2) / 0.25**2))


@register_method("lime")
def _lime(model, images, target, layer, cells: int = 8, n_samples: int = 256, batch_size: int = 64, seed: int = 0) -> Tensor:
    """LIME (Ribeiro et al. 2016; captum) on a `cells` x `cells` grid of superpixels, switched off to the mean colour.

    Surrogate and kernel follow lime_image rather than captum's defaults: ridge regression
    (alpha = 1) weighted by `_lime_image_kernel`.
    """
    from captum._utils.models.linear_model import SkLearnRidge

    with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
        torch.manual_seed(seed)
        return _superpixel_method(
            "Lime", model, images, target, cells, n_samples, batch_size,
            interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=_lime_image_kernel,
        )


@register_method("kernel_shap")
def _kernel_shap(model, images, target, layer, cells: int = 8, n_samples: int = 256, batch_size: int = 64, seed: int = 0) -> Tensor:
    """Kernel SHAP (Lundberg and Lee 2017; captum) on a `cells` x `cells` grid of superpixels, switched off to the mean colour."""
    with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
        torch.manual_seed(seed)
        return _superpixel_method("KernelShap", model, images, target, cells, n_samples, batch_size)


# ----------------------------------------------------------------------------- the model's own
@register_method("intrinsic")
def _intrinsic(model, images, target, layer) -> Tensor:
    """The model's own explanation, ``model.explain(images, target).heatmap`` (zoo models)."""
    explain = getattr(model, "explain", None)
    if explain is None:
        raise ValueError(f"{type(model).__name__} has no explain(); 'intrinsic' needs a zoo model")
    return explain(images, target).heatmap


# ----------------------------------------------------------------------------- methods in their own modules
# They register themselves through `register_method` when imported (after everything above is defined).
from explain import fullgrad, guided, lrp  # noqa: E402,F401
