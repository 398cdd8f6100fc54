"""The sample index is built once per job: rank 0 lists, the others receive it, and a resume reads the cache."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xcit.data.formats
from xcit.data.pipeline import build_datasets

from .test_data import cfg_for, make_folder

ROOT = Path(__file__).resolve().parents[1]


def _count_listings(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = xcit.data.formats.list_folder
    monkeypatch.setattr(
        xcit.data.formats, "list_folder", lambda root, *a: calls.append(Path(root).name) or real(root, *a)
    )
    return calls


def test_the_index_is_cached_and_listed_again_only_when_the_tree_changes(tmp_path, monkeypatch, caplog):
    root = make_folder(tmp_path / "ds")
    cache = tmp_path / "ckpt" / "data_index"
    calls = _count_listings(monkeypatch)
    first, _ = build_datasets(cfg_for(root), cache_dir=cache)
    assert calls == ["train", "val"] and len(list(cache.glob("*.npz"))) == 2
    with caplog.at_level(logging.INFO, logger="xcit"):
        again, val = build_datasets(cfg_for(root), cache_dir=cache)
    assert calls == ["train", "val"] and "index read from" in caplog.text  # not listed again
    assert again.samples == first.samples and again.classes == first.classes and len(val) == 9
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "b" / "new.png")  # b's folder time changes
    changed, _ = build_datasets(cfg_for(root), cache_dir=cache)
    assert calls == ["train", "val", "train"] and len(changed) == len(first) + 1
    for f in cache.glob("train-*.npz"):
        f.write_bytes(f.read_bytes()[:100])  # torn: ignored with a warning, listed again
    with caplog.at_level(logging.WARNING, logger="xcit"):
        torn, _ = build_datasets(cfg_for(root), cache_dir=cache)
    assert "ignoring the index cache" in caplog.text and torn.samples == changed.samples


PROBE = """
import os, sys
import xcit.data.formats
real = xcit.data.formats.list_folder
def probe(root, *args):
    with open(os.path.join(sys.argv[1], "listed." + os.environ.get("RANK", "0")), "a") as f:
        f.write(str(root) + "\\n")
    return real(root, *args)
xcit.data.formats.list_folder = probe
from xcit.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_under_torchrun_only_rank_0_lists_and_a_resume_lists_nothing(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=8)
    probe, marks, out = tmp_path / "probe.py", tmp_path / "marks", tmp_path / "out"
    probe.write_text(PROBE)
    marks.mkdir()
    args = ["train", "--data_dir", str(root), "--ckpt_save_dir", str(out), "--model", "xcit_nano_12_p8_224",
            "--model_overrides", "{embed_dim: 32, depth: 1, num_heads: 2}", "--image_resize", "16",
            "--batch_size", "4", "--num_parallel_workers", "0", "--tensorboard", "False", "--device_target", "cpu",
            "--val_while_train", "True", "--resume", "auto"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for epochs in (1, 2):
        proc = subprocess.run([*torchrun, str(probe), str(marks), *args, "--epoch_size", str(epochs)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "index read from" in proc.stderr if epochs == 2 else "listed in" in proc.stderr
    assert sorted(os.listdir(marks)) == ["listed.0"]  # rank 1 never listed
    listed = (marks / "listed.0").read_text().split()
    assert listed == [str(root / "train"), str(root / "val")]  # once, by the first run: the resume read the cache
    assert len(list((out / "data_index").glob("*.npz"))) == 2
