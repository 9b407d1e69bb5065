import pytest
import torch

from models.backbones import Backbone, UnknownBackboneError, receptive_field_of_layers


@pytest.mark.parametrize(
    "name, rf, start",
    [("vgg19", 268, 16.0), ("resnet34", 899, 0.5), ("densenet121", 2071, 14.5)],
)
def test_receptive_field_matches_protopnet_values(name, rf, start):
    # The values of ProtoPNet's notebook at 224 px: [n=7, j=32, r, start].
    field = Backbone(name).receptive_field(224)
    assert (field.size, field.jump, field.rf, field.start) == (7, 32, rf, start)


def test_arithmetic_size_matches_forward_pass():
    bb = Backbone("resnet18")
    out = bb(torch.zeros(1, 3, 96, 96))
    assert out.shape[1] == bb.out_channels
    assert bb.receptive_field(96).size == out.shape[-1]


def test_receptive_field_box_bounds_gradient_support():
    # Independent check by probing: the input pixels that influence one output cell of a plain
    # conv/pool chain lie exactly inside the arithmetic box.
    torch.manual_seed(0)
    bb = Backbone("vgg11").eval()
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = bb(x)
    field = bb.receptive_field(64)
    i, j = 0, 1
    out[0, :, i, j].sum().backward()
    support = x.grad[0].abs().sum(0) > 0
    ys, xs = torch.nonzero(support, as_tuple=True)
    y0, y1, x0, x1 = field.box(i, j)
    assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1
    # ... and the box is tight at the image-interior sides (no slack beyond one pixel).
    assert xs.max() >= x1 - 2


def test_layer_arithmetic_by_hand():
    # conv 3x3 s1 p1 -> pool 2x2 s2 -> conv 3x3 s1 p0 on 10 px: n=10,5,3; j=1,2,2; r=3,4,8.
    field = receptive_field_of_layers([(3, 1, 1), (2, 2, 0), (3, 1, 0)], 10)
    assert (field.size, field.jump, field.rf) == (3, 2, 8)
    assert field.start == 0.5 + 0.0 + 0.5 + 1 * 2  # 0.5, +0 (same conv), +0.5 (pool), +2 (valid conv)


def test_unknown_backbone_is_one_clear_error():
    with pytest.raises(UnknownBackboneError, match="not_a_net"):
        Backbone("not_a_net")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Backbone("resnet18", pretrained="missing.pth")


def test_torchvision_trunk_and_weights_file(tmp_path):
    import torchvision

    full = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    bb = Backbone("torchvision/resnet18", pretrained=str(path)).eval()
    assert bb.out_channels == 512
    assert torch.equal(bb.body[0].weight, full.conv1.weight)
    x = torch.rand(1, 3, 64, 64)
    full.eval()
    ref = full.layer4(full.layer3(full.layer2(full.layer1(full.maxpool(full.relu(full.bn1(full.conv1(x))))))))
    assert torch.allclose(bb(x), ref)
