"""``xcit models``: the variants with parameter count, GMACs and default resolution, and every set of released
weights (``variant.tag``) with its source, file size, published top-1 and whether this machine has it cached."""

from __future__ import annotations

import json

import torch

from ..config.options import Parser
from ..model.xcit import XCiT
from ..weights.factory import VARIANTS, gmacs, official_top1
from ..weights.pretrained import RELEASES, Release, cached_file, default_tag


def model_table(pattern: str = "") -> list[dict]:
    """One row per variant whose name (or one of whose release names) contains ``pattern``, each with its
    ``weights``: one entry per release (``name``, ``tag``, ``default``, ``hf_hub_id``, ``url``, ``size_mb``,
    ``top1``, ``cached``)."""
    rows = []
    for name, cfg in VARIANTS.items():
        releases = [r for r in RELEASES.values() if r.variant == name]
        if pattern not in name and not any(pattern in r.name for r in releases):
            continue
        with torch.device("meta"):  # count parameters and bytes without allocating them
            model = XCiT(cfg)
        params = sum(p.numel() for p in model.parameters())
        sd = model.state_dict()
        size_mb = round(sum(t.numel() * t.element_size() for t in sd.values()) / 1e6, 1)
        weights = [_release_row(r, size_mb) for r in releases]
        row = dict(name=name, params_m=round(params / 1e6, 2), gmacs=round(gmacs(cfg), 2), resolution=cfg.img_size,
                   patch=cfg.patch_size, top1=official_top1(name), weights=weights)  # fmt: skip
        rows.append(row)
    return rows


def _release_row(r: Release, size_mb: float) -> dict:
    return dict(name=r.name, tag=r.tag, default=r.tag == default_tag(r.variant), hf_hub_id=r.hf_hub_id, url=r.url,
                size_mb=size_mb, top1=r.top1, cached=cached_file(r) is not None)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="xcit models", description=__doc__)
    p.add_argument("pattern", nargs="?", default="", help="only names containing this substring")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    rows = model_table(args.pattern)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = f"{'weights (variant.tag)':<35} {'params (M)':>10} {'GMACs':>6} {'res':>4} {'size (MB)':>9} {'top-1':>6}"
    print(f"{head}  cached  source")
    for r in rows:
        for w in r["weights"]:
            source = f"hf-hub:{w['hf_hub_id']}" if w["hf_hub_id"] else w["url"]
            print(f"{w['name'] + (' *' if w['default'] else ''):<35} {r['params_m']:>10.2f} {r['gmacs']:>6.2f} "
                  f"{r['resolution']:>4} {w['size_mb']:>9.1f} {w['top1']:>6g}  {'yes' if w['cached'] else 'no':<6}  "
                  f"{source}")  # fmt: skip
    print("* the default tag (`create_model(name, pretrained=True)`). top-1: ImageNet-1k, as published with the "
          "weights (official README; MindCV's README for mindcv_in1k). size: the fp32 tensors of the file. Every "
          "hf-hub file falls back to its official URL (`xcit models --json` lists them).")  # fmt: skip
    return 0
