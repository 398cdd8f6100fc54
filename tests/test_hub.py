"""Hub-style folders (save_pretrained / from_pretrained), torch.hub entry points and the timm-layout round trip."""

import json
from pathlib import Path

import pytest
import torch

import xcit
from xcit.weights.files import convert
from xcit.weights.hub import export_timm

from .conftest import perturb_

timm = pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = xcit.create_model("xcit_nano_12_p16_224", num_classes=5, img_size=32, **TINY)
    perturb_(m)
    m.class_names = ["zero", "one", "two", "three", "four"]
    return m.eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def _timm_tiny(path: Path, num_classes: int = 5):
    """What a timm user types, plus the tiny test architecture."""
    return timm.create_model(
        "xcit_nano_12_p16_224",
        pretrained=True,
        num_classes=num_classes,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes),
        **TINY,
    ).eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_and_from_pretrained_round_trip(model, x, tmp_path):
    xcit.save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architecture"] == "xcit_nano_12_p16_224"
    assert config["num_classes"] == 5 and config["label_names"] == model.class_names
    assert config["xcit_config"]["embed_dim"] == 32 and config["flavour"] == "official"
    assert config["model_args"] == {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["interpolation"] == "bicubic"
    assert len(pcfg["mean"]) == 3 and len(pcfg["std"]) == 3 and 0 < pcfg["crop_pct"] <= 1

    loaded = xcit.from_pretrained(tmp_path / "m")
    assert loaded.class_names == model.class_names and loaded.name == model.name
    _same_weights(model, loaded)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_from_pretrained_new_head_and_mindcv_flavour(model, x, tmp_path):
    m = xcit.create_model("xcit_nano_12_p16_224", num_classes=5, img_size=32, flavour="mindcv", **TINY)
    perturb_(m, seed=3).eval()
    xcit.save_pretrained(m, tmp_path / "mc")
    loaded = xcit.from_pretrained(tmp_path / "mc")
    assert loaded.flavour == "mindcv"
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))
    tuned = xcit.from_pretrained(tmp_path / "mc", num_classes=3, drop_path_rate=0.1)
    assert tuned.head.out_features == 3 and tuned.class_names is None and tuned.cfg.drop_path_rate == 0.1
    assert torch.equal(tuned.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        xcit.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        xcit.from_pretrained(tmp_path / "empty")


def test_timm_loads_saved_folder(model, x, tmp_path):
    """timm's own ``local-dir:`` loader reads the folder: same tensors, same predictions."""
    xcit.save_pretrained(model, tmp_path / "m")
    t = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    _same_weights(model, t)
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(x), atol=1e-5, rtol=0)  # two implementations: fp32 rounding only


def test_xcit_reads_timm_folder(model, x, tmp_path):
    """A folder written by timm (as downloaded from timm/ on the Hub) loads with from_pretrained."""
    t = timm.create_model("xcit_nano_12_p16_224", num_classes=5, img_size=32, **TINY)
    t.load_state_dict(model.state_dict())
    timm.models.save_for_hf(t, tmp_path / "t", model_config={"label_names": model.class_names})
    loaded = xcit.from_pretrained(tmp_path / "t")
    _same_weights(model, loaded)
    assert loaded.class_names == model.class_names


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_timm_layout_round_trip(model, x, tmp_path, ext):
    """Training checkpoint -> `xcit convert --to timm` / export_timm -> timm.create_model(pretrained_cfg_overlay)."""
    ckpt = tmp_path / "ckpt.pth"
    torch.save(
        {"model": model.state_dict(), "ema": model.state_dict(), "arch": model.name, "classes": model.class_names},
        ckpt,
    )
    out = tmp_path / f"timm.{ext}"
    convert(ckpt, out, to="safetensors" if ext == "safetensors" else "timm")
    t = _timm_tiny(out)
    _same_weights(model, t)
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(x), atol=1e-5, rtol=0)

    direct = tmp_path / f"direct.{ext}"
    export_timm(model, direct)
    _same_weights(model, _timm_tiny(direct))


def _load_hubconf():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_hub_entry_points(model, x, tmp_path):
    hubconf = _load_hubconf()
    assert all(callable(getattr(hubconf, n)) for n in xcit.list_models())
    path = tmp_path / "w.safetensors"
    export_timm(model, path)
    m = torch.hub.load(str(REPO), "xcit_nano_12_p16_224", source="local", pretrained=str(path), img_size=32, **TINY)
    _same_weights(model, m)
    xcit.save_pretrained(model, tmp_path / "m")
    m2 = torch.hub.load(str(REPO), "from_pretrained", source="local", name_or_path=str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(m2(x), model(x))
