"""Stand-in for the official ``pipnet/pipnet.py`` and the trunks of ``features/*.py`` (M-Nauta/PIPNet).

The same attribute names and parameter layout as the official ``PIPNet`` (``_net``, ``_add_on``, ``_pool``,
``_classification``, ``_multiplier``) and ``NonNegLinear`` (``weight``, ``normalization_multiplier``, ``bias``),
so that ``nn.DataParallel(net).state_dict()`` has the keys of the official checkpoints; ``forward`` computes
the official maths (written from the structure of the official code, not copied; no downloads).
"""
import resnet_features as _resnet
import torch
import torch.nn.functional as F
from torch import nn


class PIPNet(nn.Module):
    def __init__(self, num_classes, num_prototypes, feature_net, add_on_layers, pool_layer, classification_layer):
        super().__init__()
        self._num_classes = num_classes
        self._num_prototypes = num_prototypes
        self._net = feature_net
        self._add_on = add_on_layers
        self._pool = pool_layer
        self._classification = classification_layer
        self._multiplier = classification_layer.normalization_multiplier  # registered twice, as officially

    def forward(self, xs, inference=False):
        proto_features = self._add_on(self._net(xs))
        pooled = self._pool(proto_features)
        if inference:
            pooled = torch.where(pooled < 0.1, 0.0, pooled)
        return proto_features, pooled, self._classification(pooled)


class NonNegLinear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.normalization_multiplier = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        return F.linear(x, torch.relu(self.weight), self.bias)


def resnet_pipnet_features(name):
    """The official ResNet features: ProtoPNet's class with layer3 and layer4 at stride 1."""
    net = _resnet.resnet_features(name)
    for layer in (net.layer3, net.layer4):
        block = layer[0]
        for conv in (getattr(block, "conv2" if hasattr(block, "conv3") else "conv1"), block.downsample[0]):
            conv.stride = (1, 1)
    return net


def convnext_tiny_features(threshold=100):
    """``convnext_tiny_26_features`` (threshold 100) / ``_13`` (300): head removed, strides halved."""
    import torchvision

    net = torchvision.models.convnext_tiny(weights=None)
    net.avgpool, net.classifier = nn.Identity(), nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.stride[0] == 2 and m.in_channels > threshold:
            m.stride = tuple(s // 2 for s in m.stride)
    return net


def get_network(num_classes, features, num_features=0, bias=False):
    channels = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    if num_features == 0:
        num_prototypes, add_on = channels, nn.Sequential(nn.Softmax(dim=1))
    else:
        num_prototypes = num_features
        add_on = nn.Sequential(nn.Conv2d(channels, num_features, 1, bias=True), nn.Softmax(dim=1))
    pool = nn.Sequential(nn.AdaptiveMaxPool2d((1, 1)), nn.Flatten())
    classifier = NonNegLinear(num_prototypes, num_classes, bias=bias)
    return PIPNet(num_classes, num_prototypes, features, add_on, pool, classifier)
