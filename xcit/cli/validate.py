"""``xcit validate`` / ``python validate.py``: top-1, top-5 and loss of ``--ckpt_path`` on the val split."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..config.options import VALIDATE_KEYS
from ..config.train_config import ConfigError, load_config
from ..runtime.checkpoint import CheckpointError
from ..runtime.fileio import check_writable_dir
from ..weights.files import WeightsError
from ._args import check_device_target

log = logging.getLogger("xcit")

DESCRIPTION = (
    "Validate a checkpoint (any supported format; EMA weights when present) on data_dir/val_split. Takes the "
    "same -c YAML and --key value flags as train (listed below: the keys validation reads; the others are "
    "accepted and have no effect). Runs under torchrun too; metrics are exact over all ranks."
)


def main(argv: list[str] | None = None) -> int:
    from ..train.evaluate import validate

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, explicit = load_config(argv, prog="xcit validate", description=DESCRIPTION, keys=VALIDATE_KEYS)
        if not cfg.data_dir:
            raise ConfigError("data_dir is not set: pass --data_dir /path/to/dataset")
        use_release(cfg, explicit)
        check_device_target(cfg.device_target)
        if cfg.results_file:  # fails now, not after validating
            check_writable_dir(Path(cfg.results_file).resolve().parent, "results file")
        validate(cfg, explicit)
    except (ConfigError, CheckpointError, WeightsError, FileNotFoundError) as e:
        print(f"xcit validate: error: {e}", file=sys.stderr)
        return 2
    return 0


def use_release(cfg, explicit: set[str]) -> None:
    """``--ckpt_path NAME.TAG`` (or, without a ckpt_path, MindCV's ``pretrained: True`` / ``pretrained: NAME.TAG``):
    point ``cfg`` at the release's cached file (fetched first when needed), its variant, and the preprocessing its
    top-1 was measured with for each of ``image_resize``, ``crop_pct`` and ``interpolation`` not set explicitly."""
    from ..weights.pretrained import fetch, is_release_name, resolve

    name = cfg.ckpt_path
    if not name and (cfg.pretrained is True or isinstance(cfg.pretrained, str)):
        name = cfg.model if cfg.pretrained is True else cfg.pretrained
    if not name or not is_release_name(name):
        return
    release = resolve(name)
    if "model" in explicit and cfg.model != release.variant:
        raise ConfigError(f"model {cfg.model} does not match the weights {release.name} (a {release.variant})")
    prep = release.preprocessing()
    for key, value in (("image_resize", prep.size), ("crop_pct", prep.crop_pct), ("interpolation", prep.interpolation)):
        if key not in explicit:
            setattr(cfg, key, value)
    cfg.model, cfg.ckpt_path = release.variant, str(fetch(release))
    log.info("%s (top-1 %.2f published): %s, %s resize to %d, crop %.3f", release.name, release.top1, cfg.ckpt_path,
             cfg.interpolation, cfg.image_resize, cfg.crop_pct)  # fmt: skip
