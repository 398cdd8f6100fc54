"""The one-shot GPU check behind ``scripts/gpu_check.sh`` (see there for the command); ``--cpu`` is its rehearsal.

Steps, in this order, each in its own process with a time limit taken from one budget (450 s on a GPU, so the
whole run ends inside 8 minutes; 105 s with ``--cpu``):

1. ``tests``: the ``gpu``-marked tests (on CPU they are collected and skipped);
2. ``loader``: ``xcit train``'s training loader with one worker per CPU core, and one worker's pipeline speed;
   ``feed``: the batch work on the device (normalise, erase, mixup/cutmix), a batched ``decode_jpeg`` (nvJPEG on a
   GPU) and DALI's training graph (skipped, with the reason, where DALI is not installed): images/s per device and
   the CPU cores each used;
3. ``sweep``: the resolution sweep beside DeiT-Tiny (224 to 2048 px on a GPU), and whether any op's output has a
   (tokens x tokens) shape (XCA must never build one);
4. ``demo``: the digits demo with AMP and ``torch.compile`` (loss per epoch, top-1);
5. ``torchrun``: the same under ``torchrun --nproc_per_node 1``, then an NCCL all-reduce in a torchrun process
   (one process trains without a process group, so the collective is checked on its own);
6. ``bench``: ``xcit benchmark --compare timm`` for XCiT-T12/16 and XCiT-S12/16 at 224 and 384, eager and
   compiled, bf16 autocast and fp32 (TF32 on a GPU), inference and training step, with peak memory and the fraction
   of the measured bf16 GEMM peak; entries are run most important first, and those the budget leaves no time for
   are written with ``"status": "skipped"``.

``OUT/gpu_check.json`` holds every figure; each step also leaves its files under ``OUT/<step>/``. The CPU mode runs
the same code on a depth-1 model at 32-128 px (``torch.compile`` with the ``eager`` backend: inductor's C++ builds
take minutes on 2 cores), so its JSON has every field a GPU run writes (:data:`FIELDS` lists them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}
PLANS = {
    "gpu": {
        "device": "cuda", "budget_s": 450, "caps_s": {"tests": 90, "loader": 40, "feed": 30, "sweep": 60, "demo": 60,
        "torchrun": 60}, "models": ["xcit_tiny_12_p16_224", "xcit_small_12_p16_224"], "sizes": [224, 384],
        "batch": 128, "overrides": {}, "compile": True, "warmup": 3, "rounds": 5, "iters": 5,
        "sweep_sizes": [224, 448, 640, 896, 1024, 1536, 2048], "sweep_batch": 32, "deit_max": 2048,
        "square_check_size": 2048, "sweep_precision": "bf16", "jpegs": 512, "jpeg_size": (500, 375),
        "loader_batch": 128, "loader_images": 4096, "feed_batch": 128, "feed_size": 224,
        "demo_args": ["--epoch_size", "8", "--warmup_epochs", "1", "--decay_epochs", "7"],
    },
    "cpu": {
        "device": "cpu", "budget_s": 105, "caps_s": {"tests": 30, "loader": 15, "feed": 20, "sweep": 15, "demo": 25,
        "torchrun": 30}, "models": ["xcit_tiny_12_p16_224", "xcit_small_12_p16_224"], "sizes": [32, 48],
        "batch": 2, "overrides": TINY, "compile": "eager", "warmup": 1, "rounds": 1, "iters": 1,
        "sweep_sizes": [32, 64, 128], "sweep_batch": 2, "deit_max": 128, "sweep_precision": "fp32",
        "square_check_size": 96,
        "jpegs": 8, "jpeg_size": (80, 60), "loader_batch": 4, "loader_images": 16, "feed_batch": 8, "feed_size": 32,
        "demo_args": ["--epoch_size", "2", "--warmup_epochs", "1", "--decay_epochs", "1", "--num_samples", "256",
                      "--model_overrides", "{embed_dim: 32, depth: 1, num_heads: 2, img_size: 32}"],
    },
}  # fmt: skip

# dotted paths every run writes (``*`` is every element of a list); the CPU test checks them all
FIELDS = [
    "mode", "device", "machine", "versions", "budget_s", "elapsed_s", "missing_fields",
    "steps.tests.status", "steps.tests.passed", "steps.tests.failed", "steps.tests.skipped", "steps.tests.seconds",
    "steps.loader.status", "steps.loader.workers", "steps.loader.img_per_s", "steps.loader.img_per_s_per_worker",
    "steps.loader.pipeline_img_per_s_one_worker",
    "steps.feed.status", "steps.feed.batch_stage.img_per_s", "steps.feed.batch_stage.cpu_cores_used",
    "steps.feed.decode.img_per_s", "steps.feed.decode.cpu_cores_used", "steps.feed.dali.status",
    "steps.sweep.status", "steps.sweep.points.*.img_size", "steps.sweep.points.*.ms_per_image",
    "steps.sweep.points.*.peak_memory_mib_per_image", "steps.sweep.deit_points.*.ms_per_image",
    "steps.sweep.time_ratio_16x_tokens", "steps.sweep.deit_time_ratio_16x_tokens",
    "steps.sweep.memory_ratio_16x_tokens", "steps.sweep.tokens_square_tensor", "steps.sweep.plot",
    "steps.demo.status", "steps.demo.amp", "steps.demo.compile", "steps.demo.train_loss", "steps.demo.loss_falls",
    "steps.demo.top1", "steps.demo.seconds",
    "steps.torchrun.status", "steps.torchrun.train_loss", "steps.torchrun.loss_falls", "steps.torchrun.top1",
    "steps.torchrun.nccl_probe", "steps.torchrun.seconds",
    "steps.bench.status", "steps.bench.bf16_gemm_peak_gflops", "steps.bench.entries.*.model",
    "steps.bench.entries.*.img_size", "steps.bench.entries.*.precision", "steps.bench.entries.*.compile",
    "steps.bench.entries.*.status",
]  # fmt: skip
ENTRY_FIELDS = [  # per mode of every bench entry that ran
    "ours.img_per_s", "timm.img_per_s", "ours.peak_memory_mib", "timm.peak_memory_mib", "ours.fraction_of_bf16_peak",
    "timm.fraction_of_bf16_peak", "ratio.ratio", "ratio.round_ratio_min", "ratio.round_ratio_max",
]  # fmt: skip


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_cmd(cmd: list[str], timeout: float, logfile: Path, env: dict | None = None) -> tuple[int | str, float]:
    """Run ``cmd`` with its output appended to ``logfile``; returns (exit code or "timeout", seconds)."""
    t = time.monotonic()
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        # a session of its own, so that a timeout ends the whole tree (torchrun's workers too)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)  # fmt: skip
        try:
            rc: int | str = proc.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    return rc, time.monotonic() - t


def worker(step: str, plan: dict, out: Path, deadline: float) -> None:
    """The steps that run in Python: write ``out/<step>/result.json``."""
    import steps_gpu_check as S  # the helper module beside this script

    steps = {"loader": S.loader, "feed": S.feed, "sweep": S.sweep, "bench": S.bench, "nccl": S.nccl}
    result = steps[step](plan, out, deadline)
    (out / step).mkdir(parents=True, exist_ok=True)
    (out / step / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


def _worker_args(step: str, mode: str, out: Path, deadline: float) -> list[str]:
    return [__file__, "--worker", step, "--deadline", str(deadline), *(["--cpu"] if mode == "cpu" else []), str(out)]


def self_step(step: str, mode: str, out: Path, timeout: float) -> dict:
    """Run :func:`worker` for ``step`` in a child process; its result, or why there is none."""
    deadline = time.time() + timeout - 5  # the worker stops starting new work 5 s before it is killed
    rc, secs = run_cmd([sys.executable, *_worker_args(step, mode, out, deadline)], timeout, out / step / "log.txt")
    path = out / step / "result.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res.update(status="ok" if rc == 0 and res else f"failed ({rc})", seconds=secs)
    return res


def tests_step(plan: dict, out: Path, timeout: float) -> dict:
    xml = out / "tests" / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"]
    rc, secs = run_cmd(cmd, timeout, out / "tests" / "log.txt")
    res: dict = {"seconds": secs, "exit_code": rc}
    if xml.exists():
        head = xml.read_text()[:2000]
        counts = {k: int(v) for k, v in re.findall(r'\b(tests|failures|errors|skipped)="(\d+)"', head)[:4]}
        res.update(skipped=counts.get("skipped", 0), failed=counts.get("failures", 0) + counts.get("errors", 0))
        res["passed"] = counts.get("tests", 0) - res["skipped"] - res["failed"]
    ok = rc == 0 and "passed" in res and (res["passed"] > 0 or plan["device"] == "cpu")
    res["status"] = "ok" if ok else f"failed ({rc})"
    return res


def _train_cmd(plan: dict, out: Path) -> list[str]:
    amp = ["--amp_level", "O2", "--compile", "True" if plan["device"] == "cuda" else "False"]
    return ["-m", "xcit.cli", "train", "--device_target", plan["device"], *amp, "--ckpt_save_dir", str(out),
            "--results_file", str(out / "results.json"), "--tensorboard", "False", "--keep_checkpoint_max", "1",
            *plan["demo_args"]]  # fmt: skip


def _training_result(run_dir: Path, rc, secs: float) -> dict:
    rows = []
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.exists():
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    losses = [r["train_loss"] for r in rows]
    res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    falls = len(losses) > 1 and losses[-1] < losses[0]
    return {
        "status": "ok" if rc == 0 and falls and "top1" in res else f"failed ({rc})",
        "train_loss": losses,
        "loss_falls": falls,
        "top1": res.get("top1"),
        "img_per_sec_last_epoch": rows[-1].get("img_per_sec") if rows else None,
        "seconds": secs,
    }


def demo_step(plan: dict, out: Path, timeout: float) -> dict:
    run_dir = out / "demo"
    env = {"XCIT_CACHE": str(out / "cache")}  # the digits are written there from scikit-learn's bundled copy
    rc, secs = run_cmd([sys.executable, *_train_cmd(plan, run_dir)], timeout, run_dir / "log.txt", env)
    return _training_result(run_dir, rc, secs) | {"amp": "O2", "compile": plan["device"] == "cuda"}


def torchrun_step(plan: dict, out: Path, timeout: float, mode: str) -> dict:
    run_dir = out / "torchrun"
    env = {"XCIT_CACHE": str(out / "cache")}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    t0 = time.monotonic()
    rc, secs = run_cmd([*launch, *_train_cmd(plan, run_dir)], timeout - 15, run_dir / "log.txt", env)
    res = _training_result(run_dir, rc, secs)
    probe = [*launch, *_worker_args("nccl", mode, out, time.time() + 10)]
    prc, _ = run_cmd(probe, max(5.0, timeout - (time.monotonic() - t0)), run_dir / "log.txt")
    path = out / "nccl" / "result.json"
    res["nccl_probe"] = json.loads(path.read_text()) if path.exists() else {"ok": False, "exit_code": prc}
    if not res["nccl_probe"].get("ok"):
        res["status"] = f"failed (probe {prc})"
    res["seconds"] = time.monotonic() - t0
    return res


def missing(summary: dict) -> list[str]:
    """Paths of :data:`FIELDS` (and the per-mode fields of entries that ran) absent from ``summary``."""

    def has(obj, parts: list[str]) -> bool:
        if not parts:
            return obj is not None
        if parts[0] == "*":
            return isinstance(obj, list) and len(obj) > 0 and all(has(o, parts[1:]) for o in obj)
        return isinstance(obj, dict) and parts[0] in obj and has(obj[parts[0]], parts[1:])

    gone = [f for f in FIELDS if f != "missing_fields" and not has(summary, f.split("."))]
    for i, e in enumerate(summary.get("steps", {}).get("bench", {}).get("entries", [])):
        if e.get("status") == "ok":
            gone += [f"bench.entries.{i}.{m}.{f}" for m in ("infer", "train") for f in ENTRY_FIELDS
                     if not has(e.get(m), f.split("."))]  # fmt: skip
    return gone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one-shot GPU check (see scripts/gpu_check.sh)")
    p.add_argument("out", type=Path)
    p.add_argument("--cpu", action="store_true", help="the same steps on CPU in tiny sizes")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    mode = "cpu" if args.cpu else "gpu"
    plan = PLANS[mode]
    sys.path.insert(0, str(Path(__file__).parent))
    if args.worker:
        worker(args.worker, plan, args.out, args.deadline or time.time() + 60)
        return 0
    import steps_gpu_check as S

    if mode == "gpu" and not S.cuda_available():
        print("gpu_check: no CUDA device here; scripts/gpu_check.sh --cpu OUT runs the CPU rehearsal", file=sys.stderr)
        return 2
    budget = float(os.environ.get("XCIT_GPU_CHECK_BUDGET", plan["budget_s"]))
    t0 = time.monotonic()
    summary: dict = {"mode": mode, "device": plan["device"], "budget_s": budget, **S.describe(), "steps": {}}
    order = ("tests", "loader", "feed", "sweep", "demo", "torchrun", "bench")
    for step in order:
        left = budget - (time.monotonic() - t0)
        timeout = left if step == "bench" else min(plan["caps_s"][step] * budget / plan["budget_s"], left)
        log(f"{step}: up to {timeout:.0f} s")
        if step == "tests":
            res = tests_step(plan, args.out, timeout)
        elif step == "demo":
            res = demo_step(plan, args.out, timeout)
        elif step == "torchrun":
            res = torchrun_step(plan, args.out, timeout, mode)
        else:
            res = self_step(step, mode, args.out, timeout)
        summary["steps"][step] = res
        log(f"{step}: {res['status']} in {res.get('seconds', 0):.1f} s; " + S.headline(step, res))
    summary["elapsed_s"] = time.monotonic() - t0
    summary["missing_fields"] = missing(summary)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    bad = [k for k, v in summary["steps"].items() if v["status"] != "ok"]
    log(f"done in {summary['elapsed_s']:.0f} s: {args.out / 'gpu_check.json'}; failed steps: {bad or 'none'};"
        f" missing fields: {summary['missing_fields'] or 'none'}")  # fmt: skip
    return 1 if bad or summary["missing_fields"] else 0


if __name__ == "__main__":
    sys.exit(main())
