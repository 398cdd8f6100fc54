"""The data pipeline's speed: JPEG decode plus the official training transform per worker process, beside timm's
``create_transform`` (:func:`bench_data`), and the training loader's throughput with several workers
(:func:`loader_throughput`), which says whether a training step waits for data.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .runner import settle

RECIPE = {  # the official training recipe's augmentation (paper / main.py), MindCV's xcit_tiny_12_p16 yaml keys
    "image_resize": 224,
    "auto_augment": "randaug-m9-mstd0.5-inc1",
    "re_prob": 0.25,
    "re_value": "pixel",
    "color_jitter": 0.4,
    "hflip": 0.5,
    "interpolation": "bicubic",
}


def default_jpeg_dir() -> Path:
    """Where generated benchmark JPEGs live: ``$XCIT_CACHE/bench_jpegs`` (default ``~/.cache/xcit``)."""
    from ..data.demo import cache_dir

    return cache_dir() / "bench_jpegs"


def write_jpegs(root: str | Path, n: int = 64, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """``n`` distinct natural JPEGs (ImageNet's typical 500x375) cut from scikit-learn's two sample photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = Path(root)
    if len(list(root.glob("*/*.jpg"))) >= n:
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 427x640 each
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw, ch = int(rng.integers(w // 2, w + 1)), int(rng.integers(h // 2, h + 1))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x0, y0, x0 + cw, y0 + ch)).resize(size if i % 2 else size[::-1], Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(root / "images" / f"{i:04d}.jpg", quality=90)
    return root


def timm_pipeline(recipe: dict) -> tuple[Callable, Callable]:
    """timm's loader and ``create_transform`` for ``recipe``, the reference."""
    from PIL import Image
    from timm.data import create_transform

    def load(path: Path):
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")

    transform = create_transform(
        recipe["image_resize"],
        is_training=True,
        auto_augment=recipe["auto_augment"].replace("randaug", "rand"),
        color_jitter=recipe["color_jitter"],
        hflip=recipe["hflip"],
        re_prob=recipe["re_prob"],
        re_mode=recipe["re_value"],
        interpolation=recipe["interpolation"],
    )
    return load, transform


def our_pipeline(recipe: dict) -> tuple[Callable, Callable]:
    """The loader and training transform ``xcit train`` uses for ``recipe``."""
    from ..config.train_config import TrainConfig
    from ..data.imageio import load_rgb
    from ..data.pipeline import train_transform

    return load_rgb, train_transform(TrainConfig(**recipe))


def _transform_retrying(transform: Callable, img) -> int:
    """Apply ``transform``, drawing again after a ``ValueError``; returns how many draws failed. Stock timm's
    RandAugment can ask Pillow >= 11 to posterize to 0 bits (about 1 image in 550 with ``rand-m9-mstd0.5-inc1``),
    which raises; ``xcit.data.pipeline`` patches that op, the reference pipeline is timed as shipped."""
    for failed in range(10):
        try:
            transform(img)
            return failed
        except ValueError:
            continue
    raise RuntimeError("the transform failed 10 times in a row")


def bench_data(
    folder: str | Path,
    rounds: int = 5,
    recipe: dict | None = None,
    limit: int | None = None,
    seed: int = 0,
    max_busy: float | None = None,
) -> dict:
    """Decode + training transform, images/s in this one process (= per data-loader worker), ours vs timm.

    The two pipelines take turns over the same files, round after round, with the same seeds; the per-stage
    split of our pipeline (decode, transform) says where the time goes.
    """
    import random

    import numpy as np

    recipe = {**RECIPE, **(recipe or {})}
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    if not files:
        raise FileNotFoundError(f"no JPEG files under {folder}")
    pipes = {"ours": our_pipeline(recipe), "timm": timm_pipeline(recipe)}
    times: dict[str, list[float]] = {k: [] for k in pipes}
    errors = dict.fromkeys(pipes, 0)
    decode: list[float] = []
    for r in range(rounds):
        settle(max_busy)
        for k in pipes if r % 2 == 0 else list(pipes)[::-1]:
            load, transform = pipes[k]
            random.seed(seed + r)  # RandAugment draws from python's and numpy's generators, erasing from torch's
            np.random.seed(seed + r)
            torch.manual_seed(seed + r)
            t = time.perf_counter()
            for f in files:
                errors[k] += _transform_retrying(transform, load(f))
            times[k].append((time.perf_counter() - t) / len(files))
        t = time.perf_counter()
        for f in files:
            pipes["ours"][0](f)
        decode.append((time.perf_counter() - t) / len(files))
    out = {"folder": str(folder), "images": len(files), "recipe": recipe}
    for k, ts in times.items():
        out[k] = {"img_per_s": 1 / statistics.median(ts), "round_img_per_s": [1 / t for t in ts], "errors": errors[k]}
    out["ours"]["decode_ms"] = statistics.median(decode) * 1e3
    out["ours"]["transform_ms"] = 1e3 / out["ours"]["img_per_s"] - out["ours"]["decode_ms"]
    out["ratio"] = out["ours"]["img_per_s"] / out["timm"]["img_per_s"]
    return out


def loader_throughput(
    folder: str | Path, workers: int, batch_size: int = 64, images: int = 512, recipe: dict | None = None
) -> dict:
    """Images/s of ``xcit train``'s own training loader (:func:`xcit.data.pipeline.train_loader`, the official recipe's
    transform) with ``workers`` worker processes, over the class folders of ``folder``.

    Epochs are read until ``images`` have been delivered; the clock starts when the first batch arrives (worker
    start-up and the first decode are excluded), later epochs' worker restarts are included as in training.
    """
    from ..config.train_config import TrainConfig
    from ..data.pipeline import image_folder, train_loader, train_transform

    cfg = TrainConfig(**{**RECIPE, **(recipe or {}), "batch_size": batch_size, "num_parallel_workers": workers})
    ds = image_folder(folder, transform=train_transform(cfg))
    if not len(ds):
        raise FileNotFoundError(f"no images in the class folders of {folder}")
    loader = train_loader(ds, cfg, world=1, rank=0)
    seen, start, epoch = 0, None, 0
    while seen < images:
        loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            if start is None:
                start = time.perf_counter()
                continue
            seen += x.shape[0]
            if seen >= images:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    return {
        "folder": str(folder),
        "workers": loader.num_workers,
        "batch_size": batch_size,
        "images_timed": seen,
        "img_per_s": seen / elapsed,
        "img_per_s_per_worker": seen / elapsed / max(1, loader.num_workers),
    }


def data_share(img_per_s_per_core: float, step_ms: float, batch: int, threads: int, cores: int) -> dict:
    """Whether a training run is compute- or data-bound, from one core's pipeline speed and one step's time.

    ``loader_fraction_of_step`` is the time one core needs to prepare a batch over the time the step takes. With
    loader workers on cores of their own the run is data-bound when that exceeds the workers available
    (``cores - threads``); on a machine whose cores serve both (a 2-core laptop), preparing and computing take turns,
    and ``data_share_shared_cores`` is the share of the time spent preparing data.
    """
    prepare_ms = batch / img_per_s_per_core * 1e3  # one core, one batch
    fraction = prepare_ms / step_ms
    spare = max(0, cores - threads)
    shared = (prepare_ms / cores) / (step_ms + prepare_ms / cores)
    return {
        "pipeline_img_per_s_per_core": img_per_s_per_core,
        "loader_ms_per_batch_one_core": prepare_ms,
        "step_ms": step_ms,
        "loader_fraction_of_step": fraction,
        "spare_cores": spare,
        "bound": "data" if (fraction > spare if spare else shared > 0.5) else "compute",
        "data_share_shared_cores": shared,
    }
