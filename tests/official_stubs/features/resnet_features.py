"""Stand-in for ProtoTree's ``features/resnet_features.py`` (the same trunks as ProtoPNet's file).

Subclasses of ``resnet_features`` so that pickles name ``features.resnet_features.<Class>`` as the
official ProtoTree checkpoints do.
"""
import resnet_features as _base


class BasicBlock(_base.BasicBlock):
    pass


class Bottleneck(_base.Bottleneck):
    pass


class ResNet_features(_base.ResNet_features):
    pass


def resnet18_features(pretrained=False):
    return _base.resnet_features("resnet18", pretrained, namespace=globals())


def resnet50_features(pretrained=False):
    return _base.resnet_features("resnet50", pretrained, namespace=globals())


resnet50_features_inat = resnet50_features
