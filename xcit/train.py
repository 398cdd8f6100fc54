"""``fit()``: data -> model -> optimiser -> loop -> checkpoint, single-process or under torchrun.

What a run writes (rank 0 only) into ``ckpt_save_dir``: ``config.yaml`` (the resolved config), ``train.log``,
``metrics.csv`` / ``metrics.jsonl`` / ``metrics.png``, ``tensorboard/`` (if installed), epoch checkpoints
``ckpt_e{epoch}.pth`` (the newest ``keep_checkpoint_max`` kept), ``best.pth`` (best validation top-1) and, while it
runs, ``run.lock`` (:mod:`xcit.runlock`: one run per folder).

A checkpoint holds the full state, loadable with ``torch.load(weights_only=True)``: ``model``, ``ema``,
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (the epoch to resume at), ``step`` (optimiser steps so far),
``sampler`` (position within the epoch), ``rng`` (every rank's generators), ``config``, ``classes``, ``arch``,
``model_config`` (the architecture, overrides included), ``flavour`` and ``best_top1``. Resuming restores all of
it, so a resumed run continues bit for bit (CPU), mid-epoch included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import distributed
from .checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, check_training, notices, save_config
from .data import build_datasets, mixup_fn, train_loader, train_subset, val_loader
from .distill import build_teacher
from .divergence import diverged_weights, set_aside_diverged
from .ema import ModelEma
from .evaluate import evaluate
from .fileio import check_writable_dir
from .limits import check_same_architecture
from .logging_utils import MetricsLog, run_banner, setup_logging, step_log
from .losses import Criterion, DistillationLoss
from .optim import create_optimizer, param_groups
from .precision import amp_setup, autocast
from .preemption import Preempted, StopSignal, elastic_restart_count
from .readers import report_bad_reads
from .runlock import hold_run_lock
from .schedule import LRSchedule
from .threads import CpuThreads
from .variants import create_model
from .weights import load_weights

log = logging.getLogger("xcit")

CKPT_PATTERN = "ckpt_e*.pth"


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


def fit(
    cfg: TrainConfig,
    explicit: set[str] | frozenset = frozenset(),
    on_step: Callable[[TrainState], None] | None = None,
    stop: StopSignal | None = None,
) -> dict:
    """Train ``cfg``'s model on ``cfg.data_dir`` and validate it. Returns the final metrics and output paths.

    ``on_step(state)`` runs on every rank after each optimiser step (all ranks must make the same collective
    calls in it). Raises :class:`TrainingDiverged` on a non-finite loss, keeping the last good checkpoint. When
    ``stop`` (an active :class:`StopSignal`) has caught SIGTERM/SIGINT, the run saves a checkpoint after the
    current step and raises :class:`Preempted`.
    """
    check_training(cfg)
    check_writable_dir(cfg.ckpt_save_dir, "checkpoints")  # a read-only or full disk: one line now, not a traceback
    world = distributed.init(cfg.device_target, cfg.distribute, cfg.dist_timeout)
    with hold_run_lock(Path(cfg.ckpt_save_dir), world.is_main):
        return _fit(cfg, world, explicit, on_step, stop)


def _fit(cfg: TrainConfig, world: distributed.World, explicit, on_step, stop) -> dict:
    out = Path(cfg.ckpt_save_dir)
    setup_logging(out / "train.log" if world.is_main else None, world.rank)
    for line in notices(cfg, set(explicit)):
        log.info("notice: %s", line)
    cpu_threads = CpuThreads.start(world.device)  # the CPUs not kept busy by other processes (xcit.threads)
    _seed_everything(cfg.seed)  # the same initial weights on every rank (the EMA copy is made before DDP syncs)

    # -- data ----------------------------------------------------------------------------------------------------
    need_val = cfg.val_while_train or bool(cfg.results_file)
    train_set, val_set = build_datasets(cfg, need_val=need_val, cache_dir=out / "data_index")  # listed once a job
    classes = train_set.classes
    num_classes = _num_classes(cfg.num_classes, classes)
    train_set = train_subset(train_set, cfg.num_samples, cfg.seed)
    loader = train_loader(train_set, cfg, world.size, world.rank)
    vloader = val_loader(val_set, cfg.batch_size, cfg.num_parallel_workers, world.size, world.rank) if val_set else None
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(loader) / accum)
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training images make no full batch of {cfg.batch_size} x {world.size}")
    mixup = mixup_fn(cfg, num_classes)
    criterion = Criterion(cfg.loss, 0.0 if mixup else cfg.label_smoothing, cfg.reduction)  # mixup smooths itself

    # -- model ---------------------------------------------------------------------------------------------------
    torch.backends.cudnn.benchmark = world.device.type == "cuda"  # fixed input size: pick the fastest conv kernels
    model = build_model(cfg, num_classes, world.device)
    ema = ModelEma(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None  # before SyncBN/compile/DDP (official)
    train_model = _wrap(model, cfg, world)
    _seed_everything(cfg.seed + world.rank)  # official main.py: seed + rank, so drop path differs across ranks

    # -- optimiser -----------------------------------------------------------------------------------------------
    optimizer, schedule, lr = build_optimizer(cfg, model, steps_per_epoch, world.size, world.device)
    amp_dtype, scaler = amp_setup(cfg.amp_level, cfg.amp_dtype, cfg.loss_scale, world.device)
    val_dtype, _ = amp_setup(cfg.val_amp_level, cfg.amp_dtype, 1.0, world.device)
    if cfg.distillation_type != "none":
        teacher = build_teacher(cfg.teacher_model, cfg.teacher_path, num_classes, world.device)
        criterion = DistillationLoss(
            criterion, teacher, cfg.distillation_type, cfg.distillation_alpha, cfg.distillation_tau, amp_dtype
        )
        if world.is_main:
            log.info("distillation %s from %s (%s), alpha %g, tau %g", cfg.distillation_type, cfg.teacher_model,
                     cfg.teacher_path, cfg.distillation_alpha, cfg.distillation_tau)  # fmt: skip

    # -- resume --------------------------------------------------------------------------------------------------
    state, rng = TrainState(), None
    resume_from = _resume_point(cfg, out)
    if resume_from is not None:
        state, rng = restore(*resume_from, cfg, classes, model, ema, optimizer, schedule, scaler, loader.sampler)
        if state.epoch >= cfg.epoch_size and world.is_main:  # e.g. --resume auto once more after the end
            log.info("%s: the run had finished (epoch %d of %d): nothing left to train", resume_from[0], state.epoch,
                     cfg.epoch_size)  # fmt: skip
    if world.is_main:
        run_banner(cfg, world, model, len(train_set), len(val_set or []), classes, steps_per_epoch, lr, amp_dtype)
        save_config(cfg, out / "config.yaml", header=f"resolved config of this run ({cfg.model})")
    metrics = MetricsLog(out, state.epoch, cfg.tensorboard) if world.is_main else None

    def save(names: list[str]) -> None:  # every rank calls it (the RNG states are gathered)
        if bad := diverged_weights(model):  # the same weights on every rank: every rank stops here
            last = latest_checkpoint(out, CKPT_PATTERN) if world.is_main else None
            raise TrainingDiverged(
                f"the weights diverged at step {state.step} ({bad}); not saved. Last good checkpoint: "
                f"{last or 'none written yet'}. Try a lower lr or clip_grad: True"
            )
        rngs = distributed.all_gather_object(capture_rng_state())
        if world.is_main:
            ckpt = checkpoint_state(cfg, model, ema, optimizer, schedule, scaler, loader.sampler, state, rngs, classes)
            for name in names:
                save_checkpoint(out / name, ckpt)
            _prune(out, cfg.ckpt_save_policy, cfg.keep_checkpoint_max, metrics.rows if metrics else [])

    def after_step(st: TrainState) -> None:
        if cpu_threads is not None:
            cpu_threads.adjust()
        name = f"ckpt_e{st.epoch:04d}_s{st.step:08d}.pth"
        saved = cfg.ckpt_interval_steps and st.step % cfg.ckpt_interval_steps == 0 and st.batches_done < len(loader)
        if saved:
            save([name])
        if on_step is not None:
            on_step(st)
        signum = stop.agreed(world.device) if stop is not None else 0  # all ranks stop after the same step
        if signum:
            if not saved:
                save([name])
            raise Preempted(signum, str(out / name) if world.is_main else None)

    if rng is not None:  # last, so that nothing above shifts the restored random streams
        restore_rng_state(rng[world.rank] if len(rng) == world.size else rng[0])

    # -- loop ----------------------------------------------------------------------------------------------------
    last_val = None
    for epoch in range(state.epoch, cfg.epoch_size):
        state.epoch = epoch
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(
            train_model,
            loader,
            optimizer,
            schedule,
            criterion,
            state,
            device=world.device,
            epochs=cfg.epoch_size,
            world_size=world.size,
            mixup=mixup,
            ema=ema,
            scaler=scaler,
            amp_dtype=amp_dtype,
            accum=accum,
            clip_value=cfg.clip_value if cfg.clip_grad else None,
            freeze_bn=cfg.freeze_bn,
            channels_last=cfg.channels_last,
            log_interval=cfg.log_interval,
            on_step=after_step,
            last_checkpoint=lambda: set_aside_diverged(out, CKPT_PATTERN, state.step) if world.is_main else None,
        )
        stats["bad_images"] = report_bad_reads(loader, f"epoch {epoch + 1}", "replaced by the next good image", 10)
        state.epoch, state.batches_done, state.loss_sum, state.loss_steps = epoch + 1, 0, 0.0, 0
        last_val = None
        if vloader is not None and (
            (cfg.val_while_train and (epoch + 1) % cfg.val_interval == 0) or epoch + 1 == cfg.epoch_size
        ):
            last_val = evaluate(ema.module if ema else model, vloader, world.device, val_dtype, cfg.channels_last)
        is_best = last_val is not None and last_val["top1"] > state.best_top1
        if is_best:
            state.best_top1 = last_val["top1"]
        _log_epoch(epoch, cfg.epoch_size, stats, last_val, state)
        if metrics is not None:
            metrics.add({"epoch": epoch, "step": state.step, **stats, **_val_columns(last_val)})
        names = ["best.pth"] if is_best else []
        if (epoch + 1) % cfg.ckpt_save_interval == 0 or epoch + 1 == cfg.epoch_size:
            names.insert(0, f"ckpt_e{epoch + 1:04d}.pth")
        if names:
            save(names)

    # -- report --------------------------------------------------------------------------------------------------
    if last_val is None and vloader is not None:  # nothing left to train (resumed a finished run)
        last_val = evaluate(ema.module if ema else model, vloader, world.device, val_dtype, cfg.channels_last)
    result = _finish(cfg, out, last_val, world.is_main)
    if metrics is not None:
        metrics.close()
    distributed.barrier()
    return result


# ----------------------------------------------------------------------------------------------------------------------
# The epoch
# ----------------------------------------------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    criterion: Criterion | DistillationLoss,
    state: TrainState,
    *,
    device: torch.device,
    epochs: int,
    world_size: int = 1,
    mixup=None,
    ema=None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    accum: int = 1,
    clip_value: float | None = None,
    freeze_bn: bool = False,
    channels_last: bool = False,
    log_interval: int = 100,
    on_step: Callable[[TrainState], None] | None = None,
    last_checkpoint: Callable[[], Path | None] = lambda: None,
) -> dict:
    """One epoch (or its rest, after a mid-epoch resume). Returns ``train_loss``, ``lr``, ``epoch_time`` and
    ``img_per_sec`` (global). The loss of each step is the mean over all ranks' images."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    inner = model.module if isinstance(model, DDP) else model
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile wrapper
    start_batch = loader.sampler.start_batch  # read before iterating: iterating consumes the resume position
    total, batch = len(loader), loader.batch_size
    bar = tqdm(total=total, initial=start_batch, desc=f"epoch {state.epoch + 1}/{epochs}", dynamic_ncols=True,
               disable=None if distributed.is_main() else True, leave=False)  # fmt: skip
    micro = torch.zeros((), device=device)
    t0 = time.perf_counter()
    step_lr = schedule.lr_at(max(0, schedule.last_step - 1))  # the lr of the last step taken
    for i, (x, y) in enumerate(loader, start=start_batch):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            x, y = mixup(x, y)
        boundary = (i + 1) % accum == 0 or i + 1 == total
        no_sync = model.no_sync() if isinstance(model, DDP) and not boundary else contextlib.nullcontext()
        with no_sync:
            with autocast(device, amp_dtype):
                logits = model(x)
            loss = criterion(logits, y, x)
            scaler.scale(loss / accum).backward()
        micro += loss.detach() / accum
        bar.update(1)
        if not boundary:
            continue
        step_loss = distributed.all_reduce_mean(micro.clone()).item()
        micro.zero_()
        if not math.isfinite(step_loss):
            bar.close()
            raise TrainingDiverged(
                f"loss is {step_loss} at epoch {state.epoch + 1}, step {state.step + 1}: stopped before this step "
                f"changed the weights. Last good checkpoint: {last_checkpoint() or 'none written yet'}. Try a "
                f"lower lr, clip_grad: True, or amp_level O0 / amp_dtype bf16."
            )
        if clip_value is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_value)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step_lr = schedule.get_last_lr()  # the lr this step used
        schedule.step()
        if ema is not None:
            ema.update(inner)
        state.step, state.batches_done = state.step + 1, i + 1
        state.loss_sum, state.loss_steps = state.loss_sum + step_loss, state.loss_steps + 1
        done = (i + 1 - start_batch) * batch * world_size
        ips = done / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{step_lr:.2e}", img_s=f"{ips:.0f}")
        if state.step % log_interval == 0 or i + 1 == total:
            step_log.info(
                "epoch %d/%d step %d/%d loss %.6f lr %.9e img/s %.0f",
                state.epoch + 1, epochs, i + 1, total, step_loss, step_lr, ips,
            )  # fmt: skip
        if on_step is not None:
            on_step(state)
    bar.close()
    elapsed = time.perf_counter() - t0
    seen = (total - start_batch) * batch * world_size
    return {
        "train_loss": state.loss_sum / state.loss_steps if state.loss_steps else float("nan"),
        "lr": step_lr,
        "epoch_time": elapsed,
        "img_per_sec": seen / max(elapsed, 1e-9),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Model, precision, wrapping
# ----------------------------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The variant with ``model_overrides``, from ``pretrained`` (head reset to ``num_classes``) or ``ckpt_path``
    (weights only; with ``resume_opt`` the whole run is resumed instead)."""
    pretrained = cfg.pretrained if isinstance(cfg.pretrained, str) and cfg.pretrained else None
    model = create_model(
        cfg.model,
        pretrained=pretrained,
        num_classes=num_classes,
        in_chans=cfg.in_channels,
        drop_path_rate=cfg.drop_path_rate or 0.0,
        drop_rate=cfg.drop_rate or 0.0,
        head_drop_rate=cfg.head_drop_rate,
        **cfg.model_overrides,
    )
    if cfg.ckpt_path and not cfg.resume_opt:
        load_weights(model, cfg.ckpt_path, strict=True)
        log.info("initialised %s from %s", cfg.model, cfg.ckpt_path)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, steps_per_epoch: int, world_size: int, device: torch.device
) -> tuple[torch.optim.Optimizer, LRSchedule, float]:
    """The optimiser over ``model``'s parameter groups, its per-step schedule and the base lr (``lr_scale``
    applied to the global batch ``batch_size x world_size x gradient_accumulation_steps``)."""
    global_batch = cfg.batch_size * world_size * cfg.gradient_accumulation_steps
    lr = cfg.lr * global_batch / 512 if cfg.lr_scale == "linear" else cfg.lr
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_filter, cfg.layer_decay)
    optimizer = create_optimizer(groups, cfg.opt, lr, cfg.momentum, cfg.eps, cfg.use_nesterov, device)
    schedule = LRSchedule(
        optimizer,
        lr,
        steps_per_epoch,
        cfg.epoch_size,
        scheduler=cfg.scheduler,
        warmup_epochs=cfg.warmup_epochs,
        warmup_start=cfg.warmup_lr if cfg.warmup_lr is not None else lr * cfg.warmup_factor,
        min_lr=cfg.min_lr,
        decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate,
        milestones=tuple(cfg.multi_step_decay_milestones),
        stair=cfg.lr_epoch_stair,
        num_cycles=cfg.num_cycles,
        cycle_decay=cfg.cycle_decay,
    )
    return optimizer, schedule, lr


def _wrap(model: nn.Module, cfg: TrainConfig, world: distributed.World) -> nn.Module:
    """SyncBatchNorm, torch.compile and DDP, in that order (nanoGPT compiles before wrapping in DDP)."""
    if cfg.sync_bn and world.distributed:
        if world.device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA: torch's SyncBatchNorm is GPU-only (on CPU use freeze_bn)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.compiles_on(world.device.type):
        model = torch.compile(model)
    if world.distributed:
        model = DDP(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    return model


def _num_classes(requested: int | None, classes: list[str]) -> int:
    if requested is None:
        return len(classes)
    if requested < len(classes):
        raise ConfigError(f"num_classes {requested} is smaller than the {len(classes)} classes in the data")
    if requested > len(classes):
        log.warning("num_classes %d for %d classes in the data: the extra outputs are never targets", requested,
                    len(classes))  # fmt: skip
    return requested


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_state(
    cfg: TrainConfig, model, ema, optimizer, schedule, scaler, sampler, state: TrainState, rngs: list, classes
) -> dict:
    """The full training state as ``weights_only``-safe values (see the module docstring)."""
    return {
        "model": model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "ema_updates": ema.updates if ema is not None else 0,
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "sampler": sampler.state_dict(batches_done=state.batches_done),
        "epoch_loss": [state.loss_sum, state.loss_steps],  # the running mean of a mid-epoch checkpoint's epoch
        "rng": rngs,
        "config": cfg.to_dict(),
        "classes": list(classes),
        "arch": cfg.model,
        "model_config": dataclasses.asdict(model.cfg),
        "flavour": model.flavour,
        "best_top1": state.best_top1,
    }


def _resume_point(cfg: TrainConfig, out: Path) -> tuple[Path, dict | None] | None:
    """The checkpoint to resume from, and its contents when choosing it meant reading it (``resume auto``)."""
    restarts = elastic_restart_count()  # torchrun --max_restarts: a restarted job resumes by itself
    if cfg.resume == "auto" or restarts:
        found = load_latest_checkpoint(out, CKPT_PATTERN)
        if found is not None or cfg.resume == "auto":
            why = f"torchrun restart {restarts}" if restarts else "resume auto"
            log.info("%s: %s", why, found[0] if found else f"no checkpoint in {out}, starting from scratch")
            return found
    if cfg.resume:
        return Path(cfg.resume), None
    if cfg.ckpt_path and cfg.resume_opt:
        return Path(cfg.ckpt_path), None
    return None


def restore(
    path: Path, ckpt: dict | None, cfg: TrainConfig, classes, model, ema, optimizer, schedule, scaler, sampler
) -> tuple[TrainState, list | None]:
    """Load a full checkpoint (``ckpt``, or read from ``path``) into the run's objects. Returns the state and the
    saved RNG states (restored by the caller once setup is over). A checkpoint of another model or class list is
    refused."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if ckpt.get("arch") != cfg.model or list(ckpt.get("classes") or classes) != list(classes):
        raise ConfigError(
            f"{path} was trained as {ckpt.get('arch')!r} on {len(ckpt.get('classes') or [])} classes; this run is "
            f"{cfg.model!r} on {len(classes)} classes"
        )
    check_same_architecture(path, ckpt.get("model_config"), dataclasses.asdict(model.cfg))
    model.load_state_dict(ckpt["model"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
        ema.updates = int(ckpt.get("ema_updates", ckpt["step"]))  # older checkpoints: one update per step
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path}: cannot resume this run's optimiser or data order from it ({e})") from None
    schedule.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(int(ckpt["epoch"]), int(ckpt["step"]), 0, float(ckpt.get("best_top1", -1.0)))
    if ckpt["sampler"]["epoch"] == state.epoch:
        state.batches_done = sampler.start_batch
        state.loss_sum, state.loss_steps = (float(v) for v in ckpt.get("epoch_loss", (0.0, 0)))
        state.loss_steps = int(state.loss_steps)
    log.info("resumed %s: epoch %d, step %d%s", path, state.epoch, state.step,
             f" (+{state.batches_done} batches)" if state.batches_done else "")  # fmt: skip
    return state, ckpt.get("rng")


def _prune(out: Path, policy: str, keep: int, rows: list[dict]) -> None:
    """``latest_k``: keep the newest ``keep`` epoch checkpoints. ``top_k``: the ``keep`` with the best val top-1.

    Step checkpoints (``ckpt_interval_steps``) are resume points only: the newest two are kept (two, so that a
    corrupt newest one still has a fallback), apart from the epoch checkpoints' count.
    """
    prune_checkpoints(out, 2, "ckpt_e*_s*.pth")
    epochs = "ckpt_e[0-9][0-9][0-9][0-9].pth"
    if policy == "latest_k":
        prune_checkpoints(out, keep, epochs)
        return
    top1 = {f"ckpt_e{r['epoch'] + 1:04d}.pth": r.get("top1") or -1.0 for r in rows}
    files = sorted(out.glob(epochs), key=lambda p: top1.get(p.name, -1.0), reverse=True)
    for p in files[keep:]:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def _val_columns(val: dict | None) -> dict:
    if val is None:
        return {"val_loss": None, "top1": None, "top5": None, "val_skipped": None}
    return {"val_loss": val["loss"], "top1": val["top1"], "top5": val["top5"], "val_skipped": val["skipped_images"]}


def _log_epoch(epoch: int, epochs: int, stats: dict, val: dict | None, state: TrainState) -> None:
    msg = f"epoch {epoch + 1}/{epochs}: train loss {stats['train_loss']:.4f}, lr {stats['lr']:.3e}, "
    msg += f"{stats['img_per_sec']:.0f} img/s, {stats['epoch_time']:.1f} s"
    if val is not None:
        msg += f" | val top-1 {val['top1']:.2f}, top-5 {val['top5']:.2f}, loss {val['loss']:.4f}"
        msg += f" (best {state.best_top1:.2f})"
    log.info(msg)


def _finish(cfg: TrainConfig, out: Path, val: dict | None, is_main: bool) -> dict:
    result = {"model": cfg.model, **(val or {})}
    result["checkpoint"] = str(latest_checkpoint(out, CKPT_PATTERN) or "") if is_main else ""
    result["best"] = str(out / "best.pth") if (out / "best.pth").is_file() else ""
    result.update(log=str(out / "train.log"), metrics=str(out / "metrics.csv"), plot=str(out / "metrics.png"))
    if is_main:
        if val is not None:
            log.info("validation: top-1 %.2f, top-5 %.2f, loss %.4f on %d images", val["top1"], val["top5"],
                     val["loss"], val["num_images"])  # fmt: skip
        for key in ("checkpoint", "best", "log", "metrics", "plot"):
            log.info("%-10s %s", key + ":", result[key])
        if cfg.results_file:
            keys = ("top1", "top5", "loss", "num_images", "img_per_sec", "model", "checkpoint")
            Path(cfg.results_file).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.results_file).write_text(json.dumps({k: result.get(k) for k in keys}, indent=2) + "\n")
            log.info("%-10s %s", "results:", cfg.results_file)
    return result


class _CallableModule(types.ModuleType):
    """``xcit.train(config, **keys)`` runs :func:`xcit.train_api.train`; ``xcit.train.fit`` and the rest stay this
    module's (a package attribute cannot be both a submodule and a function)."""

    def __call__(self, config=None, **keys) -> dict:
        from .train_api import train

        return train(config, **keys)


sys.modules[__name__].__class__ = _CallableModule
