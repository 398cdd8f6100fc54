"""Resume and the NaN guard, through the CLI: a checkpoint of other model_overrides is refused by name, and no
checkpoint is left holding diverged weights."""

from __future__ import annotations

import logging

import torch

from xcit.cli import main
from xcit.runtime.checkpoint import load_checkpoint, save_checkpoint
from xcit.train.divergence import WEIGHT_LIMIT, set_aside_diverged

from .test_data import make_folder

FAST = ["--model", "xcit_nano_12_p8_224", "--image_resize", "16", "--num_parallel_workers", "0", "--tensorboard",
        "False", "--batch_size", "4", "--log_interval", "1", "--warmup_epochs", "0"]  # fmt: skip


def _train(data, out, overrides: str, *extra: str) -> int:
    argv = ["train", "--data_dir", str(data), "--ckpt_save_dir", str(out), *FAST, "--model_overrides", overrides]
    return main([*argv, *extra])


def test_resume_with_other_model_overrides_is_refused_by_name(tmp_path, caplog):
    data = make_folder(tmp_path / "data", per_class=4, size=16)
    assert _train(data, tmp_path / "run", "{embed_dim: 32, depth: 1, num_heads: 2}", "--epoch_size", "1") == 0
    with caplog.at_level(logging.ERROR, logger="xcit"):
        code = _train(data, tmp_path / "run", "{embed_dim: 32, depth: 2, num_heads: 2}", "--epoch_size", "2",
                      "--resume", "auto")  # fmt: skip
    assert code == 2
    assert "ckpt_e0001.pth was trained with another architecture: depth 1 (this run: 2)" in caplog.text


def test_no_checkpoint_holds_runaway_weights(tmp_path, caplog):
    data = make_folder(tmp_path / "data", per_class=4, size=16)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="xcit"):
        code = _train(data, out, "{embed_dim: 32, depth: 1, num_heads: 2}", "--lr", "1e5", "--epoch_size", "2",
                      "--ckpt_interval_steps", "1")  # fmt: skip
    assert code == 1
    assert "the weights diverged at step 1" in caplog.text and "not saved" in caplog.text
    for ckpt in out.glob("ckpt_e*.pth"):  # whatever was written holds weights a resume can start from
        weights = load_checkpoint(ckpt)["model"]
        assert max(float(v.abs().max()) for v in weights.values() if v.is_floating_point()) <= WEIGHT_LIMIT


def test_the_checkpoint_whose_weights_gave_the_nan_is_set_aside(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"ckpt_e0000_s{step:08d}.pth", {"epoch": 0, "step": step, "w": torch.ones(1)})
    last_good = set_aside_diverged(tmp_path, "ckpt_e*.pth", step=3)  # the loss of step 4 was NaN
    assert last_good == tmp_path / "ckpt_e0000_s00000002.pth"
    assert (tmp_path / "ckpt_e0000_s00000003.pth.diverged").is_file()
    assert not (tmp_path / "ckpt_e0000_s00000003.pth").exists()
