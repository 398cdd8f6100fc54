"""The training loop's parts: a run's state (:class:`Run`, what a checkpoint holds of it) and one epoch of steps.

:func:`xcit.train.fit.fit` builds a :class:`Run` from the config and calls :func:`train_one_epoch` once per epoch; a
checkpoint is ``run.state_dict(...)`` and a resume ``run.load_state_dict(...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..runtime import distributed
from ..runtime.checkpoint import load_checkpoint
from ..runtime.errors import ConfigError
from ..runtime.limits import check_same_architecture
from ..runtime.precision import autocast
from .logs import step_log

log = logging.getLogger("xcit")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; training stopped before the bad step changed the weights."""


@dataclass
class TrainState:
    """Where training stands: ``epoch`` is the epoch to run next (or the one in progress mid-epoch)."""

    epoch: int = 0
    step: int = 0
    batches_done: int = 0  # batches of ``epoch`` already trained (mid-epoch checkpoints)
    loss_sum: float = 0.0  # the epoch's step losses so far and their count: a resumed epoch reports all of them
    loss_steps: int = 0
    best_top1: float = -1.0


@dataclass(frozen=True)
class StepOptions:
    """How each training step runs."""

    device: torch.device
    epochs: int  # for the progress bar and the step log
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    accum: int = 1  # batches per optimiser step
    clip_value: float | None = None  # gradient-norm clipping
    freeze_bn: bool = False
    channels_last: bool = False
    log_interval: int = 100


@dataclass
class Run:
    """What a training run carries from step to step. ``model`` is the bare model (EMA updates, checkpoints);
    ``train_model`` is what the steps call (compiled and/or DDP-wrapped, or ``model`` itself)."""

    model: nn.Module
    train_model: nn.Module
    ema: nn.Module | None  # xcit.train.ema.ModelEma
    optimizer: torch.optim.Optimizer
    schedule: object  # xcit.train.schedule.LRSchedule
    scaler: torch.amp.GradScaler
    criterion: Callable
    loader: torch.utils.data.DataLoader  # its sampler is an xcit.data.sampler.ResumableSampler
    mixup: Callable | None = None
    state: TrainState = field(default_factory=TrainState)

    def state_dict(self, config: dict, arch: str, classes: list[str], rngs: list) -> dict:
        """The full training state as ``weights_only``-safe values (the keys :mod:`xcit.train.fit` documents)."""
        ema, state = self.ema, self.state
        return {
            "model": self.model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_updates": ema.updates if ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "sampler": self.loader.sampler.state_dict(batches_done=state.batches_done),
            "epoch_loss": [state.loss_sum, state.loss_steps],  # the running mean of a mid-epoch checkpoint's epoch
            "rng": rngs,
            "config": config,
            "classes": list(classes),
            "arch": arch,
            "model_config": dataclasses.asdict(self.model.cfg),
            "flavour": self.model.flavour,
            "best_top1": state.best_top1,
        }

    def load_state_dict(self, path: Path, ckpt: dict | None, arch: str, classes: list[str]) -> list | None:
        """Load a full checkpoint (``ckpt``, or read from ``path``) into this run and set :attr:`state`. Returns the
        saved RNG states (the caller restores them once setup is over). Another model or class list is refused."""
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        if ckpt.get("arch") != arch or list(ckpt.get("classes") or classes) != list(classes):
            raise ConfigError(
                f"{path} was trained as {ckpt.get('arch')!r} on {len(ckpt.get('classes') or [])} classes; this run "
                f"is {arch!r} on {len(classes)} classes"
            )
        check_same_architecture(path, ckpt.get("model_config"), dataclasses.asdict(self.model.cfg))
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
            self.ema.updates = int(ckpt.get("ema_updates", ckpt["step"]))  # older checkpoints: one update per step
        sampler = self.loader.sampler
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            sampler.load_state_dict(ckpt["sampler"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{path}: cannot resume this run's optimiser or data order from it ({e})") from None
        self.schedule.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(int(ckpt["epoch"]), int(ckpt["step"]), 0, best_top1=float(ckpt.get("best_top1", -1.0)))
        if ckpt["sampler"]["epoch"] == state.epoch:
            loss_sum, loss_steps = ckpt.get("epoch_loss", (0.0, 0))
            state.batches_done, state.loss_sum, state.loss_steps = sampler.start_batch, float(loss_sum), int(loss_steps)
        self.state = state
        log.info("resumed %s: epoch %d, step %d%s", path, state.epoch, state.step,
                 f" (+{state.batches_done} batches)" if state.batches_done else "")  # fmt: skip
        return ckpt.get("rng")


# ----------------------------------------------------------------------------------------------------------------------
# The epoch
# ----------------------------------------------------------------------------------------------------------------------


def train_one_epoch(
    run: Run,
    opts: StepOptions,
    on_step: Callable[[TrainState], None] | None = None,
    last_checkpoint: Callable[[], Path | None] | None = None,
) -> dict:
    """One epoch (or its rest, after a mid-epoch resume). Returns ``train_loss``, ``lr``, ``epoch_time`` and
    ``img_per_sec`` (global). The loss of each step is the mean over all ranks' images. ``on_step(state)`` runs
    after each optimiser step; ``last_checkpoint()`` names the newest checkpoint for the divergence message."""
    _train_mode(run.train_model, opts.freeze_bn)
    loader, state = run.loader, run.state
    start_batch = loader.sampler.start_batch  # read before iterating: iterating consumes the resume position
    total = len(loader)
    bar = tqdm(total=total, initial=start_batch, desc=f"epoch {state.epoch + 1}/{opts.epochs}", dynamic_ncols=True,
               disable=None if distributed.is_main() else True, leave=False)  # fmt: skip
    micro = torch.zeros((), device=opts.device)
    t0 = time.perf_counter()
    step_lr = run.schedule.lr_at(max(0, run.schedule.last_step - 1))  # the lr of the last step taken
    for i, (x, y) in enumerate(loader, start=start_batch):
        boundary = (i + 1) % opts.accum == 0 or i + 1 == total
        micro += _forward_backward(run, opts, x, y, sync=boundary)
        bar.update(1)
        if not boundary:
            continue
        step_loss = distributed.all_reduce_mean(micro.clone()).item()
        micro.zero_()
        if not math.isfinite(step_loss):
            bar.close()
            last = last_checkpoint() if last_checkpoint is not None else None
            raise TrainingDiverged(
                f"loss is {step_loss} at epoch {state.epoch + 1}, step {state.step + 1}: stopped before this step "
                f"changed the weights. Last good checkpoint: {last or 'none written yet'}. Try a "
                f"lower lr, clip_grad: True, or amp_level O0 / amp_dtype bf16."
            )
        step_lr = _optimizer_step(run, opts.clip_value)
        state.step, state.batches_done = state.step + 1, i + 1
        state.loss_sum, state.loss_steps = state.loss_sum + step_loss, state.loss_steps + 1
        ips = (i + 1 - start_batch) * loader.batch_size * opts.world_size / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{step_lr:.2e}", img_s=f"{ips:.0f}")
        if state.step % opts.log_interval == 0 or i + 1 == total:
            step_log.info("epoch %d/%d step %d/%d loss %.6f lr %.9e img/s %.0f",
                          state.epoch + 1, opts.epochs, i + 1, total, step_loss, step_lr, ips)  # fmt: skip
        if on_step is not None:
            on_step(state)
    bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "train_loss": state.loss_sum / state.loss_steps if state.loss_steps else float("nan"),
        "lr": step_lr,
        "epoch_time": elapsed,
        "img_per_sec": (total - start_batch) * loader.batch_size * opts.world_size / max(elapsed, 1e-9),
    }


def _train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:  # BatchNorm keeps its running statistics (and normalises with them)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _forward_backward(run: Run, opts: StepOptions, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
    """One batch's loss, scaled and backpropagated (gradients all-reduced under DDP only when ``sync``); returns
    the loss's share of the optimiser step, detached."""
    x, y = x.to(opts.device, non_blocking=True), y.to(opts.device, non_blocking=True)
    if opts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if run.mixup is not None:
        x, y = run.mixup(x, y)
    model = run.train_model
    no_sync = model.no_sync() if isinstance(model, DDP) and not sync else contextlib.nullcontext()
    with no_sync:
        with autocast(opts.device, opts.amp_dtype):
            logits = model(x)
        loss = run.criterion(logits, y, x)
        run.scaler.scale(loss / opts.accum).backward()
    return loss.detach() / opts.accum


def _optimizer_step(run: Run, clip_value: float | None) -> float:
    """Clip, step, zero the gradients, advance the schedule and the EMA. Returns the lr the step used."""
    if clip_value is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.train_model.parameters(), clip_value)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    step_lr = run.schedule.get_last_lr()
    run.schedule.step()
    if run.ema is not None:
        run.ema.update(run.model)
    return step_lr
