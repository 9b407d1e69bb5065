"""Training-step overhead of each family against the same backbone as a plain timm classifier.

One step = forward + backward + optimiser step on the same batch. Median of `--repeats` timed steps
after warm-up; throughput in images/s; peak memory (CUDA) or peak RSS growth (CPU). Target: each
family's step <= 1.15x the plain classifier's. PIP-Net: a batch of B images is B/2 images in two views, all
its phase-2 loss terms; "official strides" is its trunk with layer3 and layer4 at stride 1 (another network).

    python benchmarks/train_step.py                # ResNet-18, batch 32, 224 px
    python benchmarks/train_step.py --quick        # batch 4, 32 px, 10 classes, 2 repeats
    python benchmarks/train_step.py --device cuda
"""
from __future__ import annotations

import argparse
import inspect
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models import BcosNet, CAMNet, ConceptBottleneck, InterpretableCNN, PIPNet, PlainClassifier, ProtoPNet, ProtoPool, ProtoTree  # noqa: E402


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
        return InterpretableCNN(num_classes=classes, backbone=backbone, stage=4)  # the whole trunk, as the others
    if family == "BcosNet":  # the B-cos version of the same ResNet, with its BCE loss (not a cheaper variant)
        return BcosNet(num_classes=classes, architecture=backbone)
    if family.startswith("PIP-Net"):  # phase 2 ("full": all terms); a batch of B images is B/2 pairs of views
        model = PIPNet(num_classes=classes, backbone=backbone, official_strides="official" in family)
        model.set_phase("full")
        return model
    if family == "ProtoPool":  # the official pool for 200 classes: P = 202, 10 slots per class; its full joint loss
        model = ProtoPool(num_classes=classes, backbone=backbone, num_prototypes=classes + 2, slots_per_class=10,
                          prototype_dim=128)
        model.set_phase("joint")
        model.current_gumbel_scale.fill_(100.0)  # a Gumbel-softmax epoch (official scale at epoch 1: 183)
        return model
    if family == "ConceptBottleneck":  # joint, the paper's 112 concepts, 28 groups
        return ConceptBottleneck(num_classes=classes, num_concepts=112, concept_groups=[j // 4 for j in range(112)],
                                 backbone=backbone)
    raise ValueError(family)


def loss_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The family's own training loss (all its terms), or cross-entropy for a plain classifier."""
    if isinstance(model, PIPNet):
        return model.compute_losses(images, labels[: len(labels) // 2], plan=model.plan(model.hparams.epochs_pretrain + 20))[1]["loss"]
    if "concepts" in inspect.signature(getattr(model, "compute_losses", lambda: None)).parameters:
        concepts = torch.randint(0, 2, (len(labels), model.num_concepts), generator=torch.Generator().manual_seed(0))
        return model.compute_losses(images, labels, concepts.to(images.device))[1]["loss"]
    if hasattr(model, "compute_losses"):
        try:
            return model.compute_losses(images, labels)[1]["loss"]
        except NotImplementedError:
            pass
    return F.cross_entropy(model(images), labels)


class StepTimer:
    """One model's training steps: warm-up, then one timed step per call (so families can interleave)."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str) -> None:
        self.model, self.images, self.labels, self.device = model.to(device).train(), images, labels, device
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.times: list[float] = []

    def step(self) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss_of(self.model, self.images, self.labels).backward()
        self.optimizer.step()
        if self.device == "cuda":
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        return time.perf_counter() - t0


def peak_memory(device: str, rss_before: int) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024


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
    families = ["plain timm classifier", "CAMNet", "ProtoPNet", "ProtoTree", "InterpretableCNN", "BcosNet", "PIP-Net",
                "PIP-Net (official strides)", "ProtoPool", "ConceptBottleneck"]
    timers, peaks = {}, {}
    for family in families:  # build and warm up one after the other (memory growth per family) ...
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        timers[family] = StepTimer(build(family, args.classes, args.backbone), images, labels, args.device)
        for _ in range(2):
            timers[family].step()
        peaks[family] = peak_memory(args.device, rss_before)
    for _ in range(args.repeats):  # ... then time them interleaved, so load changes hit every family alike
        for family in families:
            timers[family].times.append(timers[family].step())
    rows = []
    for family in families:
        seconds = statistics.median(timers[family].times)
        rows.append({"family": family, "seconds": seconds, "throughput": args.batch / seconds, "peak_mib": peaks[family]})
    base = rows[0]["seconds"]
    mem = "peak CUDA MiB" if args.device == "cuda" else "peak RSS growth MiB"
    print(f"training step, {args.backbone}, batch {args.batch}, {args.size} px, {args.classes} classes, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    print(f"| family | step (ms) | images/s | {mem} | vs plain (target <= 1.15x) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["seconds"] / base
        print(f"| {r['family']} | {1000 * r['seconds']:.1f} | {r['throughput']:.1f} | {r['peak_mib']:.0f} | "
              f"{ratio:.2f}x{'' if ratio <= 1.15 else ' (over)'} |")
    return rows


if __name__ == "__main__":
    main()
