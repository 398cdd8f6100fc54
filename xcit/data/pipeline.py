"""Datasets, transforms, mixup/cutmix, the loss and the loaders of a training run.

* **Data.** ``data_dir/<train_split>/<class>/*.jpg`` and ``data_dir/<val_split>/<class>/*``, torchvision's
  ImageFolder layout, indexed from directory listings alone (:mod:`xcit.data.readers`: no file is opened, symlink
  loops are not followed). Any image mode (grayscale, RGBA, CMYK, palette, 16-bit) becomes 8-bit RGB
  (:func:`xcit.data.imageio.load_rgb`), or grey / 4 bands for ``in_channels`` 1 / 4 (:func:`xcit.data.imageio.to_mode`).
  A file that fails to decode (zero bytes, not an image, truncated, too many pixels) is found when it is read: in
  training it is replaced by the next good image, in validation it is left out; both are counted and named once
  per epoch.
* **Transforms.** timm's ``create_transform``, which defines the official recipe (random resized crop, flips,
  color jitter, RandAugment; eval resize to ``image_resize / crop_pct`` then centre crop), in its prefetcher form:
  workers return uint8 pixels, and the batch is normalised and erased (timm's ``RandomErasing`` with MindCV's
  area/aspect keys) once on the training device (:mod:`xcit.data.device`), where timm's ``Mixup`` (mixup, cutmix,
  switch probability, label smoothing) follows in the training loop. ``data_backend``: ``fast`` (default) decodes
  JPEGs with torchvision and crops in one pass (:mod:`xcit.data.fastcrop`), ``pil`` keeps Pillow's path, ``dali``
  runs the recipe as a DALI graph (:mod:`xcit.data.dali`).
* **Order.** :class:`xcit.data.sampler.ResumableSampler` shards the (repeated-augmentation) epoch across ranks and
  seeds each sample's augmentation from its position, so the same images get the same crops on any number of
  ranks and after a resume. Validation shards rank ``r`` to images ``r, r + W, ...`` without padding: no image is
  counted twice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from ..config.train_config import ConfigError, TrainConfig
from ..model.preprocessing import PIL_MODES, Preprocessing, channel_stats
from ..runtime.preemption import worker_ignores_stop_signals
from .device import (
    DeviceLoader,
    batch_stage,  # noqa: F401 - the loaders' batch stage, importable from here too
)
from .formats import detect_format, layout, open_split, relabel
from .imageio import TENSOR_RGB
from .readers import CountingLoader, ImageDataset, collate
from .sampler import ResumableSampler, SeededDataset

log = logging.getLogger("xcit")


class DataError(ConfigError):
    """A dataset that cannot be trained on (missing split, no images, val classes unknown to train)."""


# ----------------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------------


def image_folder(
    root: str | Path,
    classes: list[str] | None = None,
    transform=None,
    skip_bad: bool = False,
    cache_dir: Path | None = None,
) -> ImageDataset:
    """One ImageFolder split (``root``) as an :class:`ImageDataset`, labels in ``classes``' order if given."""
    root = Path(root)
    source, listing = open_split("folder", root.parent, root.name, cache_dir)
    return ImageDataset(relabel(source, classes) if classes else source, transform, skip_bad, listing)


def _report(split: str, ds: ImageDataset) -> None:
    for loop in ds.listing.loops:
        log.warning("%s: symlink loop %s not followed (each file is listed once)", split, loop)
    skipped = ds.listing.not_images
    if skipped:
        examples = "; ".join(os.path.relpath(p, ds.source.root) for p in skipped[:5])
        more = ", ..." if len(skipped) > 5 else ""
        log.warning("%s: skipped %d files that are not images (by name): %s%s", split, len(skipped), examples, more)


def build_datasets(
    cfg: TrainConfig,
    classes: list[str] | None = None,
    need_train: bool = True,
    need_val: bool = True,
    skip_unknown_val: bool = False,
    cache_dir: Path | None = None,
    exact_classes: bool = False,
    eval_prep: Preprocessing | None = None,
) -> tuple[ImageDataset | None, ImageDataset | None]:
    """Train (unless ``need_train`` is False) and val datasets with their transforms, in any format
    (``data_format``, :mod:`xcit.data.formats`).

    Labels follow ``classes`` if given (a checkpoint's), else train's sorted classes (val's when there is no train
    split). A missing val split gives ``None`` unless ``need_val``. An empty split, or a val class that the label
    set lacks, is a :class:`DataError` (with ``skip_unknown_val``, such classes are left out with a warning);
    ``exact_classes`` also refuses a val split that lacks some of ``classes``. ``cache_dir``: where the indexes
    are kept between runs (:mod:`xcit.data.index_cache`). ``eval_prep``: the validation preprocessing (default: the
    config's, :meth:`Preprocessing.from_train_config`).
    """
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir not found: {root}")
    fmt = detect_format(root, cfg.train_split, cfg.val_split) if cfg.data_format == "auto" else cfg.data_format
    train = None
    if need_train:
        opened = open_split(fmt, root, cfg.train_split, cache_dir)
        if opened is None:
            raise DataError(f"train split not found: {root / cfg.train_split} ({layout(fmt, root)})")
        source, listing = opened
        fast = cfg.data_backend == "fast" and PIL_MODES[cfg.in_channels] == "RGB"  # JPEGs decoded by torchvision
        train = ImageDataset(
            relabel(source, classes) if classes else source,
            train_transform(cfg),
            False,
            listing,
            TENSOR_RGB if fast else PIL_MODES[cfg.in_channels],
        )
        _report(f"{root / cfg.train_split}", train)
        if not len(train):
            raise DataError(f"{root / cfg.train_split}: no images in {len(source.found_classes)} class folders")
        empty = sorted(set(train.classes) - {train.classes[y] for y in set(train.targets)})
        if empty:
            log.warning("%s: %d classes have no training images: %s", root / cfg.train_split, len(empty), empty[:10])
        classes = train.classes
    opened = open_split(fmt, root, cfg.val_split, cache_dir)
    if opened is None:
        if need_val:
            raise DataError(f"val split not found: {root / cfg.val_split} ({layout(fmt, root)})")
        log.info("no %s split in %s: training without validation", cfg.val_split, root)
        return train, None
    source, listing = opened
    label_set = f"{root / cfg.train_split}" if need_train else "the checkpoint's classes"
    _check_val_classes(f"{root / cfg.val_split}", source.classes, classes, label_set, skip_unknown_val, exact_classes)
    prep = eval_prep or Preprocessing.from_train_config(cfg)
    val = ImageDataset(
        relabel(source, classes or source.classes),
        eval_transform(prep, uint8=True),
        True,
        listing,
        PIL_MODES[prep.in_chans],
    )
    _report(f"{root / cfg.val_split}", val)
    if not len(val):
        raise DataError(f"{root / cfg.val_split}: no images")
    return train, val


def _check_val_classes(where: str, found, classes, label_set: str, skip_unknown: bool, exact: bool) -> None:
    if classes is None:
        return
    unknown, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
    if exact and (unknown or missing) and not skip_unknown:
        raise DataError(
            f"{where} does not hold the checkpoint's classes (missing {len(missing)}: {missing[:5]}, unknown "
            f"{len(unknown)}: {unknown[:5]}); --ignore_class_mismatch True scores the checkpoint's classes that are "
            f"present"
        )
    if unknown and skip_unknown:
        log.warning("%s: %d classes are not in %s and are not scored: %s", where, len(unknown), label_set,
                    unknown[:10])  # fmt: skip
    elif unknown:
        raise DataError(f"{where}: {len(unknown)} classes are not in {label_set}: {unknown[:10]}")


# ----------------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------------


class WorkerTransform:
    """What a loader worker runs on one image: the recipe's augmentations ending in a uint8 ``(C, H, W)`` tensor
    (timm's ``use_prefetcher`` form). ``mean`` and ``std`` (per band, 0-1 scale) are for the batch stage on the
    training device (:class:`xcit.data.device.BatchStage`), which normalises the whole batch there."""

    def __init__(self, transforms: list, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.transforms, self.mean, self.std = transforms, tuple(mean), tuple(std)

    def __call__(self, img) -> torch.Tensor:
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        body = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({body}\n    mean={self.mean}, std={self.std})"


def train_transform(cfg: TrainConfig) -> WorkerTransform:
    """timm's ImageNet training transform (official recipe) up to uint8 pixels, as timm's ``create_transform(...,
    use_prefetcher=True)`` builds it; normalisation and random erasing run once per batch on the training device
    (:func:`batch_stage`). Images have ``in_channels`` bands (RGB, grey or RGBA,
    :data:`xcit.model.preprocessing.PIL_MODES`), normalised with one mean/std per band
    (:func:`xcit.model.preprocessing.channel_stats`). With ``data_backend: fast`` the random resized crop takes
    decoded JPEG tensors in one pass (:mod:`xcit.data.fastcrop`)."""
    from timm.data import create_transform
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from .fastcrop import OnePassRandomResizedCrop

    mean, std = channel_stats(*cfg.norm_mean_std, cfg.in_channels)
    spec = cfg.timm_auto_augment
    trivial = spec is not None and spec.startswith("trivialaug")  # not in timm: torchvision's, added below
    t = create_transform(
        cfg.image_resize,
        is_training=True,
        scale=cfg.scale,
        ratio=cfg.ratio,
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        color_jitter=None if trivial else cfg.color_jitter or None,  # 0 means off; timm drops it under auto_augment
        auto_augment=None if trivial else spec,
        interpolation=cfg.interpolation,
        mean=mean,
        std=std,
        re_prob=0.0,
        use_prefetcher=True,
    )
    _posterize_accepts_zero_bits(t)
    ops = list(t.transforms)
    if trivial:
        ops.insert(len(ops) - 1, trivial_augment_wide(spec, cfg.interpolation, mean))  # before MaybePILToTensor
    if cfg.data_backend == "fast" and isinstance(ops[0], RandomResizedCropAndInterpolation):
        ops[0] = OnePassRandomResizedCrop.like(ops[0])
    return WorkerTransform(ops, mean, std)


def trivial_augment_wide(spec: str, interpolation: str, mean: tuple[float, ...]):
    """MindCV's ``trivialaugwide[-mN]`` as torchvision's ``TrivialAugmentWide`` (Muller & Hutter, 2021).

    One op per image, drawn uniformly, at a uniformly drawn strength over the wide ranges (rotate +-135 degrees,
    shear +-0.99, enhance 0.01-1.99, ...), as MindCV's, which draws invert where this draws identity. ``mN``: N
    strength bins over the full range (default 31, the paper's and torchvision's). Fill: the mean pixel, as timm's
    RandAugment.
    """
    from torchvision.transforms import InterpolationMode, TrivialAugmentWide

    levels = int(spec.partition("-m")[2] or 31)
    mode = {"bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}.get(
        interpolation, InterpolationMode.BICUBIC
    )
    fill = [min(255, round(255 * m)) for m in mean]
    return TrivialAugmentWide(num_magnitude_bins=levels, interpolation=mode, fill=fill)


class ToNormalizedTensor:
    """``Normalize(mean, std)(ToTensor()(img))`` for an 8-bit RGB PIL image in one pass: ``x * 1/(255 std) - mean/std``
    straight from the uint8 pixels (the same values to float rounding, 5e-7; half the time of the two steps)."""

    def __init__(self, mean, std) -> None:
        std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.mean, self.std = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1), std
        self.scale, self.shift = 1.0 / (255.0 * std), -self.mean / std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.array(img, dtype=np.uint8)
        pixels = torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr).permute(2, 0, 1)  # CHW view of HWC
        out = torch.empty(pixels.shape, dtype=torch.float32)
        return torch.addcmul(self.shift, pixels, self.scale, out=out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def _fuse_to_tensor_normalize(transform):
    """Replace timm's ``MaybeToTensor(), Normalize(...)`` pair by :class:`ToNormalizedTensor` (in place)."""
    from torchvision import transforms as T

    ts = getattr(transform, "transforms", [])
    for i in range(len(ts) - 1):
        if type(ts[i]).__name__ in ("MaybeToTensor", "ToTensor") and isinstance(ts[i + 1], T.Normalize):
            ts[i : i + 2] = [ToNormalizedTensor(ts[i + 1].mean, ts[i + 1].std)]
            break
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's ``posterize`` with 0 bits allowed: a black image, what older Pillow returned (mask ``~255``)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    return img.point(lambda _: 0) if bits_to_keep <= 0 else ImageOps.posterize(img, bits_to_keep)


def _posterize_accepts_zero_bits(transform) -> None:
    """RandAugment's posterize keeps 0 bits at the ends of the magnitude range (``PosterizeIncreasing``: 4 - 4 at
    magnitude 10, ``Posterize``: 0 at magnitude 0), which magnitude noise reaches: about 1 image in 550 with
    ``rand-m9-mstd0.5-inc1``. Recent Pillow (13 here) raises on 0 bits, so each such op gets :func:`_posterize`."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize


def eval_transform(prep: Preprocessing, uint8: bool = False):
    """Resize the short side to ``size / crop_pct`` with ``interpolation``, centre-crop ``size``, normalise
    (one image; with ``uint8``, a :class:`WorkerTransform` that stops at the pixels and leaves the normalisation
    to the batch stage on the device)."""
    from timm.data import create_transform

    p = prep
    t = create_transform(
        p.size, is_training=False, crop_pct=p.crop_pct, interpolation=p.interpolation, mean=p.mean, std=p.std,
        use_prefetcher=uint8,
    )  # fmt: skip
    return WorkerTransform(list(t.transforms), p.mean, p.std) if uint8 else _fuse_to_tensor_normalize(t)


def mixup_fn(cfg: TrainConfig, num_classes: int):
    """timm's ``Mixup`` (batch-wise mixup/cutmix with label smoothing folded into the soft targets) or None."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    if cfg.batch_size % 2 or not cfg.drop_remainder:
        raise ConfigError(
            f"mixup/cutmix pair each batch with its reverse: batch_size ({cfg.batch_size}) must be even and "
            f"drop_remainder ({cfg.drop_remainder}) True"
        )
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.cutmix_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------------


def _workers(n: int) -> int:
    return max(0, min(n, os.cpu_count() or 1))


def train_subset(ds: ImageDataset, num_samples: int | None, seed: int) -> ImageDataset:
    """A fixed random subset of ``num_samples`` images (MindCV's ``num_samples``); the whole set when None."""
    if not num_samples or num_samples >= len(ds):
        return ds
    keep = sorted(np.random.default_rng(seed).permutation(len(ds))[:num_samples].tolist())
    return ds.subset(keep)  # same classes and transform; a plain dataset, not a Subset (see SeededDataset)


def train_loader(
    ds: ImageDataset, cfg: TrainConfig, world: int, rank: int, device: torch.device | str = "cpu"
) -> DeviceLoader:
    """Seeded, sharded, resumable training loader. ``batch_size`` is per rank. Workers return uint8 batches; they
    are normalised and randomly erased on ``device`` (:func:`batch_stage`). Bad files met are counted
    (:func:`xcit.data.readers.report_bad_reads`)."""
    sampler = ResumableSampler(
        len(ds),
        shuffle=cfg.shuffle,
        seed=cfg.seed,
        num_replicas=world,
        rank=rank,
        repeats=max(1, cfg.aug_repeats),
        drop_last=False,  # pad so every rank runs the same number of steps (DistributedSampler's default)
        batch_size=cfg.batch_size,
    )
    n = _workers(cfg.num_parallel_workers)
    loader = CountingLoader(
        DataLoader(
            SeededDataset(ds),
            batch_size=cfg.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=n,
            drop_last=cfg.drop_remainder,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            generator=torch.Generator(),  # workers' base seed must not come from the global RNG (see xcit.data.sampler)
            worker_init_fn=worker_ignores_stop_signals,  # SIGTERM/SIGINT are the main process's to handle
            prefetch_factor=4 if n else None,
        )
    )
    return DeviceLoader(loader, batch_stage(cfg, device), device)


def loaders(train_set: ImageDataset, val_set: ImageDataset | None, cfg: TrainConfig, world: int, rank: int,
            device: torch.device | str = "cpu"):  # fmt: skip
    """The training and validation loaders of ``cfg.data_backend`` (``fast`` and ``pil``: DataLoader workers and the
    batch stage on ``device``; ``dali``: :mod:`xcit.data.dali`). The validation loader is None without ``val_set``."""
    if cfg.data_backend == "dali":
        from .dali import dali_loaders

        return dali_loaders(train_set, val_set, cfg, world, rank, device, None)
    train = train_loader(train_set, cfg, world, rank, device)
    val = (
        None if val_set is None else val_loader(val_set, cfg.batch_size, cfg.num_parallel_workers, world, rank, device)
    )
    return train, val


def val_loader(
    ds: ImageDataset, batch_size: int, workers: int, world: int, rank: int, device: torch.device | str = "cpu"
) -> DeviceLoader:
    """Rank ``r`` of ``W`` gets images ``r, r + W, ...``: shards differ by at most one image and none repeats.
    Undecodable images are left out and named (``ds.skip_bad``), never replaced. Batches leave the workers as
    uint8 and are normalised on ``device`` with the dataset transform's mean and std."""
    from .device import BatchStage

    shard = Subset(ds, list(range(rank, len(ds), world)))
    n = _workers(workers)
    loader = CountingLoader(
        DataLoader(
            shard,
            batch_size=batch_size,
            shuffle=False,
            num_workers=n,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),
        )
    )
    return DeviceLoader(loader, BatchStage(ds.transform.mean, ds.transform.std, device), device)
