"""Batched deletion / insertion (explain.metrics) against a per-image loop, the way RISE's CausalMetric
and Quantus run them: one image at a time, one forward pass per step, pixels replaced in place.

ResNet-18 (timm, random weights) at 224 px; every variant runs in its own process, so the peak memory
column is that variant's own (GPU: max allocated; CPU: max resident set). The AUCs of both variants are
compared, then the table is printed with the speed-up of the batched version.

    python benchmarks/metrics.py            # 4 images, step 1792 (RISE's batched evaluation: 28 steps)
    python benchmarks/metrics.py --quick    # deletion only, 1 image at 64 px, small batch, one process
    python benchmarks/metrics.py --step 224 # RISE's demo step (224 steps per image)

A second table times attribution methods written over a library (images per second, batch 64) against
the library's own call on the same batch: LRP (EpsilonPlusFlat) against Zennit's ``Gradient`` with
``ResNetCanonizer``, Guided Grad-CAM and Deconvnet against captum, FullGrad against one plain
gradient pass (it has no library), on torchvision's ResNet-18 (random weights), where Zennit's
canonizer fits.

A third table times the optimisation and region methods of ``explain.posthoc.attribute`` (XRAI,
extremal perturbations, meaningful perturbation; captum has none of them) batched against a per-image
loop of the same calls, at 64 px with fewer steps/iterations than their defaults (given in the table).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def _setup(args: dict):
    import timm

    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(args["images"], 3, args["size"], args["size"], generator=gen).to(device)
    heatmaps = torch.rand(args["images"], args["size"], args["size"], generator=gen).to(device)
    return model, images, heatmaps, device


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop_auc(model, image, heatmap, start, finish, step) -> float:
    """One image: rank pixels, then n_steps + 1 single-image forwards, replacing `step` pixels each time."""
    n = heatmap.numel()
    n_steps = math.ceil(n / step)
    order = heatmap.flatten().argsort(descending=True, stable=True)
    with torch.no_grad():
        target = int(model(image[None]).argmax(1))
        current, finish = start.clone().flatten(1), finish.flatten(1)
        scores = []
        for i in range(n_steps + 1):
            scores.append(float(torch.softmax(model(current.view(1, *image.shape)), 1)[0, target]))
            idx = order[i * step:(i + 1) * step]
            current[:, idx] = finish[:, idx]
    return (sum(scores) - scores[0] / 2 - scores[-1] / 2) / n_steps


def run_variant(args: dict) -> dict:
    from explain import metrics as M

    model, images, heatmaps, device = _setup(args)
    with torch.no_grad():
        model(images[:1])  # warm-up
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    if args["variant"] == "batched":
        kw = {"step": args["step"], "batch_size": args["batch_size"]}
        aucs = M.deletion(model, images, heatmaps, **kw) if args["metric"] == "deletion" else M.insertion(model, images, heatmaps, **kw)
        aucs = aucs.tolist()
    else:
        base = torch.zeros(1, 3, 1, 1, device=device)  # a timm model takes normalised input: its zero
        aucs = []
        for b in range(len(images)):
            if args["metric"] == "deletion":
                start, finish = images[b], base[0].expand_as(images[b])
            else:
                start, finish = M.blur(images[b:b + 1], base)[0], images[b]
            aucs.append(_loop_auc(model, images[b], heatmaps[b], start, finish, args["step"]))
    _sync(device)
    seconds = time.perf_counter() - tic
    return {"seconds": seconds, "peak_mb": _peak_mb(device), "aucs": aucs}


def _attribution_calls(model, images, target):
    """{method: (ours, the library's own call or a plain reference, reference name)}, each -> (B, H, W)."""
    from captum.attr import Deconvolution, GuidedGradCam, Saliency
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    from explain.posthoc import attribute

    def zennit_lrp():
        with Gradient(model, EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attributor:
            seed = torch.nn.functional.one_hot(target, 1000).to(images)
            return attributor(images, lambda out: seed * out)[1].sum(1)

    ours = lambda method, **kw: lambda: attribute(model, images, target, method=method, **kw)  # noqa: E731
    gradient = lambda: Saliency(model).attribute(images, target=target, abs=False).sum(1)  # noqa: E731
    return {
        "lrp": (ours("lrp"), zennit_lrp, "zennit"),
        "guided_gradcam": (ours("guided_gradcam", layer="layer4"), lambda: GuidedGradCam(model, model.layer4).attribute(
            images, target=target, interpolate_mode="bilinear").sum(1), "captum"),
        "deconvnet": (ours("deconvnet"), lambda: Deconvolution(model).attribute(images, target=target).sum(1), "captum"),
        "fullgrad": (ours("fullgrad"), gradient, "gradient"),
        "fullgrad_simple": (ours("fullgrad_simple"), gradient, "gradient"),
    }


def attribution_table(batch: int, size: int, threads: int, device: str, repeats: int = 3) -> None:
    """Print images/s of each method and of its reference (the fastest of `repeats` alternating runs in
    this process)."""
    import torchvision

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = torchvision.models.resnet18(num_classes=1000).to(device).eval()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        target = model(images).argmax(1)
    print(f"\nattribution methods: torchvision ResNet-18 (random weights), {size} px, batch {batch}, device {device}, "
          f"{threads} CPU thread(s), fastest of {repeats}")
    print(f"{'method':<16} {'variant':<9} {'time [s]':>9} {'images/s':>9} {'ours/ref':>9} {'max |diff|':>11}")
    dev = torch.device(device)
    for method, (ours, reference, name) in _attribution_calls(model, images, target).items():
        results = {"ours": (math.inf, None), name: (math.inf, None)}
        ours(), reference()  # warm-up
        for _ in range(repeats):  # alternating, the fastest of `repeats` (the machine may be shared)
            for variant, fn in (("ours", ours), (name, reference)):
                _sync(dev)
                tic = time.perf_counter()
                out = fn()
                _sync(dev)
                results[variant] = (min(results[variant][0], time.perf_counter() - tic), out.detach())
        diff = float((results["ours"][1] - results[name][1]).abs().max()) if name != "gradient" else float("nan")
        for variant, (sec, _) in results.items():
            ratio = results["ours"][0] / results[name][0]
            print(f"{method:<16} {variant:<9} {sec:>9.2f} {batch / sec:>9.1f} {ratio:>8.2f}x {diff:>11.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="default 224 (--quick: 64)")
    p.add_argument("--step", type=int, default=None, help="pixels per step (default 224 * 8)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attr-batch", type=int, default=None, help="attribution table: batch (default 64; --quick: 2)")
    p.add_argument("--attr-size", type=int, default=None, help="attribution table: image size (default --size)")
    p.add_argument("--attr-only", action="store_true", help="only the attribution table")
    p.add_argument("--explain-only", action="store_true", help="only the table of the explanation methods")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    a.size = a.size or (64 if a.quick else 224)
    common = {"images": a.images or (1 if a.quick else 4), "size": a.size, "step": a.step or 8 * a.size,
              "batch_size": a.batch_size or (16 if a.quick else 64), "threads": a.threads, "device": a.device}
    steps = math.ceil(a.size * a.size / common["step"]) + 1
    ctx = mp.get_context("spawn")
    rows = []
    for metric in () if a.attr_only or a.explain_only else ("deletion",) if a.quick else ("deletion", "insertion"):
        results = {}
        for variant in ("loop", "batched"):
            if a.quick:  # a smoke run: in this process (peak memory is then not per variant)
                results[variant] = run_variant({**common, "metric": metric, "variant": variant})
                continue
            with ctx.Pool(1) as pool:
                results[variant] = pool.apply(run_variant, ({**common, "metric": metric, "variant": variant},))
        diff = max(abs(x - y) for x, y in zip(results["loop"]["aucs"], results["batched"]["aucs"]))
        for variant, r in results.items():
            rows.append((metric, variant, r["seconds"], common["images"] * steps / r["seconds"], r["peak_mb"],
                         results["loop"]["seconds"] / r["seconds"], diff))
    print(f"ResNet-18 (random weights), {a.size} px, {common['images']} image(s), step {common['step']} "
          f"({steps} forward images per image), device {a.device}, {a.threads} CPU thread(s), "
          f"batch {common['batch_size']}")
    print(f"{'metric':<10} {'variant':<8} {'time [s]':>9} {'img-steps/s':>12} {'peak [MB]':>10} {'speed-up':>9} {'max |dAUC|':>11}")
    for metric, variant, sec, thr, mem, ratio, diff in rows:
        print(f"{metric:<10} {variant:<8} {sec:>9.2f} {thr:>12.1f} {mem:>10.0f} {ratio:>8.2f}x {diff:>11.2e}")
    if not a.explain_only:
        attribution_table(a.attr_batch or (2 if a.quick else 64), a.attr_size or a.size, a.threads, a.device,
                          repeats=1 if a.quick else 3)
    if not a.attr_only:
        explanation_table(a)


EXPLAIN_OPTIONS = {"xrai": {"steps": 20}, "extremal": {"max_iter": 20}, "meaningful": {"iterations": 20}}


def explanation_table(a: argparse.Namespace) -> None:
    """Images per second of XRAI, extremal and meaningful perturbation: one batch vs a per-image loop."""
    from explain.posthoc import attribute

    from benchmarks.common import timed

    torch.manual_seed(0)
    device = torch.device(a.device)
    size, n = (32, 2) if a.quick else (64, a.images or 64)
    model = timm_resnet18(device)
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    target = torch.arange(n, device=device) % 10
    print(f"\nExplanation methods: ResNet-18 (random weights, 10 classes), {size} px, batch {n}, device {a.device}")
    print(f"{'method':<11} {'options':<16} {'variant':<8} {'time [s]':>9} {'images/s':>9} {'speed-up':>9} {'max |diff|':>11}")
    for method, options in EXPLAIN_OPTIONS.items():
        options = {k: max(2, v // 5) for k, v in options.items()} if a.quick else options
        wall_b, _, _, batched = timed(lambda: attribute(model, images, target, method=method, **options), device)
        wall_l, _, _, loop = timed(lambda: torch.cat([attribute(model, images[i:i + 1], target[i:i + 1], method=method,
                                                                **options) for i in range(n)]), device)
        diff = float((batched - loop).abs().max())
        text = ",".join(f"{k}={v}" for k, v in options.items())
        for variant, wall in (("loop", wall_l), ("batched", wall_b)):
            print(f"{method:<11} {text:<16} {variant:<8} {wall:>9.2f} {n / wall:>9.2f} {wall_l / wall:>8.2f}x {diff:>11.2e}")


def timm_resnet18(device: torch.device) -> torch.nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10).to(device).eval()


if __name__ == "__main__":
    main()
