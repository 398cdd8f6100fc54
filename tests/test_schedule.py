"""The learning-rate schedule against MindCV's ``create_scheduler``, every step.

``tests/fixtures/mindcv/schedules.json`` holds the lr lists that MindCV 0.3.0 itself returned (written by
``scripts/make_mindcv_train_fixture.py --what schedules``); set ``XCIT_MINDCV_PYTHON`` to a Python with MindSpore
and MindCV to regenerate them live and compare again.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from xcit.config.train_config import ConfigError, load_config
from xcit.data.demo import write_digits
from xcit.train.fit import fit
from xcit.train.schedule import LRSchedule

from .conftest import needs_mindcv, run_mindcv_fixture_script
from .test_mindcv import FIXTURES

CASES = json.loads((FIXTURES / "schedules.json").read_text())["cases"]


def schedule(kwargs: dict, optimizer=None) -> LRSchedule:
    """Ours, built from create_scheduler's keyword arguments (train.py: warm-up start = lr x warmup_factor)."""
    k = {"warmup_factor": 0.0, "decay_epochs": 10, "decay_rate": 0.9, "num_cycles": 1, "cycle_decay": 1.0, **kwargs}
    optimizer = optimizer or torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return LRSchedule(
        optimizer, k["lr"], k["steps_per_epoch"], k["num_epochs"], scheduler=k["scheduler"],
        warmup_epochs=k["warmup_epochs"], warmup_start=k["lr"] * k["warmup_factor"], min_lr=k["min_lr"],
        decay_epochs=k["decay_epochs"], decay_rate=k["decay_rate"], milestones=tuple(k.get("milestones", ())),
        stair=k.get("lr_epoch_stair", False), num_cycles=k["num_cycles"], cycle_decay=k["cycle_decay"],
    )  # fmt: skip


def _id(case: dict) -> str:
    k = case["kwargs"]
    return f"{k['scheduler']}-w{k['warmup_epochs']}" + ("-stair" if k.get("lr_epoch_stair") else "")


@pytest.mark.parametrize("case", [c for c in CASES if "lrs" in c], ids=_id)
def test_every_step_equals_mindcvs_create_scheduler(case):
    ours = schedule(case["kwargs"])
    lrs = case["lrs"]
    assert ours.total == len(lrs)
    assert [ours.lr_at(i) for i in range(len(lrs))] == lrs  # bit for bit
    assert ours.lr_at(len(lrs) + 5) == lrs[-1]  # past the end the last value is held


def test_milestones_count_from_the_end_of_warmup():
    case = next(c for c in CASES if c["kwargs"]["scheduler"] == "multi_step_decay")
    lrs = case["lrs"]  # 6 steps per epoch, 1 warm-up epoch, milestones [1, 2]: epochs 2, 3 and 4 of the run
    assert lrs[6:12] == [0.5] * 6 and lrs[12:18] == pytest.approx([0.05] * 6) and lrs[18] == pytest.approx(0.005)


@pytest.mark.parametrize("case", [c for c in CASES if "error" in c], ids=_id)
def test_refusals_are_mindcvs(case, tmp_path):
    k = case["kwargs"]
    assert "doesn't support" in case["error"]  # MindCV's ValueError
    args = ["--scheduler", k["scheduler"], "--warmup_epochs", str(k["warmup_epochs"])]
    args += ["--lr_epoch_stair", str(k.get("lr_epoch_stair", False))]
    with pytest.raises(ConfigError, match=f"scheduler {k['scheduler']} does not support lr_epoch_stair or warmup"):
        load_config(args)


def test_resume_continues_the_schedule():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kwargs = {"lr": 1e-3, "min_lr": 1e-5, "scheduler": "cosine_decay", "steps_per_epoch": 10, "num_epochs": 12}
    s = schedule({**kwargs, "warmup_epochs": 2, "decay_epochs": 8}, opt)
    for _ in range(37):
        s.step()
    other = schedule({**kwargs, "warmup_epochs": 2, "decay_epochs": 8})
    other.load_state_dict(s.state_dict())
    assert opt.param_groups[0]["lr"] == s.lr_at(37) == other.get_last_lr()


@pytest.mark.slow
def test_logged_lr_of_every_training_step_is_mindcvs(tmp_path):
    """A run with 6 steps per epoch logs, for each step, the lr that step used: MindCV's list entry."""
    case = next(c for c in CASES if c["kwargs"]["scheduler"] == "multi_step_decay")
    data = write_digits(tmp_path / "digits", classes=3, per_class=5)  # 12 training images
    out = tmp_path / "out"
    args = ["--data_dir", str(data), "--ckpt_save_dir", str(out), "--batch_size", "2", "--image_resize", "16"]
    args += ["--model", "xcit_nano_12_p8_224", "--model_overrides", "{embed_dim: 16, depth: 1, num_heads: 2}"]
    args += ["--num_parallel_workers", "0", "--tensorboard", "False", "--log_interval", "1", "--epoch_size", "4"]
    args += ["--scheduler", "multi_step_decay", "--multi_step_decay_milestones", "[1, 2]", "--decay_rate", "0.1"]
    args += ["--lr", "0.5", "--warmup_epochs", "1", "--opt", "sgd"]
    fit(*load_config(args))
    logged = [float(m) for m in re.findall(r" lr (\S+) img/s", (out / "train.log").read_text())]
    assert logged == pytest.approx(case["lrs"], rel=1e-9)


@needs_mindcv
def test_fixture_is_what_mindcv_returns_now(tmp_path):
    run_mindcv_fixture_script("schedules", tmp_path)
    live = json.loads((tmp_path / "schedules.json").read_text())["cases"]
    assert live == CASES
    for case in (c for c in live if "lrs" in c):
        assert [schedule(case["kwargs"]).lr_at(i) for i in range(len(case["lrs"]))] == case["lrs"]
