"""``data_backend: dali``: the recipe's decode and augmentations as an NVIDIA DALI graph (the ``dali`` extra).

On a GPU the JPEGs are decoded by nvJPEG (``device="mixed"``) and every augmentation runs on the GPU; without one
(``device_id=None``) the same graph runs on DALI's CPU backend, which is how it is tested here.

* **Order.** Files are fed through ``fn.external_source`` one batch at a time, in the order
  :class:`xcit.data.sampler.ResumableSampler` gives: each rank's share of the epoch, its order and its resume
  position are the project's, as with the default backend (checkpoints record the batches done, as always).
* **Graph.** Random-resized crop through the ROI decode (``fn.decoders.image_random_crop``: only the crop is
  decoded), antialiased cubic resize, flip, RandAugment / TrivialAugment (``nvidia.dali.auto_aug``) or colour
  jitter, then ``fn.crop_mirror_normalize``. Evaluation: resize of the short side to ``size / crop_pct`` and a
  centre crop. Random erasing (timm's ``RandomErasing``) and mixup/cutmix run on the batch afterwards, on the
  device, exactly as with the default backend (:mod:`xcit.data.device`, :mod:`xcit.train.loop`).
* **Where it differs from timm** (docs/how-to/feeding-gpus.md): the crop's area and aspect are drawn by DALI
  (``random_area``, ``random_aspect_ratio``: the same ranges, its own sampler and fallback); DALI's RandAugment
  has its own operation set (no posterize/solarize-add/invert variants as timm's ``inc1`` list, no magnitude
  noise: ``mstd`` is ignored) with ``m`` on timm's 0-10 scale, filling with one grey level (timm: the mean per
  channel); the cubic filter is DALI's (antialiased, not
  Pillow's). The augmentation draws come from DALI's generator, seeded per rank and epoch, so a mid-epoch resume
  continues the order exactly but not the random crops.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config.train_config import ConfigError, TrainConfig
from ..model.preprocessing import Preprocessing, channel_stats

MISSING = "data_backend dali needs NVIDIA DALI: pip install -e '.[dali]' (nvidia-dali-cuda130)"


def available() -> bool:
    """Whether NVIDIA DALI is installed."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ModuleNotFoundError, ValueError):  # ValueError: a blocked module (sys.modules entry None)
        return False


def require() -> None:
    """Raise a one-line :class:`ConfigError` naming the extra when DALI is missing."""
    if not available():
        raise ConfigError(MISSING)


def _rand_augment_args(spec: str) -> dict:
    """timm's ``rand-m9-n2-mstd0.5-inc1`` as DALI's ``rand_augment`` arguments: ``n`` ops at magnitude ``m`` of
    timm's 10 (DALI's bins 0..10)."""
    out = {"n": 2, "m": 9, "num_magnitude_bins": 11}
    for part in spec.split("-")[1:]:
        if part.startswith("m") and not part.startswith("mstd") and not part.startswith("mmax"):
            out["m"] = int(float(part[1:]))
        elif part.startswith("n"):
            out["n"] = int(part[1:])
    return out


def _train_graph(cfg: TrainConfig, gpu: bool):
    """The training graph's body (inside a pipeline definition): uint8 file bytes -> normalised CHW float."""
    from nvidia.dali import fn, types

    size, fill = cfg.image_resize, [round(255 * m) for m in channel_stats(*cfg.norm_mean_std, 3)[0]]
    mean, std = channel_stats(*cfg.norm_mean_std, 3)
    jpegs = fn.external_source(name="files", dtype=types.UINT8, ndim=1)
    labels = fn.external_source(name="labels", dtype=types.INT64, ndim=0)
    images = fn.decoders.image_random_crop(
        jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, random_area=list(cfg.scale),
        random_aspect_ratio=list(cfg.ratio), num_attempts=10,
    )  # fmt: skip
    interp = types.INTERP_CUBIC if cfg.interpolation == "bicubic" else types.INTERP_LINEAR
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=True)
    spec = cfg.timm_auto_augment
    if spec and spec.startswith("rand"):
        from nvidia.dali.auto_aug import rand_augment

        images = rand_augment.rand_augment(images, shape=(size, size), fill_value=fill[0], **_rand_augment_args(spec))
    elif spec and spec.startswith("trivialaug"):
        from nvidia.dali.auto_aug import trivial_augment

        bins = int(spec.partition("-m")[2] or 31)
        images = trivial_augment.trivial_augment_wide(images, num_magnitude_bins=bins, shape=(size, size),
                                                      fill_value=fill[0])  # fmt: skip
    elif cfg.color_jitter:
        j = [1 - float(cfg.color_jitter), 1 + float(cfg.color_jitter)]
        images = fn.color_twist(images, brightness=fn.random.uniform(range=j), contrast=fn.random.uniform(range=j),
                                saturation=fn.random.uniform(range=j))  # fmt: skip
    mirror = fn.random.coin_flip(probability=cfg.hflip) if cfg.hflip > 0 else 0
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in mean], std=[255 * s for s in std],
        mirror=mirror,
    )  # fmt: skip
    return images, labels


def _eval_graph(prep: Preprocessing, gpu: bool):
    from nvidia.dali import fn, types

    jpegs = fn.external_source(name="files", dtype=types.UINT8, ndim=1)
    labels = fn.external_source(name="labels", dtype=types.INT64, ndim=0)
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    interp = types.INTERP_CUBIC if prep.interpolation == "bicubic" else types.INTERP_LINEAR
    short = int(prep.size / prep.crop_pct)  # timm: floor(size / crop_pct)
    images = fn.resize(images, resize_shorter=short, interp_type=interp, antialias=True)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(prep.size, prep.size),
        mean=[255 * m for m in prep.mean], std=[255 * s for s in prep.std],
    )  # fmt: skip
    return images, labels


def build_pipeline(graph, batch: int, device: torch.device, threads: int, seed: int):
    """A built DALI pipeline around ``graph(gpu)`` on ``device`` (CPU backend: ``device_id=None``)."""
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"

    @pipeline_def(enable_conditionals=True)
    def pipe():
        return graph(gpu)

    p = pipe(batch_size=batch, num_threads=threads, device_id=(device.index or 0) if gpu else None,
             seed=seed % (1 << 31), prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)  # fmt: skip
    p.build()
    return p


def _to_torch(out, device: torch.device) -> torch.Tensor:
    t = out.as_tensor()
    return torch.from_dlpack(t) if device.type == "cuda" else torch.from_numpy(np.array(t))


def run_batch(pipe, data: list[np.ndarray], labels: list[int], device: torch.device):
    """One batch through ``pipe``: encoded files in, ``(x, y)`` out on ``device``."""
    pipe.feed_input("files", data)
    pipe.feed_input("labels", [np.asarray(y, dtype=np.int64) for y in labels])
    images, ys = pipe.run()
    return _to_torch(images, device), _to_torch(ys, torch.device("cpu")).to(device)


def _read(source, i: int) -> np.ndarray:
    """The encoded bytes of item ``i`` of a folder or shard source."""
    if hasattr(source, "read"):
        data = source.read(i)
    else:
        data = Path(source.path(i)).read_bytes()
    return np.frombuffer(data, dtype=np.uint8)


def train_pipeline(cfg: TrainConfig, device: torch.device, threads: int = 1):
    """The training graph of ``cfg`` built on ``device`` with ``threads`` CPU threads."""
    return build_pipeline(lambda gpu: _train_graph(cfg, gpu), cfg.batch_size, device, threads, cfg.seed)


def file_batches(pipe, files: list[Path], batch: int, device: torch.device) -> Iterator:
    """``pipe`` over ``files`` in order, ``batch`` at a time (the benchmark's entry)."""
    for k in range(0, len(files), batch):
        chunk = files[k : k + batch]
        yield run_batch(pipe, [np.fromfile(f, dtype=np.uint8) for f in chunk], [0] * len(chunk), device)


class DaliLoader:
    """Batches of ``(x, y)`` on ``device`` from a DALI graph fed in ``sampler``'s order (training: a
    :class:`xcit.data.sampler.ResumableSampler`; validation: a plain index list), then ``stage`` (the random
    erasing of :class:`xcit.data.device.BatchStage`, training only). Mirrors the default loader's interface:
    ``sampler``, ``batch_size``, ``len()``, ``take_bad()``."""

    def __init__(self, dataset, sampler, graph, batch_size: int, device, threads: int, seed: int, drop_last: bool,
                 erase=None) -> None:  # fmt: skip
        require()
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.device, self.threads, self.seed, self.erase = torch.device(device), threads, seed, erase
        self.graph, self.num_workers, self._pipe, self._epoch = graph, 0, None, None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def take_bad(self) -> list[str]:
        return []  # DALI stops on an undecodable file (it raises), it never substitutes one

    def _pipeline(self):
        epoch = getattr(self.sampler, "epoch", 0)
        if self._pipe is None or epoch != self._epoch:  # augmentation draws seeded per rank and epoch
            rank = getattr(self.sampler, "rank", 0)
            seed = self.seed * 1_000_003 + epoch * 7919 + rank
            self._pipe = build_pipeline(self.graph, self.batch_size, self.device, self.threads, seed)
            self._epoch = epoch
        return self._pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from .device import erase_seeds
        from .sampler import ResumableSampler

        seeded = isinstance(self.sampler, ResumableSampler)
        pipe, source = self._pipeline(), self.dataset.source
        items = [(i, None) if isinstance(i, int) else i for i in self.sampler]
        order, seeds = [i for i, _ in items], [s for _, s in items]
        for k in range(0, len(order), self.batch_size):
            chunk = order[k : k + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            x, y = run_batch(pipe, [_read(source, i) for i in chunk], [int(source.targets[i]) for i in chunk],
                             self.device)  # fmt: skip
            if self.erase is not None:
                x = self.erase(x.to(self.device), erase_seeds(seeds[k : k + self.batch_size]) if seeded else None)
            yield x, y


def dali_loaders(train_set, val_set, cfg: TrainConfig, world: int, rank: int, device, prep: Preprocessing | None):
    """The training and validation loaders of ``data_backend: dali`` (``val_set`` may be None)."""
    from .device import batch_stage
    from .sampler import ResumableSampler

    require()
    if cfg.in_channels != 3:
        raise ConfigError(f"data_backend dali decodes RGB: in_channels {cfg.in_channels} needs data_backend fast")
    threads = max(1, cfg.num_parallel_workers)
    sampler = ResumableSampler(len(train_set), shuffle=cfg.shuffle, seed=cfg.seed, num_replicas=world, rank=rank,
                               repeats=max(1, cfg.aug_repeats), batch_size=cfg.batch_size)  # fmt: skip
    stage = batch_stage(cfg, device)
    erase = None if stage.erase is None else stage.erase_batch
    train = DaliLoader(train_set, sampler, lambda gpu: _train_graph(cfg, gpu), cfg.batch_size, device, threads,
                       cfg.seed, cfg.drop_remainder, erase)  # fmt: skip
    val = None
    if val_set is not None:
        prep = prep or Preprocessing.from_train_config(cfg)
        shard = list(range(rank, len(val_set), world))
        val = DaliLoader(val_set, shard, lambda gpu: _eval_graph(prep, gpu), cfg.batch_size, device, threads,
                         cfg.seed, False)  # fmt: skip
    return train, val
