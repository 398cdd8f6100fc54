"""Parameter groups, the optimiser, the per-step learning-rate schedule and the weight EMA.

**Weight decay groups** (``weight_decay_filter``):

* ``official`` (default): the official recipe exactly. ``main.py`` calls timm 0.4's ``create_optimizer``, whose
  ``add_weight_decay`` exempts parameters with ``len(shape) == 1``, names ending in ``.bias`` and the model's
  ``no_weight_decay()`` names (``cls_token``). So LayerNorm/BatchNorm weights, all biases and the LayerScale
  gammas get no decay, while the XCA ``temperature`` (shape ``(heads, 1, 1)``, three dimensions) IS decayed,
  as are ``cls_token``-free conv and linear weights.
* ``all``: additionally exempts every ``temperature`` (norms, biases, gammas and ``cls_token`` already are).
* ``norm_and_bias``: MindCV's filter: 1-D parameters and biases only (``cls_token`` and ``temperature`` decayed).
* ``disable``: decay everything.

**Layer-wise lr decay** (``layer_decay``, BEiT/timm style): layer id 0 is the stem (patch embedding, positional
encoding, ``cls_token``, as timm's ``group_matcher`` for XCiT), XCA block ``i`` is ``i + 1``, class attention,
the final norm and the head are ``depth + 1``; a parameter's lr is ``lr x layer_decay ** (depth + 1 - id)``.

**Schedule**: linear warm-up per step from ``warmup_lr`` (or ``lr x warmup_factor``) to ``lr`` over
``warmup_epochs``, then ``cosine_decay`` to ``min_lr`` over ``decay_epochs`` (MindCV's semantics; ``min_lr`` is held
afterwards), or constant / step / multi-step / exponential decay. ``lr_epoch_stair`` holds it per epoch, which is
how the official recipe's timm scheduler steps.

The weight EMA is in :mod:`xcit.ema`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import WD_FILTERS


def layer_id(name: str, depth: int) -> int:
    """Layer index of a parameter for layer-wise lr decay: 0 stem, 1..depth XCA blocks, depth + 1 the rest."""
    if name.startswith(("patch_embed.", "pos_embed.", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _no_decay(name: str, p: torch.Tensor, wd_filter: str, skip: set[str]) -> bool:
    one_d = p.ndim <= 1 or name.endswith(".bias")
    if wd_filter == "disable":
        return False
    if wd_filter == "norm_and_bias":
        return one_d
    if wd_filter == "all":
        return one_d or name in skip or name.endswith("temperature")
    return one_d or name in skip  # official


def param_groups(
    model: nn.Module, weight_decay: float, wd_filter: str = "official", layer_decay: float | None = None
) -> list[dict]:
    """Optimiser parameter groups: ``weight_decay`` 0 or ``weight_decay`` per the filter, and an ``lr_scale``
    per layer when ``layer_decay`` is set. Each group lists its ``param_names``."""
    if wd_filter not in WD_FILTERS:
        raise ValueError(f"weight_decay_filter must be one of {WD_FILTERS}, got {wd_filter!r}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = _no_decay(name, p, wd_filter, skip)
        lid = layer_id(name, depth) if layer_decay else depth + 1
        scale = layer_decay ** (depth + 1 - lid) if layer_decay else 1.0
        g = groups.setdefault(
            (lid, no_wd),
            {"params": [], "param_names": [], "weight_decay": 0.0 if no_wd else weight_decay, "lr_scale": scale},
        )
        g["params"].append(p)
        g["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def create_optimizer(
    groups: list[dict],
    opt: str,
    lr: float,
    momentum: float = 0.9,
    eps: float = 1e-8,
    nesterov: bool = False,
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """The optimiser named by MindCV's ``opt``. AdamW/Adam/SGD come from torch (fused kernels on CUDA, foreach
    otherwise); the rest (lamb, nadam, rmsprop, adagrad, lion) from timm."""
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    fast = {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=eps, **fast)
    if opt == "adam":  # weight decay is an L2 term here, as in MindSpore's Adam
        return torch.optim.Adam(groups, lr=lr, eps=eps, **fast)
    if opt in ("sgd", "momentum"):
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **fast)
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(groups, opt=opt, lr=lr, momentum=momentum, eps=eps)


class LRSchedule:
    """Per-step learning rate: warm-up, then a decay rule; sets every group's ``lr = lr_at(step) x lr_scale``.

    Call :meth:`step` after each optimiser step. ``state_dict()`` is the step count (plain ints/floats).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        steps_per_epoch: int,
        scheduler: str = "cosine_decay",
        warmup_epochs: float = 0,
        warmup_start: float = 0.0,
        min_lr: float = 0.0,
        decay_epochs: float = 1,
        decay_rate: float = 0.1,
        milestones: tuple[int, ...] = (),
        stair: bool = False,
        num_cycles: int = 1,
        cycle_decay: float = 1.0,
    ) -> None:
        self.optimizer, self.lr, self.spe = optimizer, lr, max(1, steps_per_epoch)
        self.scheduler, self.warmup_start, self.min_lr = scheduler, warmup_start, min_lr
        self.warmup_steps = round(warmup_epochs * self.spe)
        self.decay_steps = max(1, round(decay_epochs * self.spe))
        self.decay_epochs, self.decay_rate, self.milestones = decay_epochs, decay_rate, tuple(milestones)
        self.stair, self.num_cycles, self.cycle_decay = stair, num_cycles, cycle_decay
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based)."""
        if self.stair:
            step = step // self.spe * self.spe
        if step < self.warmup_steps:
            return self.warmup_start + (self.lr - self.warmup_start) * step / self.warmup_steps
        t = step - self.warmup_steps
        epochs_after = t / self.spe
        if self.scheduler == "cosine_decay":
            cycle = t // self.decay_steps
            if cycle >= self.num_cycles:
                return self.min_lr
            peak = self.lr * self.cycle_decay**cycle
            u = (t % self.decay_steps) / self.decay_steps
            return self.min_lr + 0.5 * (peak - self.min_lr) * (1 + math.cos(math.pi * u))
        if self.scheduler == "step_decay":
            return self.lr * self.decay_rate ** int(epochs_after // self.decay_epochs)
        if self.scheduler == "multi_step_decay":
            return self.lr * self.decay_rate ** sum(step / self.spe >= m for m in self.milestones)
        if self.scheduler == "exponential_decay":
            return self.lr * self.decay_rate**epochs_after
        return self.lr  # constant

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.last_step)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
