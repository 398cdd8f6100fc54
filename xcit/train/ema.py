"""The weight EMA, updated after every optimiser step, with MindCV's warm-up or the official constant decay.

``ema_warmup`` selects the decay of update ``t`` (1-based: the ``t``-th optimiser step of the run):

* ``mindcv`` (default, since the keys and defaults are MindCV's): ``d_t = ema_decay x (1 - exp(-t / 2000))``,
  exactly MindCV's ``TrainStep.ema_update`` (``mindcv/utils/train_step.py``; the factor is computed in fp32 there
  and here). The first updates follow the weights closely; ``d_t`` reaches 99 % of ``ema_decay`` after ~9.2k steps.
* ``none``: ``d_t = ema_decay`` from the first step, as the official ``main.py`` (timm 0.4's ``ModelEma``) does.
  Every recipe under ``configs/xcit/official/`` sets it.

Either way ``ema = d_t * ema + (1 - d_t) * weights`` over parameters and floating-point buffers (BatchNorm running
statistics; MindCV's EMA covers them too, as MindSpore keeps them as parameters). The update count ``updates`` is
saved in checkpoints, so a resumed run continues the warm-up where it stopped.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from ..config.train_config import EMA_WARMUPS

MINDCV_EMA_T = 2000.0  # mindcv/utils/train_step.py: ema_decay * (1 - exp(-updates / 2000))


def ema_decay_at(decay: float, updates: int, warmup: str) -> float:
    """The decay of the ``updates``-th EMA update (1-based) under ``warmup`` (``mindcv`` or ``none``)."""
    if warmup == "none":
        return decay
    t = torch.tensor(float(updates), dtype=torch.float32)  # MindCV: a float32 Parameter and fp32 ops
    return float(decay * (1 - torch.exp(-t / MINDCV_EMA_T)))


def describe_ema(decay: float, warmup: str) -> str:
    """The EMA rule in use, for the log."""
    if warmup == "none":
        return f"{decay} per step, no warm-up (ema_warmup none, official)"
    return f"{decay} x (1 - exp(-t/2000)) at step t (ema_warmup mindcv, MindCV's warm-up)"


class ModelEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` (foreach lerp over the state dict) with the decay of :func:`ema_decay_at`.

    Create it before wrapping the model in DDP or ``torch.compile``; call :meth:`update` after each optimiser step.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: str = "mindcv") -> None:
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"ema_warmup must be one of {EMA_WARMUPS}, got {warmup!r}")
        super().__init__(model, decay=decay)
        self.warmup, self.updates = warmup, 0

    def get_decay(self, step: int | None = None) -> float:
        return ema_decay_at(self.decay, self.updates if step is None else step, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        self.updates += 1
        super().update(model, step)
