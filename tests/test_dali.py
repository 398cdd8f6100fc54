"""``data_backend: dali`` on DALI's CPU backend (``device_id=None``): the graph, the order, the CLI, a short run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xcit.config.train_config import load_config
from xcit.data import dali
from xcit.data.demo import write_digits

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed (the dali extra)")
ROOT = Path(__file__).resolve().parents[1]


def _cfg(root: Path, *flags: str):
    return load_config(["--data_dir", str(root), "--data_backend", "dali", "--image_resize", "32",
                        "--batch_size", "6", "--num_parallel_workers", "1", *flags])[0]  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An ImageFolder of small JPEGs cut from real photos, two classes."""
    from xcit.bench.data import write_jpegs

    root = tmp_path_factory.mktemp("photos")
    for split, n in (("train", 8), ("val", 4)):
        for c in ("a", "b"):
            write_jpegs(root / "tmp" / split / c, n=n, size=(100, 75), seed=ord(c) + n)
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / "tmp" / split / c / "images").rename(root / split / c)
    return root


AUGMENT = [
    pytest.param(("--color_jitter", "0.4"), id="color-jitter"),
    pytest.param(("--auto_augment", "randaug-m9-mstd0.5-inc1"), id="randaugment", marks=pytest.mark.slow),
    pytest.param(("--auto_augment", "trivialaugwide"), id="trivialaugment", marks=pytest.mark.slow),
]  # DALI's auto_aug graphs build in tens of seconds on 2 shared cores: the slow suite


@needs_dali
@pytest.mark.parametrize("augment", AUGMENT)
def test_training_graph_gives_normalised_recipe_batches_in_the_samplers_order(photos, augment):
    from xcit.data.pipeline import build_datasets, loaders

    cfg = _cfg(photos, *augment, "--re_prob", "0.25", "--re_value", "pixel")
    train, val = build_datasets(cfg)
    tl, vl = loaders(train, val, cfg, world=2, rank=1)
    assert len(tl) == 1 and len(vl) == 1  # 8 of 16 images on rank 1: one full batch of 6 (drop_remainder)
    tl.sampler.set_epoch(0)
    (x, y), = list(tl)  # fmt: skip
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert -3 < x.mean() < 3 and x.min() < -1 and x.max() > 1  # normalised with the ImageNet mean/std
    order = tl.sampler.epoch_indices(0)[:6]
    assert y.tolist() == [int(train.source.targets[i]) for i in order]  # the resumable sampler's order, rank 1
    xv, yv = next(iter(vl))
    assert xv.shape == (4, 3, 32, 32) and yv.tolist() == [int(val.source.targets[i]) for i in range(1, 8, 2)]


@needs_dali
def test_eval_graph_is_resize_and_centre_crop(photos):
    """DALI's eval graph against timm's eval transform on the same files: the same geometry (the resize and the
    crop), the cubic filter apart (docs/how-to/feeding-gpus.md)."""
    from timm.data import create_transform

    from xcit.data.imageio import load_rgb
    from xcit.data.pipeline import build_datasets, loaders

    cfg = _cfg(photos, "--crop_pct", "0.875", "--interpolation", "bicubic")
    train, val = build_datasets(cfg)
    _, vl = loaders(train, val, cfg, world=1, rank=0)
    x, _ = next(iter(vl))
    ref = create_transform(32, is_training=False, crop_pct=0.875, interpolation="bicubic")
    want = torch.stack([ref(load_rgb(val.source.path(i))) for i in range(len(x))])
    assert x.shape == want.shape and (x - want).abs().mean() < 0.05  # a filter's difference, not a shifted crop


@needs_dali
def test_resume_position_is_the_samplers(photos):
    from xcit.data.pipeline import build_datasets, loaders

    cfg = _cfg(photos, "--batch_size", "2", "--drop_remainder", "False")
    train, _ = build_datasets(cfg)
    tl, _ = loaders(train, None, cfg, world=1, rank=0)
    tl.sampler.set_epoch(3)
    full = [y for _, y in tl]
    state = tl.sampler.state_dict(batches_done=5)
    tl2, _ = loaders(train, None, cfg, world=1, rank=0)
    tl2.sampler.load_state_dict(state)
    tl2.sampler.set_epoch(3)
    assert tl2.sampler.start_batch == 5
    rest = [y for _, y in tl2]
    assert len(full) == 8 and [t.tolist() for t in rest] == [t.tolist() for t in full[5:]]


@pytest.mark.slow
@needs_dali
def test_demo_trains_on_the_cpu_backend(tmp_path):
    """Two epochs of the digits demo through DALI: the loss falls and validation runs (the full 30-epoch demo
    reaches 99.7% top-1, docs/how-to/feeding-gpus.md)."""
    from xcit.data.demo import DEMO_RECIPE
    from xcit.train.fit import run_config

    data = write_digits(tmp_path / "digits", classes=4, per_class=40)
    res = run_config({**DEMO_RECIPE, "model_overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32}},
                     data_dir=str(data), data_backend="dali", epoch_size=2, warmup_epochs=0, decay_epochs=2,
                     ckpt_save_dir=str(tmp_path / "out"), batch_size=32, num_parallel_workers=1)  # fmt: skip
    rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and res["num_images"] == 32 and 0 <= res["top1"] <= 100
    losses = [float(r.split(",")[rows[0].split(",").index("train_loss")]) for r in rows[1:]]
    assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_missing_dali_is_one_line_naming_the_extra(tmp_path, monkeypatch, caplog):
    from xcit.cli import main

    data = write_digits(tmp_path / "digits", classes=2, per_class=8)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what an environment without the extra imports
    code = main(["train", "--data_dir", str(data), "--data_backend", "dali", "--epoch_size", "1",
                 "--ckpt_save_dir", str(tmp_path / "out"), "--batch_size", "4"])  # fmt: skip
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and len(errors) == 1 and errors[0].exc_info is None
    msg = errors[0].getMessage()
    assert "\n" not in msg and "data_backend dali needs NVIDIA DALI: pip install -e '.[dali]'" in msg
