"""Stand-in for the official ``prototree/node.py``."""
from torch import nn


class Node(nn.Module):
    def __init__(self, index):
        super().__init__()
        self._index = index

    @property
    def index(self):
        return self._index

    @property
    def nodes(self):
        return self.branches.union(self.leaves)
