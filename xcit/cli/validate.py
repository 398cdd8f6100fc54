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
        check_device_target(cfg.device_target)
        if cfg.results_file:  # fails now, not after validating
            check_writable_dir(Path(cfg.results_file).resolve().parent, "results file")
        validate(cfg, explicit)
    except (ConfigError, CheckpointError, WeightsError, FileNotFoundError) as e:
        print(f"xcit validate: error: {e}", file=sys.stderr)
        return 2
    return 0
