"""ProtoPNet's last-layer phase: cached similarities against recomputing the network every pass.

In last-layer epochs only the last layer trains, so the min distances of every training image are
fixed: `cache_last_layer` computes them in one inference pass (after each push) and trains on them
for all passes. Both paths here run the model's own training-step code (`ProtoPNet.batch_losses`,
then backward and Adam on the last layer) over the same pre-collated, shuffled batches in the same
order, for the same number of passes, from the same weights; the resulting last layers must agree
(asserted). Data loading and Lightning's per-step overhead are excluded from both.
Target: >= 10x.

    python benchmarks/last_layer.py                # ResNet-18, 500 images at 224 px, 200 classes, 20 passes
    python benchmarks/last_layer.py --quick        # 32 images at 48 px, 8 classes: a smoke run
    python benchmarks/last_layer.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import timed  # noqa: E402
from models import ProtoPNet  # noqa: E402


def make_batches(n: int, classes: int, size: int, batch: int, passes: int, device: torch.device) -> list[list[dict]]:
    """Per pass, a shuffled list of dict batches ("image", "label", "index") already on the device."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g).to(device)
    labels = (torch.arange(n) % classes).to(device)
    epochs = []
    for _ in range(passes):
        order = torch.randperm(n, generator=g).to(device)
        epochs.append([{"image": images[i], "label": labels[i], "index": i} for i in order.split(batch)])
    return epochs


def train_passes(model: ProtoPNet, epochs: list[list[dict]]) -> None:
    """The last-layer training steps of `ProtoPNet.training_step`, without Lightning."""
    optimizer = torch.optim.Adam(model.last_layer.parameters(), lr=model.hparams.last_layer_lr)
    for batches in epochs:
        for batch in batches:
            loss = model.batch_losses(batch, "train")[2]["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 images at 48 px, 8 classes: a smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=80)
    parser.add_argument("--passes", type=int, default=20, help="last-layer passes per push (official: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cached phase (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.size, args.classes, args.batch, args.repeats = 32, 48, 8, 16, 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    # freeze_bn_stats: the recomputing path then sees the same (eval-mode) trunk as the cache.
    model = ProtoPNet(num_classes=args.classes, backbone=args.backbone, prototypes_per_class=args.per_class,
                      prototype_dim=args.dim, freeze_bn_stats=True, last_layer_lr=1e-3).to(device)
    model.set_phase("last")
    model.train()
    epochs = make_batches(args.images, args.classes, args.size, args.batch, args.passes, device)
    push_order = [{"image": b["image"], "label": b["label"], "index": b["index"]} for b in epochs[0]]
    initial = model.last_layer.weight.detach().clone()

    def recompute() -> torch.Tensor:
        model._use_cache = False  # what ProtoPNet.on_train_epoch_start decides per epoch
        model.last_layer.weight.data.copy_(initial)
        train_passes(model, epochs)
        return model.last_layer.weight.detach().clone()

    def cached() -> torch.Tensor:
        model.last_layer.weight.data.copy_(initial)
        model.build_similarity_cache(push_order)  # the one inference pass after a push
        model._use_cache = True
        train_passes(model, epochs)
        return model.last_layer.weight.detach().clone()

    def build_only() -> None:
        model.build_similarity_cache(push_order)

    def passes_only() -> None:
        model._use_cache = True
        train_passes(model, epochs)

    train_passes(model, [epochs[0][:2]])  # warm-up (allocator, kernels)
    runs = [timed(cached, device) for _ in range(args.repeats)]
    t_cached, c_cached, m_cached, w_cached = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    t_build, c_build, m_build, _ = timed(build_only, device)
    t_passes, c_passes, m_passes, _ = timed(passes_only, device)
    t_full, c_full, m_full, w_full = timed(recompute, device)  # once: it is the slow one
    same = torch.allclose(w_cached, w_full, atol=1e-4, rtol=1e-3)
    assert same, f"cached and recomputed last layers differ by {(w_cached - w_full).abs().max().item():.3g}"

    seen = args.images * args.passes
    print(f"last-layer phase, {args.backbone}, {args.images} images at {args.size} px, P={model.num_prototypes} "
          f"prototypes, D={args.dim}, batch {args.batch}, {args.passes} passes, {device.type}, "
          f"{torch.get_num_threads()} threads; cached: median of {args.repeats}")
    mem = "peak CUDA MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"| path | time (s) | CPU s | image-passes/s | {mem} | vs recompute (target >= 10x) |")
    print("|---|---|---|---|---|---|")
    rows = [("recompute the network every pass", t_full, c_full, m_full),
            ("cached: build (1 inference pass)", t_build, c_build, m_build),
            (f"cached: {args.passes} passes on the cache", t_passes, c_passes, m_passes),
            ("cached: whole phase", t_cached, c_cached, m_cached)]
    for name, t, c, m in rows:
        ratio = t_full / t
        print(f"| {name} | {t:.3f} | {c:.3f} | {seen / t:.0f} | {m:.0f} | {ratio:.1f}x |")
    ratio = t_full / t_cached
    print(f"whole phase {ratio:.1f}x faster ({'meets' if ratio >= 10 else 'misses'} the 10x target); "
          f"same last layer: {'yes' if same else 'no'}; cache {model.similarity_cache.numel() * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
