"""Arguments and checks shared by the commands that load one trained model."""

from __future__ import annotations

import argparse

import torch

from ..config.train_config import ConfigError
from ..config.typed_values import str2bool

EMA_HELP = (
    "True: a training checkpoint's EMA weights, False: its raw weights (default: the EMA weights when the file "
    "has them; the same rule in every command)"
)


def ema_flag(text: str) -> bool:
    """``--ema True/False``, MindCV's boolean spellings, as ``xcit validate`` reads its ``ema`` key."""
    try:
        return str2bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_ema_argument(p: argparse.ArgumentParser) -> None:
    """``--ema True/False``; unset (None) takes the EMA weights when the file has them."""
    p.add_argument("--ema", type=ema_flag, default=None, metavar="{True,False}", help=EMA_HELP)


def add_weights_arguments(p: argparse.ArgumentParser, pretrained_help: str) -> None:
    """``--model``, ``--pretrained`` and ``--ema``, read by :func:`xcit.infer.predict.load_model`."""
    p.add_argument("--model", help="architecture (default: the one recorded in --pretrained)")
    p.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        metavar="PATH_OR_NAME",
        help=f"{pretrained_help}; or released weights by name (xcit_tiny_12_p16_224.fb_in1k, listed by `xcit models`), "
        "fetched once and cached; alone, --model's default release",
    )
    add_ema_argument(p)


def check_device(device: str, flag: str = "--device") -> str:
    """``device`` if this machine has it; else a ``ValueError`` with one line saying what is missing (torch's own
    error for a missing CUDA driver comes from deep inside the first ``.to(device)``)."""
    try:
        dev = torch.device("cuda" if device.lower() == "gpu" else device)
    except RuntimeError:
        raise ValueError(f"{flag} {device}: not a device (give cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {device}: this machine has no CUDA device; use {flag} cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"{flag} {device}: only cpu and cuda[:N] are supported")
    return str(dev)


def check_device_target(device_target: str) -> None:
    """train / validate's ``device_target``: ``cuda`` on a machine without CUDA is a :class:`ConfigError` (one
    line), before any data or model is touched. ``auto`` takes CUDA when present, else the CPU."""
    if device_target in ("cuda", "gpu"):
        try:
            check_device("cuda", "--device_target")
        except ValueError as e:
            raise ConfigError(f"{e} (or auto: CUDA when present)") from None
