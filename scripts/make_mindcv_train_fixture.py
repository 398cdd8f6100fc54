"""Record what MindCV's own training code does, for the training-parity tests (tests/test_mindcv_train.py).

Runs in a separate environment with MindSpore and MindCV (never the project's own)::

    python3 -m venv /work/venvs/mindcv && /work/venvs/mindcv/bin/pip install mindspore mindcv "numpy<2"
    /work/venvs/mindcv/bin/python scripts/make_mindcv_train_fixture.py                    # all fixtures below
    /work/venvs/mindcv/bin/python scripts/make_mindcv_train_fixture.py --what schedules --out-dir /tmp/x

``--what`` picks one part (default ``all``); each writes into ``--out-dir`` (default ``tests/fixtures/mindcv``):

* ``schedules`` -> ``schedules.json``: every step's lr of ``mindcv.scheduler.create_scheduler`` for a set of cases
  (each scheduler, warm-up and ``lr_epoch_stair`` on and off), and the error message of each refused case.
* ``config`` -> ``mindcv_saved_config.yaml``: the file MindCV's ``train.py`` writes beside its checkpoints
  (``config.save_args`` after ``config.parse_args(["-c", <seed recipe>])``). MindCV's ``config.py`` lives in its
  repository, not in the wheel: pass ``--mindcv-config path/to/mindcv/config.py``.
* ``train`` -> ``train_parity.npz``: 20 steps of MindCV training (see :func:`make_train_fixture`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mindcv"

# create_scheduler keyword arguments; every case also gets lr 0.5, min_lr 1e-3 unless it sets them
SCHEDULE_CASES = [
    dict(scheduler="cosine_decay", steps_per_epoch=3, warmup_epochs=2, warmup_factor=0.1, decay_epochs=3, num_epochs=6),
    dict(scheduler="cosine_decay", steps_per_epoch=3, warmup_epochs=2, warmup_factor=0.1, decay_epochs=3, num_epochs=6,
         lr_epoch_stair=True),
    dict(scheduler="cosine_decay", steps_per_epoch=4, warmup_epochs=1, decay_epochs=2, num_epochs=7, num_cycles=2,
         cycle_decay=0.5),
    dict(scheduler="cosine_decay", steps_per_epoch=3, warmup_epochs=1, decay_epochs=8, num_epochs=5),
    dict(scheduler="multi_step_decay", steps_per_epoch=6, warmup_epochs=1, milestones=[1, 2], decay_rate=0.1,
         num_epochs=4),
    dict(scheduler="multi_step_decay", steps_per_epoch=6, warmup_epochs=1, milestones=[1, 2], decay_rate=0.1,
         num_epochs=4, lr_epoch_stair=True, warmup_factor=0.01),
    dict(scheduler="step_decay", steps_per_epoch=3, warmup_epochs=1, decay_epochs=2, decay_rate=0.5, num_epochs=6),
    dict(scheduler="exponential_decay", steps_per_epoch=3, warmup_epochs=1, decay_rate=0.7, num_epochs=5),
    dict(scheduler="exponential_decay", steps_per_epoch=3, warmup_epochs=1, decay_rate=0.7, num_epochs=5,
         lr_epoch_stair=True),
    dict(scheduler="polynomial_decay", steps_per_epoch=3, warmup_epochs=1, decay_rate=2.0, num_epochs=5),
    dict(scheduler="polynomial_decay", steps_per_epoch=3, warmup_epochs=1, decay_rate=2.0, num_epochs=5,
         lr_epoch_stair=True),
    dict(scheduler="constant", steps_per_epoch=3, warmup_epochs=2, warmup_factor=0.2, num_epochs=4),
    dict(scheduler="one_cycle", steps_per_epoch=4, warmup_epochs=0, num_epochs=5),
    dict(scheduler="cyclic", steps_per_epoch=4, warmup_epochs=0, num_epochs=5, num_cycles=2),
    dict(scheduler="cyclic", steps_per_epoch=5, warmup_epochs=0, num_epochs=3, num_cycles=1, min_lr=0.0),
    dict(scheduler="one_cycle", steps_per_epoch=4, warmup_epochs=1, num_epochs=5),
    dict(scheduler="cyclic", steps_per_epoch=4, warmup_epochs=0, num_epochs=5, lr_epoch_stair=True),
]  # fmt: skip


def make_schedules(out_dir: Path) -> None:
    """``schedules.json``: ``[{"kwargs": ..., "lrs": [...]} or {"kwargs": ..., "error": "..."}]``."""
    from mindcv.scheduler import create_scheduler

    records = []
    for case in SCHEDULE_CASES:
        kwargs = {"lr": 0.5, "min_lr": 1e-3, **case}
        try:
            records.append({"kwargs": kwargs, "lrs": [float(v) for v in create_scheduler(**kwargs)]})
        except ValueError as e:
            records.append({"kwargs": kwargs, "error": str(e)})
    (out_dir / "schedules.json").write_text(json.dumps({"mindcv": _version(), "cases": records}, indent=1) + "\n")
    print(f"schedules.json: {len(records)} cases")


def make_saved_config(out_dir: Path, mindcv_config: Path) -> None:
    """``mindcv_saved_config.yaml``: MindCV's ``save_args`` output for the seed recipe (as its train.py writes it)."""
    spec = importlib.util.spec_from_file_location("mindcv_repo_config", mindcv_config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = ROOT / "configs" / "xcit" / "xcit_tiny_12_p16_ascend.yaml"
    args = module.parse_args(["-c", str(recipe.relative_to(ROOT))])
    path = out_dir / "mindcv_saved_config.yaml"
    module.save_args(args, str(path))
    print(f"{path.name}: {len(vars(args))} keys")


def _version() -> str:
    import mindcv
    import mindspore

    return f"mindcv {getattr(mindcv, '__version__', '?')}, mindspore {mindspore.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=FIXTURES)
    ap.add_argument("--what", choices=("all", "schedules", "config", "train"), default="all")
    ap.add_argument("--mindcv-config", type=Path, help="MindCV's repository config.py (for --what config)")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.what in ("all", "schedules"):
        make_schedules(args.out_dir)
    if args.what in ("all", "config"):
        if args.mindcv_config is None:
            ap.error("--what config needs --mindcv-config (config.py of a MindCV checkout)")
        make_saved_config(args.out_dir, args.mindcv_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
