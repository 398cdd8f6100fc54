import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import xcit
from xcit.weights.files import WeightsError, official_to_timm, strip_prefixes, timm_to_official

from .conftest import perturb_

KW = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)
NAME = "xcit_nano_12_p16_224"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model():
    return perturb_(xcit.create_model(NAME, **KW)).eval()


def _logits(m, x=None):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) if x is None else x
    with torch.no_grad():
        return m.eval()(x)


def test_official_layout_round_trip(model):
    sd = model.state_dict()
    off = timm_to_official(sd)
    assert not any(".attn.q." in k for k in off if k.startswith("cls_attn"))
    back = official_to_timm(off)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("wrap", ["module.", "model.", "module.model."])
def test_prefixes_and_wrappers_are_stripped(model, tmp_path, wrap):
    sd = {wrap + k: v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "w.pth")
    m = xcit.create_model(NAME, pretrained=tmp_path / "w.pth", **{k: v for k, v in KW.items() if k != "num_classes"})
    assert m.num_classes == 10
    torch.testing.assert_close(_logits(m), _logits(model))


def test_safetensors_timm_and_convert_cli(model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from xcit.cli import main

    save_file(model.state_dict(), str(tmp_path / "timm.safetensors"))
    torch.save(timm_to_official(model.state_dict()), tmp_path / "official.pth")
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "ours.safetensors"), "--model", NAME]) == 0
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == NAME and meta["flavour"] == "official" and meta["format"] == "xcit"
    cfg = {k: v for k, v in KW.items() if k != "num_classes"}
    for f in ("timm.safetensors", "ours.safetensors"):
        m = xcit.create_model(NAME, pretrained=tmp_path / f, **cfg)
        torch.testing.assert_close(_logits(m), _logits(model), rtol=0, atol=0)


def test_strict_report_and_head_drop(model, tmp_path):
    sd = model.state_dict()
    sd.pop("blocks.0.gamma1")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    fresh = xcit.create_model(NAME, **KW)
    with pytest.raises(WeightsError) as e:
        xcit.load_weights(fresh, tmp_path / "bad.pth")
    assert "missing (1): blocks.0.gamma1" in str(e.value) and "unexpected (1): extra.weight" in str(e.value)
    # a different classifier size: an error unless asked, then the head is dropped with a notice
    torch.save(model.state_dict(), tmp_path / "ok.pth")
    cfg = {k: v for k, v in KW.items() if k != "num_classes"}
    with pytest.raises(WeightsError, match="classifier size differs"):
        xcit.load_weights(xcit.create_model(NAME, num_classes=5, **cfg), tmp_path / "ok.pth")
    m = xcit.create_model(NAME, pretrained=tmp_path / "ok.pth", num_classes=5, **cfg)
    assert m.head.weight.shape == (5, 32)
    torch.testing.assert_close(m.blocks[1].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight)


def test_training_checkpoint_ema_and_classes(model, tmp_path):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = {"model": model.state_dict(), "ema": ema, "arch": NAME, "flavour": "official", "classes": list("abcdefghij")}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    cfg = {k: v for k, v in KW.items() if k != "num_classes"}
    m = xcit.create_model(NAME, pretrained=tmp_path / "ckpt.pth", **cfg)
    assert m.class_names == list("abcdefghij")
    torch.testing.assert_close(m.head.bias, model.head.bias)
    e = xcit.create_model(NAME, pretrained=tmp_path / "ckpt.pth", use_ema=True, **cfg)
    torch.testing.assert_close(e.head.bias, model.head.bias + 1)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Evil(str(target))}, f)
    torch.save({"x": _Evil(str(target))}, tmp_path / "evil_zip.pth", _use_new_zipfile_serialization=True)
    for name in ("evil.pth", "evil_zip.pth"):
        with pytest.raises(WeightsError, match="refused") as e:
            xcit.read_weights(tmp_path / name)
        assert name in str(e.value)
    assert not target.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".ckpt"])
def test_truncated_and_garbage_files_name_the_file(model, tmp_path, suffix):
    from safetensors.torch import save_file

    full = tmp_path / f"full{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(full))
    elif suffix == ".ckpt":
        pytest.importorskip("google.protobuf")
        from xcit.weights.mindspore_ckpt import timm_to_mindcv, write_mindspore_ckpt

        write_mindspore_ckpt(full, timm_to_mindcv(model.state_dict()))
    else:
        torch.save(model.state_dict(), full)
    data = full.read_bytes()
    for i, blob in enumerate([data[: len(data) // 2], data[:7], os.urandom(300)]):
        bad = tmp_path / f"bad{i}{suffix}"
        bad.write_bytes(blob)
        with pytest.raises(WeightsError) as e:
            xcit.read_weights(bad)
        assert str(bad) in str(e.value)
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        xcit.read_weights(tmp_path / f"empty{suffix}")
    with pytest.raises(FileNotFoundError, match="nope"):
        xcit.read_weights(tmp_path / f"nope{suffix}")


def test_strip_prefixes_only_when_shared():
    sd = {"model.a": torch.zeros(1), "head.b": torch.zeros(1)}
    assert strip_prefixes(sd).keys() == sd.keys()


def test_models_command_json(capsys):
    from xcit.cli import main

    assert main(["models", "--json", "tiny_12_p16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["xcit_tiny_12_p16_224", "xcit_tiny_12_p16_384"]
    assert rows[0]["params_m"] == pytest.approx(6.72, abs=0.01)
    assert rows[0]["gmacs"] == pytest.approx(1.24, abs=0.03)


def test_closed_pipe_ends_quietly():
    """`xcit models | head -1`: the reader is gone before the table is written; no traceback, SIGPIPE status."""
    import subprocess
    import sys

    code = "import sys; from xcit.cli import main; sys.exit(main(['models']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert b"Traceback" not in proc.stderr.read()


def test_convert_mindcv_ckpt_keeps_flavour_and_round_trips(tmp_path):
    """MindCV .ckpt -> safetensors (flavour recorded) -> model matches MindCV's logits -> back to .ckpt exactly."""
    import numpy as np

    from xcit.cli import main
    from xcit.weights.mindspore_ckpt import read_mindspore_ckpt

    stem = os.path.join(os.path.dirname(__file__), "fixtures", "mindcv", "xcit_small_fixture")
    data = np.load(stem + ".npz")
    cfg = json.loads(str(data["config"]))
    arch = {k: cfg[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "eta", "tokens_norm")}
    assert main(["convert", stem + ".ckpt", str(tmp_path / "m.safetensors")]) == 0
    m = xcit.create_model("xcit_tiny_12_p16_224", pretrained=tmp_path / "m.safetensors", **arch).eval()
    assert m.flavour == "mindcv" and m.num_classes == cfg["num_classes"]
    with torch.no_grad():
        diff = (m(torch.from_numpy(data["input"])) - torch.from_numpy(data["logits"])).abs().max()
    assert diff <= 1e-4
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back.ckpt")]) == 0
    orig, back = read_mindspore_ckpt(stem + ".ckpt"), read_mindspore_ckpt(tmp_path / "back.ckpt")
    assert orig.keys() == back.keys()
    assert all(torch.equal(orig[k], back[k]) for k in orig)


def test_cli_reports_bad_weights_in_one_line(tmp_path, capsys):
    """Every command turns a broken weight file into one `xcit <command>: error: ...` line and exit status 2."""
    from xcit.cli import main

    model = xcit.create_model("xcit_nano_12_p16_224", embed_dim=32, depth=2, num_heads=2, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "w.pth").read_bytes()[:2000])
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    for argv in (
        ["predict", str(tmp_path / "x.png"), "--pretrained", str(cut)],
        ["attention", str(tmp_path / "x.png"), "--pretrained", str(cut), "--out", str(tmp_path / "att")],
        ["export", "--pretrained", str(cut), "--out", str(tmp_path / "m.onnx")],
        ["convert", str(cut), str(tmp_path / "m.safetensors")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"xcit {argv[0]}: error: {cut}: not a readable PyTorch file (truncated" in err, err


def test_official_numerics_survive_a_mindspore_ckpt_round_trip(tmp_path, caplog):
    """Official-numerics weights written as a .ckpt load back here with official numerics (the file records its
    flavour), and the conversion says MindCV's own model computes them differently; MindCV's files stay mindcv."""
    import logging

    import timm

    from xcit.cli import main
    from xcit.weights.mindspore_ckpt import read_mindspore_ckpt, read_mindspore_ckpt_strings

    ref = perturb_(timm.create_model(NAME, num_classes=10, embed_dim=32, depth=2, num_heads=2)).eval()
    torch.save(ref.state_dict(), tmp_path / "nano_timm.pth")
    with caplog.at_level(logging.WARNING, logger="xcit"):
        assert main(["convert", str(tmp_path / "nano_timm.pth"), str(tmp_path / "nano.ckpt"), "--model", NAME]) == 0
    assert "MindCV's own model (no q/k normalisation, tanh GELU) computes them differently" in caplog.text
    tensors, strings = read_mindspore_ckpt_strings(tmp_path / "nano.ckpt")
    assert strings == {"xcit_flavour": "official", "xcit_arch": NAME}
    assert read_mindspore_ckpt(tmp_path / "nano.ckpt").keys() == tensors.keys()  # strings are not tensors
    back = xcit.create_model(NAME, pretrained=tmp_path / "nano.ckpt", embed_dim=32, depth=2, num_heads=2)
    assert back.flavour == "official"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back.eval()(x) - ref(x)).abs().max() <= 1e-4
    # MindCV's own training checkpoints record nothing: they keep MindCV's numerics
    mindcv = xcit.read_weights(ROOT / "tests" / "fixtures" / "mindcv" / "xcit_small_fixture.ckpt")
    assert mindcv.flavour == "mindcv" and mindcv.source_format == "mindcv"
