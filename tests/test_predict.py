"""xcit predict: same predictions as the validation path, class names, batching, bad files skipped."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import xcit
from xcit.cli import predict as predict_cmd
from xcit.config.train_config import TrainConfig
from xcit.data.demo import write_digits
from xcit.data.pipeline import build_datasets, val_loader
from xcit.infer.predict import class_names, imagenet_class_names, load_model
from xcit.runtime.checkpoint import save_checkpoint

from .conftest import perturb_

ARCH = "xcit_nano_12_p8_224"
OVERRIDES = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits") / "d", classes=4, per_class=15)


@pytest.fixture(scope="module")
def checkpoint(digits, tmp_path_factory):
    """A checkpoint shaped as `xcit train` writes it: weights and EMA weights, architecture, classes, config."""
    torch.manual_seed(0)
    model = perturb_(xcit.create_model(ARCH, num_classes=4, **OVERRIDES), seed=5).eval()
    ema = perturb_(xcit.create_model(ARCH, num_classes=4, **OVERRIDES), seed=6).eval()
    cfg = TrainConfig(
        data_dir=str(digits),
        model=ARCH,
        model_overrides=dict(OVERRIDES),
        image_resize=32,
        interpolation="bicubic",
        crop_pct=0.875,  # resize to 36, centre-crop 32: predict must crop the same way
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        num_parallel_workers=0,
        batch_size=7,
    )
    path = tmp_path_factory.mktemp("ckpt") / "best.pth"
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "config": cfg.to_dict(), "arch": ARCH}
    state |= {"classes": ["0", "1", "2", "3"], "model_config": asdict(model.cfg), "flavour": "official"}
    save_checkpoint(path, state)
    return path, cfg, ema, model


def _predict_json(argv, capsys) -> dict:
    assert predict_cmd.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _validation_logits(cfg, model) -> tuple[list, torch.Tensor]:
    """The validation data path: checked ImageFolder + eval transform + sharded loader."""
    _, val = build_datasets(cfg, classes=["0", "1", "2", "3"], need_train=False)
    loader = val_loader(val, batch_size=7, workers=0, world=1, rank=0)
    with torch.no_grad():
        return val.samples, torch.cat([model(x) for x, _ in loader])


def test_predict_matches_validation_path(checkpoint, digits, capsys):
    path, cfg, ema, model = checkpoint
    doc = _predict_json([str(digits / "val"), "--pretrained", str(path), "--topk", "2", "--batch-size", "5"], capsys)
    assert doc["model"] == ARCH and doc["errors"] == []
    assert doc["preprocessing"]["crop_pct"] == 0.875 and doc["preprocessing"]["interpolation"] == "bicubic"
    samples, logits = _validation_logits(cfg, ema)  # validation scores the EMA weights when present
    probs, top1 = logits.softmax(-1).max(-1)
    by_path = {p["path"]: p["topk"][0] for p in doc["predictions"]}
    assert len(by_path) == len(samples) == 12
    for (file, _), i, p in zip(samples, top1.tolist(), probs.tolist()):
        assert by_path[str(file)]["index"] == i
        assert by_path[str(file)]["label"] == str(i)
        assert by_path[str(file)]["prob"] == pytest.approx(p, abs=1e-5)

    low = _predict_json([str(digits / "val"), "--pretrained", str(path), "--precision", "bf16"], capsys)
    assert [p["topk"][0]["prob"] for p in low["predictions"]] == pytest.approx(
        [by_path[p["path"]]["prob"] for p in low["predictions"]], abs=2e-2
    )  # bf16 autocast: the same probabilities to bf16's precision

    raw = _predict_json([str(digits / "val"), "--pretrained", str(path), "--ema", "False"], capsys)
    _, raw_logits = _validation_logits(cfg, model)
    assert [p["topk"][0]["prob"] for p in raw["predictions"]] == pytest.approx(
        raw_logits.softmax(-1).max(-1).values.tolist(), abs=1e-5
    )


def test_predict_top1_equals_validate(checkpoint, digits, capsys):
    """`xcit validate`'s top-1 on the val split equals the accuracy of predict's top-1 on the same files."""
    evaluate = pytest.importorskip("xcit.train.evaluate")
    path, cfg, _, _ = checkpoint
    result = evaluate.validate(replace(cfg, ckpt_path=str(path)))
    doc = _predict_json([str(digits / "val"), "--pretrained", str(path)], capsys)
    hits = [int(p["topk"][0]["label"] == Path(p["path"]).parent.name) for p in doc["predictions"]]
    assert result["num_images"] == len(hits) == 12
    assert result["top1"] == pytest.approx(100.0 * sum(hits) / len(hits))


def test_architecture_and_classes_from_checkpoint(checkpoint):
    path, _, ema, _ = checkpoint
    loaded = load_model(None, path)
    assert loaded.name == ARCH and loaded.cfg.embed_dim == 32 and loaded.cfg.depth == 2
    assert class_names(loaded) == ["0", "1", "2", "3"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), ema(x))


def test_architecture_from_shapes_without_config(tmp_path):
    """A bare state dict of a modified architecture still loads: the shapes give embed_dim, depth, heads."""
    m = xcit.create_model(ARCH, num_classes=3, **OVERRIDES)
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    loaded = load_model(ARCH, tmp_path / "bare.pth")
    assert (loaded.cfg.embed_dim, loaded.cfg.depth, loaded.cfg.num_heads, loaded.num_classes) == (32, 2, 2, 3)
    with pytest.raises(ValueError, match="pass --model"):
        load_model(None, tmp_path / "bare.pth")


def test_imagenet_names_and_bad_files(digits, tmp_path, capsys):
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca" and names[207] == "golden retriever"
    m = xcit.create_model(ARCH, num_classes=1000, **OVERRIDES)
    xcit.save_pretrained(m, tmp_path / "m")
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = sorted((digits / "val" / "1").iterdir())[:3]
    for i, f in enumerate(good):
        (folder / f"{i}.png").write_bytes(f.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "html.jpg").write_text("<html>not found</html>")
    doc = _predict_json([str(folder), str(tmp_path / "missing.png"), "--pretrained", str(tmp_path / "m")], capsys)
    assert [p["path"].rsplit("/", 1)[1] for p in doc["predictions"]] == ["0.png", "1.png", "2.png"]
    assert all(len(p["topk"]) == 5 and p["topk"][0]["label"] in names for p in doc["predictions"])
    failed = {e["path"].rsplit("/", 1)[1]: e["error"] for e in doc["errors"]}
    assert set(failed) == {"empty.jpg", "html.jpg", "missing.png"} and "empty" in failed["empty.jpg"]

    assert predict_cmd.main([str(folder / "empty.jpg"), "--pretrained", str(tmp_path / "m")]) == 1
    assert predict_cmd.main([str(folder / "0.png"), "--pretrained", str(tmp_path / "m"), "--topk", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(folder / "0.png") + ": ") and line.split(": ", 1)[1].split(" (")[0] in names


class _Reads:
    """Counts the real ``torch.load`` calls and ``open`` calls of one file (the real functions run)."""

    def __init__(self, monkeypatch, path: Path):
        import builtins

        self.path, self.loads, self.opens = Path(path).resolve(), 0, 0
        real_load, real_open = torch.load, builtins.open

        def load(f, *args, **kwargs):
            self.loads += 1
            return real_load(f, *args, **kwargs)

        def open_(file, *args, **kwargs):
            if isinstance(file, (str, Path)) and Path(file).resolve() == self.path:
                self.opens += 1
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(torch, "load", load)
        monkeypatch.setattr(builtins, "open", open_)


def test_a_training_checkpoint_is_read_once_per_command(checkpoint, digits, capsys, monkeypatch):
    """predict and validate open a training checkpoint once and torch.load it once (its checksum checked on the
    way), instead of once for the metadata, once for the checksum and once for the weights."""
    evaluate = pytest.importorskip("xcit.train.evaluate")
    path, cfg, _, _ = checkpoint
    reads = _Reads(monkeypatch, path)
    _predict_json([str(digits / "val"), "--pretrained", str(path)], capsys)
    assert (reads.loads, reads.opens) == (1, 1)
    reads.loads = reads.opens = 0
    evaluate.validate(replace(cfg, ckpt_path=str(path)))
    assert (reads.loads, reads.opens) == (1, 1)
