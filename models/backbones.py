"""Convolutional trunks from timm or torchvision, cut at a stage, with receptive-field arithmetic.

A `Backbone` maps normalised images (B, 3, H, W) to one feature map (B, C, h, w). It knows its
`out_channels` and can map a latent cell (i, j) to the box of input pixels that can influence it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["Backbone", "PretrainedWeightsError", "ReceptiveField", "receptive_field_of_layers", "UnknownBackboneError"]

# The papers' trunks are torchvision's ImageNet weights (ProtoPNet, ProtoTree on Cars): timm serves those
# under the `.tv_in1k` tag (e.g. `resnet34.tv_in1k`); its untagged names are other recipes (`resnet34.a1_in1k`).
PRETRAINED_FLAG = "--model.init_args.pretrained_backbone /path/to/weights.pth"


class UnknownBackboneError(ValueError):
    """Raised when neither timm nor torchvision knows a backbone name."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be fetched (no network, no cache)."""


def _fetch_failed(name: str, exc: BaseException) -> PretrainedWeightsError:
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return PretrainedWeightsError(
        f"cannot fetch the pretrained weights of backbone {name!r} ({type(exc).__name__}: {reason}); "
        f"download them where there is network and pass the file with {PRETRAINED_FLAG}")


def _bbn_inat_to_resnet(state: dict) -> dict:
    """BBN's iNaturalist-2017 ResNet-50 (``BBN.iNaturalist2017.res50.180epoch.best_model.pth``, used by
    ProtoTree) in torchvision/timm key names: its conventional-learning block ``cb_block`` becomes
    ``layer4.2``, the re-balancing block ``rb_block`` and the classifier are dropped (as ProtoTree does)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if not key.startswith("backbone.") or key.startswith("backbone.rb_block"):
            continue
        out[key.removeprefix("backbone.").replace("cb_block", "layer4.2", 1)] = value
    return out


def _weights_file(path: str | Path) -> dict:
    """A local state dict (or a checkpoint holding one under "state_dict", as zoo files do), BBN's layout converted."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path} (give an existing file with {PRETRAINED_FLAG})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if any(k.removeprefix("module.").startswith("backbone.cb_block") for k in state):
        state = _bbn_inat_to_resnet(state)
    if any(k.startswith("backbone.body.") for k in state):  # a zoo model's trunk (e.g. a released zoo file)
        state = {k.removeprefix("backbone.body."): v for k, v in state.items() if k.startswith("backbone.body.")}
    return state


@dataclass(frozen=True)
class ReceptiveField:
    """Layer arithmetic of a trunk (Araujo et al. / ProtoPNet's `receptive_field.py` conventions).

    Attributes:
        size: side of the output map (n).
        jump: distance in input pixels between two adjacent output cells (j).
        rf: side of the receptive field of one output cell (r).
        start: input coordinate of the centre of output cell 0 (start).
        image_size: the input side this was computed for.
    """

    size: int
    jump: float
    rf: float
    start: float
    image_size: int

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Receptive-field box of latent cell (row i, column j) as (y0, y1, x0, x1), clipped to the image."""
        cy, cx = self.start + i * self.jump, self.start + j * self.jump
        half = self.rf / 2
        return (
            max(int(cy - half), 0),
            min(int(cy + half), self.image_size),
            max(int(cx - half), 0),
            min(int(cx + half), self.image_size),
        )


def _as_pair(v) -> int:
    return v[0] if isinstance(v, (tuple, list)) else int(v)


def receptive_field_of_layers(layers: list[tuple[int, int, int]], image_size: int) -> ReceptiveField:
    """Carry (n, j, r, start) through a chain of (kernel, stride, padding) layers.

    n' = floor((n + 2p - k) / s) + 1, j' = j s, r' = r + (k - 1) j, start' = start + ((k - 1) / 2 - p) j.
    """
    n, j, r, start = image_size, 1.0, 1.0, 0.5
    for k, s, p in layers:
        n = math.floor((n + 2 * p - k) / s) + 1
        r = r + (k - 1) * j
        start = start + ((k - 1) / 2 - p) * j
        j = j * s
    return ReceptiveField(size=n, jump=j, rf=r, start=start, image_size=image_size)


def _main_path_layers(module: nn.Module) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) of the spatial layers on the main path, in registration order.

    Shortcut projections (`downsample`, timm's `shortcut`) run in parallel with the main path and do
    not widen the receptive field, so they are skipped, as in the official ProtoPNet arithmetic.
    """
    layers = []
    for name, m in module.named_modules():
        parts = name.split(".")
        if "downsample" in parts or "shortcut" in parts:
            continue
        if isinstance(m, nn.Conv2d):
            k, s, p = _as_pair(m.kernel_size), _as_pair(m.stride), m.padding
            p = (k - 1) // 2 if p == "same" else (0 if p == "valid" else _as_pair(p))
            layers.append((k, s, p))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k, s = _as_pair(m.kernel_size), _as_pair(m.stride or m.kernel_size)
            layers.append((k, s, _as_pair(m.padding)))
    return layers


def _torchvision_trunk(name: str, stage: int | None, pretrained: bool | str | Path) -> tuple[nn.Module, int]:
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights="DEFAULT" if pretrained is True else None)
    except ValueError as e:
        raise UnknownBackboneError(f"torchvision has no model {name!r}: {e}") from None
    except OSError as e:  # URLError, connection and hash errors of the download
        raise _fetch_failed(f"torchvision/{name}", e) from e
    if isinstance(pretrained, (str, Path)):
        # The classifier head is cut away below, so a file from a classifier with another class
        # count is fine: drop head weights whose shape differs, load everything else strictly.
        state = _weights_file(pretrained)
        own = net.state_dict()
        state = {k: v for k, v in state.items() if not (k.split(".")[0] in ("fc", "classifier") and v.shape != own[k].shape)}
        missing, unexpected = net.load_state_dict(state, strict=False)
        trunk_missing = [k for k in missing if k.split(".")[0] not in ("fc", "classifier")]
        if trunk_missing or unexpected:
            raise ValueError(
                f"backbone weights {pretrained} do not fit torchvision {name}: "
                f"missing {trunk_missing[:5]}, unexpected {unexpected[:5]}"
            )
    if hasattr(net, "layer4"):  # ResNet family: stages 1..4 are layer1..layer4
        last = 4 if stage is None else stage
        blocks = [net.conv1, net.bn1, net.relu, net.maxpool] + [getattr(net, f"layer{i}") for i in range(1, last + 1)]
        trunk = nn.Sequential(*blocks)
    elif hasattr(net, "features"):  # VGG, DenseNet, MobileNet, EfficientNet
        trunk = net.features
        if stage is not None:
            raise ValueError(f"stage is only supported for torchvision ResNets, not {name!r}; use a timm name instead")
        if name.startswith("densenet"):  # DenseNet's features end with norm5; ReLU follows in its head
            trunk = nn.Sequential(trunk, nn.ReLU(inplace=False))
    else:
        raise UnknownBackboneError(f"cannot cut torchvision model {name!r} into a convolutional trunk")
    trunk.eval()  # probe the width in eval mode: a train-mode pass would move BN running statistics
    with torch.no_grad():
        channels = trunk(torch.zeros(1, 3, 64, 64)).shape[1]
    trunk.train()
    return trunk, channels


class Backbone(nn.Module):
    """A convolutional trunk that returns one feature map.

    Args:
        name: a timm model name (``"resnet18"``, ``"vgg19"``, ``"densenet121"``) or
            ``"torchvision/<name>"`` for a torchvision model.
        stage: index of the feature stage to stop at (timm `out_indices` convention, -1 = last;
            for torchvision ResNets 1..4 = layer1..layer4). None = the last stage.
        pretrained: False, True (the library's weights of the tagged name, e.g. ``resnet34.tv_in1k``
            = torchvision's ImageNet weights; needs network, else `PretrainedWeightsError`), or a path
            to a state dict of the full classifier, loaded with ``weights_only=True`` (torchvision key
            names work; BBN's iNaturalist ResNet-50 file is converted).
    """

    def __init__(self, name: str = "resnet18", stage: int | None = None, pretrained: bool | str = False) -> None:
        super().__init__()
        self.name, self.stage = name, stage
        if name.startswith("torchvision/"):
            tv_name = name.split("/", 1)[1]
            self.body, self.out_channels = _torchvision_trunk(tv_name, stage, pretrained)
        else:
            import timm

            if not timm.is_model(name):
                raise UnknownBackboneError(
                    f"unknown backbone {name!r}: timm does not know it (see timm.list_models()), "
                    "and torchvision models are written 'torchvision/<name>'"
                )
            kwargs: dict = {"features_only": True, "out_indices": (-1 if stage is None else stage,)}
            if isinstance(pretrained, (str, Path)):
                # timm's own filter still maps torchvision key names (DenseNet, VGG) onto its modules.
                kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": _weights_file(pretrained)})
            else:
                kwargs["pretrained"] = bool(pretrained)
            try:
                self.body = timm.create_model(name, **kwargs)
            except (OSError, RuntimeError) as e:  # hub and URL downloads (no network, no cache, bad hash)
                if pretrained is not True:
                    raise
                raise _fetch_failed(name, e) from e
            self.out_channels = self.body.feature_info.channels()[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out[-1] if isinstance(out, (list, tuple)) else out

    def receptive_field(self, image_size: int) -> ReceptiveField:
        """Exact layer arithmetic over the main path of the trunk, for square inputs of `image_size`."""
        return receptive_field_of_layers(_main_path_layers(self.body), image_size)
