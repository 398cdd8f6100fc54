"""``xcit convert SRC DST``: official / timm / MindCV / project weights -> safetensors, .pth or MindSpore .ckpt."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config.options import Parser
from ..runtime.fileio import check_writable_dir
from ..weights.files import FORMATS, convert
from ._args import add_ema_argument

log = logging.getLogger("xcit")


def main(argv: list[str] | None = None) -> int:
    p = Parser(
        prog="xcit convert",
        description="Convert XCiT weights. The source format is detected; the target follows DST's extension "
        "(.safetensors -> safetensors, .ckpt -> MindSpore, otherwise timm-layout .pth) unless --to is given.",
    )
    p.add_argument("src", help="official .pth, timm .pth/.safetensors, MindCV .ckpt or an xcit checkpoint")
    p.add_argument("dst", help="output file")
    p.add_argument("--to", choices=FORMATS, help="target format (default: from DST's extension)")
    p.add_argument("--model", help="architecture name to record (default: inferred from the weights' shapes)")
    add_ema_argument(p)
    args = p.parse_args(argv)
    check_writable_dir(Path(args.dst).resolve().parent, "converted weights")
    w = convert(args.src, args.dst, to=args.to, arch=args.model, use_ema=args.ema)
    to = args.to or {".ckpt": "mindspore", ".safetensors": "safetensors"}.get(Path(args.dst).suffix, "timm")
    which = "EMA weights" if w.used_ema else "model weights" + (" (its EMA weights are not used)" if w.has_ema else "")
    log.info("wrote %s: %s format, arch=%s, flavour=%s, %d tensors; from %s (%s, %s)", args.dst, to, w.arch,
             w.flavour, len(w.state_dict), args.src, w.source_format, which)  # fmt: skip
    return 0
