"""The weight EMA: MindCV's warm-up by default, the official constant decay for the official recipes.

MindCV (``mindcv/utils/train_step.py``, ``TrainStep.ema_update``) updates at optimiser update ``t`` (1-based) with
``d_t = ema_decay * (1 - exp(-t / 2000))`` computed in float32; the official ``main.py`` uses ``d_t = ema_decay``.
The rule is re-derived here with NumPy, independently of ``xcit.train.ema``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xcit.config.train_config import load_config
from xcit.data.demo import write_digits
from xcit.runtime.checkpoint import load_checkpoint
from xcit.train.ema import ModelEma
from xcit.train.fit import fit

SMALL = ["--model_overrides", "{embed_dim: 32, depth: 1, num_heads: 2}", "--image_resize", "32"]
SMALL += ["--num_parallel_workers", "0", "--tensorboard", "False", "--distribute", "False", "--batch_size", "4"]
SMALL += ["--epoch_size", "1", "--warmup_epochs", "1", "--decay_epochs", "1", "--ckpt_interval_steps", "1"]


def mindcv_decay(decay: float, t: int) -> float:
    """MindCV's factor: a float32 Parameter ``updates`` and float32 ops."""
    return float(np.float32(decay) * (np.float32(1) - np.exp(-np.float32(t) / np.float32(2000))))


def test_mindcv_warmup_forgets_the_initial_weights():
    """The seed recipe's d = 0.99996: after 6 steps MindCV's EMA keeps ~1e-17 of the start, a constant d 0.99976."""
    kept = {}
    for warmup in ("mindcv", "none"):
        model = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        ema = ModelEma(model, 0.99996, warmup)
        torch.nn.init.ones_(model.weight)
        for _ in range(6):
            ema.update(model)
        kept[warmup] = 1.0 - ema.module.weight[0, 0].item()  # the initial weights' share of the EMA
        assert ema.updates == 6
    assert kept["none"] == pytest.approx(0.99996**6, rel=1e-5)
    expected = np.prod([mindcv_decay(0.99996, t) for t in range(1, 7)])
    assert expected < 1e-16 and abs(kept["mindcv"]) < 1e-6  # fp32: the EMA equals the new weights


def _run_and_collect(tmp_path, recipe: str, extra: list[str]) -> list[dict]:
    data = write_digits(tmp_path / "digits", classes=4, per_class=7)
    out = tmp_path / "out"
    cfg, explicit = load_config(["-c", recipe, "--data_dir", str(data), "--ckpt_save_dir", str(out), *SMALL, *extra])
    seen = []

    def collect(state):  # the step checkpoint written after this step (every step but the epoch's last)
        path = out / f"ckpt_e{state.epoch:04d}_s{state.step:08d}.pth"
        if path.is_file():
            ckpt = load_checkpoint(path)
            seen.append({k: ckpt[k] for k in ("model", "ema", "ema_updates", "step", "config")})

    fit(cfg, explicit, on_step=collect)
    assert len(seen) >= 4
    return seen


def _assert_ema_rule(seen: list[dict], decay_of) -> None:
    for prev, cur in zip(seen, seen[1:]):
        assert cur["step"] == prev["step"] + 1 and cur["ema_updates"] == cur["step"]
        d = decay_of(cur["step"])
        for k, ema in cur["ema"].items():
            if not ema.is_floating_point():
                continue
            expected = d * prev["ema"][k].double() + (1 - d) * cur["model"][k].double()
            assert (ema.double() - expected).abs().max().item() <= 1e-5, (cur["step"], k)


@pytest.mark.slow
def test_seed_mindcv_recipe_checkpoints_follow_mindcvs_ema_update(tmp_path):
    seen = _run_and_collect(tmp_path, "configs/xcit/xcit_tiny_12_p16_ascend.yaml", ["--re_prob", "0"])
    assert seen[0]["config"]["ema_warmup"] == "mindcv" and seen[0]["config"]["ema_decay"] == 0.99996
    _assert_ema_rule(seen, lambda t: mindcv_decay(0.99996, t))
    w, e = seen[-1]["model"]["head.weight"], seen[-1]["ema"]["head.weight"]
    assert (w - e).abs().max() < 1e-2 * w.abs().max()  # early on the EMA follows the weights


@pytest.mark.slow
def test_official_recipe_checkpoints_follow_the_constant_decay(tmp_path):
    recipe = "configs/xcit/official/xcit_nano_12_p16_224.yaml"
    seen = _run_and_collect(tmp_path, recipe, ["--aug_repeats", "0", "--ema_decay", "0.9"])
    assert seen[0]["config"]["ema_warmup"] == "none"
    _assert_ema_rule(seen, lambda t: 0.9)


def test_banner_names_the_ema_rule(tmp_path, caplog):
    import logging

    data = write_digits(tmp_path / "digits", classes=2, per_class=6)
    args = ["--data_dir", str(data), "--ckpt_save_dir", str(tmp_path / "o"), *SMALL, "--ema", "--ckpt_interval_steps"]
    cfg, explicit = load_config([*args, "0", "--ema_warmup", "none", "--batch_size", "8"])
    with caplog.at_level(logging.INFO, logger="xcit"):
        fit(cfg, explicit)
    assert "no warm-up (ema_warmup none, official)" in caplog.text
