"""Released checkpoints (``*.pt``) and their manifest, as package data; `build.py` writes them."""
