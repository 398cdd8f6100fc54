"""Every optimiser ``opt`` accepts against MindCV's own, step by step.

``tests/fixtures/mindcv/optimizers.npz`` holds five steps of each optimiser that MindCV 0.3.0's ``create_optimizer``
builds (``scripts/make_mindcv_train_fixture.py --what optim``: train.py's arguments, a per-step lr list, weight decay
0.1 with the ``norm_and_bias`` filter, momentum 0.9, eps 1e-10) on a (4, 3) weight and a (3,) bias with fixed
gradients, in MindSpore on the CPU. The same parameters go through ``xcit.train.optim.param_groups`` and
``create_optimizer`` here. Two cases cannot come from MindSpore's CPU build and are checked against MindSpore's
documented formula instead: ``nn.Lamb`` (its kernel exists on Ascend and GPU only) and ``nn.Momentum`` with
``use_nesterov`` (the CPU kernel ignores the flag: the fixture equals plain momentum).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from xcit.config.train_config import ConfigError, config_from_dict
from xcit.train.optim import create_optimizer, param_groups

from .conftest import needs_mindcv, run_mindcv_fixture_script
from .test_mindcv import FIXTURES

FX = np.load(FIXTURES / "optimizers.npz")
META = json.loads(str(FX["meta"]))
ATOL, RTOL = 1e-6, 1e-5  # fp32 kernels against fp32 kernels: measured <= 3e-7 on parameters of size ~1


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(FX["init/weight"]).clone())
        self.bias = nn.Parameter(torch.from_numpy(FX["init/bias"]).clone())


def _ours(opt: str, nesterov: bool = False) -> list[dict[str, torch.Tensor]]:
    """Parameters after each step, with the groups and optimiser `xcit train` builds."""
    model = _Tiny()
    groups = param_groups(model, META["weight_decay"], META["weight_decay_filter"])
    optimizer = create_optimizer(groups, opt, META["lrs"][0], META["momentum"], META["eps"], nesterov)
    out = []
    for t, lr in enumerate(META["lrs"]):
        for g in optimizer.param_groups:
            g["lr"] = lr
        for name, p in model.named_parameters():
            p.grad = torch.from_numpy(FX[f"grad/{name}/{t}"]).clone()
        optimizer.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _theirs(case: str) -> list[dict[str, torch.Tensor]]:
    return [{n: torch.from_numpy(FX[f"{case}/{n}/{t}"]) for n in ("weight", "bias")} for t in range(META["steps"])]


def _assert_same(ours: list[dict], theirs: list[dict]) -> None:
    for t, (a, b) in enumerate(zip(ours, theirs)):
        for n in b:
            torch.testing.assert_close(a[n], b[n], atol=ATOL, rtol=RTOL, msg=lambda m, n=n, t=t: f"{n} step {t}: {m}")


@pytest.mark.parametrize("case", ["adamw", "adam", "sgd", "sgd_nesterov", "momentum", "nadam", "rmsprop", "adagrad",
                                  "lion"])  # fmt: skip
def test_matches_mindcv(case):
    opt, _, nesterov = case.partition("_")
    _assert_same(_ours(opt, bool(nesterov)), _theirs(case))


def test_every_opt_key_is_covered():
    from xcit.config.train_config import OPTIMIZERS

    covered = {c.split("_")[0] for c in META["cases"]}
    assert set(OPTIMIZERS) <= covered


def test_momentum_nesterov_is_the_documented_formula():
    # MindSpore's CPU ApplyMomentum ignores use_nesterov; the documented rule (Ascend/GPU) is nn.SGD's, which matches
    _assert_same(_theirs("momentum_nesterov"), _theirs("momentum"))
    _assert_same(_ours("momentum", nesterov=True), _theirs("sgd_nesterov"))


def test_lamb_is_mindspore_documented_formula():
    assert "lamb" in META["errors"]  # no CPU kernel: nothing recorded
    b1, b2, eps = 0.9, 0.999, 1e-6  # nn.Lamb's defaults (MindCV passes none)
    w = {n: FX[f"init/{n}"].astype(np.float64) for n in ("weight", "bias")}
    m = {n: np.zeros_like(v) for n, v in w.items()}
    v = {n: np.zeros_like(x) for n, x in w.items()}
    want = []
    for t, lr in enumerate(META["lrs"], start=1):
        for n in w:
            g = FX[f"grad/{n}/{t - 1}"].astype(np.float64)
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            r = m[n] / (1 - b1**t) / (np.sqrt(v[n] / (1 - b2**t)) + eps)
            u = r + (META["weight_decay"] if n == "weight" else 0.0) * w[n]
            wn, un = np.linalg.norm(w[n]), np.linalg.norm(u)
            w[n] = w[n] - lr * (wn / un if wn > 0 and un > 0 else 1.0) * u
        want.append({n: torch.from_numpy(x.astype(np.float32)) for n, x in w.items()})
    _assert_same(_ours("lamb"), want)


def test_adan_is_refused_as_mindcv_train_refuses_it():
    # MindCV's create_optimizer has an Adan, but its train.py's --opt choices leave it out
    assert "adan" in META["cases"] and "adan" not in META["errors"]
    with pytest.raises(ConfigError, match="opt"):
        config_from_dict({"opt": "adan"})


def test_eps_reaches_rmsprop_only():
    model = _Tiny()
    adamw = create_optimizer(param_groups(model, 0.0), "adamw", 0.1, eps=1e-3)
    assert adamw.param_groups[0]["eps"] == 1e-8  # MindCV's AdamW default; its create_optimizer passes no eps
    rms = create_optimizer(param_groups(model, 0.0), "rmsprop", 0.1, eps=1e-3)
    assert rms.param_groups[0]["eps"] == 1e-3


def test_an_unused_eps_is_noticed():
    from xcit.config.train_config import notices

    cfg = config_from_dict({"opt": "adamw", "eps": 1e-6})
    assert any("eps: 1e-06 is not used" in line and "1e-08" in line for line in notices(cfg, {"eps"}))
    assert not any(line.startswith("eps") for line in notices(config_from_dict({"opt": "rmsprop"}), {"eps"}))


@needs_mindcv
def test_fixture_is_what_mindcv_steps_now(tmp_path):
    run_mindcv_fixture_script("optim", tmp_path)
    live = np.load(tmp_path / "optimizers.npz")
    assert sorted(live.files) == sorted(FX.files)
    for name in FX.files:
        if name != "meta":
            np.testing.assert_allclose(live[name], FX[name], atol=ATOL, rtol=RTOL, err_msg=name)
