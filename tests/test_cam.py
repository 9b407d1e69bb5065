import pytest
import torch

import models
from models.cam import CAMNet, cam_bounding_boxes


@pytest.fixture
def tiny_cam():
    torch.manual_seed(0)
    return models.create_model("cam_test_resnet", num_classes=4).eval()


def test_registry_lists_and_builds():
    assert {"cam_resnet18", "cam_vgg16", "cam_test_resnet"} <= set(models.list_models("cam_*"))
    with pytest.raises(ValueError, match="unknown model 'cam_nope'"):
        models.create_model("cam_nope")


def test_cam_equals_hand_computation(tiny_cam):
    x = torch.rand(3, 3, 48, 48)
    feats = tiny_cam.features(x)  # (B, C, h, w)
    w = tiny_cam.classifier.weight
    target = torch.tensor([0, 2, 3])
    expl = tiny_cam.explain(x, target)
    for b in range(3):
        # M_c(x, y) = sum_k w_ck f_k(x, y), one channel at a time
        manual = sum(w[target[b], k] * feats[b, k] for k in range(feats.shape[1]))
        assert torch.allclose(expl.evidence["cam"][b], manual, atol=1e-5)
    assert expl.heatmap.shape == (3, 48, 48)
    # The CAM averages to the logit minus the bias: GAP and the linear map commute.
    logits = tiny_cam(x)
    means = expl.evidence["cam"].mean(dim=(1, 2)) + tiny_cam.classifier.bias[target]
    assert torch.allclose(means, logits[torch.arange(3), target], atol=1e-5)


def test_explain_defaults_to_prediction(tiny_cam):
    x = torch.rand(2, 3, 32, 32)
    expl = tiny_cam.explain(x)
    assert torch.equal(expl.target, tiny_cam(x).argmax(1))


def test_box_rule_picks_largest_component_above_20_percent():
    hm = torch.zeros(1, 20, 20)
    hm[0, 2:5, 2:5] = 1.0  # the peak, 9 px
    hm[0, 10:18, 8:16] = 0.3  # above 20% of the max, 64 px: the largest component
    hm[0, 0, 19] = 0.1  # below the threshold
    box = cam_bounding_boxes(hm, 0.2)[0].tolist()
    assert box == [8, 10, 16, 18]


def test_extra_conv_and_parameter_groups():
    model = CAMNet(num_classes=3, backbone="test_resnet", extra_conv=16, group_lr={"backbone": 1e-4, "head": 1e-2})
    assert model.classifier.in_features == 16
    opt = model.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": 1e-4, "head": 1e-2}
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


def test_unknown_group_lr_is_a_clear_error():
    model = CAMNet(num_classes=3, backbone="test_resnet", group_lr={"trunk": 1e-4})
    with pytest.raises(ValueError, match="unknown parameter group"):
        model.configure_optimizers()


def test_normalisation_is_the_first_layer(tiny_cam):
    x = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor(models.base.IMAGENET_MEAN), torch.tensor(models.base.IMAGENET_STD)
    manual = tiny_cam.classifier(tiny_cam.backbone((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).mean((2, 3)))
    assert torch.allclose(tiny_cam(x), manual, atol=1e-6)
