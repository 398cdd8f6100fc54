"""The training configuration: defaults in one dataclass, a YAML file over them, ``--key value`` flags over that.

Keys are MindCV's flat keys (``mindcv/config.py``), so a MindCV recipe loads unchanged, and its defaults are
MindCV's defaults: a MindCV YAML that leaves a key out means here what it means in MindCV. Two deliberate
exceptions: ``model`` defaults to ``xcit_tiny_12_p16_224`` and ``weight_decay_filter`` to the official XCiT
grouping. Keys MindCV does not have (marked "[xcit]" in ``--help``) add what the official recipe needs
(``mixup_switch_prob``, ``re_count``, ``warmup_lr``, ``lr_scale``), fine-tuning (``model_overrides``) and
outputs (``results_file``, ``resume``).

Ascend-only keys are mapped rather than dropped: ``mode`` 0 (graph) is ``torch.compile`` and 1 is eager;
``amp_level`` O0 is fp32 and O1/O2/O3 are autocast (bf16 on CPU; bf16, or fp16 with a gradient scaler starting at
``loss_scale``, on CUDA); ``dataset_sink_mode`` and ``device_target`` are accepted with a notice.

An unknown key or a bad value raises :class:`ConfigError` before any work starts, naming the nearest valid key.
"""

from __future__ import annotations

import argparse
import difflib
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..model.preprocessing import Preprocessing
from ..runtime.errors import ConfigError
from .mindcv_rules import WD_FILTERS, check_schedule, optim_notices, schedule_notices
from .typed_values import convert_value


def _k(default: Any, help_: str, *, xcit: bool = False) -> Any:
    """A config field with its help text next to its default ("[xcit]" marks keys MindCV does not have)."""
    meta = {"help": ("[xcit] " if xcit else "") + help_}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "random")
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum", "nadam", "lamb", "rmsprop", "adagrad", "lion")
EMA_WARMUPS = ("mindcv", "none")
SCHEDULERS = ("cosine_decay", "constant", "step_decay", "multi_step_decay", "exponential_decay", "polynomial_decay")
SCHEDULERS += ("one_cycle", "cyclic")
AMP_LEVELS = ("O0", "O1", "O2", "O3")
DEVICES = ("auto", "cpu", "cuda", "gpu", "ascend")
IGNORED_KEYS = ("enable_modelarts", "multi_data_url", "data_url", "ckpt_url", "train_url", "amp_cast_list")


@dataclass
class TrainConfig:
    """Every key of ``xcit train`` / ``xcit validate`` (MindCV's keys plus a few marked "[xcit]")."""

    # -- system ----------------------------------------------------------------------------------------------------
    mode: int = _k(0, "0: graph mode -> torch.compile (on CUDA; see `compile`), 1: eager")
    distribute: bool = _k(False, "distributed run; launch with torchrun (the world comes from its environment)")
    val_while_train: bool = _k(False, "validate during training")
    val_interval: int = _k(1, "validate every N epochs")
    log_interval: int = _k(100, "log every N steps")
    seed: int = _k(42, "seed of the python, numpy and torch generators and of the data order")
    device_target: str = _k("auto", "auto | cpu | cuda (MindCV's GPU/CPU accepted; Ascend -> auto, with a notice)")
    compile: bool | None = _k(None, "torch.compile the model; default: follow `mode` (0 compiles on CUDA)", xcit=True)
    enable_modelarts: bool = _k(False, "ModelArts (accepted, no effect)")
    multi_data_url: str = _k("/cache/data/", "ModelArts (accepted, no effect)")
    data_url: str = _k("/cache/data/", "ModelArts (accepted, no effect)")
    ckpt_url: str = _k("/cache/output/", "ModelArts (accepted, no effect)")
    train_url: str = _k("/cache/output/", "ModelArts (accepted, no effect)")

    # -- dataset ---------------------------------------------------------------------------------------------------
    dataset: str = _k("imagenet", "an ImageFolder dataset name (any), or `digits` for the built-in demo")
    data_dir: str = _k("", "dataset root holding <train_split>/ and <val_split>/ class folders")
    train_split: str = _k("train", "training split folder name")
    val_split: str = _k("val", "validation split folder name")
    data_format: str = _k("auto", "auto | folder | wds (WebDataset shards) | hf (Hugging Face dataset)", xcit=True)
    data_backend: str = _k("fast", "fast (torchvision JPEG decode, one-pass crop) | pil (Pillow: timm's pixels) | "
                           "dali (NVIDIA DALI, the dali extra)", xcit=True)  # fmt: skip
    dataset_download: bool = _k(False, "MindCV downloads MNIST/CIFAR; here data must be an ImageFolder")
    num_parallel_workers: int = _k(8, "data loader worker processes (capped at the CPU count)")
    shuffle: bool = _k(True, "shuffle the training set every epoch")
    num_samples: int | None = _k(None, "train on a fixed random subset of this many images")
    batch_size: int = _k(128, "batch size PER PROCESS; global batch = batch_size x world size")
    drop_remainder: bool = _k(True, "drop the last incomplete training batch")
    aug_repeats: int = _k(0, "repeated augmentation: each image N times per epoch, sharded across ranks (0/1: off)")
    eval_shuffle: bool = _k(False, "accepted; validation metrics do not depend on order")

    # -- augmentation ----------------------------------------------------------------------------------------------
    image_resize: int = _k(224, "training and evaluation resolution")
    scale: tuple[float, float] = _k((0.08, 1.0), "random resized crop area range")
    ratio: tuple[float, float] = _k((0.75, 1.333), "random resized crop aspect range")
    hflip: float = _k(0.5, "horizontal flip probability")
    vflip: float = _k(0.0, "vertical flip probability")
    color_jitter: float | None = _k(0.4, "color jitter strength (off when RandAugment is on, as in timm)")
    interpolation: str = _k("bilinear", "resize interpolation: " + " | ".join(INTERPOLATIONS))
    auto_augment: str | None = _k(
        None, "e.g. randaug-m9-mstd0.5-inc1 (MindCV) or rand-m9-mstd0.5-inc1 (timm), autoaug, augmix, trivialaugwide"
    )
    aug_splits: int = _k(0, "AugMix splits (only 0 is supported)")
    re_prob: float = _k(0.0, "random erasing probability")
    re_scale: tuple[float, float] = _k((0.02, 0.33), "random erasing area range")
    re_ratio: tuple[float, float] = _k((0.3, 3.3), "random erasing aspect range")
    re_value: int | float | str = _k(0, "erased pixels: 0 (constant), `random` (per region) or `pixel` (per pixel)")
    re_max_attempts: int = _k(10, "random erasing attempts (timm uses 10)")
    re_count: int = _k(1, "random erasing regions per image", xcit=True)
    mean: list[float] = _k([0.485 * 255, 0.456 * 255, 0.406 * 255], "normalisation mean (0-255 or 0-1 scale)")
    std: list[float] = _k([0.229 * 255, 0.224 * 255, 0.225 * 255], "normalisation std (0-255 or 0-1 scale)")
    crop_pct: float = _k(0.875, "evaluation centre-crop fraction: resize to image_resize / crop_pct, then crop")
    mixup: float = _k(0.0, "mixup alpha (0: off)")
    cutmix: float = _k(0.0, "cutmix alpha (0: off)")
    cutmix_prob: float = _k(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = _k(0.5, "probability of cutmix instead of mixup when both are on", xcit=True)
    mixup_mode: str = _k("batch", "mixup parameters per batch | pair | elem", xcit=True)

    # -- model -----------------------------------------------------------------------------------------------------
    model: str = _k("xcit_tiny_12_p16_224", "variant name (see `xcit models`)")
    num_classes: int | None = _k(None, "classifier size; default: the number of training classes")
    in_channels: int = _k(3, "input channels: 3 (RGB), 1 (grey) or 4 (RGBA / 4-band files as stored)")
    drop_rate: float | None = _k(None, "dropout after the pos. encoding, the attention projections, in the MLPs")
    head_drop_rate: float = _k(0.0, "dropout before the head (timm's drop_rate)", xcit=True)
    drop_path_rate: float | None = _k(None, "stochastic depth, the same rate in every block")
    model_overrides: dict = _k({}, "architecture overrides, e.g. {embed_dim: 64, depth: 4}", xcit=True)
    pretrained: bool | str = _k(False, "weights to start from: True (model's released weights, fetched once and "
                                "cached), a release name (xcit_tiny_12_p16_224.fb_in1k) or a file of any format; "
                                "the head is reset to num_classes")  # fmt: skip
    ckpt_path: str = _k("", "checkpoint: weights to start from, or with resume_opt the run to resume")
    resume_opt: bool = _k(False, "resume optimiser, schedule, EMA, epoch and RNG state from ckpt_path")
    resume: str = _k("", "`auto`: resume from the newest good checkpoint in ckpt_save_dir; or a path", xcit=True)
    keep_checkpoint_max: int = _k(10, "keep at most this many epoch checkpoints")
    ckpt_save_dir: str = _k("./ckpt", "checkpoints, logs, metrics and the resolved config go here")
    ckpt_save_interval: int = _k(1, "save a checkpoint every N epochs")
    ckpt_save_policy: str = _k("latest_k", "latest_k | top_k (by validation top-1)")
    ckpt_interval_steps: int = _k(0, "also save every N optimiser steps (0: off)", xcit=True)
    dist_timeout: int = _k(600, "seconds a collective waits for a dead or hung rank before failing", xcit=True)
    epoch_size: int = _k(90, "number of epochs")
    dataset_sink_mode: bool = _k(True, "Ascend data sinking (accepted, no effect)")
    ema: bool = _k(False, "keep an exponential moving average of the weights; validation uses it")
    ema_decay: float = _k(0.9999, "EMA decay d, once per optimiser step: ema = d_t * ema + (1 - d_t) * w")
    ema_warmup: str = _k("mindcv", "mindcv: d_t = d x (1 - exp(-t/2000)) at step t | none: d_t = d", xcit=True)
    clip_grad: bool = _k(False, "clip the global gradient norm to clip_value")
    clip_value: float = _k(15.0, "max gradient norm when clip_grad")
    layer_decay: float | None = _k(
        None, "layer-wise lr decay: XCA block i (from 0) of L gets lr x decay^(L - i), the stem decay^(L + 1)"
    )
    gradient_accumulation_steps: int = _k(1, "accumulate this many batches per optimiser step")
    sync_bn: bool = _k(False, "SyncBatchNorm across ranks (CUDA): BN statistics over the global batch", xcit=True)
    freeze_bn: bool = _k(False, "keep BatchNorm layers in eval mode (fixed statistics) while training", xcit=True)
    channels_last: bool = _k(False, "channels-last memory format (helps the conv stem on CUDA)", xcit=True)
    distillation_type: str = _k("none", "knowledge distillation: none | hard (teacher's top-1) | soft (KL)", xcit=True)
    distillation_alpha: float = _k(0.5, "loss = (1 - alpha) x label loss + alpha x teacher loss", xcit=True)
    distillation_tau: float = _k(1.0, "soft distillation temperature", xcit=True)
    teacher_model: str = _k("regnety_160", "an XCiT variant or a timm model (official: regnety_160)", xcit=True)
    teacher_path: str = _k("", "teacher weights file (required with distillation; nothing is downloaded)", xcit=True)
    grad_checkpointing: bool = _k(
        False, "recompute each XCA block's activations in backward: less memory, one more block forward", xcit=True
    )

    # -- optimizer -------------------------------------------------------------------------------------------------
    opt: str = _k("adam", " | ".join(OPTIMIZERS))
    momentum: float = _k(0.9, "SGD momentum")
    weight_decay: float = _k(1e-6, "weight decay (decoupled for adamw)")
    use_nesterov: bool = _k(False, "Nesterov momentum for sgd/momentum")
    weight_decay_filter: str = _k(
        "official",
        "official: no decay on 1-D params, biases, cls_token (temperature IS decayed) | all: also temperature | "
        "norm_and_bias: 1-D params and biases only | auto (MindSpore filters norms): = official | disable",
    )
    filter_bias_and_bn: bool = _k(True, "older MindCV key: False means weight_decay_filter=disable")
    eps: float = _k(1e-10, "rmsprop's epsilon (as in MindCV, the other optimisers use their own)")
    amp_level: str = _k("O0", "O0: fp32; O1/O2/O3: autocast (bf16 on CPU; bf16 or fp16 on CUDA, see amp_dtype)")
    val_amp_level: str = _k("O0", "amp_level for validation")
    amp_dtype: str = _k("auto", "autocast dtype on CUDA: auto (bf16 if supported) | bf16 | fp16", xcit=True)
    amp_cast_list: str | None = _k(None, "MindSpore cell cast list (accepted, no effect)")
    loss_scale: float = _k(1.0, "initial gradient-scaler scale for fp16 autocast")
    loss_scale_type: str = _k("fixed", "fixed | dynamic | auto; fp16 always uses torch's dynamic GradScaler")
    dynamic_loss_scale: bool = _k(False, "older MindCV key (fp16 scaling is always dynamic)")
    drop_overflow_update: bool = _k(False, "fp16: skip steps with inf/nan gradients (GradScaler always does)")

    # -- scheduler -------------------------------------------------------------------------------------------------
    scheduler: str = _k("cosine_decay", " | ".join(SCHEDULERS))
    lr: float = _k(0.001, "peak learning rate (scaled by the global batch only if lr_scale=linear)")
    lr_scale: str = _k("none", "none: lr as given (MindCV) | linear: lr x global_batch / 512 (official)", xcit=True)
    min_lr: float = _k(1e-6, "final learning rate of cosine_decay")
    warmup_epochs: int = _k(3, "linear warm-up epochs (per step)")
    warmup_factor: float = _k(0.0, "warm-up starts at lr x warmup_factor")
    warmup_lr: float | None = _k(None, "warm-up start lr; overrides warmup_factor (official: 1e-6)", xcit=True)
    decay_epochs: int = _k(100, "epochs of cosine decay after warm-up (lr stays at min_lr afterwards)")
    decay_rate: float = _k(0.9, "factor of step_decay / multi_step_decay / exponential_decay")
    multi_step_decay_milestones: list[int] = _k([30, 60, 90], "epochs after warm-up where multi_step_decay decays")
    lr_epoch_stair: bool = _k(False, "change the lr once per epoch instead of every step")
    num_cycles: int = _k(1, "cosine cycles")
    cycle_decay: float = _k(1.0, "peak lr factor per cosine cycle")

    # -- loss ------------------------------------------------------------------------------------------------------
    loss: str = _k("CE", "CE (softmax cross-entropy) | BCE (binary cross-entropy on one-hot/mixed targets)")
    label_smoothing: float = _k(0.0, "label smoothing")
    aux_factor: float = _k(0.0, "auxiliary-head loss factor (XCiT has no auxiliary head: 0 only)")
    reduction: str = _k("mean", "loss reduction over the batch: mean | sum")

    # -- output ----------------------------------------------------------------------------------------------------
    results_file: str = _k("", "write final top-1/top-5/loss/throughput as JSON here", xcit=True)
    tensorboard: bool = _k(True, "TensorBoard event files in ckpt_save_dir (when tensorboard is installed)", xcit=True)
    ignore_class_mismatch: bool = _k(False, "validate: allow data classes that differ from the checkpoint's", xcit=True)

    # -- derived values --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON/``weights_only``-safe values (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @property
    def timm_auto_augment(self) -> str | None:
        """``auto_augment`` in timm's spelling (MindCV's ``randaug-...`` is timm's ``rand-...``)."""
        return to_timm_auto_augment(self.auto_augment)

    @property
    def norm_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """mean/std on the 0-1 scale (MindCV writes them on the 0-255 scale)."""
        k = 255.0 if max(self.mean) > 1.0 or max(self.std) > 1.0 else 1.0
        return tuple(m / k for m in self.mean), tuple(s / k for s in self.std)

    @property
    def use_compile(self) -> bool | None:
        """True/False when set explicitly; None means "mode 0 compiles on CUDA only"."""
        return self.compile if self.compile is not None else (None if self.mode == 0 else False)

    def compiles_on(self, device_type: str) -> bool:
        """Whether to ``torch.compile`` on this device type: ``compile`` if set, else graph mode on CUDA."""
        return self.use_compile if self.use_compile is not None else device_type == "cuda"


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


KEYS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))
_TYPES = typing.get_type_hints(TrainConfig)
_DEFAULTS = {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(TrainConfig)}


def to_timm_auto_augment(spec: str | None) -> str | None:
    """MindCV policy names -> timm's: ``randaug`` -> ``rand``, ``autoaug`` -> ``original``, ``autoaugr`` ->
    ``originalr`` (the rest of the string, ``-m9-mstd0.5-inc1``, has the same meaning in both)."""
    if not spec:
        return None
    head, sep, rest = spec.partition("-")
    head = {"randaug": "rand", "autoaug": "original", "autoaugr": "originalr"}.get(head, head)
    return head + sep + rest


# ----------------------------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------------------------


def nearest_key(key: str) -> str | None:
    """The valid key closest to ``key`` (difflib), or None."""
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.5)
    return close[0] if close else None


def _unknown(key: str, where: str) -> ConfigError:
    near = nearest_key(key)
    hint = f"; did you mean {near!r}?" if near else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint} (`xcit train --help` lists all {len(KEYS)} keys)")


def _set(values: dict[str, Any], key: str, raw: Any, where: str) -> None:
    if key not in _TYPES:
        raise _unknown(key, where)
    try:
        values[key] = convert_value(raw, _TYPES[key])
    except (ValueError, TypeError, yaml.YAMLError) as e:  # list/dict values given as text are parsed as YAML
        raise ConfigError(f"{where}: bad value for {key!r}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "opt": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "weight_decay_filter": (*WD_FILTERS, "auto"),  # auto: official (resolved when the config loads)
    "amp_level": AMP_LEVELS,
    "val_amp_level": AMP_LEVELS,
    "amp_dtype": ("auto", "bf16", "fp16"),
    "interpolation": INTERPOLATIONS,
    "loss": ("CE", "BCE"),
    "reduction": ("mean", "sum"),
    "lr_scale": ("none", "linear"),
    "ckpt_save_policy": ("latest_k", "top_k"),
    "loss_scale_type": ("fixed", "dynamic", "auto"),
    "mixup_mode": ("batch", "pair", "elem"),
    "device_target": DEVICES,
    "distillation_type": ("none", "soft", "hard"),
    "ema_warmup": EMA_WARMUPS,
    "data_format": ("auto", "folder", "wds", "hf"),
    "data_backend": ("fast", "pil", "dali"),
}
_PROBABILITIES = ("hflip", "vflip", "re_prob", "cutmix_prob", "mixup_switch_prob", "label_smoothing", "warmup_factor")
_PROBABILITIES += ("distillation_alpha", "head_drop_rate")
_NON_NEGATIVE = ("mixup", "cutmix", "weight_decay", "min_lr", "warmup_epochs", "aug_repeats", "ckpt_interval_steps")
_POSITIVE = ("batch_size", "epoch_size", "image_resize", "val_interval", "log_interval", "lr", "keep_checkpoint_max")
_POSITIVE += ("ckpt_save_interval", "gradient_accumulation_steps", "clip_value", "num_cycles", "decay_epochs")
_POSITIVE += ("dist_timeout", "distillation_tau")


def _normalise(values: dict[str, Any]) -> None:
    """Case and spelling variants MindCV accepts -> one canonical value."""
    values["device_target"] = values["device_target"].lower()
    if values["device_target"] == "gpu":
        values["device_target"] = "cuda"
    lower = ("opt", "scheduler", "interpolation", "weight_decay_filter", "reduction", "lr_scale", "amp_dtype")
    for key in (*lower, "ema_warmup"):
        values[key] = values[key].lower()
    if values["scheduler"] == "warmup_cosine_decay":  # MindCV's alias
        values["scheduler"] = "cosine_decay"
    for key in ("amp_level", "val_amp_level", "loss"):
        values[key] = values[key].upper()
    if values["ckpt_save_policy"] in (None, "None", "none", ""):
        values["ckpt_save_policy"] = "latest_k"
    if not values["filter_bias_and_bn"]:
        values["weight_decay_filter"] = "disable"
    if values["weight_decay_filter"] == "auto":
        values["weight_decay_filter"] = "official"


def check(cfg: TrainConfig) -> None:
    """Every value check that needs no data: choices, ranges, the model name and the augmentation string."""
    for key, choices in _CHOICES.items():
        v = getattr(cfg, key)
        if v not in choices:
            near = difflib.get_close_matches(str(v), choices, n=1, cutoff=0.3)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"bad value for {key!r}: {v!r} is not one of {', '.join(choices)}{hint}")
    for key in _PROBABILITIES:
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"bad value for {key!r}: {getattr(cfg, key)} is not a probability in [0, 1]")
    for key in _NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"bad value for {key!r}: {getattr(cfg, key)} must be >= 0")
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"bad value for {key!r}: {getattr(cfg, key)} must be > 0")
    _check_ranges(cfg)
    _check_model(cfg)
    _check_auto_augment(cfg)
    from ..model.arch import get_config
    from ..runtime.limits import check_config_limits

    check_config_limits(cfg, get_config(cfg.model))
    check_schedule(cfg.scheduler, cfg.warmup_epochs, cfg.lr_epoch_stair)


def _check_ranges(cfg: TrainConfig) -> None:
    if cfg.mode not in (0, 1):
        raise ConfigError(f"bad value for 'mode': {cfg.mode} is not 0 (graph mode: torch.compile) or 1 (eager)")
    if not 0.0 < cfg.crop_pct <= 1.0:
        raise ConfigError(f"bad value for 'crop_pct': {cfg.crop_pct} must be in (0, 1]")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"bad value for 'ema_decay': {cfg.ema_decay} must be in [0, 1)")
    if cfg.layer_decay is not None and not 0.0 < cfg.layer_decay <= 1.0:
        raise ConfigError(f"bad value for 'layer_decay': {cfg.layer_decay} must be in (0, 1]")
    for key in ("scale", "ratio", "re_scale", "re_ratio"):
        lo, hi = getattr(cfg, key)
        if not 0 < lo <= hi:
            raise ConfigError(f"bad value for {key!r}: {[lo, hi]} must be two numbers 0 < low <= high")
    if cfg.in_channels not in (1, 3, 4):
        raise ConfigError(f"bad value for 'in_channels': {cfg.in_channels}; images are read as 1 (grey), 3 (RGB) or 4")
    if cfg.in_channels == 4 and cfg.auto_augment:
        raise ConfigError("'auto_augment' needs RGB or grey images (its colour ops refuse 4 bands): unset it for 4")
    if len(cfg.mean) not in {1, 3, cfg.in_channels} or len(cfg.std) != len(cfg.mean) or min(cfg.std) <= 0:
        raise ConfigError(f"bad value for 'mean'/'std': 1, 3 or {cfg.in_channels} values each, std > 0")
    if cfg.aug_splits not in (0, 1):
        raise ConfigError(f"bad value for 'aug_splits': {cfg.aug_splits}; AugMix split BN is not supported (use 0)")
    if cfg.aux_factor != 0:
        raise ConfigError(f"bad value for 'aux_factor': {cfg.aux_factor}; XCiT has no auxiliary head (use 0)")
    if cfg.num_classes is not None and cfg.num_classes <= 0:
        raise ConfigError(f"bad value for 'num_classes': {cfg.num_classes} must be > 0")
    if cfg.re_value not in (0, "random", "pixel", "const"):  # timm erases with zeros, normal noise per region/pixel
        raise ConfigError(f"bad value for 're_value': {cfg.re_value!r}; use 0, 'random' or 'pixel'")
    if cfg.resume_opt and not cfg.ckpt_path:
        raise ConfigError("'resume_opt: True' needs 'ckpt_path' (the checkpoint to resume)")


def check_training(cfg: TrainConfig) -> None:
    """What only training needs (validation never builds the teacher): a teacher file for distillation."""
    if cfg.distillation_type != "none" and not cfg.teacher_path:
        raise ConfigError(
            f"'distillation_type: {cfg.distillation_type}' needs 'teacher_path', the weights of {cfg.teacher_model!r}"
        )
    if cfg.distillation_type != "none" and not Path(cfg.teacher_path).is_file():
        raise ConfigError(f"bad value for 'teacher_path': {cfg.teacher_path} is not a file")


def _check_model(cfg: TrainConfig) -> None:
    from ..model.arch import XCiTConfig, get_config

    try:
        get_config(cfg.model)
    except ValueError as e:
        raise ConfigError(f"bad value for 'model': {e}") from None
    allowed = {f.name for f in fields(XCiTConfig)} - {"num_classes", "in_chans", "drop_path_rate"}
    allowed -= {"drop_rate", "head_drop_rate"}
    for key in cfg.model_overrides:
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"bad value for 'model_overrides': unknown architecture field {key!r}{hint}")


def _check_auto_augment(cfg: TrainConfig) -> None:
    spec = cfg.timm_auto_augment
    if not spec:
        return
    if spec.startswith("trivialaug"):
        if not re.fullmatch(r"trivialaugwide(-m([2-9]|[1-9]\d+))?", spec):
            raise ConfigError(
                f"bad value for 'auto_augment': {cfg.auto_augment!r} is not trivialaugwide[-mN] (N >= 2 strength bins)"
            )
        return
    from .augment_spec import parse_policy

    try:  # every part checked: timm's parsers skip parts they cannot split (rand-mx trains as rand)
        parse_policy(cfg.auto_augment)
    except ValueError as e:
        raise ConfigError(f"bad value for 'auto_augment': {cfg.auto_augment!r}: {e}") from None
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    build = rand_augment_transform if spec.startswith("rand") else auto_augment_transform
    build = augment_and_mix_transform if spec.startswith("augmix") else build
    try:  # timm parses the string here; a typo fails now rather than in a data worker
        build(spec, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except Exception as e:  # noqa: BLE001 - timm raises assorted types for a bad string
        raise ConfigError(f"bad value for 'auto_augment': {cfg.auto_augment!r} ({e})") from None


def notices(cfg: TrainConfig, explicit: set[str]) -> list[str]:
    """One line per accepted key that has no effect (or a changed one) on this backend."""
    out = ["config: the recipe path a MindCV run recorded in its saved config; ignored"] if "config" in explicit else []
    if "dataset_sink_mode" in explicit and not cfg.dataset_sink_mode:  # True, MindCV's default, is silent
        out.append("dataset_sink_mode: Ascend data sinking has no PyTorch equivalent; the key has no effect")
    if "device_target" in explicit and cfg.device_target == "ascend":
        out.append("device_target: Ascend is not available; using CUDA if present, else CPU")
    elif "device_target" in explicit and cfg.device_target != "auto":
        out.append(f"device_target: {cfg.device_target}")
    defaults = TrainConfig()  # a resolved config written beside a checkpoint repeats the defaults: no notice then
    out += [
        f"{k}: accepted, no effect here"
        for k in IGNORED_KEYS
        if k in explicit and getattr(cfg, k) and getattr(cfg, k) != getattr(defaults, k)
    ]
    if cfg.amp_level != "O0" and "loss_scale_type" in explicit and cfg.loss_scale_type == "fixed":
        out.append("loss_scale_type: fixed -> fp16 uses torch's dynamic GradScaler starting at loss_scale")
    if cfg.re_max_attempts != 10:
        out.append(f"re_max_attempts: {cfg.re_max_attempts} -> timm's random erasing makes 10 attempts")
    size = cfg.model_overrides.get("img_size") if isinstance(cfg.model_overrides, dict) else None
    if size is not None and size != cfg.image_resize:  # XCiT's Fourier encoding takes any grid: img_size is a label
        out.append(f"model_overrides img_size {size} is the model's nominal size only; images are cropped to "
                   f"image_resize {cfg.image_resize} (set image_resize: {size} to train at {size})")  # fmt: skip

    notices_ = schedule_notices(cfg.warmup_epochs, cfg.lr_epoch_stair, cfg.warmup_factor, cfg.warmup_lr)
    return out + notices_ + optim_notices(cfg, explicit)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML recipe as a flat dict (empty file -> {}); a folder, a missing or non-UTF-8 file, a key given twice
    or a nested mapping is a ConfigError naming the file (:func:`xcit.config.recipe_file.read_recipe`)."""
    from .recipe_file import read_recipe

    return read_recipe(path)


def build_parser(prog: str, description: str, keys: frozenset | None = None) -> argparse.ArgumentParser:
    """``-c/--config`` plus one ``--key value`` option per config key (``--key`` alone sets a boolean True), grouped
    in the help; ``keys`` limits the help to what a command uses (every key is still accepted)."""
    from .options import Parser, add_config_options

    p = Parser(prog=prog, description=description, usage="%(prog)s [-c CONFIG] [--key VALUE ...]")
    p.add_argument("-c", "--config", default="", help="YAML recipe (MindCV keys); flags override it")
    add_config_options(p, fields(TrainConfig), _TYPES, _DEFAULTS, _CHOICES, keys)
    return p


def load_config(
    argv: list[str] | None = None,
    prog: str = "xcit train",
    base: dict[str, Any] | None = None,
    description: str | None = None,
    keys: frozenset | None = None,
) -> tuple[TrainConfig, set[str]]:
    """Defaults <- ``base`` <- YAML (``-c``) <- flags. Returns the checked config and the keys set explicitly.

    ``base`` holds defaults of a built-in recipe (the demo) that a YAML and flags still override.
    """
    parser = build_parser(prog, description or __doc__.split("\n\n")[0], keys)
    args, unknown = parser.parse_known_args(argv)
    dashed = _dashed_flags(unknown)  # --data-dir X spellings; anything else left over is an error
    values = dict(_DEFAULTS)
    for key, raw in (base or {}).items():
        _set(values, key, raw, "built-in recipe")
    explicit: set[str] = set()
    if args.config:
        for key, raw in read_yaml(args.config).items():
            if key != "config":  # MindCV's save_args records the -c path of the run: a notice, no effect
                _set(values, str(key), raw, args.config)
            explicit.add(str(key))
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    flags.update(dashed)
    for key, raw in flags.items():
        _set(values, key, raw, "command line")
        explicit.add(key)
    _normalise(values)
    cfg = TrainConfig(**values)
    check(cfg)
    return cfg, explicit


def _dashed_flags(tokens: list[str]) -> dict[str, str]:
    """``--data-dir X`` / ``--data-dir=X`` tokens that argparse left over; an unknown key or stray token fails."""
    out, i = {}, 0
    while i < len(tokens):
        if not tokens[i].startswith("--"):
            raise ConfigError(f"command line: unexpected argument {tokens[i]!r} (options are --key value)")
        key, eq, val = tokens[i][2:].partition("=")
        key = key.replace("-", "_")
        if key not in _TYPES:
            raise _unknown(key, "command line")
        if not eq:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            bool_flag = _TYPES[key] is bool and (nxt is None or nxt.startswith("--"))
            val = "True" if bool_flag else nxt
            i += 0 if bool_flag else 1
        out[key] = val
        i += 1
    return out


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A checked config from a plain dict (e.g. the one a checkpoint records); unknown keys fail."""
    merged = dict(_DEFAULTS)
    for key, raw in values.items():
        _set(merged, key, raw, "config")
    _normalise(merged)
    cfg = TrainConfig(**merged)
    check(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: str | Path, header: str = "") -> None:
    """The resolved config as YAML (atomic write), loadable again with ``-c``."""
    from ..runtime.fileio import atomic_write

    text = (f"# {header}\n" if header else "") + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def recorded_preprocessing(config: dict[str, Any]) -> Preprocessing | None:
    """The evaluation preprocessing an ``xcit train`` checkpoint's recorded config implies (keys it lacks take
    :class:`TrainConfig`'s defaults), or None when it records no config."""
    if not config:
        return None
    known = TrainConfig.__dataclass_fields__
    return Preprocessing.from_train_config(TrainConfig(**{k: v for k, v in config.items() if k in known}))
