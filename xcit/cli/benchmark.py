"""``xcit benchmark``: inference and training-step throughput, peak memory, GMACs, the fraction of the machine's
measured matmul peak and the time an inference batch's GEMMs take alone; ``--compare timm`` runs timm's same model
beside ours, ``--sweep-resolution`` plots time and memory against tokens next to DeiT, ``--data`` times the JPEG
training pipeline, ``--agreement`` checks that bf16 keeps fp32's predictions.

Examples::

    xcit benchmark --compare timm --threads 2                       # eager fp32, inference and train step
    xcit benchmark --compare timm --precision bf16 --compile
    xcit benchmark --sweep-resolution --plot assets/resolution_sweep.png
    xcit benchmark --data                                           # generated JPEGs; or --data DIR
    xcit benchmark --agreement ~/.cache/xcit/digits/val --pretrained ckpt/demo/best.pth
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import torch

from ..bench import data as D
from ..bench import runner as B
from ..bench import sweep as S
from ..bench.checks import check, round_ratios, rounds_needed, starvation_warnings
from ..config.options import Parser
from ..runtime.threads import CpuThreads
from ._args import add_ema_argument, check_device, ema_flag

log = logging.getLogger("xcit")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="xcit benchmark", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="variant name (default xcit_tiny_12_p16_224, or the checkpoint's)")
    p.add_argument("--pretrained", default=None, help="weights to load (speed does not depend on them)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=224)
    p.add_argument("--precision", choices=list(B.PRECISIONS), default="fp32", help="fp32, or bf16/fp16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile every model first (compile time excluded)")
    p.add_argument("--mode", choices=["infer", "train", "both"], default="both")
    p.add_argument("--compare", choices=["timm"], default=None, help="time timm's same model, alternating")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per model (the first one compiles)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per model per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument(
        "--settle",
        type=float,
        default=None,
        metavar="PCT",
        help="shared machine: before each round wait until other processes use < PCT%% of the CPU",
    )
    p.add_argument("--sweep-resolution", action="store_true", help="time and memory from 224 to 1024 (2048 nano)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="sweep resolutions (default: 224..1024)")
    p.add_argument("--plot", default="assets/resolution_sweep.png", help="where the sweep's PNG goes")
    p.add_argument(
        "--data",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="images per CPU-second of the data pipeline (file to normalised batch), ours vs timm's (and DALI's),\n"
        "on a folder of JPEGs, then the training step it feeds (no DIR: generate 500x375 JPEGs from real photos)",
    )
    p.add_argument("--data-images", type=int, default=64, help="images in a generated --data folder")
    p.add_argument(
        "--agreement",
        default=None,
        metavar="DIR",
        help="top-1 agreement of bf16/fp16 with fp32 on a split (DATA_DIR/val or DATA_DIR; use with --pretrained),\n"
        "labelled as `xcit validate` labels it",
    )
    p.add_argument(
        "--ignore_class_mismatch",
        "--ignore-class-mismatch",
        type=ema_flag,
        default=False,
        metavar="{True,False}",
        help="--agreement: score the checkpoint's classes present in the split, as validate's flag",
    )
    add_ema_argument(p)
    p.add_argument(
        "--cpu-paths",
        action="store_true",
        help="time each CPU fast-path switch on and off (eager inference, alternating) and say which this CPU wants",
    )
    p.add_argument("--results_file", "--results-file", dest="results_file", default=None, help="write JSON here")
    return p.parse_args(argv)


def _row(name: str, r: dict) -> str:
    mem = f"{r['peak_memory_mib']:9.1f}" if "peak_memory_mib" in r else f"{'-':>9}"
    return (
        f"  {name:<5} {r['img_per_s']:9.1f} {r['ms_per_batch']:10.1f} {mem} {r['gflops_per_s']:9.1f}"
        f" {100 * r['fraction_of_peak']:7.1f}% {100 * r['fraction_of_bf16_peak']:7.1f}%"
    )


def report(res: dict) -> None:
    """The benchmark's table: one block per mode, ratios last."""
    peaks = res["matmul_peak_gflops"]
    print(
        f"{res['model']}  batch {res['batch']}  {res['img_size']}px  {res['precision']}"
        f"{'  compiled' if res['compile'] else '  eager'}  {res['device']}  {res['threads']} threads"
    )
    print("measured GEMM peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print("GMACs/image: " + ", ".join(f"{k} {v:.3f}" for k, v in res["gmacs_per_image"].items()))
    for mode in B.MODES:
        if mode not in res:
            continue
        cols = ("img/s", "ms/batch", "peak MiB", "GFLOP/s", "of peak", "of bf16")
        print(f"{mode}:  {'':5} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, (9, 10, 9, 9, 8, 8))))
        for k in ("ours", "timm"):
            if k in res[mode]:
                print(_row(k, res[mode][k]))
        for k in ("ours", "timm"):
            g = res[mode].get(k, {}).get("gemm_only")
            if g and "share_of_batch_time" in g:
                print(
                    f"  {k:<5} GEMMs alone {g['ms_per_batch']:.1f} ms/batch = {100 * g['share_of_batch_time']:.0f}% of"
                    f" the batch; bound {g['img_per_s_bound']:.1f} img/s = {100 * g['bound_fraction_of_peak']:.1f}%"
                    f" of peak, {100 * g['bound_fraction_of_bf16_peak']:.1f}% of bf16"
                )
        if "ratio" in res[mode]:
            q = res[mode]["ratio"]
            print(
                f"  ours/timm {q['ratio']:.3f} (medians), {q['ratio_of_fastest']:.3f} (fastest calls);"
                f" per round {q['round_ratio_min']:.3f} .. {q['round_ratio_max']:.3f}"
            )


def formats(folder: str | Path, rounds: int, max_busy: float | None) -> dict | None:
    """The same images read as a folder, as WebDataset shards and as a Hugging Face dataset, beside timm's loader."""
    import importlib.util
    import tempfile

    if not all(importlib.util.find_spec(m) for m in ("webdataset", "datasets")):
        print("  (per-format timing needs the data extra: pip install -e '.[data]')")
        return None
    from ..bench.formats import bench_formats

    with tempfile.TemporaryDirectory() as tmp:
        res = bench_formats(folder, tmp, rounds=rounds, max_busy=max_busy)
    print("  per format (read + decode + transform, one worker): " + ", ".join(
        f"{k} {res[k]['img_per_s']:.1f} img/s ({res['ratio_to_timm'][k]:.3f}x timm)" for k in res["ratio_to_timm"]
    ) + f"; timm's loader on the folder {res['timm']['img_per_s']:.1f} img/s")  # fmt: skip
    return res


def report_sweep(res: dict) -> None:
    print(f"resolution sweep, {res['precision']}, ~{res['tokens_per_call']} tokens per call")
    ref = {p["img_size"]: p for p in res["reference_points"]}
    print(f"  {'size':>5} {'tokens':>7} {'ours ms/img':>12} {'MiB/img':>8} {'deit ms/img':>12} {'MiB/img':>8}")
    for p in res["ours"]:
        d = ref.get(p["img_size"], {})
        nan = float("nan")
        ours = f"{p['ms_per_image']:12.1f} {p.get('peak_memory_mib_per_image', nan):8.1f}"
        deit = f"{d.get('ms_per_image', nan):12.1f} {d.get('peak_memory_mib_per_image', nan):8.1f}"
        print(f"  {p['img_size']:5d} {p['tokens']:7d} {ours} {deit}")
    s = res["scaling"]
    if "time_ratio" in s:
        deit = s["reference"].get("time_ratio", float("nan"))
        print(f"  16x tokens -> ours {s['time_ratio']:.1f}x time per image, deit {deit:.1f}x")


def report_data(res: dict, folder) -> None:
    """The data pipelines' images per CPU-second, ours over timm's with the rounds' spread."""
    lo, hi = min(res["round_ratios"]), max(res["round_ratios"])
    print(f"data pipeline on {res['images']} JPEGs ({folder}), file to normalised batch of {res['batch']} on"
          f" {res['device']}, images per CPU-second (one thread):")  # fmt: skip
    print(f"  ours {res['ours']['img_per_s']:.1f} (decode {res['ours']['decode_ms']:.2f} ms + the rest"
          f" {res['ours']['transform_ms']:.2f} ms),  timm {res['timm']['img_per_s']:.1f}")  # fmt: skip
    if "dali" in res:
        print(f"  dali {res['dali']['img_per_s']:.1f} ({res['dali_ratio']:.3f}x timm)")
    print(f"  ours/timm {res['ratio']:.3f} (medians of {len(res['round_ratios'])} alternating rounds;"
          f" per round {lo:.3f} .. {hi:.3f})")  # fmt: skip


def loader_share(args: argparse.Namespace, img_per_s_per_core: float) -> dict:
    """One training step of ``args.model`` timed here, against the time one core takes to prepare its batch:
    whether training on this machine waits for data (:func:`xcit.bench.data.data_share`)."""
    step = B.run(args.model, args.batch, args.img_size, args.precision, args.compile, ("train",), None, args.device,
                 args.warmup, max(2, args.rounds // 2), args.iters, False, args.pretrained, args.settle)  # fmt: skip
    threads = 0 if str(args.device).startswith("cuda") else torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = D.data_share(img_per_s_per_core, step["train"]["ours"]["ms_per_batch"], args.batch, threads, cores)
    share.update(model=args.model, precision=args.precision, compile=args.compile, batch=args.batch, threads=threads)
    print(
        f"training step ({args.model}, batch {args.batch}, {args.precision}, {threads} threads):"
        f" {share['step_ms']:.0f} ms; one core prepares the batch in {share['loader_ms_per_batch_one_core']:.0f} ms"
        f" ({share['loader_fraction_of_step']:.2f} of the step); with {share['spare_cores']} core(s) to spare for"
        f" loader workers: {share['bound']}-bound"
        + ("" if share["spare_cores"] else f", {100 * share['data_share_shared_cores']:.0f}% of the time on data")
        + f"; not to wait for data the step needs {share['cores_needed']} loader core(s)"
    )
    return share


def cpu_paths(name: str, batch: int, rounds: int, iters: int) -> dict:
    """:func:`xcit.bench.cpu_paths.measure`, printed: every switch's on/off ratio here, and the op-level times."""
    from ..bench import cpu_paths as cpu_bench

    res = cpu_bench.measure(name, batch, rounds, iters)
    print(f"CPU family {res['family']} (detected {res['detected_family']}, ATen {res['capability']}), "
          f"{res['threads']} threads, {name} batch {batch}, eager inference")  # fmt: skip
    for switch, r in res["switches"].items():
        if "skipped" in r:
            print(f"  {switch:<20} {r['precision']}  not timed: {r['skipped']}")
            continue
        lo, hi = r["round_on_over_off"]
        verdict = "faster on" if r["faster_here"] else "faster off"
        print(f"  {switch:<20} {r['precision']}  on {r['img_per_s_on']:7.1f} img/s, off {r['img_per_s_off']:7.1f}:"
              f" on/off {r['on_over_off']:.3f} (rounds {lo:.3f}..{hi:.3f}), {verdict}")  # fmt: skip
    for op, t in res["ops"].items():
        print(f"  {op}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    return res


def check_counts(args: argparse.Namespace) -> None:
    """One line for counts that cannot be measured (a batch of 0 fails in a reshape, 0 rounds has no median)."""
    for flag, least in (("batch", 1), ("iters", 1), ("rounds", 1), ("warmup", 0), ("data_images", 1)):
        value = getattr(args, flag)
        if value < least:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: give {least} or more")
    if args.agreement and not args.pretrained:
        raise ValueError("--agreement needs --pretrained WEIGHTS (random weights agree with nothing)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    check_counts(args)
    args.device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None and not (args.agreement and args.pretrained):
        args.model = "xcit_tiny_12_p16_224"
    results: dict = {"command": "xcit benchmark " + shlex.join(sys.argv[2:] if argv is None else argv)}
    if args.data is not None:
        folder = args.data or D.write_jpegs(D.default_jpeg_dir(), n=args.data_images)
        res = D.bench_data(folder, rounds=args.rounds, max_busy=args.settle, device=args.device)
        results["data"] = res
        report_data(res, folder)
        results["data_formats"] = formats(folder, args.rounds, args.settle)
        results["data_share"] = loader_share(args, res["ours"]["img_per_s"])
    elif args.cpu_paths:
        results["cpu_paths"] = cpu_paths(args.model, args.batch, args.rounds, args.iters)
    elif args.agreement:
        size = args.img_size if args.img_size != 224 else None  # default: the checkpoint's own resolution
        from ..bench.agreement import agreement

        res = agreement(args.agreement, args.pretrained, args.model, args.device, args.batch, size, args.ema,
                        args.ignore_class_mismatch)  # fmt: skip
        results["agreement"] = res
        print(f"{res['images']} images: top-1 " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in res["top1"].items()))
        print("agreement with fp32: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in res["agreement_with_fp32"].items()))
    elif args.sweep_resolution:
        res = S.sweep(
            args.model, args.precision, args.device, args.batch, args.iters, args.sizes, memory=args.memory,
            max_busy=args.settle,
        )  # fmt: skip
        res["plot"] = str(S.plot_sweep(res, args.plot))
        results["sweep"] = res
        report_sweep(res)
        print(f"plot: {res['plot']}")
    else:
        modes = B.MODES if args.mode == "both" else (args.mode,)
        cpu = CpuThreads() if not str(args.device).startswith("cuda") else None  # what else ran meanwhile
        res = B.run(
            args.model, args.batch, args.img_size, args.precision, args.compile, modes, args.compare, args.device,
            args.warmup, args.rounds, args.iters, args.memory, args.pretrained, args.settle,
        )  # fmt: skip
        for mode in modes:  # how many rounds the observed spread needs for a ratio within 2%
            if "ratio" in res[mode]:
                res[mode]["ratio"]["rounds_needed"] = rounds_needed(round_ratios(res[mode]))
        results.update(res, warnings=check(res))
        if cpu is not None:
            results["warnings"] += starvation_warnings(cpu.busy_elsewhere(), cpu.available, torch.get_num_threads())
        report(res)
        for line in results["warnings"]:
            print(f"warning: {line}")
    if args.results_file:
        Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_file).write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {args.results_file}")
    return 0
