"""Stand-in for the official ``prototree/branch.py``: left = absent (1 - p), right = present (p)."""
import math

import torch

from prototree.node import Node


class Branch(Node):
    def __init__(self, index, l, r, args):
        super().__init__(index)
        self.l = l
        self.r = r
        self._log_probabilities = args.log_probabilities

    def forward(self, xs, **kwargs):
        """Distributed prediction of this subtree: (1 - p) left + p right (logsumexp in log mode)."""
        ps = kwargs["conv_net_output"][kwargs["out_map"][self]].squeeze(dim=1)
        l_dists, r_dists = self.l.forward(xs, **kwargs), self.r.forward(xs, **kwargs)
        ps = ps.view(-1, 1)
        if not self._log_probabilities:
            return (1 - ps) * l_dists + ps * r_dists
        x = ps.abs() + 1e-7  # the official stable log(1 - exp(-x))
        one_minus_p = torch.where(x < math.log(2), torch.log(-torch.expm1(-x)), torch.log1p(-torch.exp(-x)))
        return torch.logsumexp(torch.stack((one_minus_p + l_dists, ps + r_dists)), dim=0)

    @property
    def size(self):
        return 1 + self.l.size + self.r.size

    @property
    def leaves(self):
        return self.l.leaves.union(self.r.leaves)

    @property
    def branches(self):
        return {self}.union(self.l.branches).union(self.r.branches)
