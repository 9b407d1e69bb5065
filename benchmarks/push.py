"""ProtoPNet push: the vectorised push against a per-prototype NumPy loop written like the official code.

CUB-like scale: 2,000 prototypes (200 classes x 10), D = 128, 7 x 7 latent maps (ResNet-18 at 224 px),
random images with class-sorted labels (the official push loader is an unshuffled ImageFolder), batch 75.
Both pushes must find the same prototypes (asserted). Reported for both, as medians of interleaved
rounds: the whole push, one plain inference pass of the same network over the same images, and the
search as push minus that pass (the cost the push adds to a pass), twice:
- raw: the difference of two ~20 s runs, which drift by more than the search itself;
- net: the same difference with each run's own time in trunk + add-on taken out (clocked in the run):
  (push - its network time) - (pass - its network time). The network does the same work in both, so
  this is push - pass without the network's run-to-run noise. It is negative where the push does less
  outside the network than the pass (ours computes only the distances of the prototypes that may use
  a batch's images; the pass computes all of them and the last layer).
And everything after trunk + add-on (distances, search, boxes, patches) timed alone on cached latent
maps, with and without boxes and patches. Ours also makes each prototype's 32 x 32 patch image, which
the reference does not (the official code writes files). The compiled kernels are loaded before the
timings (a one-time cost per process, printed).
The reference does the official per-batch work without file writes: 1x1-convolution distances for all
prototypes, NumPy copies, a Python loop over all prototypes with a fancy-index copy each, and on every
improvement the receptive field and the 95th-percentile box. (Its boxes come from the pre-push
prototype's map, ours from the pushed prototype's own map, so boxes are not compared.)

PIP-Net has no push: its records come from a top-k search (k = 10, the official ``visualize_topk``) over the
same images, timed against one inference pass of the same PIP-Net (medians of interleaved rounds; target
<= 1.1x), on the same trunk with its own strides (``--pipnet-official-strides``: layer3/4 at stride 1).

    python benchmarks/push.py            # 2,000 images
    python benchmarks/push.py --quick    # 40 images at 64 px, 20 classes (P = 200): a smoke run
    python benchmarks/push.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import sync, timed  # noqa: E402
from models import PIPNet, ProtoPNet, ProtoPool  # noqa: E402
from models.prototypes import PushSearch  # noqa: E402


class RandomImages(torch.utils.data.Dataset):
    """n uniform-noise images made once (so loading costs next to nothing and the timings are the push's);
    labels class-sorted like the official unshuffled ImageFolder push loader."""

    def __init__(self, n: int, num_classes: int, size: int) -> None:
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
        self.labels = torch.arange(n) * num_classes // n

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


# ---------------------------------------------------------------------------------- reference
def official_distances(latent: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """ProtoPNet's `_l2_convolution`: relu(conv(z^2, ones) - 2 conv(z, p) + ||p||^2), (B, P, h, w) contiguous."""
    prototypes = prototypes.view(*prototypes.shape[:2], 1, 1)
    z2 = F.conv2d(latent**2, torch.ones_like(prototypes))
    p2 = (prototypes**2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
    return F.relu(z2 - 2 * F.conv2d(latent, prototypes) + p2)


def new_state(num_prototypes: int, dim: int) -> dict:
    return {"distance": np.full(num_prototypes, np.inf), "vectors": np.zeros((num_prototypes, dim), np.float32),
            "sample_index": np.full(num_prototypes, -1), "position": np.full((num_prototypes, 2), -1),
            "rf_box": np.full((num_prototypes, 4), -1), "box": np.full((num_prototypes, 4), -1)}


def reference_update(latent_t: torch.Tensor, dist_t: torch.Tensor, labels: torch.Tensor, index: np.ndarray,
                     identity: torch.Tensor, rf, image_size: int, state: dict, boxes: bool = True) -> None:
    """One batch of the official `update_prototypes_on_batch` (class-specific), without its file writes:
    NumPy copies of both maps, a Python loop over all prototypes with a fancy-index copy of the class's
    maps each, and on every improvement the receptive field and the 95th-percentile box of the bicubically
    upsampled activation map."""
    latent, dist = np.copy(latent_t.cpu().numpy()), np.copy(dist_t.cpu().numpy())
    class_to_img: dict[int, list[int]] = {k: [] for k in range(identity.shape[1])}
    for i, y in enumerate(labels):
        class_to_img[y.item()].append(i)
    for j in range(dist.shape[1]):
        imgs = class_to_img[torch.argmax(identity[j]).item()]
        if not imgs:
            continue
        dist_j = dist[imgs][:, j]
        best = np.amin(dist_j)
        if best < state["distance"][j]:
            b, r, c = np.unravel_index(np.argmin(dist_j, axis=None), dist_j.shape)
            b = imgs[b]
            state["distance"][j], state["vectors"][j] = best, latent[b, :, r, c]
            state["sample_index"][j], state["position"][j] = index[b], (r, c)
            y0, y1, x0, x1 = rf.box(r, c)
            state["rf_box"][j] = (x0, y0, x1, y1)
            if not boxes:
                continue
            act = np.log((dist[b, j] + 1) / (dist[b, j] + 1e-4))
            up = F.interpolate(torch.from_numpy(act)[None, None], size=(image_size, image_size), mode="bicubic",
                               align_corners=False)[0, 0].numpy()
            ys, xs = np.nonzero(up >= np.percentile(up, 95))
            state["box"][j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


@torch.no_grad()
def reference_push(model: ProtoPNet, loader, device, image_size: int) -> dict:
    """The whole official-style push: its forward per batch (trunk, add-on, conv distances), then the loop."""
    model.eval()
    protos = model.prototype_vectors
    state = new_state(model.num_prototypes, protos.shape[1])
    rf = model.receptive_field(image_size)
    for batch in loader:
        latent = model.latent(batch["image"].to(device))
        reference_update(latent, official_distances(latent, protos), batch["label"], batch["index"].numpy(),
                         model.prototype_class_identity, rf, image_size, state)
    protos.copy_(torch.from_numpy(state["vectors"]).view_as(protos))
    return state


class NetworkClock:
    """Sums the wall time spent in `model.latent` (trunk + add-on) while installed."""

    def __init__(self, model: ProtoPNet, device: torch.device) -> None:
        self.model, self.device, self.seconds = model, device, 0.0
        self.latent = model.latent

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        t = time.perf_counter()
        out = self.latent(images)
        sync(self.device)
        self.seconds += time.perf_counter() - t
        return out

    def run(self, fn):
        self.seconds = 0.0
        self.model.latent = self  # the instance attribute shadows the method
        try:
            return fn()
        finally:
            del self.model.latent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 images at 64 px, 20 classes: a smoke run")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=75)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of pass, push, reference; medians")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pipnet-official-strides", action="store_true", help="PIP-Net's trunk with stride-1 layer3/4")
    args = parser.parse_args()
    if args.quick:  # every class needs an image in the push set
        args.images, args.classes, args.size, args.rounds = 40, 20, 64, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = ProtoPNet(num_classes=args.classes, backbone=args.backbone, prototypes_per_class=args.per_class,
                      prototype_dim=args.dim).to(device).eval()
    data = RandomImages(args.images, args.classes, args.size)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)
    initial = model.prototype_vectors.detach().clone()
    with torch.no_grad():
        h = model.latent(data[0]["image"][None].to(device)).shape[-1]
    clock = NetworkClock(model, device)

    def inference():
        def one_pass():
            with torch.no_grad():
                for batch in loader:
                    model(batch["image"].to(device))
        return clock.run(one_pass)

    def ours():
        model.prototype_vectors.data.copy_(initial)
        return clock.run(lambda: model.push(loader))

    def reference():
        model.prototype_vectors.data.copy_(initial)
        return clock.run(lambda: reference_push(model, loader, device, args.size))

    inference()  # warm-up (allocator, kernels) on the first batches
    t = time.perf_counter()  # load (or compile, the first time on a machine) the push's CPU kernels
    with torch.no_grad():
        z = model.latent(data[0]["image"][None].to(device))
        model.push_record(data[0]["image"][None].to(device), torch.zeros(1, dtype=torch.long, device=device),
                          torch.ones_like(z[:, 0]))
    kernels_s = time.perf_counter() - t
    runs: dict[str, list] = {"pass": [], "ours": [], "reference": []}
    for r in range(args.rounds):  # rotate the order so that drifts of the machine hit all three alike
        for name in (["pass", "ours", "reference"] * 2)[r % 3: r % 3 + 3]:
            t, c, m, out = timed({"pass": inference, "ours": ours, "reference": reference}[name], device)
            runs[name].append((t, c, m, clock.seconds, out))
    res, ref = runs["ours"][-1][4], runs["reference"][-1][4]

    assert np.array_equal(res.sample_index.cpu().numpy(), ref["sample_index"]), "different source images"
    assert np.array_equal(res.position.cpu().numpy(), ref["position"]), "different positions"
    np.testing.assert_allclose(res.vectors.cpu().numpy(), ref["vectors"], atol=1e-6)
    assert np.array_equal(model.prototype_rf_box.cpu().numpy(), ref["rf_box"]), "different receptive-field boxes"

    # Everything after trunk + add-on (distances, search, boxes, patches), timed alone on cached latent maps.
    protos = initial.to(device)
    cached = []
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device)
            cached.append((model.latent(images), images, batch))
    rf = model.receptive_field(args.size)

    def search_ours(records: bool = True):
        kept = {"box": torch.full((len(protos), 4), -1, device=device), "patch": torch.zeros_like(model.prototype_patch),
                "image_size": torch.zeros(len(protos), 2, dtype=torch.long, device=device)} if records else None
        search = PushSearch(protos, model.prototype_class_identity, kept, model.push_record if records else None)
        for z, images, b in cached:
            search.update(z, b["label"], b["index"], images)
        return search.result()

    def search_reference(boxes: bool = True):
        state = new_state(len(protos), protos.shape[1])
        for z, _, b in cached:
            reference_update(z, official_distances(z, protos), b["label"], b["index"].numpy(),
                             model.prototype_class_identity, rf, args.size, state, boxes)
        return state

    t_s_ours, c_s_ours, _, s_ours = timed(search_ours, device)
    t_s_ref, c_s_ref, _, s_ref = timed(search_reference, device)
    t_n_ours = timed(lambda: search_ours(records=False), device)[0]
    t_n_ref = timed(lambda: search_reference(boxes=False), device)[0]
    assert np.array_equal(s_ours.sample_index.cpu().numpy(), s_ref["sample_index"]), "searches disagree"

    med = lambda xs: float(np.median(xs))  # noqa: E731
    t_pass = med([x[0] for x in runs["pass"]])
    n = args.images
    print(f"push benchmark: {n} random {args.size}px images, {args.backbone} -> {h}x{h} maps, "
          f"P={len(protos)} prototypes, D={args.dim}, batch {args.batch_size}, device {device}, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds "
          f"(kernels loaded once before: {kernels_s:.2f} s)")
    print("wall seconds. search = push - pass: raw, and net (each run's own trunk + add-on time taken out); "
          "after-latent = distances + search + boxes + patches on cached latent maps")
    print(f"{'method':<20} {'push':>7} {'pass':>7} {'push/pass':>9} {'search raw':>10} {'search net':>10} "
          f"{'after-latent':>12} {'img/s':>6} {'peak MiB':>8}")
    table = {}
    for name, label, s in (("ours", "vectorised (ours)", t_s_ours), ("reference", "per-prototype loop", t_s_ref)):
        push = med([x[0] for x in runs[name]])
        raw = med([x[0] - p[0] for x, p in zip(runs[name], runs["pass"])])
        net = [(x[0] - x[3]) - (p[0] - p[3]) for x, p in zip(runs[name], runs["pass"])]
        table[name] = (med(net), s, net)
        print(f"{label:<20} {push:>7.2f} {t_pass:>7.2f} {push / t_pass:>9.3f} {raw:>10.3f} {med(net):>10.3f} {s:>12.3f} "
              f"{n / push:>6.1f} {max(x[2] for x in runs[name]):>8.0f}")
    print(f"{'inference pass':<20} {'':>7} {t_pass:>7.2f} {'':>9} {'':>10} {'':>10} {'':>12} {n / t_pass:>6.1f} "
          f"{max(x[2] for x in runs['pass']):>8.0f}")
    (n_o, a_o, nets_o), (n_r, a_r, nets_r) = table["ours"], table["reference"]
    outside = med([p[0] - p[3] for p in runs["pass"]])
    print(f"net search per round: ours {', '.join(f'{v:.3f}' for v in nets_o)}; loop {', '.join(f'{v:.3f}' for v in nets_r)} "
          f"(the pass spends {outside:.3f} s outside the network)")
    ratio = f"{n_r / n_o:.1f}x" if n_o > 0 else "unbounded (the push spends no more than a pass outside the network)"
    print(f"speed-up of ours: search (net) {ratio}, after-latent {a_r / a_o:.1f}x; same prototypes and receptive fields: yes")
    print(f"after-latent without boxes and patches (the nearest-patch search alone): ours {t_n_ours:.3f} s, "
          f"loop {t_n_ref:.3f} s, {t_n_ref / t_n_ours:.1f}x")
    pipnet_topk(args, device, loader)
    protopool_row(args, loader, device)


def pipnet_topk(args, device: torch.device, loader) -> None:
    """PIP-Net's top-k search (its records) against one inference pass of the same model."""
    torch.manual_seed(0)
    model = PIPNet(num_classes=args.classes, backbone=args.backbone, official_strides=args.pipnet_official_strides)
    model = model.to(device).eval()

    def one_pass():
        with torch.no_grad():
            for batch in loader:
                model(batch["image"].to(device))

    one_pass()  # warm-up
    runs: dict[str, list[float]] = {"pass": [], "search": []}
    for r in range(args.rounds):
        for name in (["pass", "search"] if r % 2 == 0 else ["search", "pass"]):
            runs[name].append(timed(one_pass if name == "pass" else lambda: model.push(loader), device)[0])
    med = lambda xs: float(np.median(xs))  # noqa: E731
    t_pass, t_search = med(runs["pass"]), med(runs["search"])
    with torch.no_grad():
        h = model.latent(loader.dataset[0]["image"][None].to(device)).shape[-1]
    print(f"PIP-Net top-k search (k={model.hparams.topk}): {args.backbone} -> {h}x{h} maps, P={model.num_prototypes} "
          f"channel prototypes, {'official' if args.pipnet_official_strides else 'own'} strides")
    print(f"{'method':<20} {'search':>7} {'pass':>7} {'search/pass':>11}")
    print(f"{'top-k search':<20} {t_search:>7.2f} {t_pass:>7.2f} {t_search / t_pass:>11.3f}"
          f"{'' if t_search / t_pass <= 1.1 else ' (over 1.1x)'}")


def protopool_row(args: argparse.Namespace, loader, device: torch.device) -> tuple[float, float]:
    """ProtoPool's push vs one inference pass of the same model over `loader` (medians of interleaved rounds)."""
    torch.manual_seed(0)
    model = ProtoPool(num_classes=args.classes, backbone=args.backbone, num_prototypes=args.classes + 2,
                      slots_per_class=args.per_class, prototype_dim=args.dim).to(device).eval()
    initial = model.prototype_vectors.detach().clone()

    def inference():
        with torch.no_grad():
            for batch in loader:
                model(batch["image"].to(device))

    def push():
        model.prototype_vectors.data.copy_(initial)
        model.slots_hardened.fill_(False)
        return model.push(loader)

    inference()
    times: dict[str, list[float]] = {"pass": [], "push": []}
    for r in range(args.rounds):
        for name in (["pass", "push"] * 2)[r % 2: r % 2 + 2]:
            times[name].append(timed({"pass": inference, "push": push}[name], device)[0])
    t_pass, t_push = float(np.median(times["pass"])), float(np.median(times["push"]))
    print(f"ProtoPool projection (P={model.num_prototypes}, {args.per_class} slots per class, slot-map constraint): "
          f"push {t_push:.2f} s, pass {t_pass:.2f} s, push/pass {t_push / t_pass:.3f} (target <= 1.1)")
    return t_push, t_pass


if __name__ == "__main__":
    main()
