"""Command-line parsing shared by every ``xcit`` command: one spelling rule and readable, grouped help.

* Every long option may be written with dashes or underscores (``--batch-size`` = ``--batch_size``) in every
  command.
* ``xcit train`` / ``xcit validate`` show the config keys in groups (data, model, augmentation, ...), each with its
  type or choices and a cleanly printed default; ``validate`` lists only the keys validation reads (the others are
  still accepted, e.g. from a training run's ``config.yaml``).

The config itself (keys, types, defaults, checks) lives in :mod:`xcit.config.train_config`; this module only presents
it.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Union

GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "data_dir", "train_split", "val_split", "data_format", "dataset_download",
             "num_parallel_workers", "shuffle", "num_samples", "batch_size", "drop_remainder", "aug_repeats",
             "eval_shuffle"),
    "model": ("model", "num_classes", "in_channels", "drop_rate", "head_drop_rate", "drop_path_rate",
              "model_overrides", "grad_checkpointing", "sync_bn", "freeze_bn"),
    "augmentation": ("image_resize", "scale", "ratio", "hflip", "vflip", "color_jitter", "interpolation",
                     "auto_augment", "aug_splits", "re_prob", "re_scale", "re_ratio", "re_value", "re_max_attempts",
                     "re_count", "mean", "std", "crop_pct", "mixup", "cutmix", "cutmix_prob", "mixup_switch_prob",
                     "mixup_mode"),
    "loss and distillation": ("loss", "label_smoothing", "aux_factor", "reduction", "distillation_type",
                              "distillation_alpha", "distillation_tau", "teacher_model", "teacher_path"),
    "optimiser": ("opt", "momentum", "weight_decay", "use_nesterov", "weight_decay_filter", "filter_bias_and_bn", "eps",
                  "layer_decay", "clip_grad", "clip_value", "gradient_accumulation_steps"),
    "schedule": ("epoch_size", "scheduler", "lr", "lr_scale", "min_lr", "warmup_epochs", "warmup_factor", "warmup_lr",
                 "decay_epochs", "decay_rate", "multi_step_decay_milestones", "lr_epoch_stair", "num_cycles",
                 "cycle_decay"),
    "checkpoints and EMA": ("pretrained", "ckpt_path", "resume_opt", "resume", "ckpt_save_dir", "ckpt_save_interval",
                            "ckpt_save_policy", "keep_checkpoint_max", "ckpt_interval_steps", "ema", "ema_decay",
                            "ema_warmup"),
    "validation and output": ("val_while_train", "val_interval", "log_interval", "results_file", "tensorboard",
                              "ignore_class_mismatch"),
    "distributed and device": ("distribute", "dist_timeout", "device_target", "seed"),
    "precision and compilation": ("mode", "compile", "amp_level", "val_amp_level", "amp_dtype", "channels_last",
                                  "loss_scale", "loss_scale_type", "dynamic_loss_scale", "drop_overflow_update"),
    "accepted for MindCV compatibility, no effect here": ("enable_modelarts", "multi_data_url", "data_url", "ckpt_url",
                                                          "train_url", "dataset_sink_mode", "amp_cast_list"),
}  # fmt: skip

# what `xcit validate` reads (evaluate.validate, the evaluation transform and the validation loader)
VALIDATE_KEYS = frozenset(
    ("dataset", "data_dir", "val_split", "data_format", "num_parallel_workers", "batch_size", "model",
     "model_overrides", "image_resize", "interpolation", "mean", "std", "crop_pct", "ckpt_path", "ema", "results_file",
     "ignore_class_mismatch", "distribute", "dist_timeout", "device_target", "mode", "compile", "val_amp_level",
     "amp_dtype", "channels_last")
)  # fmt: skip

SPELLING = "Options may be written with - or _ (--batch-size = --batch_size)."


class Parser(argparse.ArgumentParser):
    """``argparse`` with one spelling rule: ``--a_b`` and ``--a-b`` both reach the option registered as either."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("epilog", SPELLING)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        import sys

        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._respell(a) for a in args], namespace)

    def _respell(self, token: str) -> str:
        if not token.startswith("--") or len(token) < 3:
            return token
        name, eq, value = token.partition("=")
        if name not in self._option_string_actions:
            for alt in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if alt in self._option_string_actions:
                    return alt + eq + value
        return token


def show(value: Any) -> str:
    """A default as a user would type it: ``57.12``, not ``57.120000000000005``; lists in YAML's ``[a, b]``."""
    if isinstance(value, float):
        return repr(float(format(value, ".10g")))
    if value == "":
        return "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def metavar(tp: Any, choices: tuple[str, ...] | None) -> str:
    """``{a,b}`` for a key with choices, else its type: INT, FLOAT, STR, BOOL, LIST, MAPPING (``|`` for unions)."""
    if choices:
        return "{" + ",".join(choices) + "}"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return "|".join(metavar(a, None) for a in args if a is not type(None))
    if origin is tuple:
        return ",".join(metavar(a, None) for a in args)
    if origin is list or tp is list:
        return f"{metavar(args[0], None) if args else 'V'},..."
    if origin is dict or tp is dict:
        return "MAPPING"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(tp, "V")


def add_config_options(
    p: argparse.ArgumentParser, fields: list, hints: dict, defaults: dict, choices: dict, shown: frozenset | None
) -> None:
    """One ``--key value`` option per config field, in :data:`GROUPS`; keys outside ``shown`` are accepted unlisted."""
    grouped = {k: title for title, keys in GROUPS.items() for k in keys}
    visible = {f.name for f in fields if shown is None or f.name in shown}
    titles = {grouped.get(k, "other") for k in visible}
    groups = {t: p.add_argument_group(f"{t} options") for t in (*GROUPS, "other") if t in titles}
    for f in fields:
        title = grouped.get(f.name, "other")
        is_bool = hints[f.name] is bool
        (groups[title] if f.name in visible else p).add_argument(
            f"--{f.name}",
            dest=f.name,
            default=argparse.SUPPRESS,
            nargs="?" if is_bool else None,
            const="True" if is_bool else None,
            metavar=metavar(hints[f.name], choices.get(f.name)),
            help=f"{f.metadata['help']} (default: {show(defaults[f.name])})".replace("%", "%%")
            if f.name in visible
            else argparse.SUPPRESS,
        )
