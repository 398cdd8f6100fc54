"""20 steps of training against a real MindCV run, from the same initial weights on the same batches.

``tests/fixtures/mindcv/train_parity.npz`` was written by MindSpore and MindCV themselves
(``scripts/make_mindcv_train_fixture.py --what train``): a small MindCV ``XCiT`` (D 32, depth 2, 4 heads, p8, 32 px,
10 classes) trained with MindCV's ``create_loss`` (CE, label smoothing 0.1), ``create_scheduler`` (1 warm-up epoch
from 0, then cosine decay), ``create_optimizer`` (AdamW, weight decay 0.05 on all but norms, biases and LayerScale)
and ``create_trainer``'s ``TrainStep`` (fixed loss scale 1024, EMA 0.99996 with MindCV's warm-up), 4 batches of 4 per
epoch for 5 epochs, augmentation off, fp32 on the CPU. The same keys here go through ``xcit.train.fit``'s own builders
and ``train_one_epoch``.

Tolerances: both runs compute the same fp32 formulas with different kernels (oneDNN here, MindSpore's CPU kernels
there), so every forward and backward differs by a few ulps and the differences grow a little with each step. When
the fixture was made, the loss differed by at most 1.2e-6 (5 ulps of a loss near 2.3; 8 of the 20 steps by <= 2.4e-7)
and the weights by at most 4.8e-7 (median over tensors 7e-8), the same size as the difference between this fp32 run
and the same run in fp64 (5e-7, except below). The tests allow 5e-6 on the loss and 2e-6 + 1e-5 relative on every
weight and EMA weight: four times the measured spread, far below the change that 20 steps make (>1e-2).

The class-attention key biases are the exception: softmax ignores a constant added to every logit, so their true
gradient is exactly zero and both runs see only rounding noise, which AdamW normalises into steps of up to ~lr. They
drifted 3.4e-5 apart (this run against itself in fp64: 4.9e-5; on one thread: 1.1e-4). They are held only to
what AdamW allows such a parameter, about lr per step in each run (2 x the sum of the run's lrs, 0.04), and a test
shows that their gradient is noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from xcit.config.train_config import TrainConfig, config_from_dict
from xcit.train.ema import ModelEma
from xcit.train.fit import Run, StepOptions, build_model, build_optimizer, train_one_epoch
from xcit.train.losses import Criterion
from xcit.weights.mindspore_ckpt import mindcv_to_timm

from .conftest import needs_mindcv, run_mindcv_fixture_script
from .test_mindcv import FIXTURES

LOSS_ATOL = 5e-6
WEIGHT_ATOL, WEIGHT_RTOL = 2e-6, 1e-5
NOISE_ONLY = ".attn.k.bias"  # class attention: a zero true gradient (see above)


def _fixture(path=FIXTURES / "train_parity.npz") -> dict:
    data = np.load(path)
    return {n: data[n] for n in data.files}


@dataclass
class _Sampler:
    start_batch: int = 0

    def set_epoch(self, epoch: int) -> None:
        pass


class _Batches:
    """The fixture's images in MindCV's order: batch b of every epoch is images [b x B, (b + 1) x B)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        self.images, self.labels, self.batch_size, self.sampler = images, labels, batch_size, _Sampler()

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __iter__(self):
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.images[sl], self.labels[sl]


def _state(fx: dict, prefix: str) -> dict[str, torch.Tensor]:
    sd = {n[len(prefix) :]: torch.from_numpy(fx[n]) for n in fx if n.startswith(prefix)}
    return mindcv_to_timm(sd)


def _config_and_model(fx: dict) -> tuple[TrainConfig, torch.nn.Module]:
    """The fixture's keys as a config, and the model ``xcit train`` builds from them with MindCV's initial weights."""
    meta = json.loads(str(fx["meta"]))
    keys, arch = dict(meta["keys"]), meta["arch"]
    overrides = {k: arch[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "eta")}
    cfg = config_from_dict({
        **keys, "model": "xcit_tiny_12_p8_224", "num_classes": arch["num_classes"],
        "model_overrides": {**overrides, "tokens_norm": arch["tokens_norm"], "flavour": "mindcv"},
    })  # fmt: skip
    model = build_model(cfg, arch["num_classes"], torch.device("cpu"))
    model.load_state_dict(_state(fx, "init/"))
    return cfg, model


def train_like_mindcv(fx: dict) -> tuple[list[float], torch.nn.Module, torch.nn.Module]:
    """Replay the fixture's run with this package's training components, built from MindCV's keys."""
    cfg, model = _config_and_model(fx)
    device = torch.device("cpu")
    ema = ModelEma(model, cfg.ema_decay, cfg.ema_warmup)
    loader = _Batches(torch.from_numpy(fx["images"]), torch.from_numpy(fx["labels"]).long(), cfg.batch_size)
    optimizer, schedule, _ = build_optimizer(cfg, model, len(loader), 1, device)
    base, losses = Criterion(cfg.loss, cfg.label_smoothing, cfg.reduction), []

    def criterion(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss = base(logits, y, x)
        losses.append(loss.item())  # one batch per step: the loss MindCV's TrainStep returns
        return loss

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = Run(model, model, ema, optimizer, schedule, scaler, criterion, loader)
    opts = StepOptions(device, cfg.epoch_size, log_interval=10**9)
    for epoch in range(cfg.epoch_size):
        run.state.epoch = epoch
        train_one_epoch(run, opts)
    return losses, model, ema.module


@pytest.fixture(scope="module")
def replay():
    fx, threads = _fixture(), torch.get_num_threads()
    torch.set_num_threads(1)  # a 70k-parameter model: one thread is ~10x faster than two on a busy machine
    try:
        return fx, *train_like_mindcv(fx)
    finally:
        torch.set_num_threads(threads)


def _noise_atol(fx: dict) -> float:
    """How far apart AdamW can carry a parameter whose gradient is rounding noise: ~lr a step in each run."""
    return 2 * sum(json.loads(str(fx["meta"]))["lrs"][: len(fx["loss"])])


def _compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], noise_atol: float) -> dict[str, float]:
    """Max absolute difference per tensor; asserts every one is within the weight tolerance."""
    diffs = {}
    for name, ref in theirs.items():
        if name.endswith("num_batches_tracked"):
            continue
        got = ours[name].detach().float()
        diffs[name] = float((got - ref).abs().max())
        atol = noise_atol if name.startswith("cls_attn_blocks.") and name.endswith(NOISE_ONLY) else WEIGHT_ATOL
        torch.testing.assert_close(got, ref.float(), atol=atol, rtol=WEIGHT_RTOL, msg=lambda m, n=name: f"{n}: {m}")
    return diffs


def test_loss_matches_mindcv_at_every_step(replay):
    fx, losses, _, _ = replay
    ref = fx["loss"]
    assert len(losses) == len(ref) == 20
    diffs = np.abs(np.array(losses) - ref)
    assert diffs.max() < LOSS_ATOL, f"per-step |loss - MindCV's|: {diffs.tolist()}"
    assert ref[-1] < ref[0] - 0.05  # the run learns something: the comparison is not of an untouched model


def test_final_weights_match_mindcv(replay):
    fx, _, model, _ = replay
    init = _state(fx, "init/")
    final = _state(fx, "final/")
    _compare(model.state_dict(), final, _noise_atol(fx))
    moved = max(float((final[n] - init[n]).abs().max()) for n in final if not n.endswith("num_batches_tracked"))
    assert moved > 100 * WEIGHT_ATOL  # the weights moved far more than the tolerance


def test_ema_weights_match_mindcv(replay):
    fx, _, model, ema = replay
    ref_ema, ref_final = _state(fx, "ema/"), _state(fx, "final/")
    _compare(ema.state_dict(), ref_ema, _noise_atol(fx))
    # EMA minus weights is small after 20 warm-up steps (d_20 ~ 0.01): compare it on its own scale too
    ours, theirs = ema.state_dict(), model.state_dict()
    for name, ref in ref_ema.items():
        if name.endswith(("num_batches_tracked", NOISE_ONLY)):
            continue
        want = ref - ref_final[name]
        got = ours[name] - theirs[name]
        torch.testing.assert_close(got, want, atol=WEIGHT_ATOL / 10, rtol=0.05, msg=lambda m, n=name: f"{n}: {m}")


def test_class_attention_key_bias_gradient_is_rounding_noise():
    cfg, model = _config_and_model(fx := _fixture())
    model.train()
    x, y = torch.from_numpy(fx["images"][:4]), torch.from_numpy(fx["labels"][:4]).long()
    Criterion(cfg.loss, cfg.label_smoothing)(model(x), y).backward()
    grads = {n: float(p.grad.abs().max()) for n, p in model.named_parameters()}
    noise = [g for n, g in grads.items() if n.startswith("cls_attn_blocks.") and n.endswith(NOISE_ONLY)]
    signal = [g for n, g in grads.items() if n.endswith(".bias") and not n.endswith(NOISE_ONLY)]
    assert max(noise) < 1e-6 * max(signal), (noise, max(signal))


@pytest.mark.slow
@needs_mindcv
def test_fixture_is_what_mindcv_trains_now(tmp_path):
    run_mindcv_fixture_script("train", tmp_path, timeout=600)
    live, committed = _fixture(tmp_path / "train_parity.npz"), _fixture()
    np.testing.assert_array_equal(live["images"], committed["images"])
    np.testing.assert_allclose(live["loss"], committed["loss"], atol=LOSS_ATOL)
    losses, model, ema = train_like_mindcv(live)
    assert np.abs(np.array(losses) - live["loss"]).max() < LOSS_ATOL
    _compare(model.state_dict(), _state(live, "final/"), _noise_atol(live))
    _compare(ema.state_dict(), _state(live, "ema/"), _noise_atol(live))
