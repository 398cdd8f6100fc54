"""``xcit.train(config, **keys)``: a training run from Python, as ``xcit train`` runs it from the command line."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .config import ConfigError, TrainConfig


def train(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, **keys: Any) -> dict:
    """Train and validate as ``xcit train`` does; returns the final metrics and output paths (``top1``, ``top5``,
    ``checkpoint``, ...).

    ``config`` is a YAML recipe's path (as ``-c``), a dict of config keys, a :class:`xcit.config.TrainConfig`, or
    None; ``keys`` override it as ``--key value`` flags do (``epoch_size=5``). Without a ``data_dir`` (and with no
    config, or the demo's ``dataset: digits``) it trains the built-in digits demo. A bad key or value raises
    :class:`xcit.errors.ConfigError` before any work; a non-finite loss raises ``TrainingDiverged``.

    >>> result = xcit.train("configs/demo.yaml", epoch_size=2, ckpt_save_dir="ckpt/py")  # doctest: +SKIP
    """
    from .config import _DEFAULTS, config_from_dict, read_yaml
    from .demo import DEMO_RECIPE, ensure_digits
    from .train import fit

    if isinstance(config, TrainConfig):
        values = {k: v for k, v in config.to_dict().items() if v != _DEFAULTS[k]}
    elif isinstance(config, (str, os.PathLike)):
        values = read_yaml(config)
    else:
        values = dict(config or {})
    values.update(keys)
    if not values.get("data_dir") and (config is None or values.get("dataset") == "digits"):
        if "epoch_size" in values and "decay_epochs" not in values:  # the demo's schedule follows its length
            warmup = values.get("warmup_epochs", DEMO_RECIPE["warmup_epochs"])
            values["decay_epochs"] = max(1, int(values["epoch_size"]) - int(warmup))
        values = {**DEMO_RECIPE, **values}
    cfg = config_from_dict(values)
    if cfg.dataset == "digits" and not cfg.data_dir:
        cfg.data_dir = str(ensure_digits())
    if not cfg.data_dir:
        raise ConfigError("data_dir is not set: give data_dir (or no config, for the built-in demo)")
    return fit(cfg, set(values))
