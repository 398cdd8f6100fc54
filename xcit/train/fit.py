"""``fit()``: data -> model -> optimiser -> loop -> checkpoint, single-process or under torchrun.

What a run writes (rank 0 only) into ``ckpt_save_dir``: ``config.yaml`` (the resolved config), ``train.log``,
``metrics.csv`` / ``metrics.jsonl`` / ``metrics.png``, ``tensorboard/`` (if installed), epoch checkpoints
``ckpt_e{epoch}.pth`` (the newest ``keep_checkpoint_max`` kept), ``best.pth`` (best validation top-1) and, while it
runs, ``run.lock`` (:mod:`xcit.train.runlock`: one run per folder).

A checkpoint holds the full state, loadable with ``torch.load(weights_only=True)``: ``model``, ``ema``,
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (the epoch to resume at), ``step`` (optimiser steps so far),
``sampler`` (position within the epoch), ``rng`` (every rank's generators), ``config``, ``classes``, ``arch``,
``model_config`` (the architecture, overrides included), ``flavour`` and ``best_top1``. Resuming restores all of
it, so a resumed run continues bit for bit (CPU), mid-epoch included.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config.train_config import ConfigError, TrainConfig, check_training, notices, save_config
from ..data.pipeline import build_datasets, loaders, mixup_fn, train_subset
from ..data.readers import report_bad_reads
from ..runtime import distributed
from ..runtime.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from ..runtime.fileio import check_writable_dir
from ..runtime.precision import amp_setup
from ..runtime.preemption import Preempted, StopSignal, elastic_restart_count, slurm_restart_count
from ..runtime.threads import CpuThreads
from ..weights.factory import create_model
from ..weights.files import load_weights
from .distill import build_teacher
from .divergence import diverged_weights, set_aside_diverged
from .ema import ModelEma
from .evaluate import evaluate
from .logs import MetricsLog, run_banner, setup_logging
from .loop import Run, StepOptions, TrainingDiverged, TrainState, train_one_epoch
from .losses import Criterion, DistillationLoss
from .optim import create_optimizer, param_groups
from .requeue import check_resume as check_requeued_resume
from .requeue import write_record as write_requeue_record
from .runlock import hold_run_lock
from .schedule import LRSchedule

log = logging.getLogger("xcit")

__all__ = [
    "Run",
    "StepOptions",
    "TrainState",
    "TrainingDiverged",
    "build_model",
    "build_optimizer",
    "fit",
    "train_one_epoch",
]

CKPT_PATTERN = "ckpt_e*.pth"


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
    cpu_threads = CpuThreads.start(world.device)  # the CPUs not kept busy by other processes (xcit.runtime.threads)
    _seed_everything(cfg.seed)  # the same initial weights on every rank (the EMA copy is made before DDP syncs)
    data = _build_data(cfg, world, out)
    run, opts, lr = _build_run(cfg, world, data)
    rng = _resume(cfg, out, run, data.classes, world.is_main)
    val_dtype, _ = amp_setup(cfg.val_amp_level, cfg.amp_dtype, 1.0, world.device)
    if world.is_main:
        end_lr = run.schedule.lr_at(run.schedule.spe * cfg.epoch_size - 1)  # the last step's, whatever the recipe says
        run_banner(cfg, world, run.model, len(data.train_set), len(data.val_set or []), data.classes,
                   data.steps_per_epoch, lr, opts.amp_dtype, end_lr)  # fmt: skip
        save_config(cfg, out / "config.yaml", header=f"resolved config of this run ({cfg.model})")
    saver = _Saver(cfg, out, run, data.classes, world.is_main)
    after_step = _after_step(cfg, out, saver, len(run.loader), world, on_step, stop, cpu_threads)
    if rng is not None:  # last, so that nothing above shifts the restored random streams
        restore_rng_state(rng[world.rank] if len(rng) == world.size else rng[0])

    def validate() -> dict:
        model = run.ema.module if run.ema else run.model
        return evaluate(model, data.val_loader, world.device, val_dtype, cfg.channels_last)

    last_val = None
    for epoch in range(run.state.epoch, cfg.epoch_size):
        run.state.epoch = epoch
        run.loader.sampler.set_epoch(epoch)
        last_checkpoint = (lambda: set_aside_diverged(out, CKPT_PATTERN, run.state.step)) if world.is_main else None
        stats = train_one_epoch(run, opts, after_step, last_checkpoint)
        stats["bad_images"] = report_bad_reads(run.loader, f"epoch {epoch + 1}", "replaced by the next good image", 10)
        st = run.state
        st.epoch, st.batches_done, st.loss_sum, st.loss_steps = epoch + 1, 0, 0.0, 0
        validating = cfg.val_while_train and (epoch + 1) % cfg.val_interval == 0
        last_val = validate() if data.val_loader is not None and (validating or epoch + 1 == cfg.epoch_size) else None
        saver.epoch_end(epoch, stats, last_val)

    if last_val is None and data.val_loader is not None:  # nothing left to train (resumed a finished run)
        last_val = validate()
    result = _finish(cfg, out, last_val, world.is_main)
    saver.close()
    distributed.barrier()
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Setting up: data, the run, resuming
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    train_set: object
    val_set: object | None
    classes: list[str]
    num_classes: int
    loader: object
    val_loader: object | None
    steps_per_epoch: int


def _build_data(cfg: TrainConfig, world: distributed.World, out: Path) -> _Data:
    """The datasets (listed once a job, cached in ``out/data_index``) and their loaders."""
    need_val = cfg.val_while_train or bool(cfg.results_file)
    train_set, val_set = build_datasets(cfg, need_val=need_val, cache_dir=out / "data_index")
    classes = train_set.classes
    num_classes = _num_classes(cfg.num_classes, classes)
    train_set = train_subset(train_set, cfg.num_samples, cfg.seed)
    loader, vloader = loaders(train_set, val_set, cfg, world.size, world.rank, world.device)
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training images make no full batch of {cfg.batch_size} x {world.size}")
    return _Data(train_set, val_set, classes, num_classes, loader, vloader, steps_per_epoch)


def _build_run(cfg: TrainConfig, world: distributed.World, data: _Data) -> tuple[Run, StepOptions, float]:
    """Model, EMA, optimiser, schedule, precision and loss of ``cfg``: the run, how its steps run, its (scaled) lr."""
    torch.backends.cudnn.benchmark = world.device.type == "cuda"  # fixed input size: pick the fastest conv kernels
    model = build_model(cfg, data.num_classes, world.device)
    ema = ModelEma(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None  # before SyncBN/compile/DDP (official)
    train_model = _wrap(model, cfg, world)
    _seed_everything(cfg.seed + world.rank)  # official main.py: seed + rank, so drop path differs across ranks

    optimizer, schedule, lr = build_optimizer(cfg, model, data.steps_per_epoch, world.size, world.device)
    amp_dtype, scaler = amp_setup(cfg.amp_level, cfg.amp_dtype, cfg.loss_scale, world.device)
    mixup = mixup_fn(cfg, data.num_classes)
    criterion = _criterion(cfg, mixup is not None, data.num_classes, amp_dtype, world)
    run = Run(model, train_model, ema, optimizer, schedule, scaler, criterion, data.loader, mixup)
    opts = StepOptions(
        world.device, cfg.epoch_size, world.size, amp_dtype, cfg.gradient_accumulation_steps,
        cfg.clip_value if cfg.clip_grad else None, cfg.freeze_bn, cfg.channels_last, cfg.log_interval,
    )  # fmt: skip
    return run, opts, lr


def _criterion(cfg: TrainConfig, mixup: bool, num_classes: int, amp_dtype, world: distributed.World):
    """The label loss (mixup smooths its targets itself), wrapped in the distillation loss when a teacher is set."""
    criterion = Criterion(cfg.loss, 0.0 if mixup else cfg.label_smoothing, cfg.reduction)
    if cfg.distillation_type == "none":
        return criterion
    teacher = build_teacher(cfg.teacher_model, cfg.teacher_path, num_classes, world.device)
    if world.is_main:
        log.info("distillation %s from %s (%s), alpha %g, tau %g", cfg.distillation_type, cfg.teacher_model,
                 cfg.teacher_path, cfg.distillation_alpha, cfg.distillation_tau)  # fmt: skip
    return DistillationLoss(
        criterion, teacher, cfg.distillation_type, cfg.distillation_alpha, cfg.distillation_tau, amp_dtype
    )


def _resume(cfg: TrainConfig, out: Path, run: Run, classes: list[str], is_main: bool) -> list | None:
    """Restore the run from its resume point, if any; returns the saved RNG states (restored last by the caller)."""
    resume_from = _resume_point(cfg, out)
    if resume_from is None:
        return None
    path, ckpt = resume_from
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if not isinstance(ckpt.get("optimizer"), dict) or "step" not in ckpt or "sampler" not in ckpt:
        raise ConfigError(
            f"{path} is not a training checkpoint (no optimiser state, step or data order): resuming "
            f"continues a run of xcit train; to start from these weights, pass them as --pretrained"
        )
    rng = run.load_state_dict(path, ckpt, cfg.model, classes)
    if run.state.epoch >= cfg.epoch_size and is_main:  # e.g. --resume auto once more after the end
        log.info("%s: the run had finished (epoch %d of %d): nothing left to train", resume_from[0], run.state.epoch,
                 cfg.epoch_size)  # fmt: skip
    return rng


# ----------------------------------------------------------------------------------------------------------------------
# During the run: checkpoints, metrics, stopping
# ----------------------------------------------------------------------------------------------------------------------


class _Saver:
    """Epoch ends (best top-1, metrics row, epoch checkpoints, pruning) and checkpoint writes on rank 0."""

    def __init__(self, cfg: TrainConfig, out: Path, run: Run, classes: list[str], is_main: bool):
        self.cfg, self.out, self.run, self.classes, self.is_main = cfg, out, run, classes, is_main
        self.metrics = MetricsLog(out, run.state.epoch, cfg.tensorboard) if is_main else None

    def save(self, names: list[str]) -> None:
        """Write the run's state under each of ``names``. Every rank calls it (the RNG states are gathered)."""
        if bad := diverged_weights(self.run.model):  # the same weights on every rank: every rank stops here
            last = latest_checkpoint(self.out, CKPT_PATTERN) if self.is_main else None
            raise TrainingDiverged(
                f"the weights diverged at step {self.run.state.step} ({bad}); not saved. Last good checkpoint: "
                f"{last or 'none written yet'}. Try a lower lr or clip_grad: True"
            )
        rngs = distributed.all_gather_object(capture_rng_state())
        if not self.is_main:
            return
        ckpt = self.run.state_dict(self.cfg.to_dict(), self.cfg.model, self.classes, rngs)
        for name in names:
            save_checkpoint(self.out / name, ckpt)
        _prune(self.out, self.cfg.ckpt_save_policy, self.cfg.keep_checkpoint_max, self.metrics.rows)

    def epoch_end(self, epoch: int, stats: dict, val: dict | None) -> None:
        state, cfg = self.run.state, self.cfg
        is_best = val is not None and val["top1"] > state.best_top1
        if is_best:
            state.best_top1 = val["top1"]
        _log_epoch(epoch, cfg.epoch_size, stats, val, state)
        if self.metrics is not None:
            self.metrics.add({"epoch": epoch, "step": state.step, **stats, **_val_columns(val)})
        names = ["best.pth"] if is_best else []
        if (epoch + 1) % cfg.ckpt_save_interval == 0 or epoch + 1 == cfg.epoch_size:
            names.insert(0, f"ckpt_e{epoch + 1:04d}.pth")
        if names:
            self.save(names)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _after_step(cfg: TrainConfig, out: Path, saver: _Saver, batches: int, world, on_step, stop, threads) -> Callable:
    """What runs after each optimiser step: the CPU thread count, step checkpoints, the caller's ``on_step``, and
    stopping on a signal."""

    def after_step(st: TrainState) -> None:
        if threads is not None:
            threads.adjust()
        name = f"ckpt_e{st.epoch:04d}_s{st.step:08d}.pth"
        saved = cfg.ckpt_interval_steps and st.step % cfg.ckpt_interval_steps == 0 and st.batches_done < batches
        if saved:
            saver.save([name])
        if on_step is not None:
            on_step(st)
        signum = stop.agreed(world.device) if stop is not None else 0  # all ranks stop after the same step
        if signum:
            if not saved:
                saver.save([name])
            if world.is_main:  # inside SLURM: what the requeued job must find (xcit.train.requeue)
                write_requeue_record(out, st.step, out / name)
            raise Preempted(signum, str(out / name) if world.is_main else None)

    return after_step


# ----------------------------------------------------------------------------------------------------------------------
# Model, precision, wrapping
# ----------------------------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The variant with ``model_overrides``, from ``pretrained`` (head reset to ``num_classes``) or ``ckpt_path``
    (weights only; with ``resume_opt`` the whole run is resumed instead). ``pretrained: True`` fine-tunes from the
    model's released weights as MindCV's does (:mod:`xcit.weights.pretrained`: timm's default tag, fetched once)."""
    named = cfg.pretrained is True or (isinstance(cfg.pretrained, str) and cfg.pretrained)
    pretrained = cfg.pretrained if named else None
    model = create_model(
        cfg.model,
        pretrained=pretrained,
        use_ema=None,  # a training checkpoint's EMA weights when it has them, every command's rule (logged)
        num_classes=num_classes,
        in_chans=cfg.in_channels,
        drop_path_rate=cfg.drop_path_rate or 0.0,
        drop_rate=cfg.drop_rate or 0.0,
        head_drop_rate=cfg.head_drop_rate,
        **cfg.model_overrides,
    )
    if cfg.ckpt_path and not cfg.resume_opt:
        w = load_weights(model, cfg.ckpt_path, strict=True, use_ema=None)
        log.info("%s: %s weights", cfg.ckpt_path, "EMA" if w.used_ema else "model")
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


def _resume_point(cfg: TrainConfig, out: Path) -> tuple[Path, dict | None] | None:
    """The checkpoint to resume from, and its contents when choosing it meant reading it (``resume auto``)."""
    # torchrun --max_restarts and a requeued SLURM job: a restarted job resumes by itself
    restarts, requeues = elastic_restart_count(), slurm_restart_count()
    if cfg.resume == "auto" or restarts or requeues:
        found = load_latest_checkpoint(out, CKPT_PATTERN)
        if requeues:  # its own checkpoint and config, or one line saying why it cannot resume
            check_requeued_resume(out, found, cfg.to_dict())
        if found is not None or cfg.resume == "auto":
            why = f"torchrun restart {restarts}" if restarts else "resume auto"
            why = f"SLURM requeue {requeues}" if requeues else why
            log.info("%s: %s", why, found[0] if found else f"no checkpoint in {out}, starting from scratch")
            return found
    if cfg.resume:
        return Path(cfg.resume), None
    if cfg.ckpt_path and cfg.resume_opt:
        return Path(cfg.ckpt_path), None
    return None


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


def run_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, **keys: Any) -> dict:
    """Train and validate as ``xcit train`` does; returns the final metrics and output paths (``top1``, ``top5``,
    ``checkpoint``, ...).

    ``config`` is a YAML recipe's path (as ``-c``), a dict of config keys, a
    :class:`xcit.config.train_config.TrainConfig`, or
    None; ``keys`` override it as ``--key value`` flags do (``epoch_size=5``). Without a ``data_dir`` (and with no
    config, or the demo's ``dataset: digits``) it trains the built-in digits demo. A bad key or value raises
    :class:`xcit.runtime.errors.ConfigError` before any work; a non-finite loss raises ``TrainingDiverged``.

    >>> result = xcit.train("configs/demo.yaml", epoch_size=2, ckpt_save_dir="ckpt/py")  # doctest: +SKIP
    """
    from ..config.train_config import _DEFAULTS, config_from_dict, read_yaml
    from ..data.demo import DEMO_RECIPE, ensure_digits

    if isinstance(config, TrainConfig):
        values = {k: v for k, v in config.to_dict().items() if v != _DEFAULTS[k]}
    elif isinstance(config, (str, os.PathLike)):
        values = read_yaml(config)
    else:
        values = dict(config or {})
    values.update(keys)
    if not values.get("data_dir") and (config is None or values.get("dataset") == "digits"):
        if "epoch_size" in values and "decay_epochs" not in values:  # the demo's schedule follows its length
            warmup = values.get("warmup_epochs", DEMO_RECIPE["warmup_epochs"])
            values["decay_epochs"] = max(1, int(values["epoch_size"]) - int(warmup))
        values = {**DEMO_RECIPE, **values}
    cfg = config_from_dict(values)
    if cfg.dataset == "digits" and not cfg.data_dir:
        cfg.data_dir = str(ensure_digits())
    if not cfg.data_dir:
        raise ConfigError("data_dir is not set: give data_dir (or no config, for the built-in demo)")
    return fit(cfg, set(values))
