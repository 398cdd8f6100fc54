"""Kill a training run with SIGKILL at random moments, resume it each time, and compare with an uninterrupted run.

    python scripts/chaos_resume.py --kills 10 --seed 0
    python scripts/chaos_resume.py --kills 12 --shards     # the same on WebDataset shards (xcit shard)
    python scripts/chaos_resume.py --elastic --kills 5 --max_restarts 3 --seed 0

Both runs train a tiny XCiT on CPU on a small ImageFolder (scikit-learn's digits, written to disk) with every
source of randomness switched on: random resized crops, flips, RandAugment, random erasing, mixup/cutmix, drop
path, EMA, DataLoader workers, and a checkpoint after every optimiser step. The interrupted run is started with
``--resume auto`` and killed (its whole process group, workers included, as a preempted node would be) at a
random moment: during start-up (one time in five), or after 1-4 new checkpoints, mid-step, mid-save or between.
Each restart resumes from the newest checkpoint that verifies. At the end the final checkpoints' model, EMA and
optimiser tensors are compared; the script exits 0 when they are bit-identical (max abs diff 0).

``--elastic`` runs both as 2 gloo ranks under ``torchrun --max_restarts N`` and SIGKILLs one rank (chosen at
random) at a time; torchrun stops the other and restarts both, which resume by themselves. When a launch has
used up its restarts, one more kill ends it (torchrun fails) and the script launches it again, as a user would:
``--kills 5 --max_restarts 3`` is one launch restarted 3 times then killed, and a second launch killed once.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_TRAIN = "import sys; from xcit.cli import main; sys.exit(main(sys.argv[1:]))"


def train_args(data_dir: Path, out: Path, epochs: int, workers: int, seed: int, augment: str) -> list[str]:
    """A tiny recipe that uses every random component of the training loop."""
    flags = {
        "data_dir": data_dir,
        "ckpt_save_dir": out,
        "model": "xcit_nano_12_p16_224",
        "model_overrides": "{embed_dim: 32, depth: 2, num_heads: 2, img_size: 32}",
        "image_resize": 32,
        "batch_size": 8,
        "epoch_size": epochs,
        "opt": "adamw",
        "lr": 2e-3,
        "warmup_epochs": 1,
        "decay_epochs": epochs,
        "drop_path_rate": 0.1,
        "auto_augment": augment,
        "re_prob": 0.25,
        "mixup": 0.8,
        "cutmix": 1.0,
        "label_smoothing": 0.1,
        "ema": True,
        "ema_decay": 0.9,
        "num_parallel_workers": workers,
        "ckpt_interval_steps": 1,
        "keep_checkpoint_max": 3,
        "val_while_train": False,
        "tensorboard": False,
        "log_interval": 1,
        "seed": seed,
        "device_target": "cpu",
        "resume": "auto",
    }
    return ["train"] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def start(args: list[str], log_file: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # same thread count in every run
    with open(log_file, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-c", _TRAIN, *args], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def start_elastic(args: list[str], log_file: Path, max_restarts: int) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 --max_restarts N -m xcit.cli ...`` (a fresh port per launch)."""
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max_restarts", str(max_restarts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_file, "ab") as f:
        return subprocess.Popen(
            [sys.executable, *cmd, "-m", "xcit.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip


def rank_pids(agent: int) -> dict[int, int]:
    """``{rank: pid}`` of the torchrun agent's worker processes (read from their environment)."""
    ranks = {}
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return ranks
    for pid in map(int, children):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def checkpoints(out: Path) -> set[str]:
    return {p.name for p in out.glob("ckpt_e*.pth")}


def run_with_kills(args: list[str], out: Path, kills: int, rng: random.Random, log_file: Path) -> list[str]:
    """Start, wait a random time (:func:`wait_random`), SIGKILL the process group; repeat. Returns one line per
    kill."""
    events = []
    for k in range(kills):
        t0 = time.monotonic()
        proc = start(args, log_file)
        early = wait_random(proc, out, rng)
        if proc.poll() is not None:
            events.append(f"kill {k + 1}: the run finished before the kill (exit {proc.returncode})")
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        newest = max(out.glob("ckpt_e*.pth"), key=lambda p: p.stat().st_mtime_ns, default=Path("none")).name
        partial = [p.name for p in out.glob(f".*.tmp{proc.pid}")]  # the kill hit a write: only its temp file is cut
        where = f", mid-write ({partial[0]} left behind)" if partial else (" (early)" if early else "")
        events.append(f"kill {k + 1}: SIGKILL after {time.monotonic() - t0:5.1f} s, newest file {newest}{where}")
    return events


def wait_random(proc: subprocess.Popen, out: Path, rng: random.Random, timeout: float = 180) -> bool:
    """Wait a random time: start-up (one time in five), or 1-4 new checkpoints plus part of a step (at most
    ``timeout`` seconds: a run that hangs writes none). Returns whether the kill is an early one."""
    before, t0 = checkpoints(out), time.monotonic()
    if rng.random() < 0.2:  # imports, data scan, rendezvous, loading the checkpoint to resume from
        time.sleep(rng.uniform(0.0, 3.0))
        return True
    want, seen = rng.randint(1, 4), set()
    while proc.poll() is None and len(seen) < want and time.monotonic() - t0 < timeout:
        seen |= checkpoints(out) - before  # names accumulate: pruning deletes old ones
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.15))
    return False


def kill_one_rank(agent: subprocess.Popen, rng: random.Random, timeout: float = 120) -> str:
    """SIGKILL one rank of a torchrun launch, chosen at random, once both ranks run; then wait until torchrun has
    replaced both ranks or ended. Returns what happened."""
    t0 = time.monotonic()
    while len(ranks := rank_pids(agent.pid)) < 2 and agent.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    if agent.poll() is not None or len(ranks) < 2:
        return f"torchrun ended before the kill (exit {agent.poll()})"
    rank = rng.randrange(2)
    os.kill(ranks[rank], signal.SIGKILL)
    while agent.poll() is None and set(rank_pids(agent.pid).values()) & set(ranks.values()):
        time.sleep(0.01)  # the agent stops the survivor before it starts the next attempt
    return f"SIGKILL of rank {rank} (pid {ranks[rank]})"


def run_elastic_with_kills(
    args: list[str], out: Path, kills: int, max_restarts: int, rng: random.Random, log_file: Path
) -> list[str]:
    """Launch under torchrun and SIGKILL single ranks ``kills`` times; a launch whose restarts are used up is
    killed once more (it fails) and launched again. Returns one line per kill; the last launch is left running
    to the end: the last line is its exit status."""
    events, left, launch = [], kills, 0
    while True:
        launch += 1
        proc = start_elastic(args, log_file, max_restarts)
        planned = min(left, max_restarts + 1)
        for _ in range(planned):
            early = wait_random(proc, out, rng)
            what = kill_one_rank(proc, rng)
            if "SIGKILL" not in what:
                events.append(f"launch {launch}: {what}")
                return events
            left -= 1
            events.append(f"launch {launch} kill {kills - left}: {what}{' (early)' if early else ''}")
        code = proc.wait()
        events.append(f"launch {launch}: torchrun exit {code}")
        if code == 0 or planned <= max_restarts:  # finished, or failed with restarts to spare
            return events


def max_abs_diff(a: object, b: object, where: str = "") -> dict[str, float]:
    """Max |a - b| per tensor leaf of two nested checkpoint structures (inf where shapes or structure differ)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return {where: float("inf")}
        if not a.is_floating_point():
            return {where: 0.0 if torch.equal(a, b) else float("inf")}
        return {where: (a.double() - b.double()).abs().max().item() if a.numel() else 0.0}
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return {where: float("inf")}
        return {k: v for key in a for k, v in max_abs_diff(a[key], b[key], f"{where}.{key}").items()}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return {where: float("inf")}
        return {k: v for i, (x, y) in enumerate(zip(a, b)) for k, v in max_abs_diff(x, y, f"{where}[{i}]").items()}
    return {where: 0.0 if a == b else float("inf")}


def compare(ref: Path, got: Path) -> dict[str, float]:
    from xcit.runtime.checkpoint import load_checkpoint

    a, b = load_checkpoint(ref, require_checksum=True), load_checkpoint(got, require_checksum=True)
    diffs = {}
    for part in ("model", "ema", "optimizer"):
        leaves = max_abs_diff(a[part], b[part], part)
        diffs[part] = max(leaves.values(), default=0.0)
    diffs["step"] = 0.0 if a["step"] == b["step"] else float("inf")
    return diffs


def interrupted_run(a: argparse.Namespace, args: list[str], out: Path, log_file: Path) -> tuple[list[str], bool]:
    """The killed-and-resumed run to its end. Returns the kill events and whether it finished."""
    rng = random.Random(a.seed)
    if a.elastic:
        events = run_elastic_with_kills(args, out, a.kills, a.max_restarts, rng, log_file)
        return events, events[-1].endswith("torchrun exit 0")
    events = run_with_kills(args, out, a.kills, rng, log_file)
    return events, start(args, log_file).wait() == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="number of SIGKILLs (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule and of the training runs")
    p.add_argument("--epochs", type=int, default=None, help="default: enough steps for every kill (>= 3)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the training runs")
    p.add_argument("--auto_augment", default="randaug-m9-mstd0.5-inc1", help="RandAugment policy of the runs")
    p.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    p.add_argument("--elastic", action="store_true", help="2 gloo ranks under torchrun; kill one rank at a time")
    p.add_argument("--max_restarts", type=int, default=3, help="torchrun --max_restarts of --elastic (default 3)")
    p.add_argument("--shards", action="store_true", help="train on WebDataset shards of the data (xcit shard)")
    a = p.parse_args(argv)

    from xcit.data.demo import write_digits

    work = a.workdir or Path(tempfile.mkdtemp(prefix="xcit-chaos-"))
    a.epochs = a.epochs or max(3, math.ceil(a.kills * 4 / 20) + 1)  # 20 steps per epoch, <= 4 steps per kill
    data = write_digits(work / "digits", classes=4, per_class=50)
    if a.shards:  # the same images as tar shards, read by random access (xcit.data.shards)
        from xcit.cli.shard import main as shard

        if shard([str(data), str(work / "digits-wds"), "--max-size", "16KB"]) != 0:
            return 2
        data = work / "digits-wds"
    ref_dir, chaos_dir = work / "uninterrupted", work / "interrupted"
    for d in (ref_dir, chaos_dir):
        for f in d.glob("*.pth"):
            f.unlink()

    t0 = time.monotonic()
    ref_args = train_args(data, ref_dir, a.epochs, a.workers, a.seed, a.auto_augment)
    ref = (
        start_elastic(ref_args, work / "uninterrupted.log", 0)
        if a.elastic
        else start(ref_args, work / "uninterrupted.log")
    )
    if ref.wait() != 0:
        print(f"the uninterrupted run failed; see {work / 'uninterrupted.log'}")
        return 2
    print(f"uninterrupted run: {time.monotonic() - t0:.1f} s, {len(checkpoints(ref_dir))} checkpoints kept")

    args = train_args(data, chaos_dir, a.epochs, a.workers, a.seed, a.auto_augment)
    log_file = work / "interrupted.log"
    events, finished = interrupted_run(a, args, chaos_dir, log_file)
    print("\n".join(events))
    kills = sum("SIGKILL" in e for e in events)
    print(f"{sum('mid-write' in e for e in events)} of {kills} kills hit a checkpoint write")
    if not finished:
        print(f"the last resume failed; see {log_file}")
        return 2
    resumes = re.findall(r"resumed .*", log_file.read_text())
    print(f"{len(resumes)} resumes, e.g. {resumes[-1] if resumes else '-'}")
    skipped = re.findall(r"skipping corrupt checkpoint .*", log_file.read_text())
    print(f"{len(skipped)} corrupt checkpoints reported and skipped")

    name = f"ckpt_e{a.epochs:04d}.pth"
    diffs = compare(ref_dir / name, chaos_dir / name)
    for part, d in diffs.items():
        print(f"max abs diff {part:<9} {d:.3g}")
    worst = max(diffs.values())
    kept = a.workdir is not None or worst != 0  # a temp dir is removed after a success, kept to inspect a failure
    if not kept:
        shutil.rmtree(work, ignore_errors=True)
    where = work if kept else f"{work} removed; --workdir DIR keeps the runs"
    print(f"RESULT: {'bit-identical' if worst == 0 else f'max abs diff {worst:.3g}'} after {kills} kills ({where})")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
