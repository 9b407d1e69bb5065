"""ProtoTree maths against hand computations and straightforward recursive references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import ProtoTree, ProtoTreeEnsemble, create_model
from models.prototree import cell_boxes, greedy_route, leaf_update, log1mexp


def tiny_tree(depth: int = 3, num_classes: int = 4, seed: int = 0, **kwargs) -> ProtoTree:
    torch.manual_seed(seed)
    model = create_model("prototree_test_resnet", num_classes=num_classes, depth=depth, **kwargs)
    with torch.no_grad():
        model.leaves.normal_(0, 2)  # non-trivial leaf distributions
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ straightforward references
class Node:
    """An explicit tree node, as in the official code (left = absent, right = present)."""

    def __init__(self, index: int, left: "Node | None" = None, right: "Node | None" = None) -> None:
        self.index, self.left, self.right = index, left, right

    @property
    def leaves(self) -> list["Node"]:
        return [self] if self.left is None else self.left.leaves + self.right.leaves

    @property
    def internal(self) -> list["Node"]:
        return [] if self.left is None else [self] + self.left.internal + self.right.internal


def complete_tree(depth: int) -> Node:
    num_internal = 2**depth - 1

    def build(n: int) -> Node:
        return Node(n) if n >= num_internal else Node(n, build(2 * n + 1), build(2 * n + 2))

    return build(0)


def reference_forward(root: Node, min_d: torch.Tensor, leaves: torch.Tensor, num_internal: int):
    """Recursive plain-probability tree in float64: y = (1 - p) left + p right, and each leaf's pi."""
    p_all = torch.exp(-min_d.double())
    sigma = torch.softmax(leaves.double(), dim=1)
    path: dict[int, torch.Tensor] = {}

    def visit(node: Node, pa: torch.Tensor) -> torch.Tensor:
        if node.left is None:
            path[node.index - num_internal] = pa
            return sigma[node.index - num_internal].expand(len(pa), -1)
        p = p_all[:, node.index]
        return (1 - p)[:, None] * visit(node.left, pa * (1 - p)) + p[:, None] * visit(node.right, pa * p)

    y = visit(root, torch.ones(min_d.shape[0], dtype=torch.float64))
    return y, path


def reference_prune(root: Node, leaf_max: torch.Tensor, threshold: float, num_internal: int) -> Node:
    """The official prune.py on an explicit tree: maximal all-leaves-below-threshold nodes go with their parent."""
    parents = {}

    def set_parents(node: Node) -> None:
        for child in (node.left, node.right):
            if child is not None:
                parents[child.index] = node
                set_parents(child)

    set_parents(root)
    low = lambda node: all(leaf_max[l.index - num_internal] <= threshold for l in node.leaves)  # noqa: E731
    nodes = {n.index: n for n in root.internal + root.leaves}
    to_prune = [i for i, n in nodes.items() if low(n)]
    maximal = [i for i in to_prune if i != 0 and not low(parents[i])]
    for i in maximal:
        node, parent = nodes[i], parents[i]
        if parent.index == 0:
            continue
        sibling = parent.right if node is parent.left else parent.left
        grand = parents[parent.index]
        if grand.left is parent:
            grand.left = sibling
        else:
            grand.right = sibling
        parents[sibling.index] = grand
    return root


# ------------------------------------------------------------------ tests
def test_log1mexp_matches_direct_formula_and_spec_branches():
    d = torch.tensor([1e-3, 0.3, math.log(2.0) - 1e-7, 2.0, 30.0], dtype=torch.float64)
    x = d + 1e-7
    assert torch.allclose(log1mexp(d), torch.log(1 - torch.exp(-x)), rtol=1e-9)
    assert torch.isfinite(log1mexp(torch.zeros(1))).all()  # p = 1: log(1 - p) stays finite thanks to the 1e-7


def test_distances_are_euclidean_with_epsilon(images):
    model = tiny_tree()
    z = model.latent(images)
    maps = model.distance_maps(z)
    zz = z.permute(0, 2, 3, 1)[:, :, :, None, :]  # (B, h, w, 1, D)
    brute = torch.sqrt(((zz - model.prototype_vectors) ** 2).sum(-1) + 1e-14).permute(0, 3, 1, 2)
    assert torch.allclose(maps, brute, atol=1e-5)
    assert ((z > 0) & (z < 1)).all()  # sigmoid add-on


@pytest.mark.parametrize("log_mode", [True, False])
def test_distributions_and_path_probabilities_sum_to_one(images, log_mode):
    model = tiny_tree(log_probabilities=log_mode)
    out = model.tree_forward(images)
    assert torch.allclose(model.leaf_distributions().sum(1), torch.ones(model.num_leaves))
    path = out.path.exp() if log_mode else out.path
    assert torch.allclose(path.sum(1), torch.ones(len(images)), atol=1e-5)
    assert torch.allclose(out.logits.exp().sum(1), torch.ones(len(images)), atol=1e-5)


@pytest.mark.parametrize("log_mode", [True, False])
def test_vectorised_forward_equals_recursive_reference(images, log_mode):
    model = tiny_tree(depth=3, log_probabilities=log_mode)
    out = model.tree_forward(images)
    y_ref, path_ref = reference_forward(complete_tree(3), out.min_distances, model.leaves, model.num_internal)
    assert torch.allclose(out.logits.exp().double(), y_ref, atol=1e-5)
    path = out.path.exp() if log_mode else out.path
    for leaf, pa in path_ref.items():
        assert torch.allclose(path[:, leaf].double(), pa, atol=1e-5)


def test_log_mode_equals_plain_mode_and_stays_finite_where_plain_underflows():
    log_tree, plain_tree = tiny_tree(depth=4), tiny_tree(depth=4, log_probabilities=False)
    plain_tree.load_state_dict(log_tree.state_dict())
    maps = torch.rand(6, log_tree.num_internal, 2, 2) * 3
    a, b = log_tree.tree_from_distances(maps), plain_tree.tree_from_distances(maps)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.path.exp(), b.path, atol=1e-6)
    # Far-away prototypes: p = exp(-d) and products of 1 - p underflow in float32 in plain mode.
    far = maps + torch.tensor([120.0, 0.0]).repeat_interleave(torch.tensor([1, 14]))[None, :, None, None]
    # Sharp leaves of classes 0 / 1 only: softmax(150 e_k) gives classes 2, 3 e^-150, 0 in float32.
    log_tree.leaves.copy_(150 * F.one_hot(torch.arange(16) % 2, 4).float())
    plain_tree.leaves.copy_(log_tree.leaves)
    a, b = log_tree.tree_from_distances(far), plain_tree.tree_from_distances(far)
    assert (b.path == 0).any() and not torch.isfinite(b.logits).all()
    assert torch.isfinite(a.path).all() and torch.isfinite(a.logits).all()
    finite = torch.isfinite(b.logits)
    assert torch.allclose(a.logits[finite], b.logits[finite], rtol=1e-4, atol=1e-4)


def test_root_log_path_probability_is_zero():
    model = tiny_tree(depth=1)
    out = model.tree_from_distances(torch.full((1, 1, 1, 1), math.log(2.0)))  # p = 0.5 at the root
    assert torch.allclose(out.path.exp(), torch.tensor([[0.5, 0.5]]), atol=1e-6)  # no +1 shift (official bug)


@pytest.mark.parametrize("log_mode", [True, False])
def test_leaf_update_equals_hand_computation(log_mode):
    # depth 1: one node, two leaves; two images with p = 0.5 and 0.25; three classes.
    model = tiny_tree(depth=1, num_classes=3, log_probabilities=log_mode)
    counts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.5]])
    start = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    model.leaves.copy_(counts)
    maps = torch.tensor([math.log(2.0), math.log(4.0)]).view(2, 1, 1, 1)
    labels = torch.tensor([0, 1])
    out = model.tree_from_distances(maps)
    new = leaf_update(counts, start, 2, out.path, out.y, labels, log_mode)

    e = math.e
    sig = [[e / (e + 2), 1 / (e + 2), 1 / (e + 2)], [1 / (e**2 + 1 + e**0.5), e**2 / (e**2 + 1 + e**0.5), e**0.5 / (e**2 + 1 + e**0.5)]]
    pis = [[0.5, 0.5], [0.75, 0.25]]  # pi_left = 1 - p, pi_right = p
    expected = []
    for leaf in range(2):
        row = []
        for k in range(3):
            u = 0.0
            for x, y in enumerate(labels.tolist()):
                y_hat_k = sum(pis[x][l] * sig[l][k] for l in range(2))
                u += pis[x][leaf] * sig[leaf][k] * (1.0 if y == k else 0.0) / y_hat_k
            row.append(max(counts[leaf, k].item() - start[leaf, k].item() / 2, 0.0) + u)
        expected.append(row)
    assert torch.allclose(new, torch.tensor(expected), atol=1e-6)
    assert new[0, 0] > 0 and torch.isclose(new[0, 0] - 0.0, new[0, 0])  # 1 - 4/2 < 0 was clipped to 0


def test_leaf_update_total_mass_is_batch_size():
    # sum over leaves of u_l(y) = sum_l pi_l sigma_l,y / y_hat_y = 1 per image: the update adds B counts.
    model = tiny_tree(depth=4, num_classes=5)
    out = model.tree_from_distances(torch.rand(7, model.num_internal, 2, 2))
    labels = torch.randint(0, 5, (7,))
    counts = model.leaves  # the leaves of the forward pass; start = counts, N_B = 1 leaves only the update
    update = leaf_update(counts, counts, 1, out.path, out.y, labels, True)
    assert torch.allclose(update.sum(), torch.tensor(7.0), atol=1e-4)
    assert torch.allclose(update.sum(0), torch.bincount(labels, minlength=5).float(), atol=1e-4)


def test_greedy_routing_follows_p_above_half():
    torch.manual_seed(3)
    depth = 4
    similarity = torch.rand(20, 2**depth - 1)
    forced = torch.full((2**depth - 1,), -1)
    forced[[2, 5]] = torch.tensor([0, 1])
    nodes, right, leaf = greedy_route(similarity, forced, depth)
    for b in range(20):
        node, visited = 0, []
        while node < 2**depth - 1:
            visited.append(node)
            go_right = bool(forced[node] == 1) if forced[node] >= 0 else bool(similarity[b, node] > 0.5)
            node = 2 * node + 2 if go_right else 2 * node + 1
        assert nodes[b].tolist() == visited
        assert int(leaf[b]) == node - (2**depth - 1)


def test_deterministic_modes(images):
    model = tiny_tree(depth=3)
    out = model.tree_forward(images)
    log_probs, leaf, length = model.route(out, "sample_max")
    assert torch.equal(leaf, out.path.argmax(1))
    assert torch.allclose(log_probs, model.leaf_log_distributions()[leaf])
    assert (length == 3).all()
    _, greedy_leaf, _ = model.route(out, "greedy")
    _, _, ref_leaf = greedy_route(torch.exp(-out.min_distances), model.forced_route, 3)
    assert torch.equal(greedy_leaf, ref_leaf)
    modes = model.predict_modes(images)
    assert torch.equal(modes["distributed"], out.logits.argmax(1))
    with pytest.raises(ValueError, match="routing mode"):
        model.route(out, "sampled")


@pytest.mark.parametrize("seed", range(6))
def test_pruning_matches_official_algorithm_and_keeps_remaining_paths(seed):
    depth, k, threshold = 4, 10, 0.11  # uniform leaves have max 0.1 <= 0.11
    model = tiny_tree(depth=depth, num_classes=k, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(model.num_leaves, generator=gen) < 0.45
    model.leaves.copy_(torch.where(low[:, None], torch.zeros(1, k), torch.randn(model.num_leaves, k, generator=gen) * 3 + 2))
    maps = torch.rand(8, model.num_internal, 2, 2, generator=gen) * 2
    before = model.tree_from_distances(maps)

    removed = model.prune(threshold)
    root = reference_prune(complete_tree(depth), model.leaf_distributions().amax(1), threshold, model.num_internal)
    structure = model.structure()
    assert structure.internal == sorted(n.index for n in root.internal)
    assert structure.leaves == sorted(n.index for n in root.leaves)
    assert set(removed) == set(range(2 * model.num_internal + 1)) - set(structure.internal) - set(structure.leaves)
    for node in root.internal:
        assert structure.children[node.index] == (node.left.index, node.right.index)

    after = model.tree_from_distances(maps)
    y_ref, path_ref = reference_forward(root, after.min_distances, model.leaves, model.num_internal)
    assert torch.allclose(after.logits.exp().double(), y_ref, atol=1e-5)
    assert torch.allclose(after.path.exp().sum(1), torch.ones(8), atol=1e-5)
    kept = model.kept_leaves()
    assert (after.path.exp()[:, ~kept] == 0).all()
    for leaf, pa in path_ref.items():
        assert torch.allclose(after.path.exp()[:, leaf].double(), pa, atol=1e-5)
    # An image whose greedy leaf survived still ends there: pruning only removes decisions towards removed leaves.
    _, leaf_before, _ = model.route(before, "greedy")
    _, leaf_after, _ = model.route(after, "greedy")
    survived = kept[leaf_before]
    assert torch.equal(leaf_after[survived], leaf_before[survived])


def test_pruning_by_hand():
    # depth 3: leaves 7, 8 (below node 3) uniform -> node 3 and its parent 1 go, node 4 takes 1's place.
    # leaf 14 uniform, but its parent 6 has the sharp leaf 13 -> 14 and 6 go, 13 takes 6's place.
    model = tiny_tree(depth=3, num_classes=10)
    model.leaves.copy_(torch.eye(10)[:8] * 5)
    model.leaves[[0, 1, 7]] = 0.0
    assert sorted(model.prune(0.11)) == [1, 3, 6, 7, 8, 14]
    structure = model.structure()
    assert structure.children == {0: (4, 2), 4: (9, 10), 2: (5, 13), 5: (11, 12)}
    assert structure.leaves == [9, 10, 11, 12, 13]
    assert model.forced_route.tolist() == [-1, 1, -1, -1, -1, -1, 0]


def test_pruning_never_removes_root_or_everything():
    model = tiny_tree(depth=2, num_classes=10)
    model.leaves.zero_()  # every leaf uniform
    with pytest.warns(UserWarning, match="unpruned"):
        assert model.prune(0.5) == []
    assert model.structure().internal == [0, 1, 2]


def test_projection_uses_allowed_classes_and_nearest_patch():
    model = tiny_tree(depth=2, num_classes=3, patch_size=8)
    model.leaves.copy_(torch.eye(3)[[0, 1, 2, 2]] * 5)  # leaf classes 0, 1 | 2, 2
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(3, 64, 64, generator=gen), "label": torch.tensor(i % 3), "index": torch.tensor(i)}
            for i in range(9)]
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    allowed = model.projection_classes()
    assert allowed.tolist() == [[True, True, True], [True, True, False], [False, False, True]]

    model.push(loader)
    with torch.no_grad():
        latents = model.latent(torch.stack([d["image"] for d in data]))  # (N, D, h, w)
    labels = torch.tensor([int(d["label"]) for d in data])
    for node in range(model.num_internal):
        proto = model.prototype_vectors[node]
        ok = allowed[node][labels]
        patches = latents[ok].permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        dist = ((patches - proto) ** 2).sum(1)
        assert dist.min() < 1e-10  # equals a latent patch of an allowed image ...
        candidates = latents[ok].permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        assert int(labels[model.prototype_source_index[node]]) in allowed[node].nonzero()[:, 0].tolist()
        src = int(model.prototype_source_index[node])
        r, c = model.prototype_position[node].tolist()
        assert torch.allclose(latents[src, :, r, c], proto, atol=1e-6)
        x0, y0, x1, y1 = model.prototype_box[node].tolist()
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert model.prototype_patch[node].float().mean() > 0  # a real image crop was stored
        assert candidates.shape[0] == ok.sum() * latents.shape[2] * latents.shape[3]


def test_projection_is_the_nearest_allowed_patch_before_projection():
    model = tiny_tree(depth=2, num_classes=2)
    model.leaves.copy_(torch.eye(2)[[0, 1, 0, 1]] * 5)
    gen = torch.Generator().manual_seed(5)
    data = [{"image": torch.rand(3, 64, 64, generator=gen), "label": torch.tensor(i % 2), "index": torch.tensor(i)}
            for i in range(6)]
    with torch.no_grad():
        latents = model.latent(torch.stack([d["image"] for d in data]))
        old = model.prototype_vectors.detach().clone()
    allowed = model.projection_classes()
    model.push(torch.utils.data.DataLoader(data, batch_size=4))
    labels = torch.tensor([int(d["label"]) for d in data])
    for node in range(model.num_internal):
        patches = latents[allowed[node][labels]].permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        nearest = patches[((patches - old[node]) ** 2).sum(1).argmin()]
        assert torch.allclose(model.prototype_vectors[node], nearest, atol=1e-6)


def test_cell_boxes_cover_their_cell():
    boxes = cell_boxes((1, 1), (16, 16))
    assert boxes.tolist() == [[0, 0, 16, 16]]
    same = cell_boxes((4, 4), (4, 4))  # no upsampling: the one-hot mask is the cell itself
    assert same[5].tolist() == [1, 1, 2, 2]
    boxes = cell_boxes((2, 3), (20, 30))
    for i in range(2):
        for j in range(3):
            x0, y0, x1, y1 = boxes[i * 3 + j].tolist()
            assert x0 <= j * 10 + 5 < x1 and y0 <= i * 10 + 5 < y1  # contains the cell centre


def test_explain_follows_greedy_path(images):
    model = tiny_tree(depth=3)
    model.forced_route[2] = 0  # a pruned-like node: not a decision on the path
    exp = model.explain(images)
    out = model.tree_forward(images)
    nodes, present, leaf = greedy_route(torch.exp(-out.min_distances), model.forced_route, 3)
    assert torch.equal(exp.evidence["leaf"], leaf)
    assert exp.heatmap.shape == (5, 64, 64) and exp.heatmap.min() >= 0 and exp.heatmap.max() <= 1
    assert torch.allclose(exp.evidence["leaf_distribution"].sum(1), torch.ones(5))
    assert torch.equal(exp.prediction, model.leaf_distributions()[leaf].argmax(1))
    for b, steps in enumerate(exp.evidence["path"]):
        decisions = [int(n) for n in nodes[b] if model.forced_route[n] < 0]
        assert [s["node"] for s in steps] == decisions
        for s in steps:
            assert s["present"] == (s["similarity"] > 0.5)
            x0, y0, x1, y1 = s["box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_ensemble_averages_probabilities(images):
    trees = [tiny_tree(seed=s) for s in range(3)]
    ensemble = ProtoTreeEnsemble(trees)
    with torch.no_grad():
        expected = torch.stack([t(images).exp() for t in trees]).mean(0)
        assert torch.allclose(ensemble(images).exp(), expected, atol=1e-6)
        greedy = ensemble(images, mode="greedy").exp()
    assert torch.allclose(greedy.sum(1), torch.ones(len(images)), atol=1e-5)
    with pytest.raises(ValueError, match="num_classes"):
        ProtoTreeEnsemble([tiny_tree(num_classes=3), tiny_tree(num_classes=4)])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="depth"):
        create_model("prototree_test_resnet", num_classes=3, depth=0)
    with pytest.raises(ValueError, match="last_block"):
        create_model("prototree_test_resnet", num_classes=3, last_block="layer9.9")
    with pytest.raises(ValueError, match="group_lr"):
        create_model("prototree_test_resnet", num_classes=3, group_lr={"head": 0.1}).configure_optimizers()


def test_parameter_groups_and_optimiser():
    model = create_model("prototree_test_resnet", num_classes=3, last_block="layer4.0", milestones=[2, 4])
    groups = model.parameter_groups()
    block = set(map(id, model.backbone.body.get_submodule("layer4.0").parameters()))
    assert {id(p) for p in groups["last_block"]} == block and groups["last_block"]
    assert not block & {id(p) for p in groups["backbone"]}
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    assert "leaves" not in groups and not model.leaves.requires_grad  # a buffer of counts
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["eps"] == 1e-7
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": 1e-5, "last_block": 1e-3, "add_on": 1e-3, "prototypes": 1e-3}
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR) and sched.gamma == 0.5
    gradient = create_model("prototree_test_resnet", num_classes=3, derivative_free=False)
    assert gradient.leaves.requires_grad and "leaves" in gradient.parameter_groups()
    resnet50 = create_model("prototree_resnet50", num_classes=3, depth=1)
    assert resnet50.last_block_name == "layer4.2"


def test_add_on_and_prototype_initialisation():
    torch.manual_seed(0)
    model = ProtoTree(num_classes=3, depth=7, backbone="test_resnet", num_features=64)
    assert abs(model.prototype_vectors.mean().item() - 0.5) < 0.01 and abs(model.prototype_vectors.std().item() - 0.1) < 0.01
    assert model.add_on.bias is None and model.add_on.kernel_size == (1, 1)
    fan_in, fan_out = model.add_on.in_channels, model.add_on.out_channels
    assert abs(model.add_on.weight.std().item() - math.sqrt(2 / (fan_in + fan_out))) < 0.02  # xavier, gain 1
    assert (model.leaves == 0).all() and model.num_internal == 127 and model.num_leaves == 128
    assert torch.equal(model.node_prototype, torch.arange(127))


def test_gradients_reach_prototypes_and_leaves(images):
    model = tiny_tree(derivative_free=False).train()
    loss = F.nll_loss(model(images), torch.tensor([0, 1, 2, 3, 0]))
    loss.backward()
    assert model.prototype_vectors.grad.abs().sum() > 0 and model.leaves.grad.abs().sum() > 0
    assert model.add_on.weight.grad.abs().sum() > 0


def test_tree_dot_contains_every_kept_node_and_leaf_and_no_removed_one():
    import re

    from explain.viz import tree_dot

    model = tiny_tree(depth=3, num_classes=10)
    model.leaves.copy_(torch.eye(10)[:8] * 5)
    model.leaves[[0, 1, 7]] = 0.0
    removed = model.prune(0.11)
    dot = tree_dot(model, class_names=[f"class<{i}>" for i in range(10)])
    defined = {int(n) for n in re.findall(r"^\s*n(\d+) \[label=", dot, flags=re.M)}
    structure = model.structure()
    assert defined == set(structure.internal) | set(structure.leaves)
    assert not defined & set(removed)
    edges = set(re.findall(r"n(\d+) -> n(\d+) \[label=\"(Absent|Present)\"\]", dot))
    expected = {(str(p), str(c), side) for p, (l, r) in structure.children.items()
                for c, side in ((l, "Absent"), (r, "Present"))}
    assert edges == expected
    assert "class&lt;2&gt;" in dot  # leaf labels are escaped for Graphviz's HTML-like labels
