"""Released weights by name, without network: a Hugging Face cache folder in the library's own layout, filled with
weights made here by timm's own writer and read through huggingface_hub's real offline lookup; the release-URL
fallback served from a ``file://`` URL; timm, given the same cache, loads the same file and gives the same logits."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import xcit
from xcit.cli import main
from xcit.model.arch import official_top1
from xcit.weights.files import timm_to_official
from xcit.weights.pretrained import (
    RELEASES,
    PretrainedError,
    default_tag,
    fetch,
    list_pretrained,
    markdown_table,
    overlay,
    resolve,
)

from .conftest import perturb_

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "xcit_nano_12_p16_224"
NAME = f"{VARIANT}.fb_in1k"
REV = "5c2d0e6b8f1a4d3c9e7b2a6f0d8c4e1b3a5f7d9c"  # a commit hash, as refs/main holds one


def fill_hub_cache(hub: Path, repo_id: str, folder: Path, rev: str = REV) -> Path:
    """Put ``folder``'s files into a Hugging Face cache as huggingface_hub lays it out (file_download.py):
    ``models--<org>--<name>/blobs/<etag>``, ``snapshots/<rev>/<file>`` linking to the blob, ``refs/main`` = rev.
    LFS files (the weights) are named by their sha256, git files (config.json) by git's blob sha1."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.suffix == ".safetensors":
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(repo / "blobs" / etag, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return repo


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """XCiT-N12/16 weights made here, written by timm's ``save_for_hf`` (model.safetensors + config.json, as timm's
    hub repos hold them) into a Hugging Face cache, and as the official release file (``{'model': ...}``)."""
    from timm.models._hub import save_for_hf

    root = tmp_path_factory.mktemp("released")
    src = perturb_(timm.create_model(VARIANT, pretrained=False)).eval()
    save_for_hf(src, root / "export", safe_serialization=True)
    repo = fill_hub_cache(root / "hf" / "hub", f"timm/{NAME}", root / "export")
    official = root / "release" / f"{VARIANT}.pth"
    official.parent.mkdir()
    torch.save({"model": timm_to_official(src.state_dict())}, official)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = src(x)
    return SimpleNamespace(root=root, hub=root / "hf" / "hub", repo=repo, official=official, x=x, expected=expected)


def _env(hub: Path, torch_home: Path, offline: bool = True) -> dict[str, str]:
    env = {"HF_HUB_CACHE": str(hub), "HF_HOME": str(hub.parent), "TORCH_HOME": str(torch_home)}
    return {**env, "HF_HUB_OFFLINE": "1"} if offline else env


@pytest.fixture
def cache_env(released, tmp_path, monkeypatch):
    """This process sees the filled cache offline, as it would with the variables set before it started."""
    from huggingface_hub import constants

    def use(hub: Path = released.hub, offline: bool = True) -> None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # MindCV's cache is ~/.mindspore/models
        for k, v in _env(hub, tmp_path / "torch", offline).items():
            monkeypatch.setenv(k, v)
        # huggingface_hub reads these variables once, when it is imported (constants.py): set what it read
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)

    use()
    return use


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


# ----------------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------------


def test_releases_are_timms_tags_with_its_sources():
    """timm's 42 XCiT entries, each with timm's hub id, URL, input size, crop and default tag; plus MindCV's."""
    from timm.models import get_pretrained_cfg

    names = timm.list_pretrained("xcit_*")
    assert len(names) == 42 and set(RELEASES) == {*names, "xcit_tiny_12_p16_224.mindcv_in1k"}
    for name in names:
        cfg, r = get_pretrained_cfg(name).to_dict(), RELEASES[name]
        assert (r.hf_hub_id, r.url, r.crop_pct) == (cfg["hf_hub_id"], cfg["url"], cfg["crop_pct"]), name
        assert r.preprocessing().pretrained_cfg()["input_size"] == cfg["input_size"], name
    for variant in xcit.list_models():
        assert default_tag(variant) == get_pretrained_cfg(variant).tag  # timm's default: the first tag listed
    assert resolve("xcit_small_12_p16_384").name == "xcit_small_12_p16_384.fb_dist_in1k"
    assert set(list_pretrained("xcit_nano_12_p16")) == {n for n in names if n.startswith("xcit_nano_12_p16")}
    for variant in xcit.list_models():  # the variants' table (xcit models, recipes) agrees with the releases'
        assert official_top1(variant) == resolve(variant).top1, variant


def test_unknown_names_name_the_nearest_release():
    with pytest.raises(PretrainedError, match=r"'xcit_nano_12_p16_224.fb_in22k'.*did you mean 'xcit_nano_12_p16_224"
                                              r"\.fb_in1k'"):  # fmt: skip
        resolve("xcit_nano_12_p16_224.fb_in22k")
    with pytest.raises(PretrainedError, match="did you mean 'xcit_small_12_p16_384.fb_dist_in1k'"):
        resolve("xcit_small_12_p16_384.fb_in1k")
    with pytest.raises(PretrainedError, match="Did you mean: xcit_nano_12_p16_224"):
        resolve("xcit_nan_12_p16_224.fb_in1k")


def test_every_model_carries_its_hub_id_and_url():
    m = xcit.create_model("xcit_nano_12_p16_384")
    cfg = m.pretrained_cfg
    assert cfg["hf_hub_id"] == "timm/xcit_nano_12_p16_384.fb_dist_in1k" and cfg["tag"] == "fb_dist_in1k"
    assert cfg["url"] == "https://dl.fbaipublicfiles.com/xcit/xcit_nano_12_p16_384_dist.pth"
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0


def test_models_command_lists_every_release_with_size_and_top1(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    weights = {w["name"]: w for r in rows for w in r["weights"]}
    assert set(weights) == set(RELEASES)
    assert weights[NAME]["top1"] == 69.9 and weights["xcit_large_24_p8_384.fb_dist_in1k"]["top1"] == 86.0
    assert weights[NAME]["size_mb"] == pytest.approx(12.2, abs=0.1)  # 3.05 M fp32 parameters + BN statistics
    assert main(["models", "p16_384"]) == 0
    out = capsys.readouterr().out
    assert "xcit_large_24_p16_384.fb_dist_in1k *" in out and "85.8" in out


def test_docs_list_every_release_from_the_table():
    page = (ROOT / "docs" / "how-to" / "pretrained-weights.md").read_text()
    assert markdown_table() in page, "regenerate the table: python -c 'from xcit.weights.pretrained import ...'"
    for r in RELEASES.values():
        assert r.name in page and r.url in page


# ----------------------------------------------------------------------------------------------------------------------
# Loading from the cache, with timm as the reference
# ----------------------------------------------------------------------------------------------------------------------


def test_pretrained_true_matches_timm_from_the_same_cache(released, cache_env):
    ours = xcit.create_model(VARIANT, pretrained=True).eval()
    theirs = timm.create_model(VARIANT, pretrained=True).eval()
    with torch.no_grad():
        a, b = ours(released.x), theirs(released.x)
    assert _max_diff(a, b) <= 1e-5
    assert _max_diff(a, released.expected) <= 1e-5  # the file's weights, not a fresh initialisation
    assert ours.pretrained_cfg["hf_hub_id"] == theirs.pretrained_cfg["hf_hub_id"] == f"timm/{NAME}"
    again = xcit.create_model(NAME, pretrained=True).eval()  # timm's spelling; pretrained=NAME is the same release
    with torch.no_grad():
        assert torch.equal(again(released.x), a)


def test_torch_hub_entry_point_takes_pretrained_true(released, cache_env):
    model = torch.hub.load(str(ROOT), VARIANT, source="local", pretrained=True, trust_repo=True).eval()
    with torch.no_grad():
        assert _max_diff(model(released.x), released.expected) <= 1e-5


def test_predict_by_name_matches_timm_in_a_fresh_process(released, tmp_path):
    """The CLI in a process of its own, with only the environment variables set: no patching of any library."""
    img = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(img)
    env = {**os.environ, **_env(released.hub, tmp_path / "torch"), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "xcit.cli", "predict", str(img), "--model", VARIANT, "--pretrained", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)

    theirs = timm.create_model(VARIANT, pretrained=True, pretrained_cfg_overlay=dict(file=str(_hub_file(released))))
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=theirs))
    with torch.no_grad():
        probs = theirs.eval()(transform(Image.open(img).convert("RGB"))[None]).softmax(-1)[0]
    top = doc["predictions"][0]["topk"]
    assert [t["index"] for t in top] == probs.topk(5).indices.tolist()
    assert max(abs(t["prob"] - probs[t["index"]].item()) for t in top) <= 1e-5


def test_predict_by_release_name(released, cache_env, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(img)
    assert main(["predict", str(img), "--pretrained", NAME, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    theirs = timm.create_model(VARIANT, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=theirs))
    with torch.no_grad():
        probs = theirs(transform(Image.open(img).convert("RGB"))[None]).softmax(-1)[0]
    assert doc["model"] == VARIANT and doc["preprocessing"]["crop_pct"] == 1.0
    assert max(abs(t["prob"] - probs[t["index"]].item()) for t in doc["predictions"][0]["topk"]) <= 1e-5


def _hub_file(released) -> Path:
    return released.repo / "snapshots" / REV / "model.safetensors"


def _png_folder(root: Path, classes=("a", "b"), per_class: int = 2, size: int = 224) -> Path:
    rng = np.random.default_rng(1)
    for c in classes:
        (root / "val" / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "val" / c / f"{i}.png")
    return root


def test_validate_by_name_matches_timm(released, cache_env, tmp_path):
    data = _png_folder(tmp_path / "data")
    out = tmp_path / "val.json"
    argv = ["validate", "--ckpt_path", NAME, "--data_dir", str(data), "--batch_size", "4"]
    assert main([*argv, "--num_parallel_workers", "0", "--results_file", str(out)]) == 0
    result = json.loads(out.read_text())

    theirs = timm.create_model(VARIANT, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=theirs))
    files = sorted((data / "val").glob("*/*.png"))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([0 if f.parent.name == "a" else 1 for f in files])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(theirs(x), labels).item()
    assert result["num_images"] == 4 and abs(result["loss"] - loss) <= 1e-5
    # MindCV's validate.py spelling: `pretrained: True` and no ckpt_path validates the model's default release
    again = tmp_path / "again.json"
    argv = ["validate", "--model", VARIANT, "--pretrained", "True", "--data_dir", str(data), "--batch_size", "4"]
    assert main([*argv, "--num_parallel_workers", "0", "--results_file", str(again)]) == 0
    assert json.loads(again.read_text())["loss"] == result["loss"]


def test_pretrained_true_in_a_mindcv_recipe_builds_from_the_cache(released, cache_env, tmp_path, caplog):
    """MindCV's `pretrained: True` (an error before) with a new num_classes: the released weights, a new head."""
    from xcit.config.train_config import load_config
    from xcit.train.fit import build_model

    recipe = tmp_path / "finetune.yaml"
    recipe.write_text(f"model: {VARIANT}\npretrained: True\nnum_classes: 3\n")
    cfg, _ = load_config(["-c", str(recipe)])
    with caplog.at_level(logging.INFO, logger="xcit"):
        model = build_model(cfg, cfg.num_classes, torch.device("cpu"))
    assert f"{NAME}: weights from" in caplog.text and "dropping the 1000-class head" in caplog.text
    start = xcit.read_weights(_hub_file(released)).state_dict
    own = model.state_dict()
    assert own["head.weight"].shape == (3, 128)
    assert all(torch.equal(own[k], v) for k, v in start.items() if not k.startswith("head."))


@pytest.mark.slow
def test_mindcv_recipe_with_pretrained_true_fine_tunes_from_the_cache(released, cache_env, tmp_path, caplog):
    """A whole `xcit.train` run of such a recipe: it starts from the cached weights with a new 3-class head."""
    from .test_data import make_folder

    data = make_folder(tmp_path / "data", per_class=2, size=32)
    recipe = tmp_path / "finetune.yaml"
    recipe.write_text(
        f"model: {VARIANT}\npretrained: True\nnum_classes: 3\ndata_dir: {data}\nimage_resize: 32\nepoch_size: 1\n"
        f"batch_size: 6\nlr: 1.0e-12\nwarmup_epochs: 0\nweight_decay: 0.0\nnum_parallel_workers: 0\n"
        f"ckpt_save_dir: {tmp_path / 'ckpt'}\ntensorboard: False\n"
    )
    with caplog.at_level(logging.INFO, logger="xcit"):
        result = xcit.train(str(recipe))
    log = caplog.text
    assert f"{NAME}: weights from" in log and "dropping the 1000-class head" in log
    trained = xcit.read_weights(result["checkpoint"]).state_dict
    start = xcit.read_weights(_hub_file(released)).state_dict
    assert trained["head.weight"].shape == (3, 128)
    for k in ("patch_embed.proj.0.0.weight", "blocks.5.attn.qkv.weight", "cls_attn_blocks.1.mlp.fc2.bias"):
        assert _max_diff(trained[k], start[k]) <= 1e-6, k  # lr 1e-12: the run started from the cached weights


# ----------------------------------------------------------------------------------------------------------------------
# The URL fallback and MindCV's release
# ----------------------------------------------------------------------------------------------------------------------


def test_url_fallback_downloads_once_into_torch_hub_and_matches_timm(released, cache_env, tmp_path):
    """Not in the Hub's cache (offline): the release URL (here file://), downloaded once into torch.hub's cache."""
    cache_env(hub=tmp_path / "empty_hub")
    url = released.official.as_uri()
    ours = xcit.create_model(VARIANT, pretrained=True, pretrained_cfg_overlay=dict(url=url)).eval()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / released.official.name
    assert cached.is_file() and cached.read_bytes() == released.official.read_bytes()
    assert not list(cached.parent.glob("*.partial")) and not list(cached.parent.glob("tmp*"))
    theirs = timm.create_model(VARIANT, pretrained=True, pretrained_cfg_overlay=dict(url=url, hf_hub_id=None)).eval()
    with torch.no_grad():
        assert _max_diff(ours(released.x), theirs(released.x)) <= 1e-5
    moved = released.official.with_suffix(".moved")
    released.official.rename(moved)  # the URL is gone: the cached copy is used
    try:
        assert fetch(overlay(resolve(NAME), dict(url=url)), progress=False) == cached
    finally:
        moved.rename(released.official)


def test_mindcv_release_loads_with_mindcv_numerics(cache_env, tmp_path):
    """MindCV's xcit_tiny_12_p16_224 checkpoint comes by URL only and switches the model to MindCV's numerics."""
    src = perturb_(xcit.create_model("xcit_tiny_12_p16_224", flavour="mindcv"))  # as MindCV trains
    ckpt = tmp_path / "mindcv" / Path(RELEASES["xcit_tiny_12_p16_224.mindcv_in1k"].url).name
    ckpt.parent.mkdir()
    xcit.save_safetensors(src.state_dict(), tmp_path / "w.safetensors", "xcit_tiny_12_p16_224", "mindcv")
    xcit.convert(tmp_path / "w.safetensors", ckpt)  # a MindSpore .ckpt, as MindCV writes
    m = xcit.create_model("xcit_tiny_12_p16_224", pretrained="xcit_tiny_12_p16_224.mindcv_in1k",
                          pretrained_cfg_overlay=dict(url=ckpt.as_uri()))  # fmt: skip
    assert m.cfg.flavour == "mindcv" and m.pretrained_cfg["crop_pct"] == 0.875
    assert (tmp_path / "home" / ".mindspore" / "models" / ckpt.name).is_file()  # where MindCV keeps it
    assert torch.equal(m.state_dict()["blocks.3.mlp.fc1.weight"], src.state_dict()["blocks.3.mlp.fc1.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# Failures: one line, exit 2, no traceback
# ----------------------------------------------------------------------------------------------------------------------


def test_not_cached_offline_names_the_file_and_the_fetch_command(cache_env, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    cache_env(hub=tmp_path / "empty_hub")
    assert main(["predict", str(img), "--model", VARIANT, "--pretrained"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"xcit predict: error: {NAME} is not cached here")
    assert f"models--timm--{NAME}" in line and "HF_HUB_OFFLINE is set" in line
    assert f"`hf download timm/{NAME} model.safetensors`" in line


def test_not_cached_without_network_says_so(cache_env, tmp_path, capsys):
    """No HF_HUB_OFFLINE: where the Hub cannot be reached, the cache is looked at and the failure is one line."""
    cache_env(hub=tmp_path / "empty_hub", offline=False)
    argv = ["validate", "--ckpt_path", "xcit_nano_12_p8_224.fb_dist_in1k", "--data_dir", str(tmp_path)]
    try:
        import socket

        socket.getaddrinfo("huggingface.co", 443)
        pytest.skip("this machine reaches the Hub: the weights would be downloaded")
    except OSError:
        pass
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "xcit_nano_12_p8_224.fb_dist_in1k is not cached here" in line and "cannot be reached" in line


def test_unknown_tag_is_one_line_with_the_nearest(cache_env, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["predict", str(img), "--pretrained", f"{VARIANT}.fb_in22k"]) == 2
    assert f"did you mean '{NAME}'" in _error_line(capsys)
    assert main(["validate", "--ckpt_path", "xcit_tiny_12_p16_384.fb_in1k", "--data_dir", str(tmp_path)]) == 2
    assert "did you mean 'xcit_tiny_12_p16_384.fb_dist_in1k'" in _error_line(capsys)


def test_missing_huggingface_hub_names_the_extra(cache_env, tmp_path, monkeypatch, capsys):
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed: `import huggingface_hub` raises
    assert main(["predict", str(img), "--pretrained", NAME]) == 2
    line = _error_line(capsys)
    assert "'huggingface_hub' is not installed (pip install -e '.[hub]'" in line and f"{NAME} is not cached" in line


def test_a_corrupt_cached_file_is_refused_naming_it(released, cache_env, tmp_path, capsys):
    hub = tmp_path / "hub"
    shutil.copytree(released.hub, hub, symlinks=True)
    blob = (hub / released.repo.name / "snapshots" / REV / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor: it would load without the check
    blob.write_bytes(bytes(data))
    cache_env(hub=hub)
    with pytest.raises(PretrainedError, match=f"cached file .*model.safetensors is corrupt.*{blob.name}"):
        xcit.create_model(VARIANT, pretrained=True)
    img = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["predict", str(img), "--model", VARIANT, "--pretrained"]) == 2
    assert "is corrupt" in _error_line(capsys)


def test_a_corrupt_file_in_torch_hubs_cache_is_refused_naming_it(cache_env, tmp_path, capsys):
    cache_env(hub=tmp_path / "empty_hub")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / f"{VARIANT}.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04" + bytes(100))  # the start of a zip, then nothing: a cut-off download
    with pytest.raises(PretrainedError, match=f"{NAME}: the cached file cannot be read.*{cached}"):
        xcit.create_model(VARIANT, pretrained=True)


def test_backbone_takes_released_weights_by_name(released, cache_env):
    from xcit.weights.backbone import XCiTBackbone

    by_name = XCiTBackbone(VARIANT, pretrained=NAME)
    by_true = XCiTBackbone(VARIANT, pretrained=True)
    ours = xcit.create_model(VARIANT, pretrained=True)
    for key, value in by_name.body.model.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
        assert torch.equal(value, by_true.body.model.state_dict()[key]), key
