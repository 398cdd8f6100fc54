"""The thread count of CPU runs: available CPUs (affinity, cgroup quota) less what other processes keep busy."""

from __future__ import annotations

import logging

import pytest
import torch

from xcit.runtime import threads
from xcit.runtime.threads import CpuThreads, available_cpus, cgroup_quota


def test_cgroup_v2_and_v1_quotas(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1) == 0.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(v1) is None
    assert cgroup_quota(tmp_path / "none") is None


def test_available_cpus_is_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(threads, "_affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_quota", lambda: 1.5)
    assert available_cpus() == 2
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert available_cpus() == 4


@pytest.mark.parametrize("busy, expected", [(0.0, 2), (0.3, 2), (1.0, 1), (1.8, 1), (5.0, 1), (None, 2)])
def test_threads_leave_the_cpus_other_processes_keep_busy(monkeypatch, busy, expected):
    monkeypatch.setenv("XCIT_THREADS", "auto")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert CpuThreads().choose(busy) == expected


def test_a_busy_cpu_lowers_the_count_with_a_notice(monkeypatch, caplog):
    monkeypatch.setenv("XCIT_THREADS", "auto")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(CpuThreads, "busy_elsewhere", lambda self: 1.0)  # a `while 1: pass` on one of 2 cores
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with caplog.at_level(logging.INFO, logger="xcit"):
            CpuThreads.start(torch.device("cpu"), sample_s=0.0)
        assert torch.get_num_threads() == 1
        assert "threads: 2 -> 1 (other processes keep 1.0 of 2 CPU(s) busy)" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_xcit_threads_fixes_the_count(monkeypatch):
    monkeypatch.setenv("XCIT_THREADS", "1")
    before = torch.get_num_threads()
    try:
        t = CpuThreads.start(torch.device("cpu"), sample_s=0.0)
        assert t.fixed and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert CpuThreads.start(torch.device("cuda")) is None


def test_benchmark_warns_when_its_rounds_were_starved():
    from xcit.bench.checks import starvation_warnings

    (line,) = starvation_warnings(1.0, 2, 2)
    assert "other processes kept 1.0 of 2 CPU(s) busy while 2 threads ran" in line and "--threads 1" in line
    assert starvation_warnings(1.0, 2, 1) == []  # one thread on the free core: not starved
    assert starvation_warnings(0.2, 2, 2) == [] and starvation_warnings(None, 2, 2) == []
