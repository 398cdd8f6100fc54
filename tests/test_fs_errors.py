"""Filesystem errors as one line (exit 2) before any work, through the CLI; predictions as a results file; a torn
metrics line repaired. A regular file in place of the output folder stands in for a read-only one: root writes
through permission bits, and the code path (the probe write failing) is the same."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch
from PIL import Image

import xcit
from xcit.cli import main
from xcit.train.logs import MetricsLog

from .conftest import perturb_

KW = dict(embed_dim=32, depth=2, num_heads=2, num_classes=3)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(perturb_(xcit.create_model("xcit_nano_12_p16_224", **KW)).state_dict(), path)
    return path


@pytest.fixture
def blocker(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder is expected")
    return tmp_path / "blocker"


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _export(weights, out) -> list[str]:
    """``xcit export`` of ``weights`` as TorchScript to ``out``."""
    return ["export", "--model", "xcit_nano_12_p16_224", "--pretrained", str(weights), "--format", "torchscript",
            "--out", str(out)]  # fmt: skip


def test_each_command_names_an_output_folder_it_cannot_write(tmp_path, capsys, weights, blocker):
    out = blocker / "sub"
    cases = {
        "train": ["train", "--data_dir", str(tmp_path), "--ckpt_save_dir", str(out)],
        "validate": ["validate", "--data_dir", str(tmp_path / "nothing"), "--results_file", str(out / "r.json")],
        "export": _export(weights, out / "m.pt"),
        "convert": ["convert", str(weights), str(out / "w.safetensors")],
        "predict": [
            "predict",
            str(weights),
            "--model",
            "xcit_nano_12_p16_224",
            "--pretrained",
            str(weights),
            "--results-file",
            str(out / "r.csv"),
        ],
    }
    for command, argv in cases.items():
        line = _error(capsys, argv)
        assert line.startswith(f"xcit {command}: error: cannot write the "), line
        assert line.endswith(f"{blocker} is a file, not a folder"), line


def test_export_creates_a_missing_folder(tmp_path, weights):
    out = tmp_path / "new" / "folder" / "m.pt"
    assert main(_export(weights, out)) == 0
    assert out.is_file()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, colour in enumerate([(250, 0, 0), (0, 0, 250)]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    return folder


def _predict(images, weights, topk: int, out) -> list[str]:
    """``xcit predict`` of the ``images`` folder, top-``topk``, results written to ``out``."""
    return ["predict", str(images), "--model", "xcit_nano_12_p16_224", "--pretrained", str(weights), "--topk",
            str(topk), "--results-file", str(out)]  # fmt: skip


def test_predict_results_file_csv_one_column_per_rank(tmp_path, weights, images, capsys):
    out = tmp_path / "res" / "r.csv"
    assert main(_predict(images, weights, 2, out)) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["filename", "index_0", "label_0", "prob_0", "index_1", "label_1", "prob_1"]
    assert [r["filename"] for r in rows] == [str(images / "0.png"), str(images / "1.png")]
    first = printed[0].split(": ", 1)[1].split(", ")[0]  # "<label> (<prob>)"
    assert first == f"{rows[0]['label_0']} ({float(rows[0]['prob_0']):.3f})"
    assert float(rows[0]["prob_0"]) >= float(rows[0]["prob_1"])


@pytest.mark.parametrize("fmt", ["json", "json-split", "json-records"])
def test_predict_results_file_json_layouts(tmp_path, weights, images, fmt):
    out = tmp_path / f"r.{'jsonl' if fmt == 'json-records' else 'json'}"
    assert main([*_predict(images, weights, 1, out), "--results-format", fmt]) == 0
    if fmt == "json":
        doc = json.loads(out.read_text())
        assert set(doc) == {str(images / "0.png"), str(images / "1.png")}
        assert set(doc[str(images / "0.png")]) == {"index", "label", "prob"}
        assert isinstance(doc[str(images / "0.png")]["index"], int)  # top-1: scalars, as timm squeezes them
    elif fmt == "json-split":
        doc = json.loads(out.read_text())
        assert doc["columns"] == ["filename", "index", "label", "prob"] and len(doc["data"]) == 2
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["filename"] for r in rows] == [str(images / "0.png"), str(images / "1.png")]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    rows = [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.9}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 2, "train_lo'  # a crash mid-append
    (tmp_path / "metrics.jsonl").write_text(text)
    with caplog.at_level(logging.WARNING, logger="xcit"):
        log = MetricsLog(tmp_path, start_epoch=2, tensorboard=False)
    assert log.rows == rows
    assert "metrics.jsonl: line 3 is a torn last line" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows)


def test_a_full_disk_names_the_file_being_written(tmp_path):
    import errno

    from xcit.config.train_config import load_config, save_config
    from xcit.runtime.fileio import atomic_write

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() says on a full disk: no file named

    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'config.yaml'}: No space left on device"):
        atomic_write(tmp_path / "config.yaml", full)
    cfg, _ = load_config(["--data_dir", str(tmp_path)])
    save_config(cfg, tmp_path / "ok.yaml")  # a writable disk: as before
    assert list(tmp_path.iterdir()) == [tmp_path / "ok.yaml"]
