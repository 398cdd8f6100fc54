"""``xcit train`` / ``python train.py``: MindCV-style YAML and flags; no ``--data_dir`` runs the built-in demo."""

from __future__ import annotations

import logging
import os
import sys
import time

from ..config.train_config import ConfigError, load_config
from ..runtime.checkpoint import CheckpointError
from ..runtime.distributed import launch_env
from ..runtime.preemption import Preempted, StopSignal, exit_on_peer_failure, is_peer_failure
from ..weights.files import WeightsError
from ._args import check_device_target

log = logging.getLogger("xcit")

DESCRIPTION = (
    "Train an XCiT. Keys come from the defaults, then the -c YAML (MindCV's keys), then --key value flags. "
    "batch_size is per process: global batch = batch_size x processes. Without --data_dir (and without a config, "
    "or with configs/demo.yaml) it trains the built-in digits demo."
)


def _has_config(argv: list[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)


def main(argv: list[str] | None = None) -> int:
    from ..data.demo import DEMO_RECIPE, ensure_digits

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, explicit = load_config(argv, prog="xcit train", description=DESCRIPTION)
        if not cfg.data_dir and not _has_config(argv):
            cfg, explicit = load_config(argv, prog="xcit train", base=DEMO_RECIPE, description=DESCRIPTION)
            if "epoch_size" in explicit and "decay_epochs" not in explicit:  # the demo's schedule follows its length
                cfg.decay_epochs = max(1, cfg.epoch_size - cfg.warmup_epochs)
                log.info("demo: decay_epochs %d to fit epoch_size %d", cfg.decay_epochs, cfg.epoch_size)
        if cfg.dataset == "digits" and not cfg.data_dir:
            cfg.data_dir = str(ensure_digits())
            if launch_env().rank == 0:  # once per run (the process group does not exist yet)
                log.info("demo: scikit-learn digits as an ImageFolder in %s", cfg.data_dir)
        if not cfg.data_dir:
            raise ConfigError("data_dir is not set: pass --data_dir /path/to/dataset (or run without a config)")
        check_device_target(cfg.device_target)
    except ConfigError as e:
        print(f"xcit train: error: {e}", file=sys.stderr)
        return 2
    from ..train.fit import TrainingDiverged, fit  # after the config: a bad value is reported without loading it all

    start = time.perf_counter()
    try:
        with StopSignal() as stop:  # SIGTERM/SIGINT: checkpoint after the current step, then stop
            result = fit(cfg, explicit, stop=stop)
    except Preempted as e:
        if os.environ.get("SLURM_JOB_ID"):  # a requeued SLURM job resumes by itself (SLURM_RESTART_COUNT > 0)
            log.warning("xcit train: %s. A requeued job resumes by itself from the newest good checkpoint in %s; "
                        "outside the job, run the same command with --resume auto", e, cfg.ckpt_save_dir)  # fmt: skip
        else:
            log.warning("xcit train: %s. Resume: run the same command with --resume auto (it picks the newest good "
                        "checkpoint in %s)", e, cfg.ckpt_save_dir)  # fmt: skip
        return e.exit_code
    except KeyboardInterrupt:
        log.error("xcit train: interrupted twice: stopped without a checkpoint; --resume auto continues from the last")
        return 130
    except TrainingDiverged as e:
        log.error("xcit train: %s", e)
        return 1
    except (ConfigError, CheckpointError, WeightsError, FileNotFoundError) as e:
        log.error("xcit train: error: %s", e)
        return 2
    except RuntimeError as e:
        if is_peer_failure(e):  # another rank died or hangs: one clear line, then exit 1
            exit_on_peer_failure(e)
        raise
    if cfg.dataset == "digits" and result.get("top1") is not None:
        log.info("demo: top-1 %.2f%% on %d held-out digits in %.0f s; validate again with:\n  xcit validate -c %s "
                 "--ckpt_path %s", result["top1"], result["num_images"], time.perf_counter() - start,
                 f"{cfg.ckpt_save_dir}/config.yaml", result["checkpoint"])  # fmt: skip
    return 0
