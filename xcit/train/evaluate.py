"""Top-1 / top-5 / loss of a model on a validation loader, exact under any number of ranks.

Every rank evaluates its own shard (:func:`xcit.data.pipeline.val_loader`: no padding, no duplicates) and contributes
the
SUMS of per-image losses and correct counts plus its image count; one all-reduce of those sums gives the same
numbers as a single process would, including an uneven last batch. (Averaging per-rank means, or padding the
shards as ``DistributedSampler`` does, would not.)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..config.train_config import recorded_preprocessing
from ..data.readers import report_bad_reads
from ..model.preprocessing import Preprocessing
from ..runtime.distributed import all_reduce_sum
from ..runtime.precision import autocast

log = logging.getLogger("xcit")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    """``{"top1", "top5" (percent), "loss" (mean cross-entropy), "num_images", "skipped_images", "img_per_sec"}`` over
    all ranks; ``skipped_images`` counts undecodable files, each named in the log and none scored.

    Every rank must call this (it all-reduces). ``img_per_sec`` is all images over the slowest rank's time.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="none")
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        count = torch.full((), len(y), dtype=torch.float64, device=device)
        sums += torch.stack([loss.double().sum(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(), count])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    skipped = report_bad_reads(loader, "validation", "skipped, not scored")  # each named, never substituted
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    all_reduce_sum(sums)
    _all_reduce_max(elapsed)
    model.train(was_training)
    loss_sum, top1, top5, n = sums.tolist()
    n = int(n)
    return {
        "top1": 100.0 * top1 / max(n, 1),
        "top5": 100.0 * top5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "num_images": n,
        "skipped_images": skipped,
        "img_per_sec": n / max(elapsed.item(), 1e-9),
    }


def _all_reduce_max(t: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)


# ----------------------------------------------------------------------------------------------------------------------
# xcit validate
# ----------------------------------------------------------------------------------------------------------------------


def model_for_eval(
    path: str | Path, cfg, device: torch.device, use_ema: bool = True, model_named: bool = True
) -> tuple[nn.Module, list[str] | None, dict]:
    """The model stored at ``path`` (EMA weights when it has them and ``use_ema``), its class names if recorded, and the
    training config recorded with it (empty for files not written by ``xcit train``), from one read of the file.

    A checkpoint written by ``xcit train`` rebuilds its own architecture (overrides included); any other weight
    file (official, timm, MindCV, safetensors) is loaded into ``cfg.model`` with ``cfg.model_overrides``
    (``model_named``: whether the user named ``cfg.model``; else it is only the default, never "asked for"). A
    missing or unreadable file raises: validating random weights is never an option.
    """
    from ..weights.files import read_weights
    from ..weights.loading import model_from_weights

    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"ckpt_path {str(path)!r} is a folder, not a weights file")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path {str(path)!r} does not exist (refusing to validate untrained weights)")
    w = read_weights(path, use_ema=None if use_ema else False)
    if w.model_config:  # written by xcit train: the recorded architecture, whatever the config says
        model = model_from_weights(w, cfg.model if model_named else None)
    else:
        model = model_from_weights(w, cfg.model, trust_name=True, in_chans=cfg.in_channels, **cfg.model_overrides)
    return model.to(device).eval(), model.class_names, w.config


# the evaluation transform's keys in the training config, and the Preprocessing field each sets
PREPROCESSING_KEYS = {"image_resize": "size", "crop_pct": "crop_pct", "interpolation": "interpolation",
                      "mean": "mean", "std": "std"}  # fmt: skip


def eval_preprocessing(cfg, recorded: dict, explicit: set[str], in_chans: int = 3) -> Preprocessing:
    """The config's preprocessing, with what a checkpoint was trained with for every key the user did not set, for
    ``in_chans`` input channels."""
    prep = Preprocessing.from_train_config(cfg).for_channels(in_chans)
    trained = recorded_preprocessing(recorded)
    taken = [k for k in PREPROCESSING_KEYS if k in recorded and k not in explicit]
    if trained is None or not taken:
        return prep
    trained = trained.for_channels(in_chans)
    from ..config.options import show  # 57.12, not 57.120000000000005 (MindCV's default std is 0.224 * 255)

    log.info("preprocessing from the checkpoint: %s", ", ".join(f"{k} {show(recorded[k])}" for k in taken))
    return replace(prep, **{PREPROCESSING_KEYS[k]: getattr(trained, PREPROCESSING_KEYS[k]) for k in taken})


def validate(cfg, explicit: set[str] | frozenset = frozenset()) -> dict:
    """``xcit validate``: top-1, top-5 and loss of ``cfg.ckpt_path`` on ``data_dir/val_split``, on every rank."""
    from ..config.train_config import notices
    from ..data.pipeline import DataError, build_datasets, val_loader
    from ..runtime import distributed
    from ..runtime.precision import amp_setup
    from .logs import setup_logging

    if not cfg.ckpt_path:
        raise DataError("validate needs --ckpt_path (MindCV would silently validate random weights)")
    world = distributed.init(cfg.device_target, cfg.distribute, cfg.dist_timeout)
    setup_logging(None, world.rank)
    for line in notices(cfg, set(explicit)):
        log.info("notice: %s", line)
    # a training checkpoint's EMA weights are used when it has them, unless `ema: False` is set explicitly
    use_ema = cfg.ema or "ema" not in explicit
    model, classes, recorded = model_for_eval(cfg.ckpt_path, cfg, world.device, use_ema, "model" in explicit)
    prep = eval_preprocessing(cfg, recorded, set(explicit), model.cfg.in_chans)
    _, val = build_datasets(
        cfg,
        classes=classes,
        need_train=False,
        skip_unknown_val=cfg.ignore_class_mismatch,
        exact_classes=True,
        eval_prep=prep,
    )
    if classes is None and len(val.classes) != getattr(model, "num_classes", len(val.classes)):
        log.warning("%d class folders, model head has %d outputs: labels are the sorted folder indices",
                    len(val.classes), model.num_classes)  # fmt: skip
    loader = val_loader(val, cfg.batch_size, cfg.num_parallel_workers, world.size, world.rank, world.device)
    dtype, _ = amp_setup(cfg.val_amp_level, cfg.amp_dtype, 1.0, world.device)
    if cfg.compiles_on(world.device.type):  # as in training: `compile`, else graph mode (mode 0) on CUDA
        model = torch.compile(model)
    result = {**evaluate(model, loader, world.device, dtype, cfg.channels_last), "model": cfg.model}
    if world.is_main:
        log.info("%s on %s: top-1 %.2f, top-5 %.2f, loss %.4f (%d images, %.0f img/s, %d process(es))",
                 cfg.ckpt_path, cfg.data_dir, result["top1"], result["top5"], result["loss"],
                 result["num_images"], result["img_per_sec"], world.size)  # fmt: skip
        if cfg.results_file:
            Path(cfg.results_file).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.results_file).write_text(json.dumps(result, indent=2) + "\n")
    distributed.barrier()
    return result
