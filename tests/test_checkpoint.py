"""Checkpoint integrity: checksums, atomic writes under write failures, fallback to the last good file, RNG state."""

import logging
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import xcit
from xcit.runtime.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)


def _state(seed: int = 0, n: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"head.weight": torch.randn(3, n, generator=g), "head.bias": torch.zeros(3)},
        "arch": "xcit_nano_12_p16_224",
        "flavour": "official",
        "classes": ["cat", "dog", "eel"],
        "epoch": 1,
        "step": seed,
        "rng": capture_rng_state(),
        "sampler": {"epoch": 1, "consumed": 8},
    }


def _save(path, state, mtime_ns):
    save_checkpoint(path, state)
    os.utime(path, ns=(mtime_ns, mtime_ns))  # explicit order: filesystems may give two quick writes the same mtime


def test_round_trip_is_weights_only_and_readable_by_read_weights(tmp_path):
    state = _state()
    p = tmp_path / "ckpt.pth"
    save_checkpoint(p, state)
    assert verify_checkpoint(p) is True
    back = load_checkpoint(p)
    assert torch.equal(back["model"]["head.weight"], state["model"]["head.weight"])
    assert back["classes"] == state["classes"] and back["sampler"] == state["sampler"]
    assert torch.load(p, weights_only=True)["step"] == 0  # the checksum is a zip comment: plain torch reads it
    w = xcit.read_weights(p)
    assert w.arch == "xcit_nano_12_p16_224" and w.extra["classes"] == ["cat", "dog", "eel"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_flipped_bit_is_detected(tmp_path):
    p = tmp_path / "ckpt.pth"
    save_checkpoint(p, {"model": {"w": torch.full((256,), 7.0)}})
    data = bytearray(p.read_bytes())
    i = bytes(data).find(torch.full((4,), 7.0).numpy().tobytes())
    assert i > 0
    data[i + 1] ^= 0x10  # inside the tensor payload: torch's zip reader would load the changed value silently
    p.write_bytes(bytes(data))
    assert verify_checkpoint(p) is False
    with pytest.raises(CheckpointError, match=r"ckpt\.pth: checksum mismatch"):
        load_checkpoint(p)
    with pytest.raises(xcit.WeightsError, match="checksum"):
        xcit.read_weights(p)


def test_truncated_file_is_refused(tmp_path):
    p = tmp_path / "ckpt.pth"
    save_checkpoint(p, _state())
    p.write_bytes(p.read_bytes()[:-100])
    assert verify_checkpoint(p) is None
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        load_checkpoint(p)


def test_corrupt_latest_falls_back_to_previous_good(tmp_path, caplog):
    for step in (1, 2, 3):
        _save(tmp_path / f"ckpt_{step}.pth", _state(step), mtime_ns=step * 10**9)
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_3.pth"
    newest = tmp_path / "ckpt_3.pth"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    os.utime(newest, ns=(3 * 10**9, 3 * 10**9))
    (tmp_path / "ckpt_4.pth").write_bytes(b"")  # a zero-byte file from a crash mid-copy
    os.utime(tmp_path / "ckpt_4.pth", ns=(4 * 10**9, 4 * 10**9))
    with caplog.at_level(logging.WARNING, logger="xcit"):
        found = latest_checkpoint(tmp_path)
    assert found == tmp_path / "ckpt_2.pth"
    assert load_checkpoint(found)["step"] == 2
    assert "ckpt_3.pth: checksum mismatch" in caplog.text
    assert "ckpt_4.pth" in caplog.text


def test_latest_of_empty_or_missing_dir_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "nope") is None


_FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys, torch
    from xcit.runtime.checkpoint import CheckpointError, save_checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
    try:
        save_checkpoint(sys.argv[1], {"model": {"w": torch.ones(200_000)}, "step": 2})
    except CheckpointError as e:
        print("ERROR", e)
        sys.exit(3)
    """
)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    """A real failing write: the file-size limit makes write(2) fail with EFBIG half way through the new file."""
    p = tmp_path / "ckpt.pth"
    save_checkpoint(p, {"model": {"w": torch.zeros(10)}, "step": 1})
    before = p.read_bytes()
    r = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(p), str(100_000)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 3, r.stderr
    assert "ckpt.pth: could not write the checkpoint (File too large)" in r.stdout
    assert "previous checkpoint" in r.stdout
    assert p.read_bytes() == before and load_checkpoint(p)["step"] == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt.pth"]  # no temp file left behind


def test_full_tmpfs_leaves_previous_checkpoint_intact(tmp_path):
    """ENOSPC from a real 256 KiB tmpfs (needs mount rights, i.e. root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        p = mnt / "ckpt.pth"
        save_checkpoint(p, {"model": {"w": torch.zeros(10_000)}, "step": 1})  # 40 kB: fits
        before = p.read_bytes()
        with pytest.raises(CheckpointError, match="No space left on device"):
            save_checkpoint(p, {"model": {"w": torch.ones(100_000)}, "step": 2})  # 400 kB: does not
        assert p.read_bytes() == before and load_checkpoint(p)["step"] == 1
        assert [x.name for x in mnt.iterdir()] == ["ckpt.pth"]
        save_checkpoint(p, {"model": {"w": torch.ones(10_000)}, "step": 3})  # space was freed: the next save works
        assert load_checkpoint(p)["step"] == 3
    finally:
        subprocess.run(["umount", str(mnt)])


def test_unsafe_values_are_refused_before_writing(tmp_path):
    p = tmp_path / "ckpt.pth"
    save_checkpoint(p, {"step": 1})
    with pytest.raises(CheckpointError, match=r"state\['rng'\]\['np'\] is a numpy.ndarray"):
        save_checkpoint(p, {"step": 2, "rng": {"np": np.zeros(3)}})
    with pytest.raises(CheckpointError, match="numpy.float64"):
        save_checkpoint(p, {"lr": np.float64(0.1)})
    assert load_checkpoint(p)["step"] == 1


def test_plain_torch_file_loads_with_warning_unless_checksum_required(tmp_path, caplog):
    p = tmp_path / "plain.pth"
    torch.save({"step": 5}, p)
    with caplog.at_level(logging.WARNING, logger="xcit"):
        assert load_checkpoint(p)["step"] == 5
    assert "no checksum" in caplog.text
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(p, require_checksum=True)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pth")


def test_prune_keeps_newest_and_removes_dead_temp_files(tmp_path):
    for step in range(5):  # written newest first: the recorded progress decides, not the file time
        _save(tmp_path / f"ckpt_{step}.pth", {"epoch": 0, "step": step}, mtime_ns=(9 - step) * 10**9)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ckpt_9.pth.tmp{int(dead.stdout)}"
    stale.write_bytes(b"partial")
    mine = tmp_path / f".ckpt_8.pth.tmp{os.getpid()}"
    mine.write_bytes(b"in progress")
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["ckpt_3.pth", "ckpt_4.pth"]
    assert not stale.exists() and mine.exists()
    prune_checkpoints(tmp_path, keep=0)
    assert len(list(tmp_path.glob("*.pth"))) == 2


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's generator state
    np.random.standard_normal()
    save_checkpoint(tmp_path / "r.pth", {"rng": capture_rng_state()})
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2]
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]
    assert torch.equal(got[4], expected[4])


@pytest.mark.gpu
def test_cuda_rng_round_trip():
    torch.cuda.manual_seed_all(5)
    torch.rand(1, device="cuda")
    state = capture_rng_state()
    a = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(7)
    restore_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), a)


def _progress_files(folder) -> list:
    """Checkpoints of (epoch, step) (0, 3), (1, 6), (1, 8), (2, 10), written in that order."""
    paths = []
    for i, (epoch, step) in enumerate([(0, 3), (1, 6), (1, 8), (2, 10)]):
        name = f"ckpt_e{epoch:04d}_s{step:08d}.pth" if i % 2 else f"ckpt_e{epoch + 1:04d}.pth"
        _save(folder / name, {**_state(step), "epoch": epoch, "step": step}, mtime_ns=(i + 1) * 10**9)
        paths.append(folder / name)
    return paths


def test_latest_and_prune_go_by_recorded_progress_not_by_file_times(tmp_path):
    paths = _progress_files(tmp_path / "run")
    newest = paths[-1]
    os.utime(paths[0], None)  # `touch` of the oldest: now the file with the newest time
    assert latest_checkpoint(tmp_path / "run") == newest
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in reversed(paths):  # `cp` without -p, the newest progress first: it gets the oldest time
        subprocess.run(["cp", str(p), str(copy / p.name)], check=True)
        os.utime(copy / p.name, ns=(time_ns := (5 - paths.index(p)) * 10**9, time_ns))
    assert latest_checkpoint(copy) == copy / newest.name
    removed = prune_checkpoints(tmp_path / "run", keep=2)
    assert sorted(p.name for p in removed) == sorted(p.name for p in paths[:2])  # never the newer progress
    assert sorted(tmp_path.joinpath("run").glob("*.pth")) == sorted(paths[2:])


def test_latest_skips_a_greater_progress_whose_seal_fails(tmp_path, caplog):
    paths = _progress_files(tmp_path)
    data = bytearray(paths[-1].read_bytes())
    data[len(data) // 2] ^= 0x01
    paths[-1].write_bytes(bytes(data))
    os.utime(paths[1], None)
    with caplog.at_level(logging.WARNING, logger="xcit"):
        assert latest_checkpoint(tmp_path) == paths[2]  # (1, 8): the greatest one that verifies
    assert f"{paths[-1].name}: checksum mismatch" in caplog.text
