"""The built-in demo: a small XCiT trained on scikit-learn's bundled handwritten digits, no download needed.

``xcit train`` with no ``--data_dir`` (and no config, or ``configs/demo.yaml``) writes the 1,797 8x8 digit images
once as an ImageFolder (80/20 split, stratified, seed 0) under ``$XCIT_CACHE/digits`` (default
``~/.cache/xcit/digits``), then runs the ordinary training path on it: the same data code, checkpoints, logs and
plot as an ImageNet run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

# The demo recipe; configs/demo.yaml holds the same keys (a test keeps them equal). A real variant name with
# overrides: XCiT-N12/8's block design at a width and depth that trains on 2 CPU cores in minutes.
DEMO_RECIPE: dict = {
    "dataset": "digits",
    "model": "xcit_nano_12_p8_224",
    "model_overrides": {"embed_dim": 64, "depth": 4, "num_heads": 4, "img_size": 32},
    "image_resize": 32,
    "batch_size": 64,
    "epoch_size": 30,
    "opt": "adamw",
    "lr": 0.002,
    "weight_decay": 0.05,
    "warmup_epochs": 2,
    "decay_epochs": 28,
    "min_lr": 1.0e-5,
    "scale": [0.6, 1.0],
    "ratio": [0.8, 1.25],
    "hflip": 0.0,  # a mirrored 2 is not a 2
    "color_jitter": 0.0,
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "label_smoothing": 0.1,
    "val_while_train": True,
    "num_parallel_workers": 0,
    "ckpt_save_dir": "./ckpt/demo",
    "keep_checkpoint_max": 2,
    "log_interval": 10,
    "seed": 0,
}


def cache_dir() -> Path:
    """``$XCIT_CACHE`` or ``~/.cache/xcit``."""
    return Path(os.environ.get("XCIT_CACHE") or Path.home() / ".cache" / "xcit")


def write_digits(
    root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, classes: int = 10, per_class: int | None = None
) -> Path:
    """Write scikit-learn's digits as ``root/{train,val}/<digit>/<n>.png`` (8x8 grayscale, 0-255); idempotent.

    ``classes`` and ``per_class`` take a smaller subset (for tests). The split is stratified and fixed by ``seed``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    stamp = root / ".complete"
    if stamp.is_file():
        return root
    x, y = load_digits(return_X_y=True)
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(classes)])
    x, y = x[keep], y[keep]
    idx_train, idx_val = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=y, random_state=seed)
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, idx in (("train", idx_train), ("val", idx_val)):
        for i in idx:
            d = tmp / split / str(y[i])
            d.mkdir(parents=True, exist_ok=True)
            pixels = (x[i].reshape(8, 8) * (255.0 / 16.0)).round().astype(np.uint8)  # digits are 0..16
            Image.fromarray(pixels, mode="L").save(d / f"{i:04d}.png")
    (tmp / ".complete").write_text(f"{len(idx_train)} train, {len(idx_val)} val\n")
    shutil.rmtree(root, ignore_errors=True)  # a partial earlier attempt
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root


def ensure_digits(timeout_s: float = 300.0) -> Path:
    """The demo ImageFolder in the cache, written once. Under torchrun only local rank 0 writes it; the other
    ranks wait for it to appear (they start before the process group exists, so no barrier is available)."""
    root = cache_dir() / "digits"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return write_digits(root)
    deadline = time.monotonic() + timeout_s
    while not (root / ".complete").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"local rank 0 did not finish writing {root} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return root
