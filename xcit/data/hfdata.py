"""Hugging Face datasets: a ``DatasetDict.save_to_disk`` folder or the hub's parquet layout, read by index.

* ``data_dir/dataset_dict.json`` with one folder per split (``save_to_disk``): opened with ``datasets.load_from_disk``,
  memory-mapped Arrow files, nothing copied.
* ``data_dir/data/<split>-*.parquet`` (the hub's layout, as ``Dataset.to_parquet`` writes each file): opened with
  ``datasets.load_dataset("parquet", ...)``, which converts the files once into the datasets cache
  (``HF_DATASETS_CACHE``, a second copy of the data, as timm's ``hfds/`` reader makes); under torchrun rank 0
  converts first and the other ranks then open the converted copy.

The image column is the first ``Image`` feature (else a column named ``image``/``img``/``jpg``), read undecoded and
decoded by :func:`xcit.data.imageio.decode_rgb`, so bad images are handled as for folders. The label column is the first
``ClassLabel`` (its names are the class names) or an integer column named ``label``/``labels``/``cls``/``target``.
Split names follow ``train_split`` / ``val_split``; ``val`` also finds ``validation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.train_config import ConfigError
from ..runtime import distributed
from .imageio import decode_rgb
from .readers import Listing

IMAGE_COLUMNS = ("image", "img", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "cls", "target")


def _datasets():
    import datasets  # the `data` extra; the CLI names it when missing (xcit.cli.EXTRAS)

    return datasets


def is_hf(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or any((root / "data").glob("*.parquet"))


def _split_names(split: str) -> list[str]:
    return list(dict.fromkeys([split, "validation" if split == "val" else split]))


def _open_split(root: Path, split: str):
    ds = _datasets()
    if (root / "dataset_dict.json").is_file():
        for name in _split_names(split):
            if (root / name).is_dir():
                return ds.load_from_disk(str(root / name))
        return None
    for name in _split_names(split):
        files = sorted(str(p) for p in (root / "data").glob(f"{name}-*.parquet"))
        if files:
            return ds.load_dataset("parquet", data_files={name: files}, split=name)
    return None


def _columns(dataset) -> tuple[str, str]:
    ds = _datasets()
    feats = dataset.features
    image = next((k for k, f in feats.items() if isinstance(f, ds.Image)), None)
    image = image or next((k for k in IMAGE_COLUMNS if k in feats), None)
    label = next((k for k, f in feats.items() if isinstance(f, ds.ClassLabel)), None)
    label = label or next((k for k in LABEL_COLUMNS if k in feats), None)
    if image is None or label is None:
        raise ConfigError(f"a dataset needs an image column and a label column; its columns are {list(feats)}")
    return image, label


@dataclass
class HFSource:
    """A split of a Hugging Face dataset: the (memory-mapped) table, its image column undecoded, and the labels."""

    root: Path
    classes: list[str]
    found_classes: list[str]
    dataset: object  # datasets.Dataset, image column cast to Image(decode=False)
    image_column: str
    rows: np.ndarray  # row of each sample in ``dataset`` (a subset keeps the table)
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> str:
        return f"{self.root}[row {int(self.rows[i])}]"

    def load(self, i: int, mode: str = "RGB"):
        cell = self.dataset[int(self.rows[i])][self.image_column]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data and isinstance(cell, dict) and cell.get("path"):
            data = Path(cell["path"]).read_bytes()
        return decode_rgb(data or b"", self.name(i), mode=mode)

    def subset(self, keep) -> HFSource:
        keep = np.asarray(keep, dtype=np.int64)
        return HFSource(self.root, self.classes, self.found_classes, self.dataset, self.image_column,
                        self.rows[keep], self.targets[keep])  # fmt: skip


def open_hf(root: Path, split: str) -> tuple[HFSource, Listing] | None:
    """The split as an :class:`HFSource`, or None when the dataset has no such split."""
    dataset = None
    if distributed.is_main():  # the first open of parquet files converts them: once, before the other ranks
        dataset = _open_split(root, split)
    distributed.barrier()
    if not distributed.is_main():
        dataset = _open_split(root, split)
    if dataset is None:
        return None
    image, label = _columns(dataset)
    feature = dataset.features[label]
    targets = np.asarray(dataset[label], dtype=np.int64)
    names = list(getattr(feature, "names", None) or [str(i) for i in range(int(targets.max(initial=-1)) + 1)])
    dataset = dataset.cast_column(image, _datasets().Image(decode=False)).select_columns([image])
    rows = np.arange(len(targets), dtype=np.int64)
    return HFSource(root / split, names, names, dataset, image, rows, targets), Listing()
