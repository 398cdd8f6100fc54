"""Runs that meet copied folders, changed recipes and diverging losses: resume by recorded progress, refusal of
another architecture, and a last good checkpoint that holds no diverged weights."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import pytest

from xcit.config.train_config import load_config
from xcit.runtime.checkpoint import load_checkpoint
from xcit.train.fit import fit

from .test_data import make_folder

TINY = ["--model", "xcit_nano_12_p8_224", "--model_overrides", "{embed_dim: 32, depth: 1, num_heads: 2}"]
FAST = ["--image_resize", "16", "--num_parallel_workers", "0", "--tensorboard", "False", "--batch_size", "4"]
FAST += ["--log_interval", "1", "--warmup_epochs", "0"]


def train(data: Path, out: Path, *extra: str) -> dict:
    cfg, explicit = load_config(["--data_dir", str(data), "--ckpt_save_dir", str(out), *TINY, *FAST, *extra])
    return fit(cfg, explicit)


@pytest.mark.slow
def test_resume_auto_after_cp_r_and_touch_takes_the_greatest_recorded_progress(tmp_path, caplog):
    data = make_folder(tmp_path / "data", per_class=4, size=16)  # 12 images: 3 steps per epoch
    run = tmp_path / "run"
    train(data, run, "--epoch_size", "2", "--ckpt_interval_steps", "1", "--keep_checkpoint_max", "5")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)  # no -p: every file gets a new time
    os.utime(copy / "ckpt_e0001.pth", None)  # and the epoch-1 checkpoint is the newest file of all
    with caplog.at_level(logging.INFO, logger="xcit"):
        train(data, copy, "--epoch_size", "3", "--ckpt_interval_steps", "1", "--keep_checkpoint_max", "1",
              "--resume", "auto")  # fmt: skip
    resumed = re.findall(r"resumed (\S+): epoch (\d+), step (\d+)", caplog.text)
    assert resumed == [(str(copy / "ckpt_e0002.pth"), "2", "6")], resumed
    assert load_checkpoint(copy / "ckpt_e0003.pth")["step"] == 9
    kept = ["ckpt_e0002_s00000007.pth", "ckpt_e0002_s00000008.pth", "ckpt_e0003.pth"]  # 2 step, 1 epoch file
    assert sorted(p.name for p in copy.glob("ckpt_e*.pth")) == kept
