"""Stand-in for the official ``prototree/leaf.py``: class distribution softmax(_dist_params)."""
import torch
import torch.nn.functional as F
from torch import nn

from prototree.node import Node


class Leaf(Node):
    def __init__(self, index, num_classes, args):
        super().__init__(index)
        if args.disable_derivative_free_leaf_optim:
            self._dist_params = nn.Parameter(torch.randn(num_classes), requires_grad=True)
        elif args.kontschieder_normalization:
            self._dist_params = nn.Parameter(torch.ones(num_classes), requires_grad=False)
        else:
            self._dist_params = nn.Parameter(torch.zeros(num_classes), requires_grad=False)
        self._log_probabilities = args.log_probabilities
        self._kontschieder_normalization = args.kontschieder_normalization

    def forward(self, xs, **kwargs):
        return self.distribution().view(1, -1).expand(xs.size(0), -1)

    def distribution(self):
        if self._kontschieder_normalization:
            p = self._dist_params / self._dist_params.sum()
            return torch.log(p + 1e-10) if self._log_probabilities else p
        if self._log_probabilities:
            return F.log_softmax(self._dist_params, dim=0)
        return F.softmax(self._dist_params - self._dist_params.max(), dim=0)

    @property
    def size(self):
        return 1

    @property
    def leaves(self):
        return {self}

    @property
    def branches(self):
        return set()
