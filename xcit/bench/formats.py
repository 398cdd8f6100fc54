"""Read + decode + the training transform, images/s for one data-loader worker, per dataset format, beside timm.

The same JPEGs are read as an ImageFolder, as WebDataset shards (``xcit shard``'s writer) and as a Hugging Face
``save_to_disk`` dataset, each through this project's dataset (:class:`xcit.data.readers.ImageDataset`) with the
official training transform, and through timm's ``ImageDataset`` loader on the folder with timm's same transform.
The pipelines take turns round after round with the same seeds; medians are reported.
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
    from ..data.readers import list_folder
    from ..data.shards import list_shards, write_shards

    disable_progress_bars()
    folder_source, _ = list_folder(folder)
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


def bench_formats(
    folder: str | Path, workdir: str | Path, rounds: int = 5, recipe: dict | None = None, max_busy: float | None = None
) -> dict:
    """``{"folder"|"wds"|"hf"|"timm": {"img_per_s", "round_img_per_s"}, "ratio_to_timm": {...}}``."""
    from timm.data import ImageDataset as TimmDataset

    from ..config.train_config import TrainConfig
    from ..data.pipeline import train_transform
    from ..data.readers import ImageDataset

    recipe = {**RECIPE, **(recipe or {})}
    sources = _formats(Path(folder), Path(workdir))
    ours = train_transform(TrainConfig(**recipe))
    pipes = {name: ImageDataset(src, ours) for name, src in sources.items()}
    timm_ds, timm_t = TimmDataset(str(folder)), timm_pipeline(recipe)[1]
    n = len(sources["folder"])
    times: dict[str, list[float]] = {k: [] for k in (*pipes, "timm")}
    for r in range(rounds):
        settle(max_busy)
        for name in list(times) if r % 2 == 0 else list(times)[::-1]:
            random.seed(r), np.random.seed(r), torch.manual_seed(r)
            t = time.perf_counter()
            for i in range(n):
                if name == "timm":
                    _transform_retrying(timm_t, timm_ds[i][0])
                else:
                    pipes[name][i]
            times[name].append((time.perf_counter() - t) / n)
    out: dict = {"images": n, "recipe": recipe}
    for k, ts in times.items():
        out[k] = {"img_per_s": 1 / statistics.median(ts), "round_img_per_s": [1 / t for t in ts]}
    out["ratio_to_timm"] = {k: out[k]["img_per_s"] / out["timm"]["img_per_s"] for k in pipes}
    return out
