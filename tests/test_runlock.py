"""One run per ``ckpt_save_dir``: a second run on a folder in use stops with one line and touches nothing; a stale
lock of a dead process is taken over with a notice; the lock goes when the run ends."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xcit.config.train_config import ConfigError, load_config
from xcit.train.fit import fit
from xcit.train.runlock import LOCK_NAME, RunLock

from .test_data import make_folder

TINY = ["--model", "xcit_nano_12_p8_224", "--model_overrides", "{embed_dim: 32, depth: 1, num_heads: 2}"]
FAST = ["--image_resize", "16", "--num_parallel_workers", "0", "--tensorboard", "False", "--epoch_size", "1"]
FAST += ["--batch_size", "4"]


def dead_pid() -> int:
    """The pid of a real process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_second_run_on_a_folder_in_use_exits_2_with_one_line_and_touches_nothing(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4, size=16)
    out = tmp_path / "run"
    args = ["train", "--data_dir", str(data), "--ckpt_save_dir", str(out), *TINY, *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    code = "import sys; from xcit.cli import main; sys.exit(main(sys.argv[1:]))"
    first = subprocess.Popen([sys.executable, "-c", code, *args, "--epoch_size", "50", "--seed", "1"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not list(out.glob("ckpt_e*.pth")):  # the first run is well under way
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # its files now stay as they are
        before = snapshot(out)
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        second = subprocess.run([sys.executable, "-c", code, *args, "--seed", "2"], env=env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert second.returncode == 2
        err = (second.stdout + second.stderr).strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"xcit train: error: {out} is in use by another training run (pid {first.pid} on ")
        assert snapshot(out) == before  # not one byte, time or name changed
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        first.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, caplog):
    pid = dead_pid()
    stale = {"host": socket.gethostname(), "pid": pid, "started": "2020-01-01 00:00:00 +0000"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with caplog.at_level(logging.INFO, logger="xcit"), RunLock(tmp_path) as lock:
        lock.acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    notice = [r.getMessage() for r in caplog.records if "taking over the run lock" in r.getMessage()]
    assert len(notice) == 1 and f"pid {pid} on {socket.gethostname()}" in notice[0], notice
    assert not (tmp_path / LOCK_NAME).exists()  # released on leaving the with


def test_lock_of_a_reused_pid_or_another_host(tmp_path):
    lock = tmp_path / LOCK_NAME
    alive = {"host": socket.gethostname(), "pid": os.getppid(), "started": "now"}
    lock.write_text(json.dumps({**alive, "start_ticks": 1}))  # a live pid, but another process's start time
    RunLock(tmp_path).acquire().release()
    assert not lock.exists()
    lock.write_text(json.dumps({**alive, "host": "node-17"}))
    with pytest.raises(ConfigError, match=f"locked by a training run on another host .*node-17.*delete {lock}"):
        RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["host"] == "node-17"  # left alone


def test_lock_is_released_when_the_run_fails(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4, size=16)
    out = tmp_path / "run"
    cfg, explicit = load_config(["--data_dir", str(data), "--ckpt_save_dir", str(out), *TINY, *FAST])
    cfg.num_classes = 2  # fewer outputs than the 3 classes: refused once the data is read (lock held)
    with pytest.raises(ConfigError, match="num_classes 2 is smaller"):
        fit(cfg, explicit)
    assert out.is_dir() and not (out / LOCK_NAME).exists()
    with RunLock(out) as held:  # a live owner (this process): training on the folder is refused
        held.acquire()
        with pytest.raises(ConfigError, match="in use by another training run"):
            fit(cfg, explicit)
        assert json.loads((out / LOCK_NAME).read_text()) == held.owner
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------------------------------
# SLURM jobs: a requeued job takes over its own lock on any host; other jobs are refused (fast, no SLURM needed)
# ----------------------------------------------------------------------------------------------------------------------


def test_the_lock_records_the_slurm_job_and_a_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = tmp_path / LOCK_NAME
    earlier = {"host": "node-3", "pid": 1, "started": "then", "slurm_job": "77", "slurm_restart": 0}
    lock.write_text(json.dumps(earlier))  # left behind on another node by the run before the requeue
    with caplog.at_level(logging.INFO, logger="xcit"), RunLock(tmp_path) as held:
        held.acquire()
        assert json.loads(lock.read_text()) == held.owner
        assert held.owner["slurm_job"] == "77" and held.owner["slurm_restart"] == 1
    assert any("of this SLURM job's run before its requeue (SLURM job 77, pid 1 on node-3" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_another_slurm_job_or_the_same_run_of_this_job_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))  # squeue cannot be asked: another host cannot be checked
    lock = tmp_path / LOCK_NAME
    alive = {"host": socket.gethostname(), "pid": os.getppid(), "started": "now"}
    for owner in (
        {**alive, "slurm_job": "76", "slurm_restart": 0},  # another job, running here
        {**alive, "slurm_job": "77", "slurm_restart": 0},  # this job's own run, not requeued since
    ):
        lock.write_text(json.dumps(owner))
        with pytest.raises(ConfigError, match=r"in use by another training run \(SLURM job 7[67], pid"):
            RunLock(tmp_path).acquire()
    lock.write_text(json.dumps({**alive, "host": "node-9", "slurm_job": "76", "slurm_restart": 3}))
    with pytest.raises(ConfigError, match="locked by a training run on another host .SLURM job 76, pid"):
        RunLock(tmp_path).acquire()
    assert json.loads(lock.read_text())["slurm_job"] == "76"  # left alone


def test_a_requeued_job_says_why_it_cannot_resume(tmp_path, monkeypatch):
    from xcit.train.requeue import check_resume, read_record, write_record

    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_record(tmp_path, 9, tmp_path / "ckpt_e0001_s00000009.pth")
    assert read_record(tmp_path) == {"slurm_job": "12", "restart": 1, "step": 9,
                                     "checkpoint": "ckpt_e0001_s00000009.pth"}  # fmt: skip
    config = {"lr": 0.001, "epoch_size": 3, "resume": ""}
    check_resume(tmp_path, (tmp_path / "ckpt_e0001_s00000009.pth", {"step": 9, "config": config}), config)
    with pytest.raises(
        ConfigError,
        match=r"s00000009.pth \(step 9\) that it wrote before requeue 1 is missing or "
        r"corrupt, and the newest good one is ckpt_e0001_s00000008.pth at step 8; not requeued again",
    ):
        check_resume(tmp_path, (tmp_path / "ckpt_e0001_s00000008.pth", {"step": 8, "config": config}), config)
    with pytest.raises(ConfigError, match="missing or corrupt, and no good one is left"):
        check_resume(tmp_path, None, config)
    with pytest.raises(ConfigError, match=r"config changed while it was queued \(lr: 0.001 -> 0.002\)"):
        check_resume(tmp_path, (tmp_path / "x.pth", {"step": 9, "config": config}), {**config, "lr": 0.002})
    check_resume(tmp_path, (tmp_path / "x.pth", {"step": 9, "config": config}), {**config, "resume": "auto"})
    monkeypatch.setenv("SLURM_JOB_ID", "13")  # another job's record: not this job's business
    assert read_record(tmp_path) is None
    check_resume(tmp_path, None, config)
