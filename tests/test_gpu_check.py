"""``scripts/gpu_check.sh``: the CPU rehearsal runs every step and writes every field a GPU run writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _checker():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def _run(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_field_check_names_what_is_missing():
    gc = _checker()
    full = {"steps": {"sweep": {"points": [{"img_size": 32}, {}]}}}
    gone = gc.missing(full)
    assert "steps.sweep.points.*.ms_per_image" in gone and "steps.sweep.points.*.img_size" in gone  # one lacks it
    assert "mode" in gone and "missing_fields" not in gone
    assert set(gc.FIELDS) - {"missing_fields"} == set(gc.missing({}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_without_cuda_is_one_line_exit_2(tmp_path):
    r = _run(str(tmp_path / "out"), timeout=120)
    said = (r.stdout + r.stderr).strip().splitlines()  # the script tees everything into its log
    assert r.returncode == 2 and len(said) == 1 and "no CUDA device" in said[0] and "--cpu" in said[0]
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_usage_error():
    r = _run(timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.slow
def test_cpu_rehearsal_writes_every_field(tmp_path):
    out = tmp_path / "out"
    # about 100 s on 2 idle cores; the budget leaves room for a CI machine shared with other jobs
    r = _run("--cpu", str(out), timeout=900, XCIT_GPU_CHECK_BUDGET="400")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["mode"] == "cpu" and res["missing_fields"] == [] and _checker().missing(res) == []
    assert all(s["status"] == "ok" for s in res["steps"].values()), {k: s["status"] for k, s in res["steps"].items()}
    steps = res["steps"]
    assert steps["tests"]["skipped"] >= 1 and steps["tests"]["failed"] == 0  # the gpu tests, collected and skipped
    assert steps["loader"]["workers"] == os.cpu_count()  # one loader worker per core
    feed = steps["feed"]  # the batch work on the device, a batched decode, DALI's graph or why it was skipped
    assert feed["batch_stage"]["img_per_s"] > 0 and feed["decode"]["img_per_s"] > 0
    assert feed["dali"]["status"] == "ok" or feed["dali"]["status"].startswith("skipped")
    assert steps["sweep"]["tokens_square_tensor"] is False and (out / "sweep" / "resolution_sweep.png").exists()
    assert steps["demo"]["loss_falls"] and steps["torchrun"]["loss_falls"] and 0 <= steps["demo"]["top1"] <= 100
    assert steps["torchrun"]["nccl_probe"] == {"backend": "gloo", "world_size": 1, "ok": True}
    entries = steps["bench"]["entries"]
    assert len(entries) == 16 and len({e["key"] for e in entries}) == 16
    done = [e for e in entries if e["status"] == "ok"]
    assert len(done) >= 4 and all(e["status"] in ("ok", "skipped (time budget)") for e in entries)
    for e in done:
        assert e["train"]["ours"]["peak_memory_mib"] > 0 and e["infer"]["ratio"]["ratio"] > 0
        assert 0 <= e["data_share"]["data_share_shared_cores"] <= 1
    assert (out / "gpu_check.log").read_text().count("[gpu_check") >= 13
