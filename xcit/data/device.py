"""The batch work on the training device: uint8 batches from the workers, normalised and randomly erased once per
batch where the model runs (timm's ``PrefetchLoader``, ``timm/data/loader.py``; ``RandomErasing(device=...)``).

Workers return uint8 pixels, a quarter of float32's bytes across the worker -> main process -> device path. On a GPU
the copy of the next batch overlaps the current step on a side stream, as timm's prefetcher does.

**Exact resume, any world size.** Erasing draws from Python's ``random`` and torch's generator (timm's
``RandomErasing``). Here each training image is erased with generators seeded from its own sample seed (the sampler's,
which depends on its place in the epoch's global order, not on the rank; :func:`erase_seeds`), and the caller's
generators are restored afterwards: an image is erased the same way in one process or many, in one run or after a
resume, whether or not the next batch was prefetched, and the training loop's own random stream (drop path, mixup) is
not moved by it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch

from ..model.preprocessing import channel_stats
from .sampler import ResumableSampler, sample_seeds

_ERASE_STREAM = 0x5EED_E7A5  # mixed with each sample's seed: erasing draws apart from the worker's augmentation


def erase_seeds(sample_seeds_: list[int] | np.ndarray) -> list[int]:
    """The erasing seeds of a batch's samples, one per sample, from their sample seeds (splitmix64 mixing, as the
    sampler's), so erasing does not replay the random draws of the sample's own augmentation."""
    return [int(s) for s in sample_seeds(_ERASE_STREAM, 0, np.asarray(sample_seeds_, dtype=np.uint64))]


class BatchStage:
    """``x`` uint8 ``(B, C, H, W)`` on the device -> float32 ``(x / 255 - mean) / std``, then ``erase`` (timm's
    ``RandomErasing`` built with ``device=``) when given. ``mean``/``std`` are per band on the 0-1 scale."""

    def __init__(self, mean, std, device: torch.device | str = "cpu", erase=None) -> None:
        device = torch.device(device)
        std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # timm's prefetcher: (x - 255 mean) / (255 std) on the float batch, in place (8x faster on CPU than one
        # addcmul from uint8, whose mixed-dtype path converts element by element)
        self.mean, self.std = (255.0 * mean).to(device), (255.0 * std).to(device)
        self.device, self.erase = device, erase

    def __call__(self, x: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"the batch stage takes uint8 pixels, got {x.dtype}")
        return self.erase_batch(x.float().sub_(self.mean).div_(self.std), seeds)

    def erase_batch(self, x: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
        """Random erasing of a normalised batch (in place); image ``j`` with its generators seeded by ``seeds[j]``
        when given (:func:`erase_seeds`)."""
        if self.erase is None:
            return x
        if seeds is None:
            return self.erase(x)
        state = random.getstate()
        cuda = x.device.type == "cuda"
        with torch.random.fork_rng(devices=[x.device] if cuda else [], device_type="cuda"):
            try:
                for j, seed in enumerate(seeds[: len(x)]):
                    random.seed(seed)
                    if cuda:
                        with torch.cuda.device(x.device):
                            torch.cuda.manual_seed(seed)
                    else:
                        torch.default_generator.manual_seed(seed)
                    self.erase(x[j : j + 1])  # timm's RandomErasing erases a batch image by image, in place
                return x
            finally:
                random.setstate(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, erase={self.erase!r})"


class DeviceLoader:
    """A loader of ``(uint8 x, y)`` batches (:class:`xcit.data.readers.CountingLoader`) that yields them on ``device``
    after :class:`BatchStage`. Other attributes (``sampler``, ``batch_size``, ``take_bad``, ...) are the inner
    loader's. Training batches (a :class:`ResumableSampler` inside) are erased with their samples'
    :func:`erase_seeds`."""

    def __init__(self, loader, stage: BatchStage, device: torch.device | str = "cpu") -> None:
        self.loader, self.stage, self.device = loader, stage, torch.device(device)
        self._stream = None  # one side stream for the loader's lifetime (timm: per-stream allocator pools)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name in ("loader", "stage", "device", "_stream"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = getattr(self.loader, "sampler", None)
        seeded = isinstance(sampler, ResumableSampler)
        first = sampler.start_batch if seeded else 0  # read before iterating: iterating consumes it

        epoch_seeds = np.asarray([s for _, s in sampler.epoch_order()], dtype=np.uint64) if seeded else None
        size = getattr(sampler, "batch_size", None) or getattr(self.loader, "batch_size", 1)

        def seed_of(batch: int) -> list[int] | None:  # the batch's samples, in the sampler's order
            return erase_seeds(epoch_seeds[batch * size : (batch + 1) * size]) if seeded else None

        batches = enumerate(self.loader, start=first)
        if self.device.type == "cuda" and torch.cuda.is_available():
            yield from self._prefetched(batches, seed_of)
            return
        for i, (x, y) in batches:
            yield self.stage(x.to(self.device), seed_of(i)), y.to(self.device)

    def _prefetched(self, batches, seed_of) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """timm's ``PrefetchLoader``: copy and prepare batch ``k + 1`` on a side stream while ``k`` trains."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        consumer = torch.cuda.current_stream(self.device)
        ready = None
        for i, (x, y) in batches:
            with torch.cuda.stream(self._stream):
                x = self.stage(x.to(self.device, non_blocking=True), seed_of(i))
                y = y.to(self.device, non_blocking=True)
            if ready is not None:
                yield ready
            consumer.wait_stream(self._stream)
            x.record_stream(consumer)
            y.record_stream(consumer)
            ready = (x, y)
        if ready is not None:
            yield ready


def _erasing_mode(re_value: int | float | str) -> str:
    """MindCV's ``re_value`` -> timm's erasing mode: 0 -> const (zeros after normalisation), random, pixel."""
    return {"random": "rand", "pixel": "pixel", "const": "const"}.get(str(re_value), "const")


def batch_stage(cfg, device: torch.device | str = "cpu"):
    """The training batch's device-side work: normalisation with ``cfg``'s mean/std, then timm's
    ``RandomErasing`` (MindCV's area/aspect keys) on ``device``, as timm's ``PrefetchLoader`` does."""
    from timm.data.random_erasing import RandomErasing

    mean, std = channel_stats(*cfg.norm_mean_std, cfg.in_channels)
    erase = None
    if cfg.re_prob > 0:
        erase = RandomErasing(
            cfg.re_prob,
            min_area=cfg.re_scale[0],
            max_area=cfg.re_scale[1],
            min_aspect=cfg.re_ratio[0],
            max_aspect=cfg.re_ratio[1],
            mode=_erasing_mode(cfg.re_value),
            max_count=cfg.re_count,
            device=torch.device(device),
        )
    return BatchStage(mean, std, device, erase)
