"""The shared prototype machinery: distances, push, boxes, nearest patches (and ProtoPNet.push under DDP).

Latent maps are looked up from a fixed table by the image's id (pixel [0, 0, 0]), so every check is
exact and independent of any network.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.backbones import receptive_field_of_layers
from models import cpu_kernels
from models.prototypes import (
    crop_patches,
    fetch_images,
    high_activation_boxes,
    l2_distances,
    linear_similarity,
    log_similarity,
    PushSearch,
    nearest_patches,
    push_prototypes,
    receptive_field_boxes,
    similarity,
)

N, D, H, W, P, K = 40, 6, 4, 5, 10, 4


def _table(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.rand(N, D, H, W, generator=g)
    labels = torch.arange(N) % K
    protos = torch.rand(P, D, generator=g)
    allowed = torch.zeros(P, K, dtype=torch.bool)
    allowed[torch.arange(P), torch.arange(P) % K] = True
    return latent, labels, protos, allowed


def _lookup(latent):
    return lambda images: latent[images[:, 0, 0, 0].long()]


def _loader(labels, batch_size, order=None):
    ids = torch.arange(len(labels)) if order is None else order
    images = torch.arange(len(labels)).float()[:, None, None, None].expand(-1, 1, 2, 2)
    return [
        {"image": images[ids[s : s + batch_size]], "label": labels[ids[s : s + batch_size]], "index": ids[s : s + batch_size]}
        for s in range(0, len(ids), batch_size)
    ]


def test_distances_equal_cdist_on_flattened_patches():
    latent, _, protos, _ = _table()
    d = l2_distances(latent, protos[:, :, None, None])
    patches = latent.permute(0, 2, 3, 1).reshape(-1, D)
    ref = torch.cdist(patches.double(), protos.double()).pow(2).view(N, H, W, P).permute(0, 3, 1, 2)
    assert d.shape == (N, P, H, W)
    torch.testing.assert_close(d.double(), ref, atol=1e-5, rtol=1e-5)
    assert (d >= 0).all()


def test_similarities_by_hand():
    d = torch.tensor([0.0, 1.0, 3.0])
    # log((d + 1) / (d + 1e-4)): log(1e4), log(2 / 1.0001), log(4 / 3.0001)
    expected = torch.tensor([np.log(1e4), np.log(2 / 1.0001), np.log(4 / 3.0001)], dtype=torch.float32)
    torch.testing.assert_close(log_similarity(d), expected)
    torch.testing.assert_close(similarity(d, "linear"), -d)
    assert torch.equal(linear_similarity(d), -d)
    with pytest.raises(ValueError, match="unknown similarity 'cos'"):
        similarity(d, "cos")


def test_push_finds_nearest_patch_of_own_class_by_brute_force():
    latent, labels, protos, allowed = _table()
    r = push_prototypes(_lookup(latent), protos, _loader(labels, 7), allowed)
    assert r.found.all()
    exact = ((latent[:, None] - protos[None, :, :, None, None]) ** 2).sum(2)  # (N, P, H, W), no expansion
    for j in range(P):
        b, (row, col) = int(r.sample_index[j]), r.position[j].tolist()
        assert labels[b] == j % K  # an image of its own class
        torch.testing.assert_close(r.vectors[j], latent[b, :, row, col], atol=0, rtol=0)  # a real patch
        own = exact[labels == j % K, j]
        assert exact[b, j, row, col] <= own.min() + 1e-5  # and no patch of its class is nearer
        torch.testing.assert_close(r.distance[j], exact[b, j, row, col], atol=1e-5, rtol=1e-5)
        # its self-activation map: distances from the new prototype to the source image's patches
        ref_map = ((latent[b] - latent[b, :, row, col][:, None, None]) ** 2).sum(0)
        torch.testing.assert_close(r.distance_map[j], ref_map)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
@pytest.mark.parametrize("shuffled", [False, True])
def test_push_independent_of_batch_size_and_order(batch_size, shuffled):
    latent, labels, protos, allowed = _table()
    ref = push_prototypes(_lookup(latent), protos, _loader(labels, 10), allowed)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(batch_size)) if shuffled else None
    r = push_prototypes(_lookup(latent), protos, _loader(labels, batch_size, order), allowed)
    assert torch.equal(r.sample_index, ref.sample_index) and torch.equal(r.position, ref.position)
    assert torch.equal(r.vectors, ref.vectors)
    torch.testing.assert_close(r.distance, ref.distance)


def test_push_ties_go_to_smallest_sample_index_then_position():
    latent = torch.zeros(6, 2, 2, 2)  # every patch of every image is the same vector
    labels = torch.zeros(6, dtype=torch.long)
    for order in (torch.arange(6), torch.tensor([5, 3, 1, 0, 2, 4])):
        r = push_prototypes(_lookup(latent), torch.ones(1, 2), _loader(labels, 4, order))
        assert r.sample_index.tolist() == [0] and r.position.tolist() == [[0, 0]]


def test_push_without_allowed_image_reports_not_found():
    latent, labels, protos, allowed = _table()
    keep = labels != 3
    data = _loader(labels, 8, torch.nonzero(keep).squeeze(1))
    r = push_prototypes(_lookup(latent), protos, data, allowed)
    missing = torch.arange(P) % K == 3
    assert (~r.found == missing).all()
    assert (r.sample_index[missing] == -1).all() and torch.isinf(r.distance[missing]).all()
    assert torch.equal(r.vectors[missing], protos[missing])  # left as they were


def test_push_rejects_bad_input():
    latent, labels, protos, allowed = _table()
    with pytest.raises(KeyError, match="index"):
        push_prototypes(_lookup(latent), protos, [{"image": torch.zeros(1, 1, 2, 2), "label": torch.zeros(1)}])
    with pytest.raises(ValueError, match="latent_fn gives 6 channels but prototypes have 3"):
        push_prototypes(_lookup(latent), protos[:, :3], _loader(labels, 8))
    with pytest.raises(ValueError, match="allowed_classes has 2 rows"):
        push_prototypes(_lookup(latent), protos, _loader(labels, 8), allowed[:2])


def test_nearest_patches_equal_brute_force_sort():
    latent, labels, protos, _ = _table(1)
    k = 5
    nn_ = nearest_patches(_lookup(latent), protos, _loader(labels, 9, torch.randperm(N)), k=k)
    per_image = ((latent[:, None] - protos[None, :, :, None, None]) ** 2).sum(2).flatten(2)  # (N, P, HW)
    best, where = per_image.min(dim=2)
    for j in range(P):
        order = np.lexsort((np.arange(N), best[:, j].numpy()))[:k]  # by distance, then sample index
        assert nn_.sample_index[j].tolist() == order.tolist()
        assert nn_.label[j].tolist() == labels[order].tolist()
        torch.testing.assert_close(nn_.distance[j], best[order, j], atol=1e-5, rtol=1e-5)
        q = where[order, j]
        assert nn_.position[j].tolist() == torch.stack([q // W, q % W], 1).tolist()
    short = nearest_patches(_lookup(latent), protos, _loader(labels[:3], 2), k=k)
    assert (short.sample_index[:, 3:] == -1).all() and torch.isinf(short.distance[:, 3:]).all()


def test_push_records_what_describe_says_of_each_winner():
    latent, labels, protos, allowed = _table()
    seen = []

    def describe(images, image_ids, maps):
        seen.append(len(image_ids))
        return {"source_pixel": images[image_ids, 0, 0, 0], "map_min": maps.flatten(1).amin(dim=1)}

    records = {"source_pixel": torch.full((P,), -1.0), "map_min": torch.full((P,), -1.0)}
    r = push_prototypes(_lookup(latent), protos, _loader(labels, 7), allowed, records=records, describe=describe)
    assert sum(seen) >= P  # every improvement was described
    # The record of each prototype describes its final source image and its own map (zero at its patch).
    assert r.records["source_pixel"].tolist() == r.sample_index.float().tolist()
    assert (r.records["map_min"] == 0).all()


def test_push_search_rejects_bad_records_before_writing():
    latent, labels, protos, allowed = _table()
    with pytest.raises(ValueError, match="rows"):
        PushSearch(protos, allowed, {"x": torch.zeros(P - 1)}, lambda *a: {})
    search = PushSearch(protos, allowed, {"x": torch.zeros(P)}, lambda images, ids, maps: {"y": torch.zeros(len(ids))})
    images = torch.arange(8.0)[:, None, None, None].expand(8, 3, 2, 2)
    with pytest.raises(ValueError, match="describe returned"):
        search.update(latent[:8], labels[:8], torch.arange(8), images)
    assert torch.isinf(search.distance).all() and (search.index == search.index[0]).all()  # nothing written


def test_high_activation_box_matches_numpy_percentile():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 7, 7, generator=g)
    boxes, thr = high_activation_boxes(maps, (56, 48), percentile=95)
    up = F.interpolate(maps[:, None], size=(56, 48), mode="bicubic", align_corners=False)[:, 0].numpy()
    for n in range(5):
        t = np.percentile(up[n], 95)
        ys, xs = np.nonzero(up[n] >= t)
        assert abs(float(thr[n]) - t) < 1e-5
        assert boxes[n].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_high_activation_box_of_a_peak_surrounds_it():
    maps = torch.zeros(1, 7, 7)
    maps[0, 2, 5] = 1.0  # cell centre at (y, x) = (2.5, 5.5) * 32 = (80, 176) at 224 px
    (x0, y0, x1, y1), = high_activation_boxes(maps, (224, 224))[0].tolist()
    assert x0 <= 176 < x1 and y0 <= 80 < y1
    assert (x1 - x0) * (y1 - y0) <= 0.1 * 224 * 224  # about 5% of the pixels


def test_receptive_field_boxes_use_layer_arithmetic():
    rf = receptive_field_of_layers([(3, 2, 1), (3, 2, 1)], 32)  # 8x8 map, jump 4, rf 7
    boxes = receptive_field_boxes(rf, rf, torch.tensor([[0, 0], [3, 5], [-1, -1]]))
    y0, y1, x0, x1 = rf.box(3, 5)
    assert boxes[1].tolist() == [x0, y0, x1, y1]
    assert boxes[0].tolist() == [0, 0, int(rf.start + rf.rf / 2), int(rf.start + rf.rf / 2)]
    assert boxes[2].tolist() == [-1, -1, -1, -1]


def test_crop_patches_of_a_coloured_block():
    images = torch.zeros(2, 3, 40, 40)
    images[1, 0, 10:20, 4:12] = 1.0  # a red block in image 1
    patches = crop_patches(images, torch.tensor([1, 0]), torch.tensor([[4, 10, 12, 20], [0, 0, 40, 40]]), size=8)
    assert patches.dtype == torch.uint8 and patches.shape == (2, 3, 8, 8)
    assert (patches[0, 0] == 255).all() and (patches[0, 1:] == 0).all()
    assert (patches[1] == 0).all()


@pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 8), (3, 5)])
def test_compiled_crops_are_roi_align_byte_for_byte(channels, size, monkeypatch):
    g = torch.Generator().manual_seed(channels * 100 + size)
    images = torch.rand(6, channels, 61, 47, generator=g, dtype=torch.float64) * 1.2 - 0.1  # some values clamp
    n = 300
    x0, y0 = torch.randint(0, 47, (n,), generator=g), torch.randint(0, 61, (n,), generator=g)
    x1 = x0 + 1 + (torch.rand(n, generator=g) * (47 - x0)).long()
    y1 = y0 + 1 + (torch.rand(n, generator=g) * (61 - y0)).long()
    boxes = torch.stack([x0, y0, x1, y1], 1)
    boxes[:3] = torch.tensor([[0, 0, 47, 61], [46, 60, 47, 61], [0, 5, 1, 6]])  # whole image, corner pixel, one pixel
    ids = torch.randint(0, 6, (n,), generator=g)
    compiled = crop_patches(images, ids, boxes, size)
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)  # torchvision's roi_align
    assert torch.equal(compiled, crop_patches(images, ids, boxes, size))


def test_crop_patches_of_fractional_boxes_and_bad_ids():
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 20, 20, generator=g)
    boxes = torch.tensor([[2.6, 3.6, 10.4, 12.9], [0.0, 0.0, 20.0, 20.0]])
    inner = boxes + torch.tensor([0.5, 0.5, -0.5, -0.5])
    from torchvision.ops import roi_align

    ref = roi_align(images, torch.cat([torch.tensor([[1.0], [0.0]]), inner], 1), 8, 1.0, 2, True)
    assert torch.equal(crop_patches(images, torch.tensor([1, 0]), boxes, 8), (ref.clamp(0, 1) * 255).round().to(torch.uint8))
    if cpu_kernels.AVAILABLE:
        with pytest.raises(ValueError, match="image ids"):
            cpu_kernels.crop_boxes(images, torch.tensor([2]), boxes[:1].long(), 8)


class _IndexedDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels=None):
        self.images = images
        self.labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def test_fetch_images_from_dataset_and_by_scanning():
    images = torch.rand(10, 3, 4, 4)
    loader = torch.utils.data.DataLoader(_IndexedDataset(images), batch_size=3)
    wanted = torch.tensor([7, 2, 9])
    assert torch.equal(fetch_images(loader, wanted), images[wanted])
    plain = [{"image": images[s : s + 4], "label": torch.zeros(4), "index": torch.arange(s, min(s + 4, 10))} for s in (0, 4, 8)]
    assert torch.equal(fetch_images(plain, wanted), images[wanted])
    with pytest.raises(ValueError, match=r"\[11\]"):
        fetch_images(plain, torch.tensor([11]))


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        latent, labels, protos, allowed = _table()
        shard = torch.arange(rank, N, world)  # DistributedSampler(shuffle=False) order
        r = push_prototypes(_lookup(latent), protos, _loader(labels, 3, shard), allowed)
        nn_ = nearest_patches(_lookup(latent), protos, _loader(labels, 3, shard), k=4)
        # ProtoPNet.push on a DistributedSampler shard (fetches its patches from the dataset by index).
        model, dataset = _tiny_protopnet()
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        model.push(torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler))
        torch.save({"push": r.__dict__, "nearest": nn_.__dict__, "model": model.state_dict()}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _tiny_protopnet():
    from models import create_model

    torch.manual_seed(0)
    model = create_model("protopnet_test_resnet", num_classes=3, stage=2).eval()
    return model, _IndexedDataset(torch.rand(9, 3, 32, 32), labels=torch.arange(9) % 3)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_push_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    latent, labels, protos, allowed = _table()
    ref = push_prototypes(_lookup(latent), protos, _loader(labels, 5), allowed).__dict__
    ref_nn = nearest_patches(_lookup(latent), protos, _loader(labels, 5), k=4).__dict__
    model, dataset = _tiny_protopnet()
    model.push(torch.utils.data.DataLoader(dataset, batch_size=4))
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(out["model"][key], value, atol=1e-6, rtol=0, msg=f"rank {rank} model {key}")
        for key, value in ref.items():
            torch.testing.assert_close(out["push"][key], value, atol=0, rtol=0, msg=f"rank {rank} push {key}")
        for key, value in ref_nn.items():
            torch.testing.assert_close(out["nearest"][key], value, atol=1e-6, rtol=0, msg=f"rank {rank} nearest {key}")
