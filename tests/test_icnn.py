"""Interpretable CNN: templates, mask, filter loss (both rules, value and gradient), categories, model, checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import InterpretableCNN, ReceptiveField, create_model, list_models
from models.icnn import (
    InterpretableLayer,
    LayerMaps,
    balanced_categories,
    centroid_mu,
    filter_loss_surrogate,
    negative_template,
    part_templates,
    template_tau,
)
from models.icnn_loss import released_code_class_weights, released_code_decay

torch.set_num_threads(2)

N = -1.0  # template floor


# ------------------------------------------------------------------------------------ templates
def test_templates_5x5_by_hand():
    t = part_templates(5, 5, beta=4.0)
    assert t.shape == (25, 5, 5)
    # mu = (2, 2): 1 - 0.8 d for L1 distance d, floored at -1 (d=0: 1, d=1: 0.2, d=2: -0.6, d>=3: -1)
    centre = torch.tensor([
        [N, N, -0.6, N, N],
        [N, -0.6, 0.2, -0.6, N],
        [-0.6, 0.2, 1.0, 0.2, -0.6],
        [N, -0.6, 0.2, -0.6, N],
        [N, N, -0.6, N, N],
    ])
    torch.testing.assert_close(t[2 * 5 + 2], centre)
    corner = torch.tensor([
        [1.0, 0.2, -0.6, N, N],
        [0.2, -0.6, N, N, N],
        [-0.6, N, N, N, N],
        [N, N, N, N, N],
        [N, N, N, N, N],
    ])
    torch.testing.assert_close(t[0], corner)
    torch.testing.assert_close(negative_template(5, 5), torch.full((5, 5), -1.0))
    assert template_tau(5, 5) == pytest.approx(0.5 / 25) and template_tau(5, 5, "n") == pytest.approx(0.1)


def test_templates_7x7_by_hand_and_support():
    t = part_templates(7, 7, beta=4.0)
    a, b, c = 3 / 7, -1 / 7, -5 / 7  # 1 - 4 d / 7 for d = 1, 2, 3
    expected = torch.tensor([  # mu = (row 1, column 5)
        [N, N, N, c, b, a, b],
        [N, N, c, b, a, 1, a],
        [N, N, N, c, b, a, b],
        [N, N, N, N, c, b, c],
        [N, N, N, N, N, c, N],
        [N] * 7,
        [N] * 7,
    ])
    torch.testing.assert_close(t[1 * 7 + 5], expected)
    # beta = 4: positive exactly within L1 distance n / 4 of mu, and -1 from distance n / 2 on
    i, j = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    for mu in range(49):
        d = (i - mu // 7).abs() + (j - mu % 7).abs()
        assert torch.equal(t[mu] > 0, d < 7 / 4)
        assert torch.all(t[mu][d >= 3.5] == -1)


# ------------------------------------------------------------------------------------ mask
def test_mask_equals_max_x_times_template_by_hand():
    layer = InterpretableLayer(1, 2, conv=False)
    x = torch.ones(1, 1, 5, 5)
    x[0, 0, 1, 3] = 5.0
    out = layer(x)
    assert out.mu.item() == 1 * 5 + 3
    expected = torch.zeros(5, 5)
    expected[1, 3] = 5.0  # exactly x at the peak (template 1)
    for i, j in [(0, 3), (2, 3), (1, 2), (1, 4)]:
        expected[i, j] = 0.2  # x = 1 times the template 0.2 at L1 distance 1; zero where template <= 0
    torch.testing.assert_close(out.masked[0, 0], expected)


def test_mask_vectorised_over_batch_and_channels():
    torch.manual_seed(0)
    layer = InterpretableLayer(3, 2, conv=False)
    x = torch.rand(2, 3, 6, 6)
    out = layer(x)
    bank = part_templates(6, 6)
    for b in range(2):
        for c in range(3):
            mu = int(x[b, c].argmax())
            torch.testing.assert_close(out.masked[b, c], torch.clamp(x[b, c] * bank[mu], min=0))
            assert out.masked[b, c].flatten()[mu] == x[b, c].flatten()[mu]


def test_released_code_mask_uses_rounded_centroid_and_channel_beta():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 0] = 1.0
    x[0, 0, 2, 4] = 1.0
    x[0, 0, 1, 2] = 0.5
    assert centroid_mu(x).item() == 1 * 5 + 2  # centroid (1, 2)
    layer = InterpretableLayer(1, 2, conv=False, variant="released_code")
    out = layer(x)
    # grid linspace(-1, 1, 5): step 0.5; beta 2: mask 1 at the centroid, 0 one step away, -1 beyond
    expected = torch.zeros(5, 5)
    expected[1, 2] = 0.5
    torch.testing.assert_close(out.masked[0, 0], expected)
    assert out.mask[0, 0, 1, 3] == 0 and out.mask[0, 0, 0, 0] == -1


def test_released_code_beta_tracks_three_over_sigma():
    layer = InterpretableLayer(1, 2, conv=False, variant="released_code", single_category=True, beta_rate=0.05)
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, [0, 2, 4]] = 1.0  # centroid (2, 2); squared distances 4, 0, 4 -> sigma = sqrt(8 / 3)
    layer.update_statistics(layer(x), torch.tensor([1]))
    target = min(max(3 / math.sqrt(8 / 3), 1.5), 3.0)
    assert layer.channel_beta.item() == pytest.approx(2.0 + 0.05 * (target - 2.0))


# ------------------------------------------------------------------------------------ filter loss
def test_surrogate_value_and_gradient_match_eq4_and_finite_differences():
    torch.manual_seed(1)
    x = torch.rand(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    templates = part_templates(3, 3, dtype=torch.float64)[torch.tensor([[4, 0], [8, 2]])]  # (B, C, 3, 3)
    tau = template_tau(3, 3)
    log_z = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)
    log_px = torch.tensor([[-0.5, -0.1], [-0.3, -0.7]], dtype=torch.float64)
    log_prior = torch.full((2, 2), math.log(1 / 10), dtype=torch.float64)

    def loss(inp):
        s = tau * (inp * templates).sum(dim=(2, 3))
        return filter_loss_surrogate(s, log_z, log_px, log_prior).sum(dim=1).mean()

    value = loss(x)
    # value by hand: -p r (log r - log q - 1) with r = e^s / Z, q = p(x)
    manual = 0.0
    for b in range(2):
        for c in range(2):
            s = tau * float((x[b, c].detach() * templates[b, c]).sum())
            r = math.exp(s - float(log_z[b, c]))
            manual += -0.1 * r * (math.log(r) - float(log_px[b, c]) - 1) / 2
    assert float(value) == pytest.approx(manual, rel=1e-12)
    (grad,) = torch.autograd.grad(value, x)
    # Eq. 4 (negated, for -MI): dL/dx_ij = -p(T) e^s / Z (s - log Z - log p(x)) tau t_ij, / B for the mean
    s = tau * (x * templates).sum(dim=(2, 3))
    coef = -math.exp(math.log(0.1)) * torch.exp(s - log_z) * (s - log_z - log_px) / 2
    torch.testing.assert_close(grad, (coef[..., None, None] * tau * templates).detach())
    # central finite differences, element by element
    eps = 1e-6
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for idx in range(x.numel()):
            e = torch.zeros_like(x).flatten()
            e[idx] = eps
            e = e.view_as(x)
            fd.view(-1)[idx] = (loss(x + e) - loss(x - e)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-10)


def _brute_force_layer_loss(x, categories, labels, h, w):
    """Independent loops: Z_T = mean_b exp(s_T), p(x) = sum_T p(T) e^s_T / Z_T, T_hat by category."""
    b, c = x.shape[:2]
    hw = h * w
    tau = 0.5 / hw
    alpha = hw / (1 + hw)
    bank = part_templates(h, w, dtype=x.dtype)
    total = 0.0
    grads = torch.zeros_like(x)
    coefs = torch.zeros(b, c, dtype=x.dtype)
    clipped = 0.0  # the value with Eq. 4 applied only where the log ratio is >= 0
    for f in range(c):
        temps = [bank[m] for m in range(hw)] + [-torch.ones(h, w, dtype=x.dtype)]
        priors = [alpha / hw] * hw + [1 - alpha]
        s = [[tau * float((x[i, f] * t).sum()) for t in temps] for i in range(b)]
        z = [sum(math.exp(s[i][t]) for i in range(b)) / b for t in range(hw + 1)]
        for i in range(b):
            px = sum(priors[t] * math.exp(s[i][t]) / z[t] for t in range(hw + 1))
            t_hat = int(x[i, f].argmax()) if labels[i] == categories[f] else hw
            r = math.exp(s[i][t_hat]) / z[t_hat]
            total += -priors[t_hat] * r * (math.log(r) - math.log(px) - 1) / b
            log_ratio = s[i][t_hat] - math.log(z[t_hat]) - math.log(px)
            coefs[i, f] = -priors[t_hat] * r * log_ratio  # dL/ds, Eq. 4 without t_ij
            grads[i, f] = coefs[i, f] * tau * temps[t_hat] / b
            clipped += (-priors[t_hat] * r * (log_ratio - 1) if log_ratio >= 0 else priors[t_hat] * px) / b
    return total, grads, coefs, clipped


def test_layer_filter_loss_equals_brute_force_and_eq4_gradient():
    torch.manual_seed(2)
    layer = InterpretableLayer(2, 2, conv=False, momentum=0.0, normalize_gradient=False, clip_log_ratio=False).double()
    x = torch.rand(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    maps = layer(x)
    layer.class_activation.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # filter 0 -> class 0, 1 -> 1
    layer.class_seen.fill_(True)
    value = layer.filter_loss(maps, labels)
    expected, expected_grad, expected_coef, expected_clipped = _brute_force_layer_loss(x.detach(), [0, 1], labels.tolist(), 3, 3)
    assert float(value) == pytest.approx(expected, rel=1e-10)
    (grad,) = torch.autograd.grad(value, x)
    # x reaches the loss only through ReLU (identity for x > 0) and s_hat: Z and p(x) are detached
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)
    # normalised: each filter's coefficients divided by their (detached) mean magnitude over the batch
    layer.normalize_gradient = True
    value_n = layer.filter_loss(layer(x), labels)
    assert float(value_n) == pytest.approx(expected, rel=1e-10)  # the value is still the surrogate's
    (grad_n,) = torch.autograd.grad(value_n, x)
    scale = expected_coef.abs().mean(dim=0)
    torch.testing.assert_close(grad_n, expected_grad / scale[None, :, None, None], rtol=1e-8, atol=1e-12)
    # clipped: Eq. 4 only where log p(x|T_hat)/p(x) >= 0; elsewhere a constant p(T_hat) p(x), no gradient
    layer.normalize_gradient, layer.clip_log_ratio = False, True
    value_c = layer.filter_loss(layer(x), labels)
    assert float(value_c) == pytest.approx(expected_clipped, rel=1e-10)
    (grad_c,) = torch.autograd.grad(value_c, x)
    valid = expected_coef <= 0  # dL/ds = -p r log_ratio: log_ratio >= 0 exactly where it is <= 0
    assert valid.any() and (~valid).any()  # the example exercises both sides
    torch.testing.assert_close(grad_c, expected_grad * valid[..., None, None], rtol=1e-8, atol=1e-12)


def test_running_z_is_an_ema_in_log_space():
    layer = InterpretableLayer(1, 2, conv=False, momentum=0.9, single_category=True)
    x1, x2 = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3) * 3
    layer.filter_loss(layer(x1), torch.tensor([1, 0]))
    z1 = layer._log_z_3x3.exp()
    layer.filter_loss(layer(x2), torch.tensor([1, 0]), update=False)
    torch.testing.assert_close(layer._log_z_3x3.exp(), z1)  # validation does not move it
    layer.filter_loss(layer(x2), torch.tensor([1, 0]))
    tau = 0.5 / 9
    bank = torch.cat([part_templates(3, 3).flatten(1), -torch.ones(1, 9)])
    batch_z = torch.exp(tau * x2.flatten(1) @ bank.T).mean(dim=0)
    torch.testing.assert_close(layer._log_z_3x3.exp()[0], 0.9 * z1[0] + 0.1 * batch_z)


# ------------------------------------------------------------------------------------ categories
def test_filter_categories_follow_class_activations():
    layer = InterpretableLayer(4, 3, conv=False, momentum=0.9)
    perm = torch.tensor([2, 0, 1, 2])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    features = torch.zeros(6, 4, 2, 2)
    for f in range(4):
        features[labels == perm[f], f] = 1.0 + f  # filter f fires only on images of class perm[f]
    maps = LayerMaps(features=features, mu=torch.zeros(6, 4, dtype=torch.long), mask=torch.ones_like(features), masked=features)
    layer.update_statistics(maps, labels)
    assert torch.equal(layer.filter_categories(), perm)
    # EMA by hand for the classes present; an absent class keeps its value
    first = layer.class_activation.clone()
    features2 = torch.zeros_like(features)
    features2[:, 0] = 5.0  # filter 0 now fires on everything
    maps2 = LayerMaps(features=features2, mu=maps.mu, mask=maps.mask, masked=features2)
    layer.update_statistics(maps2, torch.tensor([0, 1, 0, 1, 0, 1]))
    expected = first.clone()
    expected[:, :2] = 0.9 * first[:, :2] + 0.1 * features2[:6:2].mean(dim=(0, 2, 3))[:, None]
    torch.testing.assert_close(layer.class_activation, expected)
    # after enough batches where filter 0 fires on class 1 only, it moves to class 1
    features3 = torch.zeros_like(features)
    features3[labels == 1, 0] = 10.0
    for _ in range(30):
        layer.update_statistics(LayerMaps(features3, maps.mu, maps.mask, features3), labels)
    assert layer.filter_categories()[0] == 1


def test_balanced_categories_by_hand():
    # every filter prefers class 0 in absolute terms; shares of class 1: 0.1, 0.4, 0.2, 0.45
    act = torch.tensor([[9.0, 1.0], [6.0, 4.0], [8.0, 2.0], [5.5, 4.5]])
    assert act.argmax(dim=1).tolist() == [0, 0, 0, 0]
    assert balanced_categories(act).tolist() == [0, 1, 0, 1]  # the two largest class-1 shares
    # 5 filters, 2 classes: class 0 gets 3, class 1 gets 2
    act5 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert balanced_categories(act5).tolist() == [0, 1, 1, 0, 0]  # largest share1 - share0: filters 1, 2
    layer = InterpretableLayer(4, 2, conv=False)
    layer.class_activation.copy_(act)
    layer.class_seen.fill_(True)
    layer.freeze_categories(balanced=True)
    assert layer.filter_categories().tolist() == [0, 1, 0, 1]


def test_logistic_mode_assigns_every_filter_to_the_positive_class():
    layer = InterpretableLayer(5, 2, conv=False, single_category=True)
    assert torch.equal(layer.filter_categories(), torch.ones(5, dtype=torch.long))


# ------------------------------------------------------------------------------------ released-code rule
def _official_gradient(x, mask, labels, categories, epoch, lmag, w_pos, w_neg):
    """The official conv_mask backward's injected gradient, written from its formulas with plain loops
    (MATLAB order: flip = reverse the batch and channel axes)."""
    b, c, h, w = x.shape
    a = 0.5
    grad = torch.zeros_like(x)
    for d in range(c):
        flipped = [float((x[i, d] * mask[b - 1 - i, c - 1 - d]).mean()) for i in range(b)]
        a_log_z_pos = a * math.log(sum(math.exp(v / a) for v in flipped) / b)
        a_log_z_neg = a * math.log(sum(math.exp(-float(x[i, d].mean()) / a) for i in range(b)) / b)
        pos = [i for i in range(b) if labels[i] == categories[d]]
        neg = [i for i in range(b) if labels[i] != categories[d]]
        mag = epoch / lmag  # ones ./ (1 / iter) ./ l.mag
        if pos:
            s = {i: float((x[i, d] * mask[i, d]).mean()) for i in pos}
            st = {i: math.exp(s[i] / a) * (s[i] - a_log_z_pos + a) for i in pos}
            mean = sum(st.values()) / len(pos)
            for i in pos:
                grad[i, d] = -mask[i, d] * (st[i] / (mean * mag)) * (1e-5 * w_pos[categories[d]])
        if neg:
            s = {i: float(x[i, d].mean()) for i in neg}
            st = {i: math.exp(-s[i] / a) * (-s[i] - a_log_z_neg + a) for i in neg}
            mean = sum(st.values()) / len(neg)
            for i in neg:
                grad[i, d] = (st[i] / (mean * mag)) * (1e-5 * w_neg[categories[d]])
    return grad


@pytest.mark.parametrize("single, epoch", [(False, 1), (False, 3), (True, 2)])
def test_released_rule_gradient_matches_the_official_formulas_by_hand(single, epoch):
    torch.manual_seed(3)
    num_classes = 2 if single else 3
    layer = InterpretableLayer(4, num_classes, conv=False, variant="released_code", loss_rule="released_code",
                               single_category=single).double()
    layer.channel_beta.copy_(torch.tensor([2.0, 2.5, 1.5, 3.0]))
    x = (torch.rand(5, 4, 4, 4, dtype=torch.float64) * 2).requires_grad_()
    labels = torch.tensor([1, 0, 1, 1, 0]) if single else torch.tensor([0, 1, 2, 1, 0])
    categories = [1, 1, 1, 1] if single else [0, 1, 2, 1]
    if not single:
        layer.fixed_categories.copy_(torch.tensor(categories))
    maps = layer(x)
    (grad,) = torch.autograd.grad(layer.filter_loss(maps, labels, epoch=epoch), x)
    if single:  # logistic: weights 1, mag 0.1
        lmag, w_pos, w_neg = 0.1, [1.0, 1.0], [1.0, 1.0]
    else:  # softmax, <= 10 classes: mag 0.1 * 0.2; density 1 / 3 for every class
        lmag, w_pos, w_neg = 0.02, [1.5] * 3, [0.75] * 3
    expected = _official_gradient(x.detach(), maps.mask, labels.tolist(), categories, epoch, lmag, w_pos, w_neg)
    torch.testing.assert_close(grad * 5, expected, rtol=1e-10, atol=1e-18)  # the loss is the batch mean
    # the rule's own temperature (mean / 0.5, tau = 2 / n^2): the paper rule's tau does not enter it
    other = InterpretableLayer(4, num_classes, conv=False, variant="released_code", loss_rule="released_code",
                               single_category=single, tau="n").double()
    other.load_state_dict(layer.state_dict())
    (grad_other,) = torch.autograd.grad(other.filter_loss(other(x), labels, epoch=epoch), x)
    torch.testing.assert_close(grad_other, grad)


def test_released_temperature_is_four_times_the_default():
    assert template_tau(8, 8, "code") == pytest.approx(2 / 64) == pytest.approx(4 * template_tau(8, 8))
    # exp(mean_ij(x M) / 0.5) is exp(tau tr(x M)) with tau = 2 / n^2
    x, m = torch.rand(8, 8), part_templates(8, 8)[27]
    assert math.exp(float((x * m).mean()) / 0.5) == pytest.approx(math.exp(template_tau(8, 8, "code") * float((x * m).sum())))


def test_released_class_weights_and_decay():
    cats = torch.tensor([0, 2, 1])
    w_pos, w_neg = released_code_class_weights(cats, 3, single_category=False, density=torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(w_pos, torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(w_neg, torch.tensor([1.0, 0.5 / 0.75, 0.5 / 0.75], dtype=torch.float64))
    w_pos, w_neg = released_code_class_weights(torch.tensor([4]), 20, single_category=False)  # > 10: 1 / K
    assert w_pos.item() == pytest.approx(10.0) and w_neg.item() == pytest.approx(0.5 / 0.95)
    assert released_code_decay(1, 2, single_category=True) == pytest.approx(1 / 10)
    assert released_code_decay(4, 10, single_category=False) == pytest.approx(0.02 / 4)
    assert released_code_decay(2, 200, single_category=False) == pytest.approx(0.002 / 2)
    with pytest.raises(ValueError, match="epoch"):
        released_code_decay(0, 2, single_category=True)
    with pytest.raises(ValueError, match="density"):
        released_code_class_weights(cats, 3, single_category=False, density=torch.tensor([1.0, 0.0, 0.0]))


def test_both_rules_move_each_map_along_its_template():
    """Per (image, filter) both rules' gradients are multiples of T_hat; on part-like maps (a bump at
    the filter's own place on its class, faint noise elsewhere) they point the same way (cosine 1)."""
    torch.manual_seed(4)
    b, c, n = 8, 4, 6
    labels = torch.tensor([0, 1] * 4)
    categories = torch.tensor([0, 1, 0, 1])
    x = torch.rand(b, c, n, n, dtype=torch.float64) * 0.05
    for i in range(b):
        for d in range(c):
            if labels[i] == categories[d]:
                x[i, d, d + 1, d + (i % 2)] += 2.0
                x[i, d, d + 1, d + 1 + (i % 2)] += 1.0
    x.requires_grad_()
    grads = {}
    for rule in ("paper", "released_code"):
        layer = InterpretableLayer(c, 2, conv=False, loss_rule=rule).double()
        layer.fixed_categories.copy_(categories)
        maps = layer(x)
        layer.filter_loss(maps, labels)  # warm the paper rule's running Z
        (grads[rule],) = torch.autograd.grad(layer.filter_loss(maps, labels), x)
    t_hat = torch.where((labels[:, None] == categories[None, :])[..., None, None], maps.mask, torch.full_like(maps.mask, -1.0))
    for g in grads.values():  # a multiple of T_hat: g = k T_hat with k = <g, T> / <T, T>
        k = (g * t_hat).sum(dim=(2, 3)) / (t_hat * t_hat).sum(dim=(2, 3))
        torch.testing.assert_close(g, k[..., None, None] * t_hat)
    gp, gc = (grads[r].flatten(2) for r in ("paper", "released_code"))
    cosine = F.cosine_similarity(gp, gc, dim=2)
    nonzero = (gp.norm(dim=2) > 0) & (gc.norm(dim=2) > 0)
    assert nonzero.float().mean() > 0.7
    torch.testing.assert_close(cosine[nonzero], torch.ones_like(cosine[nonzero]))


def test_model_passes_the_epoch_to_the_released_rule():
    torch.manual_seed(0)
    net = InterpretableCNN(num_classes=2, backbone="test_resnet", stage=2, variant="released_code", filter_loss="released_code")
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])

    class FakeTrainer:
        current_epoch = 0

    net._trainer = FakeTrainer()
    net.eval()  # no statistics updated between the two calls
    _, first = net.compute_losses(images, labels)
    FakeTrainer.current_epoch = 3
    _, fourth = net.compute_losses(images, labels)
    torch.testing.assert_close(fourth["filter_loss"], first["filter_loss"] / 4)  # decay mag / epoch, epoch from 1


def test_raw_feature_layer_is_the_pre_relu_conv_output():
    from explain.filter_metrics import layer_activations

    torch.manual_seed(0)
    net = InterpretableCNN(num_classes=2, backbone="test_resnet", stage=2, variant="released_code")
    images = torch.rand(3, 3, 32, 32)
    raw = layer_activations(net, net.raw_feature_layer, images)
    net.eval()
    with torch.no_grad():
        maps = net.layer_maps(images)[1][-1]
    assert (raw < 0).any()
    torch.testing.assert_close(F.relu(raw), maps.features)
    with pytest.raises(ValueError, match="no conv"):
        InterpretableCNN(num_classes=2, backbone="test_resnet", stage=2, num_layers=0).raw_feature_layer


# ------------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("icnn_test_resnet", num_classes=3, filter_loss_weight=0.5)


def test_losses_and_explanation(model):
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 1])
    model.train()
    logits, losses = model.compute_losses(images, labels)
    assert set(losses) == {"loss", "cross_entropy", "filter_loss"} and logits.shape == (4, 3)
    torch.testing.assert_close(losses["cross_entropy"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(losses["loss"], losses["cross_entropy"] + 0.5 * losses["filter_loss"])
    losses["loss"].backward()
    assert model.interpretable[1].conv.weight.grad.abs().sum() > 0
    model.eval()
    target = torch.tensor([0, 1, 2, 0])
    exp = model.explain(images, target)
    assert exp.heatmap.shape == (4, 64, 64)
    maps, cats = exp.evidence["part_maps"], exp.evidence["filter_categories"]
    assert maps.shape == (4, 48, 8, 8) and cats.shape == (48,)
    for b in range(4):
        cam = maps[b, cats == target[b]].sum(dim=0)
        up = F.interpolate(cam[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(exp.heatmap[b], up)
    assert set(list_models("icnn_*")) >= {"icnn_vgg16", "icnn_resnet18", "icnn_resnet50", "icnn_test_resnet"}


def test_logistic_mode_is_the_logistic_loss():
    torch.manual_seed(0)
    net = InterpretableCNN(num_classes=2, backbone="test_resnet", stage=2, mode="logistic", positive_class=3)
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([3, 0, 3, 7])
    batch = net._task_batch({"image": images, "label": labels})
    assert batch["label"].tolist() == [1, 0, 1, 0]
    net.train()
    logits, losses = net.compute_losses(images, batch["label"])
    assert torch.all(logits[:, 0] == 0)
    bce = F.binary_cross_entropy_with_logits(logits[:, 1], batch["label"].float())
    torch.testing.assert_close(losses["cross_entropy"], bce)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(variant="matlab"), "variant"),
        (dict(filter_loss="matlab"), "filter_loss"),
        (dict(tau="n3"), "tau"),
        (dict(mode="logistic"), "num_classes=2"),
        (dict(num_layers=0, mask_backbone=False), "interpretable layer"),
        (dict(head="mlp"), "head"),
        (dict(filter_loss_weight=-1.0), "filter_loss_weight"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        InterpretableCNN(num_classes=3, backbone="test_resnet", stage=2, **kwargs)


def test_fit_and_weights_only_checkpoint_round_trip(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    data = [{"image": torch.rand(3, 32, 32), "label": torch.tensor(i % 2)} for i in range(8)]
    loader = DataLoader(data, batch_size=4)
    net = InterpretableCNN(num_classes=2, backbone="test_resnet", stage=2, variant="released_code", head="fc", fc_hidden=16, fc_grid=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(net, loader, loader)
    assert net.interpretable[0].class_seen.all()
    assert not torch.equal(net.interpretable[0].channel_beta, torch.full((48,), 2.0))
    path = tmp_path / "icnn.ckpt"
    trainer.save_checkpoint(path)
    loaded = InterpretableCNN.load_from_checkpoint(path, weights_only=True)
    images = torch.rand(2, 3, 32, 32)
    net.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(images), net(images))
    torch.testing.assert_close(loaded.filter_categories(), net.filter_categories())


def test_checkpoint_monitor_sees_accuracy_only_once_the_filter_loss_is_on(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class Record(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            self.seen.append((float(m["val/acc_interpretable"]), float(m["val/acc"])))

    torch.manual_seed(0)
    data = [{"image": torch.rand(3, 32, 32), "label": torch.tensor(i % 2)} for i in range(8)]
    loader = DataLoader(data, batch_size=4)
    net = InterpretableCNN(num_classes=2, backbone="test_resnet", stage=2, filter_loss_warmup=1)
    record = Record()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, callbacks=[record])
    trainer.fit(net, loader, loader)
    (before, _), (after, acc) = record.seen
    assert before == -1.0  # epoch 0: no filter loss yet, never the best checkpoint
    assert after == acc and after >= 0


def test_filter_part_gallery_shows_the_top_images_of_each_filter():
    import matplotlib.pyplot as plt

    from explain.viz import filter_part_gallery

    images = torch.rand(5, 3, 32, 32)
    acts = torch.zeros(5, 3, 4, 4)
    acts[:, 0, 1, 1] = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])  # top-3 of filter 0: images 1, 4, 2
    acts[:, 2, 3, 0] = torch.tensor([5.0, 1.0, 2.0, 4.0, 3.0])  # top-3 of filter 2: images 0, 3, 4
    rf = ReceptiveField(size=4, jump=8.0, rf=12.0, start=4.0, image_size=32)
    fig = filter_part_gallery(images, acts, [0, 2], k=3, receptive_field=rf)
    axes = fig.axes
    assert len(axes) == 6
    titles = [ax.get_title().split(":")[0] for ax in axes]
    assert titles == ["#1", "#4", "#2", "#0", "#3", "#4"]
    assert all(len(ax.patches) == 1 for ax in axes)  # the receptive-field box
    plt.close(fig)
    with pytest.raises(ValueError, match="filters"):
        filter_part_gallery(images, acts, [3], k=2)


def test_configs_resolve_and_build():
    """The CUB recipe resolves through the CLI parser; each synthetic recipe's model builds and trains."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(root))
    printed = subprocess.run([sys.executable, str(root / "train.py"), "fit", "--config", "configs/icnn/cub_vgg16.yaml",
                              "--print_config"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "backbone: vgg16" in printed.stdout and "head: fc" in printed.stdout
    rules = {}
    for name in ("synthetic.yaml", "synthetic_released_code.yaml"):
        cfg = yaml.safe_load((root / "configs/icnn" / name).read_text())
        assert cfg["model"]["class_path"] == "models.InterpretableCNN"
        net = InterpretableCNN(**{**cfg["model"]["init_args"], "backbone": "test_resnet"})
        rules[name] = net.interpretable[-1].loss_rule
        net.train()
        size = cfg["data"]["init_args"]["image_size"]
        _, losses = net.compute_losses(torch.rand(4, 3, size, size), torch.tensor([0, 1, 2, 3]))
        losses["loss"].backward()
        assert net.interpretable[-1].conv.weight.grad.abs().sum() > 0
        assert net.layer_maps(torch.rand(1, 3, size, size))[1][-1].masked.shape[-1] == size // 8
    assert rules == {"synthetic.yaml": "paper", "synthetic_released_code.yaml": "released_code"}


def test_filter_loss_warmup_switches_lambda_on_after_the_warmup_epochs():
    net = InterpretableCNN(num_classes=2, backbone="test_resnet", stage=2, filter_loss_weight=2.0, filter_loss_warmup=1,
                           category_assignment="frozen")
    images, labels = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])

    class FakeTrainer:
        current_epoch = 0

    net._trainer = FakeTrainer()
    _, warm = net.compute_losses(images, labels)
    torch.testing.assert_close(warm["loss"], warm["cross_entropy"])
    assert torch.all(net.interpretable[0].fixed_categories == -1)  # still following the EMA
    net.train()
    FakeTrainer.current_epoch = 1
    _, on = net.compute_losses(images, labels)
    torch.testing.assert_close(on["loss"], on["cross_entropy"] + 2.0 * on["filter_loss"])
    frozen = net.filter_categories().clone()
    assert torch.all(net.interpretable[0].fixed_categories >= 0)
    layer = net.interpretable[0]
    layer.class_activation.copy_(-layer.class_activation)  # the EMA now prefers other classes...
    assert torch.equal(net.filter_categories(), frozen)  # ...but the frozen categories stay
