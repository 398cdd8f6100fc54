"""``xcit predict IMAGE_OR_DIR...``: top-k class names for images, with the evaluation transform of validation."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ..config.options import Parser
from ..infer.predict import class_names, eval_preprocessing, eval_transform, find_images, load_model, predict
from ..infer.results import FORMATS as RESULT_FORMATS
from ..infer.results import results_format, write_results
from ..runtime.fileio import check_writable_dir
from ..runtime.precision import PRECISIONS
from ._args import add_weights_arguments, check_device

log = logging.getLogger("xcit")


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="xcit predict",
        description="Top-k predictions for image files and folders (searched recursively). Images are resized and "
        "centre-cropped exactly as `xcit validate` does (the settings recorded in a training checkpoint, else the "
        "model's defaults). Unreadable files are reported and skipped.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders (searched recursively)")
    add_weights_arguments(p, "weights file (any supported format) or save_pretrained folder")
    p.add_argument("--topk", type=int, default=5, help="classes to print per image (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--img-size", type=int, help="evaluation resolution (default: the checkpoint's / model's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="fp32, or bf16/fp16 autocast (bf16 is about 2x faster on CPUs with AMX, and on recent GPUs)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document (predictions and errors)")
    p.add_argument(
        "--results-file",
        metavar="FILE",
        help="also write the predictions to FILE as timm's inference.py does (filename, index, label, prob)",
    )
    p.add_argument(
        "--results-format",
        choices=RESULT_FORMATS,
        help="csv (one column per rank) | json | json-split | json-records (default: from FILE's extension, "
        ".json -> json, .jsonl -> json-records, else csv)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.topk < 0:  # topk(-1) would fail deep in torch; 0 is allowed and writes the files with no classes
        raise ValueError(f"--topk {args.topk}: give 0 or more classes per image")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: give 1 or more images per forward pass")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else check_device(args.device)
    if args.results_file:  # a folder that cannot be written fails now, not after the predictions
        check_writable_dir(Path(args.results_file).resolve().parent, "results file")
    model = load_model(args.model, args.pretrained, use_ema=args.ema)
    prep = eval_preprocessing(model, args.img_size)
    transform = eval_transform(prep)
    files = find_images(args.inputs)
    if not files:
        log.error("no images found in %s", " ".join(args.inputs))
        return 1
    progress = any(Path(p).is_dir() for p in args.inputs)
    amp = PRECISIONS[args.precision]
    results, errors = predict(
        model, files, transform, class_names(model), args.topk, args.batch_size, device, progress, amp
    )

    if args.json:
        doc = {
            "model": model.name,
            "preprocessing": prep,
            "predictions": [r.to_dict() for r in results],
            "errors": [{"path": p, "error": e} for p, e in errors],
        }
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        for r in results:
            print(f"{r.path}: " + ", ".join(f"{name} ({prob:.3f})" for _, name, prob in r.topk))
    if args.results_file:
        write_results(results, args.results_file, args.results_format)
        log.info("results: %s (%s)", args.results_file, results_format(args.results_file, args.results_format))
    if errors:
        log.warning("%d of %d files could not be read and were skipped", len(errors), len(files))
    return 0 if results else 1
