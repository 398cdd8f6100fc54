"""``xcit models``: the variants with parameter count, GMACs and default resolution."""

from __future__ import annotations

import json

import torch

from ..config.options import Parser
from ..model.xcit import XCiT
from ..weights.factory import VARIANTS, gmacs, official_top1


def model_table(pattern: str = "") -> list[dict]:
    rows = []
    for name, cfg in VARIANTS.items():
        if pattern not in name:
            continue
        with torch.device("meta"):  # count parameters without allocating them
            params = sum(p.numel() for p in XCiT(cfg).parameters())
        rows.append(
            dict(
                name=name,
                params_m=round(params / 1e6, 2),
                gmacs=round(gmacs(cfg), 2),
                resolution=cfg.img_size,
                patch=cfg.patch_size,
                top1=official_top1(name),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="xcit models", description=__doc__)
    p.add_argument("pattern", nargs="?", default="", help="only names containing this substring")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    rows = model_table(args.pattern)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<26} {'params (M)':>10} {'GMACs':>8} {'res':>5} {'top-1*':>7}")
    for r in rows:
        print(f"{r['name']:<26} {r['params_m']:>10.2f} {r['gmacs']:>8.2f} {r['resolution']:>5} {r['top1']:>7.1f}")
    print("* ImageNet-1k top-1 of the official weights (paper); 384 models are distilled and fine-tuned at 384.")
    return 0
