"""Training-step overhead of each family against the same backbone as a plain timm classifier.

One step = forward + backward + optimiser step on the same batch. Median of `--repeats` timed steps
after warm-up; throughput in images/s; peak memory (CUDA) or peak RSS growth (CPU). Target: each
family's step <= 1.15x the plain classifier's.

    python benchmarks/train_step.py                # ResNet-18, batch 32, 224 px
    python benchmarks/train_step.py --quick        # batch 4, 32 px, 10 classes, 2 repeats
    python benchmarks/train_step.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import CAMNet, InterpretableCNN, PlainClassifier, ProtoPNet, ProtoTree  # noqa: E402


def build(family: str, classes: int, backbone: str) -> torch.nn.Module:
    if family == "plain timm classifier":
        return PlainClassifier(num_classes=classes, architecture=backbone)
    if family == "CAMNet":
        return CAMNet(num_classes=classes, backbone=backbone)
    if family == "ProtoPNet":
        return ProtoPNet(num_classes=classes, backbone=backbone, prototypes_per_class=10, prototype_dim=128)
    if family == "ProtoTree":
        return ProtoTree(num_classes=classes, backbone=backbone, depth=9)
    if family == "InterpretableCNN":
        return InterpretableCNN(num_classes=classes, backbone=backbone)
    raise ValueError(family)


def loss_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The family's own training loss (all its terms), or cross-entropy for a plain classifier."""
    if hasattr(model, "compute_losses"):
        try:
            return model.compute_losses(images, labels)[1]["loss"]
        except NotImplementedError:
            pass
    return F.cross_entropy(model(images), labels)


def time_steps(model, images, labels, repeats: int, warmup: int, device: str) -> tuple[float, float]:
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(warmup + repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, images, labels).backward()
        optimizer.step()
        if device == "cuda":
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024)
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.size, args.repeats, args.classes = 4, 32, 2, 10
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    labels = torch.randint(0, args.classes, (args.batch,), device=args.device)
    families = ["plain timm classifier", "CAMNet", "ProtoPNet", "ProtoTree", "InterpretableCNN"]
    rows = []
    for family in families:
        model = build(family, args.classes, args.backbone)
        seconds, peak = time_steps(model, images, labels, args.repeats, 2, args.device)
        rows.append({"family": family, "seconds": seconds, "throughput": args.batch / seconds, "peak_mib": peak})
    base = rows[0]["seconds"]
    mem = "peak CUDA MiB" if args.device == "cuda" else "peak RSS growth MiB"
    print(f"training step, {args.backbone}, batch {args.batch}, {args.size} px, {args.classes} classes, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"| family | step (ms) | images/s | {mem} | vs plain (target <= 1.15x) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["seconds"] / base
        print(f"| {r['family']} | {1000 * r['seconds']:.1f} | {r['throughput']:.1f} | {r['peak_mib']:.0f} | "
              f"{ratio:.2f}x{'' if ratio <= 1.15 else ' (over)'} |")
    return rows


if __name__ == "__main__":
    main()
