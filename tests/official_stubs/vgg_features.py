"""Stand-in for the official ``vgg_features.py``: the convolutional part of VGG as ``features``."""
from torch import nn

cfg = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG_features(nn.Module):
    def __init__(self, cfg, batch_norm=False, init_weights=True):
        super().__init__()
        self.batch_norm = batch_norm
        self.kernel_sizes, self.strides, self.paddings = [], [], []
        self.features = self._make_layers(cfg, batch_norm)

    def _make_layers(self, cfg, batch_norm):
        self.n_layers = 0
        layers, in_channels = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                self.kernel_sizes.append(2), self.strides.append(2), self.paddings.append(0)
                continue
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1)]
            layers += [nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
            self.n_layers += 1
            self.kernel_sizes.append(3), self.strides.append(1), self.paddings.append(1)
            in_channels = v
        return nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)

    def conv_info(self):
        return self.kernel_sizes, self.strides, self.paddings

    def num_layers(self):
        return self.n_layers

    def __repr__(self):
        return "VGG{}, batch_norm={}".format(self.num_layers() + 3, self.batch_norm)


def vgg11_features(pretrained=False):
    return VGG_features(cfg["A"], batch_norm=False)


def vgg11_bn_features(pretrained=False):
    return VGG_features(cfg["A"], batch_norm=True)


def vgg19_features(pretrained=False):
    return VGG_features(cfg["E"], batch_norm=False)
