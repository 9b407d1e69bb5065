"""Network Dissection cost: `explain.dissect` (streamed quantile, bincount + matmul IoU) against a plain
reference in the same run (all activations kept, exact torch quantiles, a loop over units and concepts).

    python benchmarks/dissect.py [--quick] [--device cpu|cuda]

Each variant runs in a fresh process so that its peak memory (max RSS above the RSS after building the
data on the CPU, peak allocated on a GPU) is its own. The model is one strided conv + ReLU, so the table shows the dissection machinery,
not a network's forward pass; the last column is the largest IoU difference from the reference.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_module
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def _setup(cfg: dict) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, cfg["units"], 4, stride=4), nn.ReLU()).to(cfg["device"]).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, cfg["images"], cfg["batch"]):
        b = min(cfg["batch"], cfg["images"] - start)
        images = torch.rand(b, 3, cfg["size"], cfg["size"], generator=g)
        # blocky concept maps: concepts on an 8 x 8 grid of cells, upsampled
        cells = torch.randint(0, cfg["concepts"] + 1, (b, 1, 8, 8), generator=g)
        maps = F.interpolate(cells.float(), size=(cfg["size"] // 2,) * 2, mode="nearest").long()
        batches.append({"image": images, "concept_maps": maps, "index": torch.arange(start, start + b)})
    return model, batches


def _ours(model: nn.Module, batches: list[dict], cfg: dict) -> torch.Tensor:
    from explain.concepts import ConceptSet
    from explain.dissect import dissect

    names = tuple(f"c{k}" for k in range(cfg["concepts"]))
    d = dissect(model, "1", batches, ConceptSet(names, ("any",) * len(names)), top_k=0, device=cfg["device"])
    return d.iou.float()


@torch.no_grad()
def _reference(model: nn.Module, batches: list[dict], cfg: dict) -> torch.Tensor:
    dev = cfg["device"]
    acts = torch.cat([model(b["image"].to(dev)) for b in batches])  # (N, C, h, w): every activation kept
    maps = torch.cat([b["concept_maps"] for b in batches]).to(dev)[:, 0]
    per_unit = acts.transpose(0, 1).flatten(1)
    thresholds = torch.stack([torch.quantile(u, 0.995) for u in per_unit])
    iou = torch.zeros(acts.shape[1], cfg["concepts"])
    for u in range(acts.shape[1]):
        region = F.interpolate(acts[:, u:u + 1], size=maps.shape[-2:], mode="bilinear", align_corners=False)[:, 0] > thresholds[u]
        for k in range(cfg["concepts"]):
            label = maps == k + 1
            inter = (region & label).sum()
            iou[u, k] = inter / (region.sum() + label.sum() - inter).clamp(min=1)
    return iou


def _run(name: str, cfg: dict, queue: mp.Queue) -> None:
    torch.set_num_threads(cfg["threads"])
    model, batches = _setup(cfg)
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/statm") as fh:  # resident pages now: the baseline the peak is measured above
        baseline = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    start = time.perf_counter()
    iou = (_ours if name == "ours" else _reference)(model, batches, cfg)
    if cfg["device"] == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline  # ru_maxrss is in KiB on Linux
    queue.put((time.perf_counter() - start, peak, iou.cpu().numpy()))  # numpy: no shared-memory handles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small problem in one process (seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = dict(images=32, size=32, units=32, concepts=4, batch=16) if args.quick else \
        dict(images=500, size=112, units=128, concepts=20, batch=50)
    cfg.update(device=args.device, threads=args.threads)
    ctx = mp.get_context("spawn")
    results = {}
    for name in ("ours", "reference"):
        if args.quick:  # a smoke run: in this process (peak memory is then not per variant)
            local: queue_module.Queue = queue_module.Queue()
            _run(name, cfg, local)
            results[name] = local.get()
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(name, cfg, queue))
        proc.start()
        results[name] = queue.get()
        proc.join()
    print(f"Network Dissection, {cfg['images']} images {cfg['size']} px, {cfg['units']} units, {cfg['concepts']} concepts, "
          f"masks {cfg['size'] // 2} px, {args.device}, {args.threads} threads")
    print(f"{'variant':<34} {'time s':>8} {'images/s':>10} {'peak MiB':>9} {'max |dIoU|':>11}")
    ref_iou = torch.from_numpy(results["reference"][2])
    labels = {"ours": "explain.dissect (streamed)", "reference": "plain: all activations + loops"}
    for name, (seconds, peak, iou) in results.items():
        diff = (torch.from_numpy(iou) - ref_iou).abs().max().item()
        print(f"{labels[name]:<34} {seconds:>8.2f} {cfg['images'] / seconds:>10.1f} {peak:>9.0f} {diff:>11.4f}")


if __name__ == "__main__":
    main()
