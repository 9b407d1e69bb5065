"""Train, validate, test or predict any model of the zoo from a YAML config.

    python train.py fit --config configs/cam/synthetic.yaml
    python train.py fit --config configs/cam/synthetic.yaml --trainer.max_epochs 3
    python train.py test --config configs/cam/synthetic.yaml --ckpt_path runs/.../best.ckpt
"""
from train.cli import main

if __name__ == "__main__":
    main()
