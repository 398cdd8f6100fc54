"""A distributed, repeated-augmentation sampler that can stop and resume in the middle of an epoch.

Exact resume needs two things beyond the model and optimiser state:

* **Which samples are left.** The epoch's order is a pure function of ``(seed, epoch)``, so a checkpoint only has to
  record the epoch and how many samples this rank has consumed; :meth:`ResumableSampler.load_state_dict` makes the
  next iteration yield exactly the remaining ones, in the same order.
* **The same augmentations.** Each sample comes with a seed derived from ``(seed, epoch, position in the epoch)``;
  :class:`SeededDataset` reseeds Python, NumPy and torch from it before calling the transforms. The random crop of
  a sample is then the same whichever DataLoader worker loads it, whatever ``num_workers`` is, and whether or not
  the run was interrupted, so worker RNG state never needs saving. The generators of the calling process are
  restored afterwards, so with ``num_workers=0`` the training loop's own random stream is not disturbed.
  Give the DataLoader its own ``generator=torch.Generator()``: without one, every ``iter(loader)`` draws the
  workers' base seed from the global torch RNG, and a resumed epoch would make that draw at a different point of
  the training loop's random stream (drop path, mixup) than the uninterrupted run did.

Repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``, timm's ``RepeatAugSampler``): each index of the
permutation appears ``repeats`` times in a row, the list is padded and dealt round-robin to the ranks, and each rank
keeps only its share of the *original* dataset length, so an epoch has as many steps as without repeats. With
``repeats=1`` this is exactly ``torch.utils.data.DistributedSampler``'s order.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger("xcit")

_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """Well-mixed 63-bit seeds, one per position of an epoch: the splitmix64 finaliser (Steele et al. 2014) folded
    over ``(seed, epoch, position)``. Vectorised: uint64 arithmetic wraps modulo 2**64 as splitmix64 requires."""
    z = np.zeros(len(positions), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for v in (np.uint64(seed % (1 << 64)), np.uint64(epoch % (1 << 64)), positions.astype(np.uint64)):
            z = z + v + _GOLDEN
            z = (z ^ (z >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
            z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(1)


class ResumableSampler(Sampler):
    """Yields ``(index, sample_seed)`` for this rank, deterministically per ``(seed, epoch)``; resumable mid-epoch.

    Args:
        num_samples: dataset length.
        shuffle: a fresh permutation per epoch (``torch.randperm`` seeded with ``seed + epoch``), else in order.
        seed: the run's seed; the same on every rank.
        num_replicas, rank: the data-parallel world size and this process's rank.
        repeats: repeated-augmentation copies of each sample (1 = off).
        drop_last: drop the tail that does not divide evenly across ranks instead of padding with repeated samples.
        batch_size: per-rank batch size, used to turn a count of finished batches into a count of samples.

    Resume protocol: save ``sampler.state_dict(batches_done=k)`` where ``k`` counts the batches of the current
    epoch that the optimiser has consumed (a DataLoader with workers prefetches, so the sampler alone cannot
    know). After ``load_state_dict``, ``set_epoch`` with the same epoch keeps the position and the next iteration
    yields the remaining samples; :attr:`start_batch` says how many batches of the epoch are already done.
    ``len()`` stays the full epoch length so that schedules computed from it do not change on resume.
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        repeats: int = 1,
        drop_last: bool = False,
        batch_size: int = 1,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if repeats < 1 or batch_size < 1:
            raise ValueError(f"repeats and batch_size must be >= 1, got {repeats} and {batch_size}")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.num_replicas, self.rank, self.repeats = num_replicas, rank, repeats
        self.drop_last, self.batch_size = drop_last, batch_size
        # per-rank epoch length: the original dataset's length split over the ranks (DeiT/timm RASampler)
        split = num_samples // num_replicas if drop_last else math.ceil(num_samples / num_replicas)
        self.epoch_length = max(split, 1)
        self.epoch = 0
        self._start = 0  # samples of self.epoch already consumed on this rank (set by load_state_dict)
        self._yielded = 0  # samples handed out by the current iterator, counted from the epoch start

    def __len__(self) -> int:
        return self.epoch_length

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation. A resume position loaded for the same epoch is kept."""
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded = epoch, 0, 0

    @property
    def start_batch(self) -> int:
        """Batches of the current epoch already consumed before the next iteration starts."""
        return self._start // self.batch_size

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for an epoch (without seeds, without skipping consumed samples)."""
        return [i for i, _ in self._order(self.epoch if epoch is None else epoch)]

    def epoch_order(self, epoch: int | None = None) -> list[tuple[int, int]]:
        """This rank's ``(index, sample seed)`` list for an epoch (without skipping consumed samples)."""
        return self._order(self.epoch if epoch is None else epoch)

    def _order(self, epoch: int) -> list[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        # [a, a, a, b, b, b, ...]; positions index this global list so every copy gets its own augmentation seed
        ordered = torch.repeat_interleave(perm, self.repeats).tolist()
        total = math.ceil(len(ordered) / self.num_replicas) * self.num_replicas
        ordered += (ordered * math.ceil(total / len(ordered)))[: total - len(ordered)]  # pad by wrapping around
        mine = np.arange(self.rank, total, self.num_replicas)[: self.epoch_length]
        seeds = sample_seeds(self.seed, epoch, mine).tolist()
        return [(ordered[p], s) for p, s in zip(mine.tolist(), seeds)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order(self.epoch)
        start, self._start = self._start, 0  # a resume position applies to one iteration only
        self._yielded = start
        for item in order[start:]:
            self._yielded += 1
            yield item

    def state_dict(self, batches_done: int | None = None) -> dict:
        """The position to resume from: ``{"epoch", "consumed", ...}`` (plain ints, checkpoint-safe).

        ``batches_done``: batches of the current epoch finished by the training loop. Without it, the number of
        samples this sampler has handed out is used, which is exact only with ``num_workers=0``.
        """
        consumed = self._yielded if batches_done is None else min(batches_done * self.batch_size, self.epoch_length)
        return {
            "epoch": self.epoch,
            "consumed": consumed,
            "num_samples": self.num_samples,
            "num_replicas": self.num_replicas,
            "repeats": self.repeats,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s epoch and position. A different dataset size, seed or repeats cannot continue
        the same order (``ValueError``); a different world size continues at the same fraction of the epoch."""
        for key in ("num_samples", "seed", "repeats", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                ours = getattr(self, key)
                raise ValueError(f"cannot resume the sampler: checkpoint {key}={state[key]!r}, this run {ours!r}")
        consumed = int(state["consumed"])
        if state.get("num_replicas", self.num_replicas) != self.num_replicas and consumed:
            consumed = math.ceil(consumed * state["num_replicas"] / self.num_replicas)
            log.warning(
                "resuming mid-epoch on %d ranks from a checkpoint taken on %d: the rest of this epoch is not the exact "
                "continuation (same number of samples, different order); later epochs are exact",
                self.num_replicas,
                state["num_replicas"],
            )
        self.epoch = int(state["epoch"])
        self._start = self._yielded = min(consumed, self.epoch_length)


class SeededDataset(Dataset):
    """Wraps a map-style dataset so that ``ds[(index, seed)]`` runs ``base[index]`` with Python, NumPy and torch
    seeded from ``seed``; a plain integer index is passed through unseeded. The caller's RNG states are restored
    afterwards."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str):  # expose the base dataset's classes, samples, targets, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, key):
        if not isinstance(key, (tuple, list)):
            return self.base[key]
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            torch.manual_seed(seed)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
