"""``torchrun --nproc_per_node 2`` on CPU (gloo) against one process with the same global batch and seed.

Equivalence needs every source of per-rank difference removed or shared:

* data: the sampler deals positions ``r, r + 2, ...`` of one permutation, so the two ranks' batches together are
  the single process's batch, and each sample's augmentation is seeded by its position (same crops);
* gradients: DDP averages the per-rank means of equal-sized batches, which is the global mean;
* BatchNorm (patch embedding and LPI): its batch statistics are per rank. torch's SyncBatchNorm (``sync_bn``)
  makes them global but runs on CUDA only, so on CPU the test uses ``freeze_bn`` (BN in eval mode, fixed
  statistics), which every world size computes identically;
* mixup pairs each rank's batch with its own reverse and drop path draws per-rank masks: both off here.

What remains is float summation order in the gradient all-reduce, hence a tolerance on losses and weights, while
the validation counts, which are all-reduced sums, must be identical.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xcit.data.demo import write_digits
from xcit.runtime.checkpoint import load_checkpoint
from xcit.runtime.distributed import Launch, first_host, launch_env, slurm_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--model", "xcit_nano_12_p8_224", "--model_overrides", "{embed_dim: 32, depth: 2, num_heads: 2}"]
RECIPE += ["--image_resize", "16", "--num_parallel_workers", "0", "--tensorboard", "False", "--log_interval", "1"]
RECIPE += ["--seed", "3", "--epoch_size", "2", "--ema", "True", "--ema_decay", "0.9", "--freeze_bn", "True"]
RECIPE += ["--auto_augment", "rand-m9-mstd0.5-inc1", "--re_prob", "0.25", "--label_smoothing", "0.1"]
RECIPE += ["--opt", "adamw", "--lr", "0.003", "--warmup_epochs", "1", "--decay_epochs", "1", "--val_while_train"]


def launch(nproc: int, script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, script, *args]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def step_losses(log_file: Path) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+/\d+ loss ([0-9.]+)", log_file.read_text())]


def epochs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_ranks_train_and_validate_like_one_process(tmp_path):
    data = write_digits(tmp_path / "digits", classes=4, per_class=16)  # 51 train, 13 val images
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, "train.py", *RECIPE, "--data_dir", str(data), "--batch_size", "8", "--distribute", "False",
           "--ckpt_save_dir", str(one))  # fmt: skip
    text = launch(2, "train.py", *RECIPE, "--data_dir", str(data), "--batch_size", "4", "--ckpt_save_dir", str(two))
    assert "global batch 8 = batch_size 4 x 2 process(es)" in text and "(gloo)" in text

    # the loss curve, step by step, and the per-epoch means
    a, b = step_losses(one / "train.log"), step_losses(two / "train.log")
    assert len(a) == len(b) == 12  # 6 steps x 2 epochs
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    ea, eb = epochs(one), epochs(two)
    assert [r["train_loss"] for r in eb] == pytest.approx([r["train_loss"] for r in ea], rel=1e-4)
    # validation: 13 images over 2 ranks (7 + 6, uneven last batches); counts are exact sums
    for ra, rb in zip(ea, eb):
        assert (rb["top1"], rb["top5"]) == (ra["top1"], ra["top5"])
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
    wa = load_checkpoint(one / "ckpt_e0002.pth")["ema"]
    wb = load_checkpoint(two / "ckpt_e0002.pth")["ema"]
    # class attention's key bias adds q.b to every key's score, which softmax ignores: its exact gradient is 0 and
    # AdamW normalises the float noise left in its place into lr-sized steps, different in each run (harmless)
    same = [k for k in wa if not re.search(r"cls_attn_blocks\.\d+\.attn\.k\.bias", k)]
    assert len(same) == len(wa) - 2 and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in same)
    assert not list(two.glob("*.tmp*")) and len(list(two.glob("ckpt_e*.pth"))) == 2  # rank 0 wrote, once

    # the same weights validated by 2 ranks with 3-image batches give the single process's numbers
    results = tmp_path / "val2.json"
    launch(2, "validate.py", *RECIPE, "--data_dir", str(data), "--batch_size", "3", "--ckpt_path",
           str(one / "ckpt_e0002.pth"), "--results_file", str(results))  # fmt: skip
    got, ref = json.loads(results.read_text()), ea[-1]
    assert got["num_images"] == 13 and (got["top1"], got["top5"]) == (ref["top1"], ref["top5"])
    assert got["loss"] == pytest.approx(ref["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_demo_under_torchrun_writes_and_announces_its_data_once(tmp_path, monkeypatch):
    """Without --data_dir, local rank 0 writes the digits while the other rank waits for them; one banner line."""
    monkeypatch.setenv("XCIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    text = launch(2, "train.py", *RECIPE, "--batch_size", "16", "--ckpt_save_dir", str(out))
    assert text.count("demo: scikit-learn digits as an ImageFolder") == 1
    assert "device cpu x 2 process(es) (gloo)" in text
    classes = sorted(p.name for p in (tmp_path / "cache" / "digits" / "train").iterdir())
    assert classes == [str(i) for i in range(10)]
    assert len(epochs(out)) == 2


@pytest.mark.slow  # a 2-rank torchrun: about 10 s
def test_the_process_group_xcit_creates_is_destroyed_before_the_interpreter_exits(tmp_path):
    """Left to interpreter exit, gloo's threads can be torn down mid-flight and abort a rank that finished its work
    ("terminate called without an active exception"); the group that `distributed.init` creates goes down first."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, torch.distributed as dist\n"
        "from xcit.runtime import distributed\n"
        "atexit.register(lambda: print(f'initialized at exit: {dist.is_initialized()}', flush=True))\n"
        "world = distributed.init('CPU', True, 60)\n"
        "distributed.barrier()\n"
        "print(f'rank {world.rank} of {world.size}', flush=True)\n"
    )
    out = launch(2, str(script))
    assert out.count("of 2") == 2
    assert out.count("initialized at exit: False") == 2 and "initialized at exit: True" not in out


# ----------------------------------------------------------------------------------------------------------------------
# Who launched this process: torchrun, an srun step, or nobody (fast, no SLURM needed)
# ----------------------------------------------------------------------------------------------------------------------

STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}  # fmt: skip


def test_a_task_of_an_srun_step_is_one_rank_of_the_steps_tasks():
    got = launch_env({**STEP, "SLURM_STEP_NODELIST": "gpu[07-08]"})
    assert got == Launch("slurm", rank=3, local_rank=1, size=4, master_addr="gpu07", master_port=slurm_port("4242"))
    assert 20000 <= got.master_port < 40000 and slurm_port("4242") == slurm_port("4242") != slurm_port("4243")
    # a user's MASTER_ADDR / MASTER_PORT are kept; an srun -n 1 step inside a larger allocation is a world of 1
    got = launch_env({**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "SLURM_STEP_NUM_TASKS": "1",
                      "SLURM_PROCID": "0"})  # fmt: skip
    assert (got.size, got.master_addr, got.master_port) == (1, "10.0.0.1", 1234)


def test_torchrun_wins_and_a_batch_script_or_salloc_shell_is_a_world_of_one():
    torchrun = {"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert launch_env({**STEP, **torchrun}) == Launch("torchrun", rank=1, local_rank=1, size=8)  # srun torchrun
    batch = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}  # sbatch's script and salloc's shell
    assert launch_env(batch) == Launch() and launch_env({}) == Launch()
    assert Launch().size == 1 and Launch().rank == 0


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("vm", "vm"), ("node[003-010]", "node003"), ("gpu[7,9-12],cpu1", "gpu7"), ("a1,b[2-3]", "a1")],
)
def test_the_master_is_the_first_host_of_the_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_demo_data_in_an_srun_step_is_written_by_local_rank_0_only(tmp_path, monkeypatch):
    from xcit.data.demo import ensure_digits

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XCIT_CACHE", str(tmp_path))
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**step, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TimeoutError, match="local rank 0 did not finish"):  # task 1 waits, it does not write
        ensure_digits(timeout_s=0.2)
    assert not (tmp_path / "digits").exists()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert (ensure_digits() / ".complete").is_file()
