"""Stand-in for the official ProtoPNet ``model.py``: class ``PPNet`` with the official attributes.

Squared L2 distances through the ``ones`` convolution, global min pooling, similarity
log((d + 1) / (d + epsilon)) (or -d), a bias-free last layer; `prune_prototypes` as in prune.py.
"""
import torch
import torch.nn.functional as F
from torch import nn


def _add_on(kind, in_channels, dim):
    if kind != "bottleneck":
        return nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid())
    layers, c = [], in_channels
    while c > dim or not layers:  # halve the width pair by pair down to dim
        out = max(dim, c // 2)
        layers += [nn.Conv2d(c, out, 1), nn.ReLU(), nn.Conv2d(out, out, 1), nn.ReLU() if out > dim else nn.Sigmoid()]
        c //= 2
    return nn.Sequential(*layers)


class PPNet(nn.Module):
    def __init__(self, features, img_size, prototype_shape, proto_layer_rf_info, num_classes,
                 init_weights=True, prototype_activation_function="log", add_on_layers_type="bottleneck"):
        super().__init__()
        self.img_size = img_size
        self.prototype_shape = prototype_shape
        self.num_prototypes = prototype_shape[0]
        self.num_classes = num_classes
        self.epsilon = 1e-4
        self.prototype_activation_function = prototype_activation_function
        per_class = self.num_prototypes // num_classes
        # A plain tensor attribute in the official code (not a buffer, so not in the state dict).
        self.prototype_class_identity = torch.zeros(self.num_prototypes, num_classes)
        rows = torch.arange(self.num_prototypes)
        self.prototype_class_identity[rows, rows // per_class] = 1
        self.proto_layer_rf_info = proto_layer_rf_info
        self.features = features
        if str(features).upper().startswith("DENSE"):
            in_channels = [m for m in features.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
        else:
            in_channels = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.add_on_layers = _add_on(add_on_layers_type, in_channels, prototype_shape[1])
        self.prototype_vectors = nn.Parameter(torch.rand(prototype_shape), requires_grad=True)
        self.ones = nn.Parameter(torch.ones(prototype_shape), requires_grad=False)
        self.last_layer = nn.Linear(self.num_prototypes, num_classes, bias=False)
        if init_weights:
            identity = self.prototype_class_identity.t()
            self.last_layer.weight.data.copy_(identity - 0.5 * (1 - identity))

    def conv_features(self, x):
        return self.add_on_layers(self.features(x))

    def _l2_convolution(self, x):
        x2_patch_sum = F.conv2d(x ** 2, weight=self.ones)
        p2 = (self.prototype_vectors ** 2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
        xp = F.conv2d(x, weight=self.prototype_vectors)
        return F.relu(x2_patch_sum + (-2 * xp + p2))

    def prototype_distances(self, x):
        return self._l2_convolution(self.conv_features(x))

    def distance_2_similarity(self, distances):
        if self.prototype_activation_function == "log":
            return torch.log((distances + 1) / (distances + self.epsilon))
        if self.prototype_activation_function == "linear":
            return -distances
        return self.prototype_activation_function(distances)

    def forward(self, x):
        distances = self.prototype_distances(x)
        min_distances = -F.max_pool2d(-distances, kernel_size=(distances.size(2), distances.size(3)))
        min_distances = min_distances.view(-1, self.num_prototypes)
        return self.last_layer(self.distance_2_similarity(min_distances)), min_distances

    def prune_prototypes(self, prototypes_to_prune):
        keep = sorted(set(range(self.num_prototypes)) - set(prototypes_to_prune))
        self.prototype_vectors = nn.Parameter(self.prototype_vectors.data[keep], requires_grad=True)
        self.prototype_shape = list(self.prototype_vectors.size())
        self.num_prototypes = self.prototype_shape[0]
        self.last_layer.in_features = self.num_prototypes
        self.last_layer.weight.data = self.last_layer.weight.data[:, keep]
        self.ones = nn.Parameter(self.ones.data[keep], requires_grad=False)
        self.prototype_class_identity = self.prototype_class_identity[keep, :]
