"""The data pipeline's speed: JPEG decode, the official training transform and the batch work, per CPU-second,
beside timm's ``create_transform`` (:func:`bench_data`), and the training loader's throughput with several workers
(:func:`loader_throughput`), which says whether a training step waits for data.
"""

from __future__ import annotations

import math
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
    """Where generated benchmark JPEGs live: ``$XCIT_CACHE/bench_photos_500x375`` (default ``~/.cache/xcit``)."""
    from ..data.demo import cache_dir

    return cache_dir() / "bench_photos_500x375"


def _photos() -> list:
    """The real photographs the installed libraries ship: scikit-learn's two sample images (640x427) and
    matplotlib's Grace Hopper portrait (512x600)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append(Image.open(f).convert("RGB"))
    except (ImportError, OSError, ValueError):
        pass
    return photos


def write_jpegs(root: str | Path, n: int = 64, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """``n`` distinct JPEGs of ``size`` (ImageNet's typical 500x375, landscape and portrait alternating) cut from
    real photos (:func:`_photos`) at random places and scales (1-1.25x the smallest that covers ``size``: mostly
    a slight reduction, which keeps them as sharp as ImageNet's downscaled photos), randomly mirrored, saved by
    Pillow at quality 75-95 (ImageNet's files are mostly 75-95), under ``root/images``."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    if len(list(root.glob("*/*.jpg"))) >= n:
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    photos = _photos()
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = photos[i % len(photos)]
        cw, ch = size if i % 2 == 0 else size[::-1]
        s = max(cw / im.width, ch / im.height) * float(rng.uniform(1.0, 1.25))  # mostly a slight downscale: sharp
        im = im.resize((max(cw, round(im.width * s)), max(ch, round(im.height * s))), Image.Resampling.BICUBIC)
        x0, y0 = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
        crop = im.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(root / "images" / f"{i:04d}.jpg", quality=int(rng.integers(75, 96)))
    return root


def timm_pipeline(recipe: dict) -> tuple[Callable, Callable]:
    """timm's loader and ``create_transform`` for ``recipe`` (normalised and erased per image), the reference."""
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


def our_pipeline(recipe: dict, device: torch.device | str = "cpu") -> tuple[Callable, Callable, Callable]:
    """The loader, the worker transform and the batch stage ``xcit train`` uses for ``recipe`` (its
    ``data_backend``, default ``fast``)."""
    from ..config.train_config import TrainConfig
    from ..data.imageio import TENSOR_RGB, load_rgb
    from ..data.pipeline import batch_stage, train_transform

    cfg = TrainConfig(**recipe)
    mode = TENSOR_RGB if cfg.data_backend == "fast" else "RGB"
    return (lambda f: load_rgb(f, mode=mode)), train_transform(cfg), batch_stage(cfg, device)


def _transform_retrying(transform: Callable, img):
    """Apply ``transform``, drawing again after a ``ValueError``; returns the output and how many draws failed.
    Stock timm's RandAugment can ask Pillow >= 11 to posterize to 0 bits (about 1 image in 550 with
    ``rand-m9-mstd0.5-inc1``), which raises; ``xcit.data.pipeline`` patches that op, the reference pipeline is
    timed as shipped."""
    for failed in range(10):
        try:
            return transform(img), failed
        except ValueError:
            continue
    raise RuntimeError("the transform failed 10 times in a row")


def _batches(files: list[Path], batch: int) -> list[list[Path]]:
    return [files[i : i + batch] for i in range(0, len(files), batch)]


def _runners(recipe: dict, device: torch.device, batch: int, dali: bool) -> dict[str, Callable[[list[Path]], int]]:
    """Each pipeline whole, from the files to the normalised batch on ``device``; each returns the failed draws."""
    load, transform, stage = our_pipeline(recipe, device)
    tload, ttransform = timm_pipeline(recipe)

    def ours(files: list[Path]) -> int:
        for chunk in _batches(files, batch):
            x = torch.stack([transform(load(f)) for f in chunk]).to(device)
            stage(x)
        return 0

    def timm(files: list[Path]) -> int:
        failed = 0
        for chunk in _batches(files, batch):
            outs = [_transform_retrying(ttransform, tload(f)) for f in chunk]
            failed += sum(n for _, n in outs)
            torch.stack([o for o, _ in outs]).to(device)
        return failed

    runners = {"ours": ours, "timm": timm}
    run_dali = _dali_runner(recipe, device, batch) if dali else None
    if run_dali is not None:
        runners["dali"] = run_dali
    return runners


def _dali_runner(recipe: dict, device: torch.device, batch: int) -> Callable[[list[Path]], int] | None:
    """The DALI pipeline (``data_backend: dali``) over the same files, when DALI is installed."""
    from ..data import dali as dali_backend

    if not dali_backend.available():
        return None
    from ..config.train_config import TrainConfig

    cfg = TrainConfig(**{**recipe, "batch_size": batch})
    pipe = dali_backend.train_pipeline(cfg, device, threads=1)  # built once, outside the timed rounds

    def run(files: list[Path]) -> int:
        for x, _ in dali_backend.file_batches(pipe, files, batch, device):
            del x
        return 0

    return run


def bench_data(
    folder: str | Path,
    rounds: int = 5,
    recipe: dict | None = None,
    limit: int | None = None,
    seed: int = 0,
    max_busy: float | None = None,
    batch: int = 32,
    device: torch.device | str = "cpu",
    dali: bool = True,
) -> dict:
    """Images per CPU-second of each data pipeline, whole: read + decode + training transform in one thread (a
    loader worker), the batch stacked, on ``device``, normalised and erased there (ours) or per image (timm's
    ``create_transform``), for this project's default pipeline, timm's and DALI's when installed (and ``dali``).

    CPU time is the process's (``time.process_time``: every thread, system time included), so other load on a
    shared machine does not count; the pipelines take turns over the same files, round after round (order flipped
    every round), with the same seeds. ``ratio`` is ours over timm's, of the medians; ``round_ratios`` the spread.
    """
    import random

    import numpy as np

    recipe = {**RECIPE, **(recipe or {})}
    device = torch.device(device)
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    if not files:
        raise FileNotFoundError(f"no JPEG files under {folder}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker; the batch stage's ops run in the same thread
    try:
        runners = _runners(recipe, device, batch, dali)
        cpu: dict[str, list[float]] = {k: [] for k in runners}
        wall: dict[str, list[float]] = {k: [] for k in runners}
        errors = dict.fromkeys(runners, 0)
        for r in range(rounds):
            settle(max_busy)
            for k in runners if r % 2 == 0 else list(runners)[::-1]:
                random.seed(seed + r)  # RandAugment draws from python's and numpy's generators, erasing from torch's
                np.random.seed(seed + r)
                torch.manual_seed(seed + r)
                c, t = time.process_time(), time.perf_counter()
                errors[k] += runners[k](files)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                cpu[k].append((time.process_time() - c) / len(files))
                wall[k].append((time.perf_counter() - t) / len(files))
        decode_ms = _decode_ms(files, recipe)
    finally:
        torch.set_num_threads(threads)
    out: dict = {"folder": str(folder), "images": len(files), "batch": batch, "device": str(device), "recipe": recipe}
    for k in runners:
        out[k] = {
            "img_per_s": 1 / statistics.median(cpu[k]),  # per CPU-second
            "round_img_per_s": [1 / t for t in cpu[k]],
            "wall_img_per_s": 1 / statistics.median(wall[k]),
            "errors": errors[k],
        }
    out["ours"]["decode_ms"] = decode_ms
    out["ours"]["transform_ms"] = 1e3 / out["ours"]["img_per_s"] - decode_ms
    out["ratio"] = out["ours"]["img_per_s"] / out["timm"]["img_per_s"]
    out["round_ratios"] = [a / b for a, b in zip(cpu["timm"], cpu["ours"])]
    if "dali" in out:
        out["dali_ratio"] = out["dali"]["img_per_s"] / out["timm"]["img_per_s"]
    return out


def _decode_ms(files: list[Path], recipe: dict) -> float:
    """CPU ms per image of our pipeline's decode alone (the rest of its time is the transform and batch work)."""
    load = our_pipeline(recipe)[0]
    c = time.process_time()
    for f in files:
        load(f)
    return (time.process_time() - c) / len(files) * 1e3


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
        "cores_needed": math.ceil(fraction),  # loader cores that keep the step fed
        "spare_cores": spare,
        "bound": "data" if (fraction > spare if spare else shared > 0.5) else "compute",
        "data_share_shared_cores": shared,
    }
