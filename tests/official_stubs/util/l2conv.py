"""Stand-in for the official ``util/l2conv.py``: Euclidean (not squared) distance to each prototype."""
import torch
import torch.nn.functional as F
from torch import nn


class L2Conv2D(nn.Module):
    def __init__(self, num_prototypes, num_features, w_1, h_1):
        super().__init__()
        self.prototype_vectors = nn.Parameter(torch.randn(num_prototypes, num_features, w_1, h_1), requires_grad=True)

    def forward(self, xs):
        ones = torch.ones_like(self.prototype_vectors)
        xs_squared_l2 = F.conv2d(xs ** 2, weight=ones)
        ps_squared_l2 = (self.prototype_vectors ** 2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
        distance = xs_squared_l2 + ps_squared_l2 - 2 * F.conv2d(xs, weight=self.prototype_vectors)
        return torch.sqrt(torch.abs(distance) + 1e-14)
