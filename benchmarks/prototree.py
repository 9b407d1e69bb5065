"""ProtoTree's tree head: the vectorised forward + derivative-free leaf update vs a recursive reference.

Both sides get the same (B, P, 7, 7) distance maps (the trunk and add-on are identical and left out)
and run one training step of the tree in log mode: forward, NLL backward, leaf update. The reference
is the straightforward recursion over node objects, as in the official code: each branch combines its
children with logsumexp and stores every node's path probability, and the leaf update loops over the
leaves. Each side runs in its own subprocess, so the peak memory (RSS growth on CPU, allocator peak on
CUDA) is its own.

    python benchmarks/prototree.py            # depth 9 (K 200) and 11 (K 196), batch 64
    python benchmarks/prototree.py --quick    # depth 9 only, batch 8, fewer repeats
    python benchmarks/prototree.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.prototree import ProtoTree, leaf_update, log1mexp  # noqa: E402

CASES = [(9, 200), (11, 196)]  # (depth, classes): the paper's CUB and Cars trees


class RecursiveTree:
    """Reference: node objects, one recursive call per node, a Python loop over leaves for the update."""

    def __init__(self, depth: int, leaves: torch.Tensor) -> None:
        self.depth, self.leaves, self.num_internal = depth, leaves, 2**depth - 1

    def forward(self, min_d: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        log_p = -min_d
        log_1mp = log1mexp(min_d)
        path: dict[int, torch.Tensor] = {}

        def visit(node: int, pa: torch.Tensor) -> torch.Tensor:
            path[node] = pa
            if node >= self.num_internal:
                return torch.log_softmax(self.leaves[node - self.num_internal], dim=0).expand(len(pa), -1)
            left = visit(2 * node + 1, pa + log_1mp[:, node])
            right = visit(2 * node + 2, pa + log_p[:, node])
            return torch.logsumexp(torch.stack((log_1mp[:, node, None] + left, log_p[:, node, None] + right)), dim=0)

        return visit(0, torch.zeros(min_d.shape[0])), path

    @torch.no_grad()
    def update(self, start: torch.Tensor, num_batches: int, path: dict, log_y: torch.Tensor, labels: torch.Tensor) -> None:
        log_target = torch.log(F.one_hot(labels, self.leaves.shape[1]).float())
        for leaf in range(self.leaves.shape[0]):
            log_sigma = torch.log_softmax(self.leaves[leaf], dim=0)
            pa = path[self.num_internal + leaf].detach()[:, None]
            update = torch.exp(torch.logsumexp(pa + log_sigma + log_target - log_y, dim=0))
            self.leaves[leaf] = F.relu(self.leaves[leaf] - start[leaf] / num_batches) + update


def step_vectorised(tree: ProtoTree, maps: torch.Tensor, labels: torch.Tensor) -> None:
    maps.grad = None
    out = tree.tree_from_distances(maps)
    F.nll_loss(out.logits, labels).backward()
    tree.leaves.copy_(leaf_update(tree.leaves, tree.leaves, 10, out.path.detach(), out.y.detach(), labels, True))


def step_recursive(tree: RecursiveTree, maps: torch.Tensor, labels: torch.Tensor) -> None:
    maps.grad = None
    log_y, path = tree.forward(maps.flatten(2).amin(dim=2))
    F.nll_loss(log_y, labels).backward()
    tree.update(tree.leaves.clone(), 10, path, log_y.detach(), labels)


def worker(method: str, depth: int, classes: int, batch: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    num_internal = 2**depth - 1
    maps = (torch.rand(batch, num_internal, 7, 7, device=device) * 3).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), device=device)
    leaves = torch.rand(2**depth, classes, device=device) * 5
    if method == "vectorised":
        tree = ProtoTree(num_classes=classes, depth=depth, num_features=8, backbone="test_resnet").to(device)
        tree.leaves.copy_(leaves)
        step = lambda: step_vectorised(tree, maps, labels)  # noqa: E731
        with torch.no_grad():
            log_y = tree.tree_from_distances(maps).logits
    else:
        ref = RecursiveTree(depth, leaves)
        step = lambda: step_recursive(ref, maps, labels)  # noqa: E731
        with torch.no_grad():
            log_y = ref.forward(maps.flatten(2).amin(dim=2))[0]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # inputs and model already allocated
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024)
    return {"ms_per_step": 1000 * seconds, "img_per_s": batch / seconds, "peak_mb": peak, "log_y": log_y.cpu().tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="depth 9 only, batch 8, fewer repeats, one process")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", nargs=5, metavar=("METHOD", "DEPTH", "K", "BATCH", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if args.worker:
        method, depth, k, batch, repeats = args.worker
        print(json.dumps(worker(method, int(depth), int(k), int(batch), int(repeats), device)))
        return
    batch = args.batch or (8 if args.quick else 64)
    print(f"device {device}, {args.threads} threads, batch {batch}, log mode; one tree training step "
          "(forward, NLL backward, leaf update)")
    print(f"{'depth':>5} {'K':>4} {'method':<11} {'ms/step':>9} {'img/s':>9} {'peak MB':>8} {'speed-up':>8} {'|d log y|':>9}")
    for depth, k in CASES[:1] if args.quick else CASES:
        rows = {}
        for method in ("recursive", "vectorised"):
            repeats = (1 if args.quick else 2) if method == "recursive" else (2 if args.quick else 10)
            if args.quick:  # a smoke run: in this process (peak memory is then not per method)
                rows[method] = worker(method, depth, k, batch, repeats, device)
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--device", device,
                   "--worker", method, str(depth), str(k), str(batch), str(repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        diff = (torch.tensor(rows["recursive"]["log_y"]) - torch.tensor(rows["vectorised"]["log_y"])).abs().max()
        for method, r in rows.items():
            ratio = rows["recursive"]["ms_per_step"] / r["ms_per_step"]
            print(f"{depth:>5} {k:>4} {method:<11} {r['ms_per_step']:>9.1f} {r['img_per_s']:>9.1f} "
                  f"{r['peak_mb']:>8.1f} {ratio:>7.1f}x {float(diff):>9.1e}")
    print("speed-up = recursive time / this method's time (same inputs, same process setup); "
          "|d log y| = largest difference of the two forwards' outputs")


if __name__ == "__main__":
    main()
