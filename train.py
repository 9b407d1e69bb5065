"""Train, validate, test or predict any model of the zoo from a YAML config.

    python train.py fit --config configs/cam/synthetic.yaml
    python train.py fit --config configs/cam/synthetic.yaml --trainer.max_epochs 3
    python train.py test --config configs/cam/synthetic.yaml --ckpt_path runs/.../best.ckpt

A user error (a missing data folder, a wrong checkpoint, an unknown config key, ...) prints one line,
``error: ...``, and exits 1; ``IZOO_DEBUG=1`` shows its traceback.
"""
from train.cli import main
from train.errors import run_main

if __name__ == "__main__":
    run_main(main)
