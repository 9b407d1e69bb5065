"""Small networks shared by the attribution tests (LRP, FullGrad)."""
from __future__ import annotations

import torch
from torch import nn

from models.base import Normalize


class Normalised(nn.Module):
    """A zoo-style model around `net`: images in [0, 1], the `Normalize` layer first."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def randomise_batchnorm(net: nn.Module, spread: float = 0.5) -> nn.Module:
    """Give every BatchNorm2d of `net` random running statistics and affine parameters (not the identity)."""
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-spread, spread)
        bn.running_var.uniform_(1 - spread, 1 + 2 * spread)
        bn.weight.data.uniform_(1 - spread, 1 + spread)
        bn.bias.data.uniform_(-spread / 2, spread / 2)
    return net


def images(n: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
