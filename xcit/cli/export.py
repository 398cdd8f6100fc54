"""``xcit export --format onnx|torchscript|export``: export a model and check it against PyTorch."""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

import torch

from ..config.options import Parser
from ..infer.export import (
    DEFAULT_OPSET,
    FORMATS,
    check_out_name,
    export_onnx,
    export_program,
    export_torchscript,
    onnx_metadata,
    onnx_opset,
    save_program,
    verify,
)
from ..infer.predict import class_names, eval_preprocessing, load_model
from ..runtime.fileio import check_writable_dir
from ..weights.hub import export_timm, save_pretrained
from ._args import add_weights_arguments

log = logging.getLogger("xcit")


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="xcit export",
        description="Export to ONNX (checked with onnxruntime), TorchScript (traced), a torch.export program "
        "(.pt2), a hub-style folder or a timm checkpoint. The exported file is run on the example input, and on "
        "another batch size / resolution when those axes are dynamic, and compared with PyTorch.",
    )
    p.add_argument(
        "--format",
        choices=(*FORMATS, "hub", "timm"),
        default="onnx",
        help="onnx | torchscript | export (torch.export .pt2) | hub (save_pretrained folder with the checkpoint's "
        "preprocessing) | timm (bare timm-layout .safetensors/.pth) (default: %(default)s)",
    )
    add_weights_arguments(p, "weights file or save_pretrained folder (omit for random weights)")
    p.add_argument("--out", required=True, help="output file (.onnx, .pt, .pt2, .safetensors) or hub folder")
    p.add_argument("--img-size", type=int, nargs="+", metavar="N", help="H [W] of the example input (default: model's)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the example input")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis dynamic")
    p.add_argument("--dynamic-size", action="store_true", help="make height and width dynamic (multiples of the patch)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted logit difference (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_out_name(args.format, args.out)
    if args.format == "onnx":  # before any work: a missing [export] extra is one line naming it (xcit.cli)
        for name in ("onnx", "onnxscript", "onnxruntime"):
            importlib.import_module(name)
    check_writable_dir(Path(args.out).resolve().parent, "export")  # before minutes of tracing
    model = load_model(args.model, args.pretrained, use_ema=args.ema)
    prep = eval_preprocessing(model)
    H, W = (args.img_size * 2)[:2] if args.img_size else prep["input_size"][1:]
    p = model.patch_size
    model.check_input(torch.empty(1, model.cfg.in_chans, H, W))  # friendly error for sizes off the patch grid
    example = torch.randn(args.batch_size, model.cfg.in_chans, H, W, generator=torch.Generator().manual_seed(0))

    if args.format == "onnx":
        meta = onnx_metadata(model, prep, class_names(model))
        export_onnx(model, example, args.out, args.dynamic_batch, args.dynamic_size, args.opset, meta)
    elif args.format == "torchscript":
        export_torchscript(model, example, args.out)
    elif args.format == "export":
        save_program(export_program(model, example, args.dynamic_batch, args.dynamic_size), args.out)
    elif args.format == "hub":
        save_pretrained(model, args.out, prep)
    else:
        export_timm(model, args.out)

    # check the file with its own runtime on the example and on the shapes it claims to accept
    checks = [example]
    if args.dynamic_batch or args.format in ("torchscript", "hub", "timm"):
        checks.append(torch.randn(args.batch_size + 2, model.cfg.in_chans, H, W))
    if args.dynamic_size or args.format in ("torchscript", "hub", "timm"):
        checks.append(torch.randn(1, model.cfg.in_chans, H + p, W + 2 * p))
    diffs = verify(args.out, args.format, model, checks)
    shapes = ", ".join(f"{tuple(x.shape)}: {d:.2e}" for x, d in zip(checks, diffs))
    opset = f", opset {onnx_opset(args.out)}" if args.format == "onnx" else ""
    log.info("wrote %s (%s%s); max |logit diff| vs PyTorch %s", args.out, args.format, opset, shapes)
    if max(diffs) > args.atol:
        log.error("exported outputs differ from PyTorch by %.2e > --atol %.0e", max(diffs), args.atol)
        return 1
    return 0
