"""The per-step learning rate, exactly as MindCV's ``create_scheduler`` computes it.

MindCV (``mindcv/scheduler/scheduler_factory.py`` and ``dynamic_lr.py``) builds a list of ``steps_per_epoch x
epoch_size`` values: ``warmup_epochs`` of linear warm-up from ``lr x warmup_factor`` (here also ``warmup_lr``, an
[xcit] key) to ``lr``, then the main phase over the remaining ``epoch_size - warmup_epochs`` epochs. Every main
phase counts its epochs **from the end of the warm-up**: ``multi_step_decay_milestones`` and ``step_decay``'s
``decay_epochs`` too. :meth:`LRSchedule.lr_at` returns entry ``step`` of that list with the same floating-point
operations, so the values are bit-identical; past the end the last value is held.

* ``cosine_decay`` (alias ``warmup_cosine_decay``): ``num_cycles`` cosines of ``decay_epochs`` from
  ``lr x cycle_decay^c`` to ``min_lr``, then ``min_lr``.
* ``step_decay``: ``lr x decay_rate^floor(e / decay_epochs)``; ``multi_step_decay``: ``lr x decay_rate^(number of
  milestones <= e)``, both per whole epoch ``e``.
* ``exponential_decay``: ``lr x decay_rate^e``; ``polynomial_decay``: ``lr x (1 - e / main_epochs)^decay_rate``.
* ``one_cycle``: torch's OneCycle (cosine, 30 % up) from ``lr / 25`` to ``lr`` and down to ``min_lr``.
* ``cyclic``: triangular cycles between ``min_lr`` and ``lr``, ``num_cycles`` of them over the run.
* ``constant``.

``lr_epoch_stair`` holds the lr for each epoch (``e`` a whole number; warm-up per epoch too). As in MindCV,
``one_cycle`` and ``cyclic`` refuse ``lr_epoch_stair`` and ``warmup_epochs > 0``.
"""

from __future__ import annotations

import math
from bisect import bisect_right

import torch

from ..runtime.errors import ConfigError


class LRSchedule:
    """Per-step learning rate; sets every group's ``lr = lr_at(step) x lr_scale``.

    Call :meth:`step` after each optimiser step. ``state_dict()`` is the step count (plain ints).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        steps_per_epoch: int,
        epochs: int,
        scheduler: str = "cosine_decay",
        warmup_epochs: int = 0,
        warmup_start: float = 0.0,
        min_lr: float = 0.0,
        decay_epochs: int = 1,
        decay_rate: float = 0.1,
        milestones: tuple[int, ...] = (),
        stair: bool = False,
        num_cycles: int = 1,
        cycle_decay: float = 1.0,
    ) -> None:
        self.optimizer, self.lr, self.spe = optimizer, lr, max(1, steps_per_epoch)
        self.scheduler, self.warmup_start, self.min_lr = scheduler, warmup_start, min_lr
        self.warmup_epochs, self.decay_epochs, self.decay_rate = warmup_epochs, decay_epochs, decay_rate
        self.milestones, self.stair = sorted(milestones), stair
        self.num_cycles, self.cycle_decay = num_cycles, cycle_decay
        self.warmup_steps = self.spe * warmup_epochs if warmup_epochs > 0 else 0
        self.main_epochs = epochs - warmup_epochs
        self.total = self.warmup_steps + max(0, self.spe * self.main_epochs)
        if scheduler == "cyclic" and int(self.spe * self.main_epochs / num_cycles / 2) < 1:
            raise ConfigError(f"scheduler cyclic: {self.total} steps make no half-cycle for {num_cycles} cycle(s)")
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based)."""
        step = max(0, min(step, self.total - 1))
        if step < self.warmup_steps:
            e = math.floor(step / self.spe) if self.stair else step / self.spe  # dynamic_lr.linear[_refined]_lr
            multiplier = min(e, self.warmup_epochs) / self.warmup_epochs
            return self.warmup_start + multiplier * (self.lr * 1.0 - self.warmup_start)
        return _MAIN[self.scheduler](self, step - self.warmup_steps)

    def _epoch(self, i: int) -> float:
        return math.floor(i / self.spe) if self.stair else i / self.spe

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> float:
        """The lr the next optimiser step uses."""
        return self.lr_at(self.last_step)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


# Main phases: entry ``i`` (0-based, counted from the end of the warm-up) of MindCV's list, in dynamic_lr.py's terms.


def _cosine(s: LRSchedule, i: int) -> float:  # cosine_decay_lr / cosine_decay_refined_lr
    c, k = divmod(i, s.spe * s.decay_epochs)
    if c >= s.num_cycles:
        return s.min_lr
    delta = 0.5 * (s.lr * (s.cycle_decay**c) - s.min_lr)
    t_cur = min(s._epoch(k), s.decay_epochs)
    return s.min_lr + delta * (1.0 + math.cos(math.pi * t_cur / s.decay_epochs))


def _one_cycle(s: LRSchedule, i: int) -> float:  # scheduler_factory: div_factor 25, final lr min_lr; one_cycle_lr
    initial_lr = s.lr / 25.0
    min_lr = initial_lr / (initial_lr / s.min_lr)
    steps = s.spe * s.main_epochs
    up, end = float(0.3 * steps) - 1, float(steps) - 1

    def cos(start: float, stop: float, pct: float) -> float:
        return stop + (start - stop) / 2.0 * (math.cos(math.pi * pct) + 1)

    return cos(initial_lr, s.lr, i / up) if i <= up else cos(s.lr, min_lr, (i - up) / (end - up))


def _cyclic(s: LRSchedule, i: int) -> float:  # cyclic_lr, mode triangular, base_lr min_lr, max_lr lr
    up = float(int(s.spe * s.main_epochs / s.num_cycles / 2))
    total = up + up
    ratio = up / total
    cycle = math.floor(1 + i / total)
    x = 1.0 + i / total - cycle
    scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    return s.min_lr + (s.lr - s.min_lr) * scale * 1.0


_MAIN = {
    "cosine_decay": _cosine,
    "one_cycle": _one_cycle,
    "cyclic": _cyclic,
    "constant": lambda s, i: s.lr,
    "step_decay": lambda s, i: s.lr * s.decay_rate ** math.floor(math.floor(i / s.spe) / s.decay_epochs),
    "multi_step_decay": lambda s, i: s.lr * s.decay_rate ** bisect_right(s.milestones, math.floor(i / s.spe)),
    "exponential_decay": lambda s, i: s.lr * s.decay_rate ** s._epoch(i),
    "polynomial_decay": lambda s, i: s.lr * (1 - min(s._epoch(i), s.main_epochs) / s.main_epochs) ** s.decay_rate,
}
