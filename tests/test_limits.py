"""Hostile files and unchecked values: each refused with one line naming the file or key and the limit (through
the CLI, as typed), before any work or allocation."""

from __future__ import annotations

import zipfile
from dataclasses import asdict

import pytest
import torch

import xcit
from xcit.cli import main
from xcit.runtime.checkpoint import save_checkpoint

NAME = "xcit_nano_12_p16_224"
KW = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10, img_size=32)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "overrides, named",
    [
        ('{depth: "2"}', "depth must be an integer, got '2'"),
        ("{num_heads: 0}", "num_heads must be in [1, 16384], got 0"),
        ("{embed_dim: -32}", "embed_dim must be in [8, 16384], got -32"),
        ("{depth: 100000000}", "depth must be in [1, 1024], got 100000000"),
        ("{depth: 1.0e+8}", "depth must be an integer"),
    ],
)
def test_bad_model_overrides_are_one_line_before_any_work(tmp_path, capsys, overrides, named):
    argv = ["train", "--data_dir", str(tmp_path / "none"), "--ckpt_save_dir", str(tmp_path / "run")]
    line = _error(capsys, [*argv, "--model_overrides", overrides])
    assert "'model_overrides'" in line and named in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "yaml_text, named",
    [
        ("lr: 1.0e+300\n", "'lr': lr must be in [0, 1e+06], got 1e+300"),
        ("seed: 1.0e+23\n", "'seed': seed must be in [0, "),
        ("seed: -1\n", "'seed': seed must be in [0, "),
        ("batch_size: 1.0e+20\n", "'batch_size': batch_size must be in [1, 1048576]"),
        ("image_resize: 20000\n", "'image_resize': image_resize must be in [1, 4096], got 20000"),
    ],
)
def test_run_values_past_their_limits_are_refused(tmp_path, capsys, yaml_text, named):
    (tmp_path / "r.yaml").write_text(yaml_text)
    line = _error(capsys, ["train", "-c", str(tmp_path / "r.yaml"), "--data_dir", str(tmp_path)])
    assert named in line


def test_lr_seed_batch_size_on_the_command_line(tmp_path, capsys):
    base = ["train", "--data_dir", str(tmp_path)]
    assert "lr must be in [0, 1e+06]" in _error(capsys, [*base, "--lr", "1e300"])
    assert "'seed'" in _error(capsys, [*base, "--seed", "1e23"])
    assert "'batch_size'" in _error(capsys, [*base, "--batch_size", "1e20"])


def test_duplicated_yaml_keys_are_named(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("lr: 0.1\nepoch_size: 3\nlr: 0.2\n")
    line = _error(capsys, ["train", "-c", str(tmp_path / "r.yaml")])
    assert line.endswith("r.yaml: line 3: key 'lr' appears twice (first on line 1); keep one")
    (tmp_path / "n.yaml").write_text("model_overrides: {depth: 2, depth: 3}\n")
    assert "key 'depth' appears twice" in _error(capsys, ["train", "-c", str(tmp_path / "n.yaml")])


def test_non_utf8_yaml_and_a_folder_are_named(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("lr: 0.1  # caf\xe9\n".encode("latin-1"))
    line = _error(capsys, ["train", "-c", str(tmp_path / "latin1.yaml")])
    assert "latin1.yaml: not UTF-8 text (byte 0xe9 at offset 14)" in line
    assert "is a directory, not a YAML file" in _error(capsys, ["train", "-c", str(tmp_path)])


def _checkpoint(path, model_config=None, config=None):
    model = xcit.create_model(NAME, **KW)
    record = {**asdict(model.cfg), **(model_config or {})}
    state = {"model": model.state_dict(), "arch": NAME, "model_config": record, "config": config or {}}
    save_checkpoint(path, state)  # sealed: the checksum verifies, only the recorded values are hostile
    return path


@pytest.mark.parametrize(
    "model_config, config, named",
    [
        ({"depth": 10_000_000}, None, "the recorded depth must be in [1, 1024], got 10000000"),
        ({"depth": 8}, None, "records depth 8 but holds 2 blocks"),
        ({"embed_dim": 1024, "depth": 1000}, None, "records depth 1000 but holds 2 blocks"),
        (None, {"image_resize": 20000}, "the recorded image_resize must be in [1, 4096], got 20000"),
    ],
)
def test_a_sealed_checkpoint_recording_hostile_values(tmp_path, capsys, model_config, config, named):
    ckpt = _checkpoint(tmp_path / "ckpt.pth", model_config, config)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    line = _error(capsys, ["predict", str(img), "--pretrained", str(ckpt)])
    assert str(ckpt) in line and named in line


def test_a_zip_member_inflating_far_beyond_the_file_is_refused_before_reading(tmp_path, capsys):
    good = tmp_path / "good.pth"
    torch.save(xcit.create_model(NAME, **KW).state_dict(), good)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bomb, "w") as zout:
        members = zin.infolist()
        big = max((m for m in members if "/data/" in m.filename), key=lambda m: m.file_size)
        for m in members:
            if m is big:  # 64 MiB of zeros deflate to 64 KiB: torch would inflate the whole member
                info = zipfile.ZipInfo(m.filename)
                info.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(info, bytes(64 << 20))
            else:
                zout.writestr(m, zin.read(m.filename))
    line = _error(capsys, ["predict", str(good), "--pretrained", str(bomb)])
    assert f"{bomb}: its zip members inflate to 0.06 GiB, more than the limit of 4x the file's" in line
    assert main(["convert", str(good), str(tmp_path / "ok.safetensors")]) == 0  # a stored zip reads as before
