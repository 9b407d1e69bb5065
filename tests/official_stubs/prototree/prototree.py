"""Stand-in for the official ``prototree/prototree.py``: the tree of Branch/Leaf modules and its save files.

Nodes are indexed in pre-order; ``_out_map`` maps each Branch (a key hashed by identity) to a
prototype index by zipping ``range`` with a Python set of branches, so the order is arbitrary, as
in the official code.
"""
import os
import pickle

import torch
import torch.nn.functional as F
from torch import nn

from prototree.branch import Branch
from prototree.leaf import Leaf
from util.l2conv import L2Conv2D


class ProtoTree(nn.Module):
    def __init__(self, num_classes, feature_net, args, add_on_layers=nn.Identity()):
        super().__init__()
        self._num_classes = num_classes
        self._root = self._init_tree(num_classes, args)
        self.num_features = args.num_features
        self.num_prototypes = self.num_branches
        self.prototype_shape = (args.W1, args.H1, args.num_features)
        self._parents = dict()
        self._set_parents()
        self._net = feature_net
        self._add_on = add_on_layers
        self._log_probabilities = args.log_probabilities
        self._kontschieder_normalization = args.kontschieder_normalization
        self._kontschieder_train = args.kontschieder_train
        self._out_map = {n: i for i, n in zip(range(2 ** args.depth - 1), self.branches)}
        self.prototype_layer = L2Conv2D(self.num_prototypes, self.num_features, args.W1, args.H1)

    def forward(self, xs):
        """The distributed prediction y_hat (log y_hat with log_probabilities)."""
        features = self._add_on(self._net(xs))
        distances = self.prototype_layer(features)
        min_distances = -F.max_pool2d(-distances, kernel_size=distances.shape[-2:]).flatten(1)
        similarities = -min_distances if self._log_probabilities else torch.exp(-min_distances)
        kwargs = {"conv_net_output": similarities.chunk(similarities.size(1), dim=1), "out_map": dict(self._out_map)}
        return self._root.forward(xs, **kwargs), min_distances

    @property
    def branches(self):
        return self._root.branches

    @property
    def leaves(self):
        return self._root.leaves

    @property
    def num_branches(self):
        return len(self.branches)

    def save(self, directory_path):
        os.makedirs(directory_path, exist_ok=True)
        with open(directory_path + "/model.pth", "wb") as f:
            torch.save(self, f)

    def save_state(self, directory_path):
        os.makedirs(directory_path, exist_ok=True)
        with open(directory_path + "/model_state.pth", "wb") as f:
            torch.save(self.state_dict(), f)
        with open(directory_path + "/tree.pkl", "wb") as f:
            pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)

    def _init_tree(self, num_classes, args):
        def build(i, d):
            if d == args.depth:
                return Leaf(i, num_classes, args)
            left = build(i + 1, d + 1)
            return Branch(i, left, build(i + left.size + 1, d + 1), args)

        return build(0, 0)

    def _set_parents(self):
        self._parents.clear()
        self._parents[self._root] = None

        def visit(node):
            if isinstance(node, Branch):
                for child in (node.l, node.r):
                    self._parents[child] = node
                    visit(child)

        visit(self._root)
