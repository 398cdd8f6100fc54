"""Read + decode + the training transform (up to the uint8 pixels a worker returns), images/s for one data-loader
worker, per dataset format, beside timm's (which also normalises and erases per image).

The same JPEGs are read as an ImageFolder, as WebDataset shards (``xcit shard``'s writer) and as a Hugging Face
``save_to_disk`` dataset, each through this project's dataset (:class:`xcit.data.readers.ImageDataset`) with the
official training transform, and through timm's ``ImageDataset`` loader on the folder with timm's same transform.
The pipelines take turns round after round with the same seeds; medians of images per CPU-second (the process's
CPU time, robust to other load) are reported.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .data import RECIPE, _transform_retrying, timm_pipeline
from .runner import settle


def _formats(folder: Path, workdir: Path) -> dict[str, object]:
    """The folder's images as the three formats' sources (written into ``workdir``)."""
    from datasets import ClassLabel, Dataset, Features, disable_progress_bars
    from datasets import Image as HFImage

    from ..data.hfdata import open_hf
    from ..data.shards import list_shards, write_shards

    disable_progress_bars()
    folder_source = jpeg_source(folder)
    shards = workdir / "wds"
    write_shards(folder_source, shards, "train", max_size=64 * 2**20, progress=False)
    rows = {"image": [{"bytes": Path(folder_source.path(i)).read_bytes(), "path": None}
                      for i in range(len(folder_source))], "label": folder_source.targets.tolist()}  # fmt: skip
    feats = Features({"image": HFImage(), "label": ClassLabel(names=folder_source.classes)})
    Dataset.from_dict(rows, features=feats).save_to_disk(str(workdir / "hf" / "train"))
    (workdir / "hf" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    return {
        "folder": folder_source,
        "wds": list_shards(sorted((shards / "train").glob("*.tar")))["source"],
        "hf": open_hf(workdir / "hf", "train")[0],
    }


def jpeg_source(folder: Path):
    """The JPEGs under ``folder`` (any depth; a flat folder too) as a folder source, one class per top-level
    subfolder (``.`` for files directly in ``folder``), in :func:`xcit.bench.data.bench_data`'s order."""
    from ..data.readers import FolderSource, encode_paths

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"no JPEG files under {folder}")
    rel = [p.relative_to(folder) for p in files]
    names = [r.parts[0] if len(r.parts) > 1 else "." for r in rel]
    classes = sorted(set(names))
    targets = np.asarray([classes.index(n) for n in names], dtype=np.int64)
    return FolderSource(folder, classes, classes, encode_paths([str(r) for r in rel]), targets)


def bench_formats(
    folder: str | Path, workdir: str | Path, rounds: int = 5, recipe: dict | None = None, max_busy: float | None = None
) -> dict:
    """``{"folder"|"wds"|"hf"|"timm": {"img_per_s", "round_img_per_s"}, "ratio_to_timm": {...}}``."""
    from timm.data import ImageDataset as TimmDataset

    from ..config.train_config import TrainConfig
    from ..data.imageio import TENSOR_RGB
    from ..data.pipeline import train_transform
    from ..data.readers import ImageDataset

    recipe = {**RECIPE, **(recipe or {})}
    sources = _formats(Path(folder), Path(workdir))
    cfg = TrainConfig(**recipe)
    ours, mode = train_transform(cfg), TENSOR_RGB if cfg.data_backend == "fast" else "RGB"
    pipes = {name: ImageDataset(src, ours, mode=mode) for name, src in sources.items()}
    timm_ds, timm_t = TimmDataset(str(folder)), timm_pipeline(recipe)[1]
    n = len(sources["folder"])
    times: dict[str, list[float]] = {k: [] for k in (*pipes, "timm")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as in a DataLoader worker (idle OpenMP threads spin on CPU time)
    try:
        for r in range(rounds):
            settle(max_busy)
            for name in list(times) if r % 2 == 0 else list(times)[::-1]:
                random.seed(r), np.random.seed(r), torch.manual_seed(r)
                t = time.process_time()
                for i in range(n):
                    if name == "timm":
                        _transform_retrying(timm_t, timm_ds[i][0])
                    else:
                        pipes[name][i]
                times[name].append((time.process_time() - t) / n)
    finally:
        torch.set_num_threads(threads)
    out: dict = {"images": n, "recipe": recipe}
    for k, ts in times.items():
        out[k] = {"img_per_s": 1 / statistics.median(ts), "round_img_per_s": [1 / t for t in ts]}
    out["ratio_to_timm"] = {k: out[k]["img_per_s"] / out["timm"]["img_per_s"] for k in pipes}
    return out
