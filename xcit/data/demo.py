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
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from ..runtime.distributed import launch_env

# The demo recipe, xcit/data/demo.yaml (configs/demo.yaml links to it): a real variant name with overrides, XCiT-N12/8's
# block design at a width and depth that trains on 2 CPU cores in minutes.
DEMO_RECIPE: dict = yaml.safe_load(resources.files("xcit.data").joinpath("demo.yaml").read_text())


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
    """The demo ImageFolder in the cache, written once. Under torchrun or srun only local rank 0 writes it; the other
    ranks wait for it to appear (they start before the process group exists, so no barrier is available)."""
    root = cache_dir() / "digits"
    if launch_env().local_rank == 0:  # torchrun's LOCAL_RANK, or SLURM_LOCALID in an srun step
        return write_digits(root)
    deadline = time.monotonic() + timeout_s
    while not (root / ".complete").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"local rank 0 did not finish writing {root} within {timeout_s:.0f} s")
        time.sleep(0.5)
    return root
