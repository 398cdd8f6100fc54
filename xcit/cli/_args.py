"""Arguments shared by the commands that load one trained model."""

from __future__ import annotations

import argparse


def add_weights_arguments(p: argparse.ArgumentParser, pretrained_help: str) -> None:
    """``--model``, ``--pretrained`` and ``--no-ema``, read by :func:`xcit.infer.predict.load_model`."""
    p.add_argument("--model", help="architecture (default: the one recorded in --pretrained)")
    p.add_argument("--pretrained", help=pretrained_help)
    p.add_argument(
        "--no-ema",
        dest="ema",
        action="store_false",
        default=None,
        help="use the raw weights of a training checkpoint (default: its EMA weights when present, as validate)",
    )
