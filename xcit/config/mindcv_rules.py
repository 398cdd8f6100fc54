"""MindCV's rules for the optimiser and schedule keys: what its factories refuse, and what they silently ignore.

They are checked when the config loads (:func:`xcit.config.train_config.validate`), so a run fails before any work;
:mod:`xcit.train.optim` and :mod:`xcit.train.schedule` build from the same constants.
"""

from __future__ import annotations

from ..runtime.errors import ConfigError

WD_FILTERS = ("official", "all", "norm_and_bias", "disable")  # which parameters get no weight decay
MINDCV_EPS = {"adamw": 1e-8, "adam": 1e-8, "nadam": 1e-8, "lamb": 1e-6}  # mindcv/optim/optim_factory.py


def check_schedule(scheduler: str, warmup_epochs: int, stair: bool) -> None:
    """MindCV's refusals (``create_scheduler`` raises them when the run starts; here the config fails)."""
    if scheduler in ("one_cycle", "cyclic") and (stair or warmup_epochs > 0):
        raise ConfigError(
            f"scheduler {scheduler} does not support lr_epoch_stair or warmup_epochs > 0 (as in MindCV); "
            f"set warmup_epochs: 0 and lr_epoch_stair: False (warmup_epochs is {warmup_epochs})"
        )


def schedule_notices(warmup_epochs: int, stair: bool, warmup_factor: float, warmup_lr: float | None) -> list[str]:
    """MindCV's scheduler warning about a zero first epoch (not its ``warmup_epochs + decay_epochs > num_epochs``
    one, which MindCV's own defaults trigger)."""
    out = []
    if warmup_epochs > 0 and stair and warmup_factor == 0 and warmup_lr is None:
        out.append("warmup_factor 0 with lr_epoch_stair: the lr of the first epoch is 0 (MindCV recommends 0.01)")
    return out


def optim_notices(cfg, explicit: set[str]) -> list[str]:
    """A notice when ``eps`` is set for an optimiser that MindCV builds with its own epsilon (not when it is the
    default, as in the config saved beside every checkpoint)."""
    default = type(cfg).__dataclass_fields__["eps"].default
    if "eps" not in explicit or cfg.opt == "rmsprop" or cfg.eps in (default, MINDCV_EPS.get(cfg.opt)):
        return []
    own = f"its own eps {MINDCV_EPS[cfg.opt]:g}" if cfg.opt in MINDCV_EPS else "no eps"
    return [f"eps: {cfg.eps:g} is not used: as in MindCV, only rmsprop takes eps; {cfg.opt} uses {own}"]
