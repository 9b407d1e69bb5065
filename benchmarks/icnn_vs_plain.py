"""Interpretable CNN, with each filter-loss rule, vs the same network without the filter loss (and an
ordinary CNN) on SyntheticParts.

Networks: ``paper_rule`` (Eq. 4, configs/icnn/synthetic.yaml), ``released_rule`` (the released code's
backward, configs/icnn/synthetic_released_code.yaml), ``no_filter_loss`` (lambda = 0) and ``ordinary``
(a CAM-style CNN with a plain 3x3 conv). Each trains with the same seed, data and schedule; then its
filters of the new 3x3 conv are scored on the test split, each filter on the test images of its class
and on all test images:
- part interpretability (higher is better) on the map the head reads (the masked map; the ordinary CNN:
  its conv after ReLU), filter classes by the paper's rule (class-wise mean of mean_ij x);
- location instability (lower is better) on the conv's raw pre-ReLU output, as the released
  `computeStability.m` reads it (``--li-map masked``: the masked map instead), filter classes by the
  released multi-class script's rule (class-wise mean of max_ij x on that map).
Prints one table with accuracy, metrics, training time, throughput and the process's peak memory.

    python benchmarks/icnn_vs_plain.py               # a few minutes per network on 2 CPU threads
    python benchmarks/icnn_vs_plain.py --quick       # smoke run (32 images at 32 px, 1 epoch)
    python benchmarks/icnn_vs_plain.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from explain.filter_metrics import filter_class_assignment, location_instability, part_interpretability  # noqa: E402
from models import Backbone, CAMNet, InterpretableCNN  # noqa: E402
from train.data import SyntheticParts  # noqa: E402


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-wide, monotone


class EpochLog(pl.Callback):
    """One line per epoch on stderr, so long CPU runs show progress."""

    def __init__(self, kind: str) -> None:
        self.kind, self.start = kind, time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and "step" not in k}
        print(f"[{self.kind}] epoch {trainer.current_epoch} {time.perf_counter() - self.start:.0f}s "
              + " ".join(f"{k}={v:.4g}" for k, v in sorted(logged.items())), file=sys.stderr, flush=True)


def build(kind: str, args: argparse.Namespace, num_classes: int) -> pl.LightningModule:
    common = dict(num_classes=num_classes, backbone=args.backbone, stage=args.stage, lr=args.lr,
                  weight_decay=args.weight_decay, scheduler="cosine")
    if kind == "ordinary":
        return CAMNet(extra_conv=Backbone(args.backbone, stage=args.stage).out_channels, **common)
    rule = "released_code" if kind == "released_rule" else "paper"
    weight = {"paper_rule": args.filter_loss_weight, "released_rule": args.released_weight}.get(kind, 0.0)
    return InterpretableCNN(filter_loss_weight=weight, filter_loss_warmup=args.warmup, variant=args.variant, filter_loss=rule,
                            tau=args.tau, normalize_filter_gradient=not args.raw_eq4, clip_log_ratio=not args.no_clip,
                            category_assignment=args.categories, **common)


def evaluate(model: pl.LightningModule, kind: str, dm: SyntheticParts, image_size: int, li_map: str) -> dict:
    layer = model.extra if kind == "ordinary" else model.feature_layer
    if li_map == "raw":
        li_layer = model.extra[0] if kind == "ordinary" else model.raw_feature_layer
    else:
        li_layer = layer
    rf = model.backbone.receptive_field(image_size)  # same cell centres for every network
    loader = dm.test_dataloader()
    classes = filter_class_assignment(model, layer, loader, dm.num_classes, statistic="mean")
    pi_all = part_interpretability(model, layer, loader)
    pi_cls = part_interpretability(model, layer, loader, thresholds=pi_all.thresholds, filter_classes=classes)
    li_classes = filter_class_assignment(model, li_layer, loader, dm.num_classes, statistic="max")
    li_all = location_instability(model, li_layer, loader, receptive_field=rf)
    li_cls = location_instability(model, li_layer, loader, receptive_field=rf, filter_classes=li_classes)
    return {"part_interp_class": pi_cls.value, "part_interp_all": pi_all.value,
            "loc_instab_class": li_cls.value, "loc_instab_all": li_all.value,
            "filters_per_class": torch.bincount(classes, minlength=dm.num_classes).tolist(),
            "li_filters_per_class": torch.bincount(li_classes, minlength=dm.num_classes).tolist()}


def run(kind: str, args: argparse.Namespace, dm: SyntheticParts) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    model = build(kind, args, dm.num_classes)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[EpochLog(kind)])
    start = time.perf_counter()
    if args.load:  # evaluate networks saved by an earlier --save run instead of training them
        model.load_state_dict(torch.load(os.path.join(args.load, f"{kind}.pt"), weights_only=True))
    else:
        trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    model.eval()
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(args.save, f"{kind}.pt"))
    row = {"network": kind, "lambda": getattr(model, "filter_loss_weight", 0.0), "test_acc": acc,
           "train_s": seconds, "img_per_s": 0.0 if args.load else args.epochs * args.train_size / seconds,
           "peak_mb": peak_memory_mb()}
    row.update(evaluate(model, kind, dm, args.image_size, args.li_map))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data and one epoch (smoke test)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--stage", type=int, default=2, help="resnet18 stage 2 = layer2: 8x8 maps at 64 px")
    parser.add_argument("--filter-loss-weight", type=float, default=0.003, help="lambda of the paper rule (configs/icnn/synthetic.yaml)")
    parser.add_argument("--released-weight", type=float, default=400.0,
                        help="lambda of the released rule (configs/icnn/synthetic_released_code.yaml; 1 = the code's own scale)")
    parser.add_argument("--li-map", default="raw", choices=["raw", "masked"],
                        help="map read for location instability: the conv's raw output (released code) or the masked map")
    parser.add_argument("--warmup", type=int, default=2, help="epochs before the filter loss is switched on")
    parser.add_argument("--raw-eq4", action="store_true", help="no per-filter normalisation of the Eq. 4 gradient")
    parser.add_argument("--no-clip", action="store_true", help="Eq. 4 also where log p(x|T_hat) / p(x) < 0")
    parser.add_argument("--categories", default="balanced", choices=["ema", "frozen", "balanced"],
                        help="filter categories: the EMA argmax throughout, or fixed after the warm-up")
    parser.add_argument("--variant", default="released_code", choices=["paper", "released_code"], help="as configs/icnn/synthetic.yaml")
    parser.add_argument("--tau", default="n2")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    networks = ["paper_rule", "released_rule", "no_filter_loss", "ordinary"]
    parser.add_argument("--networks", nargs="+", default=networks, choices=networks)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--save", default=None, help="folder for the trained networks' state dicts")
    parser.add_argument("--load", default=None, help="folder of state dicts (from --save) to evaluate without training")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_size, args.test_size, args.image_size = 1, 32, 32, 32
    torch.set_num_threads(args.threads)
    dm = SyntheticParts(num_classes=args.num_classes, image_size=args.image_size, train_size=args.train_size,
                        val_size=32 if args.quick else 64, test_size=args.test_size, batch_size=args.batch_size, seed=args.seed)
    rows = [run(kind, args, dm) for kind in args.networks]
    print(f"\nSyntheticParts-{args.num_classes} at {args.image_size} px, {args.backbone} stage {args.stage}, "
          f"{args.epochs} epochs x {args.train_size} images (filter loss from epoch {args.warmup}), variant {args.variant}, "
          f"tau {args.tau} (paper rule; the released rule: 2 / n^2), location instability on the {args.li_map} map, seed {args.seed}")
    header = (f"{'network':<15} {'lambda':>6} {'test acc':>8} {'PI class':>8} {'PI all':>7} {'LI class':>8} "
              f"{'LI all':>7} {'train s':>8} {'img/s':>6} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['network']:<15} {r['lambda']:>6.2g} {r['test_acc']:>8.3f} {r['part_interp_class']:>8.3f} "
              f"{r['part_interp_all']:>7.3f} {r['loc_instab_class']:>8.4f} {r['loc_instab_all']:>7.4f} "
              f"{r['train_s']:>8.0f} {r['img_per_s']:>6.1f} {r['peak_mb']:>8.0f}")
    print("PI = part interpretability (higher is better), LI = location instability (lower is better);\n"
          "'class': each filter on the test images of its class, 'all': on every test image.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
