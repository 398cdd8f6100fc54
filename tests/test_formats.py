"""WebDataset shards and Hugging Face datasets, written by webdataset and datasets themselves, train and validate
like ImageFolders: same classes, every validation image counted once, validate's top-1 equal to training's."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xcit.cli import main
from xcit.data.pipeline import build_datasets, train_loader, val_loader

from .test_data import cfg_for

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "star"]
TINY = ["--model", "xcit_nano_12_p8_224", "--model_overrides", "{embed_dim: 32, depth: 1, num_heads: 2}",
        "--image_resize", "16", "--batch_size", "4", "--num_parallel_workers", "0", "--tensorboard", "False",
        "--device_target", "cpu", "--epoch_size", "1", "--val_while_train", "True"]  # fmt: skip


def _samples(split: str, seed: int) -> list[tuple[bytes, int]]:
    """JPEG bytes and labels: 6 train / 3 val images per class, coloured by class."""
    rng = np.random.default_rng(seed)
    out = []
    for label in range(len(CLASSES)):
        for _ in range(6 if split == "train" else 3):
            arr = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
            arr[..., label] += 150
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=95)
            out.append((buf.getvalue(), label))
    return out


BROKEN = b"<html>404</html>"  # one undecodable validation image in every format


def write_wds(root: Path, hub_layout: bool = False) -> Path:
    import webdataset as wds

    for split, seed in (("train", 0), ("validation" if hub_layout else "val", 1)):
        samples = _samples(split, seed) + ([] if split == "train" else [(BROKEN, 0)])
        pattern = root / (f"imagenet-{split}-%06d.tar" if hub_layout else f"{split}/shard-%06d.tar")
        pattern.parent.mkdir(parents=True, exist_ok=True)
        with wds.ShardWriter(str(pattern), maxcount=5) as sink:  # several shards per split
            for i, (data, label) in enumerate(samples):
                sink.write({"__key__": f"{split}_{i:05d}", "jpg": data, "cls": label})
    if not hub_layout:
        (root / "classes.json").write_text(json.dumps(CLASSES))
    return root


def _dataset_dict():
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    feats = Features({"image": HFImage(), "label": ClassLabel(names=CLASSES)})
    splits = {}
    for split, seed in (("train", 0), ("validation", 1)):
        samples = _samples(split, seed) + ([] if split == "train" else [(BROKEN, 0)])
        rows = {"image": [{"bytes": d, "path": None} for d, _ in samples], "label": [y for _, y in samples]}
        splits[split] = Dataset.from_dict(rows, features=feats)
    return DatasetDict(splits)


def write_hf_disk(root: Path) -> Path:
    _dataset_dict().save_to_disk(str(root))
    return root


def write_hf_parquet(root: Path) -> Path:
    for split, ds in _dataset_dict().items():
        (root / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


WRITERS = {"wds": write_wds, "wds_hub": lambda r: write_wds(r, True), "hf_disk": write_hf_disk,
           "hf_parquet": write_hf_parquet}  # fmt: skip


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_indexes_like_a_folder(fmt, tmp_path, caplog):
    root = WRITERS[fmt](tmp_path / fmt)
    train, val = build_datasets(cfg_for(root))
    names = CLASSES if fmt != "wds_hub" else ["0", "1", "2"]  # timm's hub shards carry no class names
    assert train.classes == names and len(train) == 18 and len(val) == 10
    assert np.bincount(train.targets).tolist() == [6, 6, 6]
    x, y = next(iter(train_loader(train, cfg_for(root), world=1, rank=0)))
    assert x.shape == (4, 3, 32, 32) and y.dtype.is_floating_point is False
    seen = 0
    for rank in range(2):
        loader = val_loader(val, 4, 0, 2, rank)
        seen += sum(len(y) for _, y in loader)
        bad = loader.take_bad()
        assert len(bad) == (1 if rank == 1 else 0)  # the broken image is item 9: rank 1's shard
    assert seen == 9  # every decodable validation image once, the broken one skipped


SLOW = pytest.mark.slow  # about 5 s each; hf_disk runs in the default suite


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=[] if f == "hf_disk" else [SLOW]) for f in WRITERS])
def test_each_format_trains_and_validates_with_the_same_top1(fmt, tmp_path, caplog):
    root = WRITERS[fmt](tmp_path / fmt)
    out = tmp_path / "out"
    train_json, val_json = tmp_path / "train.json", tmp_path / "val.json"
    assert main(["train", "--data_dir", str(root), "--ckpt_save_dir", str(out), *TINY,
                 "--results_file", str(train_json)]) == 0  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="xcit"):
        assert main(["validate", "--data_dir", str(root), *TINY, "--ckpt_path", str(out / "ckpt_e0001.pth"),
                     "--results_file", str(val_json)]) == 0  # fmt: skip
    trained, validated = json.loads(train_json.read_text()), json.loads(val_json.read_text())
    assert trained["num_images"] == validated["num_images"] == 9 and validated["skipped_images"] == 1
    assert validated["top1"] == trained["top1"]
    assert "validation: 1 unreadable images skipped, not scored" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fmt", ["wds", "hf_parquet"])
def test_two_gloo_ranks_count_every_validation_image_once(fmt, tmp_path):
    root = WRITERS[fmt](tmp_path / fmt)
    out, result = tmp_path / "out", tmp_path / "val2.json"
    assert main(["train", "--data_dir", str(root), "--ckpt_save_dir", str(out), *TINY]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf2")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "xcit.cli"]
    for command in (
        ["train", "--ckpt_save_dir", str(tmp_path / "out2")],
        ["validate", "--ckpt_path", str(out / "ckpt_e0001.pth"), "--results_file", str(result)],
    ):
        proc = subprocess.run([*torchrun, *command, "--data_dir", str(root), *TINY], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(result.read_text())
    assert got["num_images"] == 9 and got["skipped_images"] == 1
    one = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert got["top1"] == one["top1"]


def test_a_missing_datasets_package_names_the_extra(tmp_path, monkeypatch, capsys):
    root = write_hf_disk(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: `import datasets` raises
    assert main(["train", "--data_dir", str(root), "--ckpt_save_dir", str(tmp_path / "out"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("xcit train: error: the optional package 'datasets' is not installed: "
                       "pip install -e '.[data]' (or pip install datasets)")  # fmt: skip


def test_xcit_shard_writes_a_folder_as_shards_that_webdataset_and_training_read(tmp_path, capsys):
    import webdataset as wds

    from .test_data import add_bad_files, make_folder

    root = make_folder(tmp_path / "ds")
    add_bad_files(root)  # copied byte for byte: still found (and counted) when read
    out = tmp_path / "shards"
    assert main(["shard", str(root), str(out), "--max-size", "4KB"]) == 0
    assert json.loads((out / "classes.json").read_text()) == ["a", "b", "c"]
    tars = sorted((out / "train").glob("train-*.tar"))
    assert len(tars) > 2  # a new shard once one reaches --max-size
    folder, _ = build_datasets(cfg_for(root))
    shards, val = build_datasets(cfg_for(out))
    assert shards.classes == folder.classes and len(val) == 9
    by_path = {}
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False):  # webdataset's own reader
        path = json.loads(sample["json"])["path"]
        by_path[path] = (int(sample["cls"]), next(v for k, v in sample.items() if k in ("jpg", "png")))
    assert len(by_path) == len(folder) == len(shards)
    for path, label in folder.samples:
        rel = str(Path(path).relative_to(root / "train"))
        assert by_path[rel][0] == label and by_path[rel][1] == Path(path).read_bytes(), rel
    names = [shards.source.name(i) for i in range(len(shards))]
    bad = [i for i, n in enumerate(names) if shards.source.sizes[i] in (0, 260)]  # zero.jpg, garbage.jpg
    assert len(bad) == 2 and all(shards[i][2] for i in bad)  # replaced by the next good image, and named
    assert main(["shard", str(root), str(tmp_path / "x"), "--max-size", "lots"]) == 2
    assert "bad size 'lots'" in capsys.readouterr().err


def test_xcit_shard_refuses_a_folder_of_shards_and_replaces_it_whole(tmp_path, capsys):
    """A second run into the same folder never leaves the first run's shards to be read beside its own."""
    from .test_data import make_folder

    root = make_folder(tmp_path / "ds")
    out = tmp_path / "shards"
    assert main(["shard", str(root), str(out), "--max-size", "4KB"]) == 0
    first = sorted(p.name for p in (out / "val").glob("*.tar"))
    assert len(first) > 1
    capsys.readouterr()
    assert main(["shard", str(root), str(out), "--splits", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds shards" in err and "--overwrite" in err
    assert sorted(p.name for p in (out / "val").glob("*.tar")) == first  # untouched
    assert main(["shard", str(root), str(out), "--splits", "val", "--overwrite"]) == 0
    assert [p.name for p in (out / "val").glob("*.tar")] == ["val-000000.tar"]  # one 1 GB-limit shard, no leftovers
    assert not (out / "train").exists()  # the old set is replaced whole: no train split labelled by old classes
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "val"]  # no staging folder left behind
    _, val = build_datasets(cfg_for(out), need_train=False)
    assert len(val) == 9  # the split's images, once
    # a run that fails part-way (val holds a class train lacks) leaves the set it found, and nothing of its own
    (root / "val" / "d").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "d" / "0.png")
    assert main(["shard", str(root), str(out), "--overwrite"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "val"]
    assert [p.name for p in (out / "val").glob("*.tar")] == ["val-000000.tar"]
    # one killed while writing leaves a hidden staging folder: no reader looks there, the next run removes it
    (out / ".xcit-shard-new-killed" / "val").mkdir(parents=True)
    assert len(build_datasets(cfg_for(out), need_train=False)[1]) == 9
    assert main(["shard", str(root), str(out), "--splits", "train", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "train"]


def test_xcit_shard_names_splits_that_are_missing_or_not_splits(tmp_path, capsys):
    from .test_data import make_folder

    root = make_folder(tmp_path / "ds")
    assert main(["shard", str(root), str(tmp_path / "o"), "--splits", "train", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"xcit shard: error: {root}: no split folder nope (its folders: train, val)"
    assert not (tmp_path / "o").exists()
    assert main(["shard", str(root / "train"), str(tmp_path / "o")]) == 2  # a split (a flat folder of classes)
    assert "has no train/ or val/ folder" in capsys.readouterr().err
    assert main(["shard", str(root), str(root)]) == 2  # would replace the image folders themselves
    assert "holds files that are not shards" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "train").iterdir()) == ["a", "b", "c"]


@pytest.mark.slow
def test_data_benchmark_times_every_format_beside_timm(tmp_path):
    from xcit.bench import data as B
    from xcit.bench.formats import bench_formats

    folder = B.write_jpegs(tmp_path / "jpegs", n=3, size=(80, 60))
    res = bench_formats(folder, tmp_path / "work", rounds=1)
    assert res["images"] == 3 and set(res["ratio_to_timm"]) == {"folder", "wds", "hf"}
    assert all(res[k]["img_per_s"] > 0 for k in ("folder", "wds", "hf", "timm"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkills_on_shards_resume_bit_identical(tmp_path, capsys):
    """scripts/chaos_resume.py --shards: random SIGKILLs of a run reading tar shards by random access."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaos_resume", ROOT / "scripts" / "chaos_resume.py")
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    assert chaos.main(["--kills", "3", "--shards", "--epochs", "2", "--workers", "1", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RESULT: bit-identical after 3 kills" in out and (tmp_path / "digits-wds" / "classes.json").is_file()


@pytest.mark.parametrize("fmt", ["webdataset", "gnu", "pax", "ustar"])
def test_the_tar_header_reader_agrees_with_tarfile(fmt, tmp_path):
    import tarfile

    from xcit.data.shards import tar_members

    if fmt == "webdataset":
        path = next((write_wds(tmp_path / "w") / "train").glob("*.tar"))
    else:
        path = tmp_path / f"{fmt}.tar"
        form = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
        with tarfile.open(path, "w", format=form) as tf:
            names = ["a.jpg", "d" * 60 + "/" + "e" * 60 + ".cls", "sub/b.png"]
            names += ["x" * 150 + ".jpg"] if fmt != "ustar" else []  # long names: GNU 'L' or pax 'path'
            for i, name in enumerate(names):
                data = bytes(range(256)) * (i + 1)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        expected = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    assert list(tar_members(path)) == expected and len(expected) >= 3


def test_shard_reads_keep_few_files_open(tmp_path, monkeypatch):
    import xcit.data.shards as S

    root = write_wds(tmp_path / "w")  # 18 training samples in 4 shards of 5
    train, _ = build_datasets(cfg_for(root))
    monkeypatch.setattr(S, "MAX_OPEN_SHARDS", 2)
    S._FDS.clear()
    src = train.source
    assert len(src.shards) == 4
    for i in range(len(src)):
        data = src.read(i)
        assert data[:2] == b"\xff\xd8" and len(S._FDS) <= 2  # a JPEG's start, from at most 2 open shards
