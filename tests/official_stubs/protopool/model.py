"""Stand-in for the official ProtoPool ``model.py``: class ``PrototypeChooser`` with the official attribute names
and shapes (``features``, ``add_on_layers``, ``prototype_vectors``, ``ones``, ``proto_presence`` [C, P, S],
``last_layer``, ``alfa`` with use_thresh) and the official forward maths: squared L2 through the ``ones``
convolution, ReLU, min and average pooling, slot mixing of the distances, log activation, focal difference,
last layer. It lives in its own folder because the official module name ``model`` is also ProtoPNet's.
The trunk is passed in (the official code builds it from ``arch`` and downloads weights).
"""
import torch
import torch.nn.functional as F
from torch import nn


class PrototypeChooser(nn.Module):
    def __init__(self, features, num_prototypes, num_descriptive, num_classes, proto_depth=128,
                 use_last_layer=True, use_thresh=False):
        super().__init__()
        self.num_classes, self.num_prototypes, self.num_descriptive = num_classes, num_prototypes, num_descriptive
        self.epsilon = 1e-4
        self.prototype_shape = (num_prototypes, proto_depth, 1, 1)
        self.use_thresh = use_thresh
        if use_thresh:  # created by --use_thresh, never used by the forward
            self.alfa = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, num_classes, num_descriptive)))
        self.proto_presence = nn.Parameter(nn.init.xavier_normal_(torch.zeros(num_classes, num_prototypes, num_descriptive)))
        self.features = features
        channels = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.add_on_layers = nn.Sequential(nn.Conv2d(channels, proto_depth, kernel_size=1), nn.Sigmoid())
        self.prototype_vectors = nn.Parameter(torch.rand(self.prototype_shape))
        self.ones = nn.Parameter(torch.ones(self.prototype_shape), requires_grad=False)
        self.use_last_layer = use_last_layer
        if use_last_layer:
            slots = num_descriptive * num_classes
            self.prototype_class_identity = torch.zeros(slots, num_classes)  # a plain attribute, not state
            self.prototype_class_identity[torch.arange(slots), torch.arange(slots) // num_descriptive] = 1
            self.last_layer = nn.Linear(slots, num_classes, bias=False)
            self.last_layer.weight.data.copy_(self.prototype_class_identity.t())
        else:
            self.last_layer = nn.Identity()

    def conv_features(self, x):
        return self.add_on_layers(self.features(x))

    def prototype_distances(self, x):
        z = self.conv_features(x)
        z2 = F.conv2d(z ** 2, weight=self.ones)
        p2 = (self.prototype_vectors ** 2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
        return F.relu(z2 - 2 * F.conv2d(z, weight=self.prototype_vectors) + p2)

    def distance_2_similarity(self, d):
        return torch.log((d + 1) / (d + self.epsilon))

    def forward(self, x, gumbel_scale=0):
        if gumbel_scale == 0:
            presence = torch.softmax(self.proto_presence, dim=1)
        else:
            presence = F.gumbel_softmax(self.proto_presence * gumbel_scale, dim=1, tau=0.5)
        d = self.prototype_distances(x)
        size = (d.size(2), d.size(3))
        min_d = -F.max_pool2d(-d, kernel_size=size).squeeze()
        avg_d = F.avg_pool2d(d, kernel_size=size).squeeze()
        mix = lambda dist: torch.einsum("bp,cpn->bcn", dist, presence)  # noqa: E731
        g = self.distance_2_similarity(mix(min_d)) - self.distance_2_similarity(mix(avg_d))
        out = self.last_layer(g.flatten(start_dim=1)) if self.use_last_layer else g.sum(dim=-1)
        return out, min_d, presence
