"""Train the released checkpoints with the repo's own configs and record them in the manifest.

    python checkpoints/build.py                     # every declared *.synthparts checkpoint
    python checkpoints/build.py cam_resnet18.synthparts --max_epochs 2   # one, shorter (a smoke run)

For each entry: `train.py fit` with its config and seed; the model the recipe's whole pipeline ends
with (`released_checkpoint`) is tested on the SyntheticParts test split, saved as a small weights-only
zoo file `checkpoints/<name>.pt`, and the manifest records file, sha256, size, accuracy, the exact
command, seed, data arguments, and the builder overrides that rebuild its architecture.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: python checkpoints/build.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models.pretrained import CHECKPOINT_DIR, MANIFEST, pretrained_entry, save_zoo_checkpoint, sha256_of  # noqa: E402
from models.registry import builder_of  # noqa: E402


def released_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint a finished run releases: what the recipe's whole pipeline ends with.

    ``final.ckpt``, written at the end of fit (after the last push, pruning and projection), when the
    run wrote one, else ``last.ckpt``. Never ``best*.ckpt``: the monitored best of a prototype model is
    an epoch before the push or projection, whose prototypes are not image patches.
    """
    folder = Path(run_dir) / "checkpoints"
    for name in ("final.ckpt", "last.ckpt"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    raise FileNotFoundError(f"{folder} has neither final.ckpt nor last.ckpt (found: {', '.join(found) or 'nothing'})")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)  # tuples and lists compare equal, as in the manifest


def builder_overrides(builder: str, init_args: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a released model that differ from its builder's defaults, so that
    ``create_model(builder, **overrides)`` builds it again (weights aside)."""
    defaults = dict(builder_of(builder)().hparams)
    return {k: v for k, v in init_args.items() if k not in defaults or _json(v) != _json(defaults[k])}


def build(name: str, work: Path, extra: list[str], run_dir: Path | None = None) -> dict:
    """Train (or, with `run_dir`, take a finished `train.py fit` run of the same config), test, release."""
    from train.cli import main as cli_main

    entry = pretrained_entry(name)
    options = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--name", name,
               "--test_after_fit", "false", *extra]
    start = time.time()
    configs = [a for c in entry.config_files for a in ("--config", str(c))]
    if run_dir is None:
        cli = cli_main(["fit", *configs, "--runs_root", str(work), *options])
        run_dir = Path(cli.trainer.default_root_dir)
    train_seconds = time.time() - start
    ckpt = released_checkpoint(run_dir)
    test = cli_main(["test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(ckpt),
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(run_dir / "test")])
    test_acc = float(test.trainer.callback_metrics["test/acc"])
    model = models.load_pretrained(ckpt, check_hash=False)
    data_cfg = test.config["test"]["data"]
    out = save_zoo_checkpoint(model, CHECKPOINT_DIR / f"{name}.pt",
                              meta={"name": name, "test_acc": test_acc, "config": entry.config})
    init_args = models.read_checkpoint(out)["init_args"]
    return {
        "file": out.name,
        "sha256": sha256_of(out),
        "size_bytes": out.stat().st_size,
        "class_path": entry.class_path,
        "builder": entry.builder,
        "overrides": builder_overrides(entry.builder, init_args),
        "released_from": ckpt.name,
        "metrics": {"test_acc": test_acc},
        "command": "python train.py " + " ".join(shlex.quote(a) for a in
                                                 ["fit", *(x for c in (entry.config, *entry.overlays) for x in ("--config", c)), *options]),
        "config": entry.config,
        **({"overlays": list(entry.overlays)} if entry.overlays else {}),
        "seed": test.config["test"]["seed_everything"],
        "data": {"class_path": data_cfg["class_path"], "init_args": dict(data_cfg["init_args"])},
        "train_seconds": round(train_seconds, 1) if train_seconds > 1 else None,
        "created": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="entries to build (default: every *.synthparts entry)")
    parser.add_argument("--max_epochs", type=int, default=None, help="override the recipe (smoke runs only)")
    parser.add_argument("--run_dir", type=Path, default=None,
                        help="release a finished `train.py fit` run of the entry's config instead of training again")
    args = parser.parse_args(argv)
    names = args.names or [n for n in models.list_pretrained() if n.endswith(".synthparts")]
    extra = ["--trainer.max_epochs", str(args.max_epochs)] if args.max_epochs else []
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            record = build(name, Path(work), extra, args.run_dir)
            # Read just before writing: another build may have released an entry meanwhile.
            manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"checkpoints": {}}
            manifest["checkpoints"][name] = record
            MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            print(f"{name}: test acc {100 * record['metrics']['test_acc']:.2f}%, {record['size_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
