"""Real SLURM jobs on a one-node test cluster (scripts/slurm_cluster.sh: munge, MariaDB, slurmdbd, slurmctld, slurmd).

``xcit submit`` jobs of 2 CPU tasks (gloo) are requeued mid-epoch by ``scontrol requeue`` (SIGTERM), by the
preemption signal (``scancel --signal=USR2``) and by their time limit's warning signal; each ends with final weights
bit-identical to one uninterrupted job of the same command (model, EMA and optimiser, max abs diff 0). A plain
``srun -n 2 xcit train`` in an sbatch script trains data-parallel. Bad input gives one line and loses nothing.

Tests marked ``slurm`` start the cluster (root and Debian's packages needed; skipped with the reason otherwise) and
submit into a fresh folder per session (SLURM's job ids restart from 1 when its state is wiped). SLURM's shortest
time limit is one minute, so the time-limit test asks for its warning signal 45 s before it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from xcit.data.demo import write_digits

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
_spec = importlib.util.spec_from_file_location("chaos_resume", ROOT / "scripts" / "chaos_resume.py")
chaos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chaos)

EPOCHS = 12  # long enough that a time-limit warning, sent at most ~30 s after the limit is cut, finds the job running
FINAL = f"ckpt_e{EPOCHS:04d}.pth"
JOB = ["--tasks_per_node", "2", "--timeout", "10"]
SLURM = [pytest.mark.slurm, pytest.mark.slow]
DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacctmgr")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def why_no_slurm() -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [c for c in DAEMONS if shutil.which(c, path=path) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install munge slurmctld slurmd "
                "slurm-client slurmdbd mariadb-server")  # fmt: skip
    if os.geteuid() != 0:
        return "the test SLURM runs its daemons as root (scripts/slurm_cluster.sh)"
    return None


@dataclass
class Cluster:
    folder: Path  # fresh per test session
    data: Path
    env: dict


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    why = why_no_slurm()
    if why:
        pytest.skip(why)
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    was_running = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True).returncode == 0
    proc = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)
    folder = tmp_path_factory.mktemp("slurm")
    env.update(SLURM_CONF=conf, XCIT_CACHE=str(folder / "cache"), OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1")  # fmt: skip
    data = write_digits(folder / "digits", classes=3, per_class=30)  # 4 steps per epoch at 2 x 8 images
    yield Cluster(folder, data, env)
    if not was_running:
        subprocess.run([str(SCRIPT), "stop"], env=env, timeout=300)


def train_args(c: Cluster, out: Path) -> list[str]:
    """Every random component of the training loop (scripts/chaos_resume.py), a checkpoint each step, no --resume."""
    args = chaos.train_args(c.data, out, EPOCHS, 1, 0, "randaug-m9-mstd0.5-inc1")[1:]
    i = args.index("--resume")
    return args[:i] + args[i + 2 :]


def xcit(c: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "xcit.cli", *args]
    return subprocess.run(cmd, env=c.env, capture_output=True, text=True, timeout=timeout, cwd=c.folder)


def submit(c: Cluster, out: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``xcit submit --wait`` in the background; returns it and the job id it printed."""
    cmd = [sys.executable, "-m", "xcit.cli", "submit", *JOB, *extra, "--wait", *train_args(c, out)]
    proc = subprocess.Popen(cmd, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=c.folder)
    first = proc.stdout.readline()
    m = re.match(r"submitted SLURM job (\d+)", first)
    assert m, first + proc.stdout.read()
    return proc, m.group(1)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def slurm(c: Cluster, *cmd: str) -> str:
    return subprocess.run(cmd, env=c.env, capture_output=True, text=True, timeout=60, check=True).stdout


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> Path:
    """The step checkpoint of ``step`` (a step in the middle of an epoch), once it is written."""
    t0 = time.monotonic()
    while True:
        found = list(out.glob(f"ckpt_e*_s{step:08d}.pth"))
        if found:
            return found[0]
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - t0 < timeout, f"no step {step} checkpoint after {timeout} s"
        time.sleep(0.1)


def assert_bit_identical(reference: Path, final: Path) -> None:
    diffs = chaos.compare(reference, final)
    assert diffs == {"model": 0.0, "ema": 0.0, "optimizer": 0.0, "step": 0.0}, diffs


def final_state(c: Cluster, job: str, timeout: float = 120) -> str:
    """sacct's state of the job once it is final (accounting may lag the job's end by a few seconds)."""
    t0 = time.monotonic()
    while True:
        state = (slurm(c, "sacct", "-X", "-n", "-P", "-o", "State", "-j", job).split() or ["?"])[-1]
        if state.split()[0] in FINAL_STATES or time.monotonic() - t0 > timeout:
            return state
        time.sleep(1)


def requeues(c: Cluster, job: str) -> int:
    return int(slurm(c, "scontrol", "show", "job", job).split("Restarts=")[1].split()[0])


@pytest.fixture(scope="session")
def reference(cluster) -> Path:
    """One uninterrupted 2-task job."""
    out = cluster.folder / "uninterrupted"
    proc, _ = submit(cluster, out)
    finish(proc)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Acceptance 1: a 2-task job trains and validates
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_task_job_trains_and_validates_every_image_once(cluster, reference):
    log = (reference / "train.log").read_text()
    assert "device cpu x 2 process(es) (gloo)" in log
    val_images = sum(1 for p in (cluster.data / "val").rglob("*.png"))
    assert re.search(rf"validation: top-1 [0-9.]+, top-5 [0-9.]+, loss [0-9.]+ on {val_images} images", log), log
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(EPOCHS)) and rows[-1]["top1"] is not None
    job = json.loads((reference / "submitted.json").read_text())["job_id"]
    for name in (FINAL, "metrics.csv", "config.yaml", f"{job}_0_log.out", f"{job}_1_log.out", f"{job}_0_result.pkl"):
        assert (reference / name).is_file(), name
    assert not (reference / "run.lock").exists() and not (reference / "requeue.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Acceptance 2: requeued mid-epoch (scontrol requeue, the preemption signal, the time limit): bit-identical
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scontrol_requeue_mid_epoch_resumes_bit_identical(cluster, reference):
    out = cluster.folder / "scontrol"
    proc, job = submit(cluster, out)
    wait_for_step(out, 6, proc)  # epoch 2, step 2 of 4
    # while it runs, a second job into its folder is refused at submit, and nothing there changes
    before = sorted(p.name for p in out.iterdir() if not p.name.startswith("ckpt_"))
    second = xcit(cluster, "submit", *JOB, *train_args(cluster, out))
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"is held by SLURM job {job}, which is still queued or running" in second.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("ckpt_")) == before
    slurm(cluster, "scontrol", "requeue", job)
    text = finish(proc)
    assert f"SLURM job {job} finished" in text
    log = (out / "train.log").read_text()
    assert "SIGTERM received: finishing this step, saving a checkpoint" in log
    assert re.search(r"SLURM requeue 1: .*ckpt_e\d{4}_s\d{8}\.pth", log), log  # a step checkpoint
    assert re.search(r"resumed .*: epoch \d, step \d+ \(\+\d batches\)", log), log  # inside an epoch
    assert requeues(cluster, job) == 1
    assert_bit_identical(reference / FINAL, out / FINAL)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_preemption_signal_requeues_mid_epoch_and_resumes_bit_identical(cluster, reference):
    out = cluster.folder / "preempted"
    proc, job = submit(cluster, out)
    wait_for_step(out, 10, proc)  # epoch 3, step 2 of 4
    slurm(cluster, "scancel", "--signal=USR2", job)  # every task of the step, as SLURM's --signal does
    text = finish(proc)
    assert f"SLURM job {job} finished" in text
    log = (out / "train.log").read_text()
    assert "SIGUSR2 received: finishing this step, saving a checkpoint" in log
    assert re.search(r"SLURM requeue 1: .*ckpt_e\d{4}_s\d{8}\.pth", log), log
    assert re.search(r"resumed .*: epoch \d, step \d+ \(\+\d batches\)", log), log
    assert f"requeueing SLURM job {job} (requeue 1 of at most 5)" in (out / f"{job}_0_log.err").read_text()
    assert requeues(cluster, job) == 1
    assert_bit_identical(reference / FINAL, out / FINAL)


def elapsed_s(c: Cluster, job: str) -> int:
    """The job's run time so far in seconds (squeue's [[D-]H:]MM:SS)."""
    text = slurm(c, "squeue", "-h", "-j", job, "-o", "%M").strip()
    parts = [int(x) for x in re.split(r"[-:]", text)]
    return sum(v * m for v, m in zip(reversed(parts), (1, 60, 3600, 86400)))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_that_reaches_its_time_limit_is_requeued_and_resumes_bit_identical(cluster, reference):
    """SLURM's own timer sends the warning: mid-epoch the job's time limit is cut to leave less than the signal's
    90 s lead, so SLURM signals it at its next time-limit check (every 30 s). SLURM's shortest limit is a minute and
    it may signal up to a minute early, so a limit set at submit time would land anywhere in the start-up; once the
    job is requeued the limit is put back."""
    out = cluster.folder / "time_limit"
    proc, job = submit(cluster, out)
    wait_for_step(out, 6, proc)
    minutes = (elapsed_s(cluster, job) + 100 + 59) // 60  # the limit >= 100 s away, its 90 s warning now due
    slurm(cluster, "scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}")
    t0 = time.monotonic()
    while requeues(cluster, job) == 0:
        assert proc.poll() is None and time.monotonic() - t0 < 240, "no warning signal from the time limit"
        time.sleep(0.5)
    slurm(cluster, "scontrol", "update", f"JobId={job}", "TimeLimit=10")
    text = finish(proc)
    assert f"SLURM job {job} finished" in text
    log = (out / "train.log").read_text()
    assert "SIGUSR2 received: finishing this step, saving a checkpoint" in log
    assert "SLURM requeue 1: " in log and requeues(cluster, job) == 1
    err = (out / f"{job}_0_log.err").read_text()
    assert f"requeueing SLURM job {job} (requeue 1 of at most 5)" in err
    assert_bit_identical(reference / FINAL, out / FINAL)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_max_requeues_stops_a_job_that_would_be_requeued_again(cluster):
    out = cluster.folder / "no_requeues"
    proc, job = submit(cluster, out, "--max_requeues", "0")
    wait_for_step(out, 2, proc)
    slurm(cluster, "scancel", "--signal=USR2", job)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and f"SLURM job {job} failed" in text, text
    assert "--max_requeues 0 reached, not requeued" in (out / f"{job}_0_log.err").read_text()
    assert requeues(cluster, job) == 0
    assert json.loads((out / "requeue.json").read_text())["step"] >= 2  # its checkpoint is there to resume from


# ----------------------------------------------------------------------------------------------------------------------
# Acceptance 3: srun -n 2 xcit train inside an sbatch script
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_srun_inside_sbatch_trains_data_parallel(cluster):
    out = cluster.folder / "srun"
    script = cluster.folder / "srun.sbatch"
    args = " ".join(f"'{a}'" for a in train_args(cluster, out) + ["--epoch_size", "1"])
    script.write_text(f"#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --output={cluster.folder}/srun-%j.out\n"
                      f"srun {sys.executable} -m xcit.cli train {args}\n")  # fmt: skip
    proc = subprocess.run(["sbatch", "--wait", str(script)], env=cluster.env, capture_output=True, text=True,
                          timeout=500)  # fmt: skip
    job = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    text = (cluster.folder / f"srun-{job}.out").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert text.count("device cpu x 2 process(es) (gloo)") == 1, text[-3000:]
    assert "is in use by another training run" not in text
    assert (out / "ckpt_e0001.pth").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# Acceptance 4: bad input, one line, nothing lost
# ----------------------------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def submit_here(args: list[str], capsys) -> tuple[int, str, str]:
    from xcit.cli import main

    code = main(["submit", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_without_slurm_or_without_submitit_submit_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["--ckpt_save_dir", str(out), "--epoch_size", "1"]
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no sinfo
        assert submit_here(args, capsys) == (2, "", "xcit submit: error: SLURM is not installed here (no sbatch on "
                                             "PATH): run xcit submit on the cluster's login node (--dry_run prints "
                                             "the job script anywhere)\n")  # fmt: skip
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "submitit", None)  # as where the slurm extra is not installed: import fails
        expected = "the optional package 'submitit' is not installed: pip install -e '.[slurm]' (or pip install "
        expected += "submitit)"
        assert submit_here(args, capsys) == (2, "", f"xcit submit: error: {expected}\n")
    code, stdout, err = submit_here(["--timeout", "1", *args], capsys)
    assert (code, stdout, len(err.splitlines())) == (2, "", 1)
    assert "--timeout 1 min leaves no time before the warning signal, which comes 90 s before the limit" in err
    assert not out.exists()  # nothing written


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = submit_here(["--dry_run", "--nodes", "2", "--ngpus", "4", "--cpus_per_task", "8", "--mem_gb",
                                     "64", "--partition", "gpu", "--timeout", "120", "--sbatch",
                                     "--exclusive --signal=USR2@120", "--ckpt_save_dir", str(out)], capsys)  # fmt: skip
    assert code == 0, err
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=65536MB", "#SBATCH --partition=gpu",
                 "#SBATCH --time=120", "#SBATCH --exclusive", "#SBATCH --signal=USR2@120"):  # fmt: skip
        assert line in stdout.splitlines(), (line, stdout)
    assert "srun --unbuffered" in stdout and not out.exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_partition_that_does_not_exist_is_refused_in_one_line(cluster):
    out = cluster.folder / "no_partition"
    line = one_line(xcit(cluster, "submit", "--partition", "nope", *train_args(cluster, out)))
    assert line == "xcit submit: error: partition 'nope' does not exist (partitions: debug)"
    assert not out.exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_folder_held_by_a_queued_job_is_refused_and_kept(cluster):
    out = cluster.folder / "held"
    first = xcit(cluster, "submit", *JOB, "--sbatch", "--begin=now+3600", *train_args(cluster, out))
    job = re.search(r"submitted SLURM job (\d+)", first.stdout).group(1)
    try:
        before = snapshot(out)
        line = one_line(xcit(cluster, "submit", *JOB, *train_args(cluster, out)))
        assert line.startswith(f"xcit submit: error: {out} is held by SLURM job {job}, which is still queued or")
        assert snapshot(out) == before
        assert slurm(cluster, "squeue", "-h", "-j", job, "-o", "%T").strip() == "PENDING"
    finally:
        slurm(cluster, "scancel", job)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_requeued_job_whose_checkpoint_is_gone_says_why_and_is_not_requeued_again(cluster):
    out = cluster.folder / "lost"
    proc, job = submit(cluster, out)
    wait_for_step(out, 7, proc)
    slurm(cluster, "scancel", "--signal=USR2", job)
    t0 = time.monotonic()
    while not (out / "requeue.json").exists():
        assert time.monotonic() - t0 < 120 and proc.poll() is None
        time.sleep(0.1)
    record = json.loads((out / "requeue.json").read_text())
    for p in out.glob("ckpt_e*_s*.pth"):  # what a cleaned-up scratch folder leaves
        p.unlink()
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, text
    assert f"SLURM job {job} failed" in text
    log = (out / "train.log").read_text()
    assert (f"requeued SLURM job {job} cannot resume: the checkpoint {out / record['checkpoint']} (step "
            f"{record['step']}) that it wrote before requeue 1 is missing or corrupt") in log  # fmt: skip
    assert requeues(cluster, job) == 1
    assert final_state(cluster, job) == "FAILED"
