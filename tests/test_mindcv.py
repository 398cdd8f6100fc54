"""MindSpore checkpoints and MindCV parity, against fixtures made by scripts/make_mindcv_fixture.py.

The fixtures were produced by MindSpore/MindCV themselves (``save_checkpoint`` of MindCV's ``XCiT`` and of the
``TrainStep`` its ``create_trainer`` builds); MindSpore is not needed here. Set ``XCIT_MINDCV_PYTHON`` to a Python
with MindSpore and MindCV to also check that they load this project's exports.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import xcit
from xcit.weights.mindspore_ckpt import (
    _Checkpoint,
    mindcv_to_timm,
    read_mindspore_ckpt,
    timm_to_mindcv,
    write_mindspore_ckpt,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mindcv"
SMALL = FIXTURES / "xcit_small_fixture"
TRAINING = FIXTURES / "xcit_small_fixture_ema"
TOL = 1e-4
CFG_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "num_classes", "eta", "tokens_norm")


def load_fixture(stem: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = np.load(stem.with_suffix(".npz"))
    config = json.loads(str(data["config"]))
    return config, {k: data[k] for k in data.files if k != "config"}


def build(config: dict, flavour: str = "mindcv") -> torch.nn.Module:
    """This project's XCiT with the fixture's architecture."""
    return xcit.create_model("xcit_tiny_12_p16_224", flavour=flavour, **{k: config[k] for k in CFG_KEYS}).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Parity with MindCV's logits
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stem, key, use_ema",
    [(SMALL, "logits", False), (TRAINING, "logits", False), (TRAINING, "logits_ema", True)],
    ids=["plain", "training-ckpt", "training-ckpt-ema"],
)
def test_matches_mindcv_logits(stem, key, use_ema):
    config, arrays = load_fixture(stem)
    model = build(config)
    xcit.load_weights(model, stem.with_suffix(".ckpt"), use_ema=use_ema)
    assert model.flavour == "mindcv"
    with torch.no_grad():
        out = model(torch.from_numpy(arrays["input"]))
    diff = (out - torch.from_numpy(arrays[key])).abs().max().item()
    assert diff <= TOL, f"max |logits - MindCV| = {diff:.3g}"


def test_official_numerics_do_not_match_mindcv():
    """MindCV-trained weights need the mindcv flavour: official numerics give clearly different logits."""
    config, arrays = load_fixture(SMALL)
    model = build(config, flavour="official")
    model.load_state_dict(mindcv_to_timm(read_mindspore_ckpt(SMALL.with_suffix(".ckpt"))))
    with torch.no_grad():
        out = model(torch.from_numpy(arrays["input"]))
    assert (out - torch.from_numpy(arrays["logits"])).abs().max().item() > 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", [SMALL, TRAINING], ids=["p16", "p8"])
def test_mapped_keys_are_timms(stem):
    timm_xcit = pytest.importorskip("timm.models.xcit")
    config, _ = load_fixture(stem)
    ref = timm_xcit.Xcit(**{k: config[k] for k in CFG_KEYS}).state_dict()
    sd = mindcv_to_timm(read_mindspore_ckpt(stem.with_suffix(".ckpt")))
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert sd[k].shape == v.shape and sd[k].dtype == v.dtype, k
    assert all(sd[k].item() == 0 for k in sd if k.endswith("num_batches_tracked"))


def test_key_map_details():
    raw = read_mindspore_ckpt(SMALL.with_suffix(".ckpt"))
    sd = mindcv_to_timm(raw)
    assert torch.equal(sd["patch_embed.proj.0.1.running_var"], raw["patch_embed.proj.0.1.moving_variance"])
    assert torch.equal(sd["blocks.0.local_mp.bn.weight"], raw["blocks.0.local_mp.bn.gamma"])
    assert torch.equal(sd["blocks.1.norm3.bias"], raw["blocks.1.norm3.beta"])
    assert torch.equal(sd["blocks.1.gamma3"], raw["blocks.1.gamma3"])  # LayerScale keeps its name
    assert torch.equal(sd["pos_embed.token_projection.weight"], raw["pos_embeder.token_projection.weight"])
    qkv = raw["cls_attn_blocks.1.attn.qkv.weight"]
    D = qkv.shape[1]
    for i, name in enumerate("qkv"):  # mindcv ClassAttention: reshape(B, N, 3, heads, head_dim) -> q, k, v
        assert torch.equal(sd[f"cls_attn_blocks.1.attn.{name}.weight"], qkv[i * D : (i + 1) * D])
    assert sd["patch_embed.proj.2.1.num_batches_tracked"].dtype == torch.long


@pytest.mark.parametrize("stem", [SMALL, TRAINING])
@pytest.mark.parametrize("use_ema", [False, True])
def test_round_trip_is_exact(stem, use_ema):
    raw = read_mindspore_ckpt(stem.with_suffix(".ckpt"))
    if use_ema and not any(k.startswith("ema.") for k in raw):
        with pytest.raises(ValueError, match="ema"):
            mindcv_to_timm(raw, use_ema=True)
        return
    if use_ema:
        expected = {k[len("ema.") :]: v for k, v in raw.items() if k.startswith("ema.")}
    else:
        expected = {k: v for k, v in raw.items() if k in mindcv_names(raw)}
    back = timm_to_mindcv(mindcv_to_timm(raw, use_ema=use_ema))
    assert sorted(back) == sorted(expected)
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def mindcv_names(raw: dict[str, torch.Tensor]) -> set[str]:
    """MindCV model parameter names of a checkpoint: no ``ema.`` copies, no optimiser or loss-scale state."""
    skip = ("ema.", "adam_m.", "adam_v.")
    scalars = {"global_step", "learning_rate", "beta1_power", "beta2_power", "scale_sense", "updates"}
    return {k for k in raw if not k.startswith(skip) and k not in scalars}


def test_training_checkpoint_state_is_dropped_and_ema_selected():
    raw = read_mindspore_ckpt(TRAINING.with_suffix(".ckpt"))
    assert {"global_step", "learning_rate", "scale_sense", "adam_m.cls_token", "adam_v.head.weight"} <= set(raw)
    main, ema = mindcv_to_timm(raw), mindcv_to_timm(raw, use_ema=True)
    assert sorted(main) == sorted(ema)
    assert torch.equal(main["head.weight"], raw["head.weight"])
    assert torch.equal(ema["head.weight"], raw["ema.head.weight"])
    assert torch.equal(ema["blocks.0.local_mp.bn.running_mean"], raw["ema.blocks.0.local_mp.bn.moving_mean"])
    assert not torch.equal(main["head.weight"], ema["head.weight"])


def test_unknown_keys_are_refused():
    raw = read_mindspore_ckpt(SMALL.with_suffix(".ckpt"))
    with pytest.raises(ValueError, match="unrecognised keys: model.cls_token"):
        mindcv_to_timm({"model." + k: v for k, v in raw.items()})
    sd = mindcv_to_timm(raw)
    with pytest.raises(ValueError, match="unrecognised keys: blocks.0.foo"):
        timm_to_mindcv({**sd, "blocks.0.foo": torch.zeros(1)})
    del sd["cls_attn_blocks.0.attn.k.weight"]
    with pytest.raises(ValueError, match="q, k and v together"):
        timm_to_mindcv(sd)


def test_timm_to_mindcv_accepts_official_layout():
    raw = read_mindspore_ckpt(SMALL.with_suffix(".ckpt"))
    official = {k.replace("pos_embed.", "pos_embeder."): v for k, v in mindcv_to_timm(raw).items()}
    for i in range(2):
        qkv = {n: official.pop(f"cls_attn_blocks.{i}.attn.{n}.weight") for n in "qkv"}
        official[f"cls_attn_blocks.{i}.attn.qkv.weight"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
        qkv = {n: official.pop(f"cls_attn_blocks.{i}.attn.{n}.bias") for n in "qkv"}
        official[f"cls_attn_blocks.{i}.attn.qkv.bias"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    back = timm_to_mindcv(official)
    assert sorted(back) == sorted(raw) and all(torch.equal(back[k], raw[k]) for k in raw)


# ----------------------------------------------------------------------------------------------------------------------
# The .ckpt file format
# ----------------------------------------------------------------------------------------------------------------------


def test_rewrite_is_byte_identical_to_mindspore(tmp_path):
    """Our writer reproduces MindSpore's save_checkpoint output byte for byte (scalars and int32 included)."""
    for stem in (SMALL, TRAINING):
        src = stem.with_suffix(".ckpt")
        write_mindspore_ckpt(tmp_path / "re.ckpt", read_mindspore_ckpt(src))
        assert (tmp_path / "re.ckpt").read_bytes() == src.read_bytes()


def test_write_read_round_trip_all_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "i32": torch.tensor([[1, -2]], dtype=torch.int32),
        "i64": torch.tensor(2**40, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous input
    }
    path = tmp_path / "all.ckpt"
    write_mindspore_ckpt(path, state)
    back = read_mindspore_ckpt(path)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    assert not [p for p in tmp_path.iterdir() if p.name != "all.ckpt"], "temporary file left behind"


def test_write_overwrites_atomically_and_validates(tmp_path):
    path = tmp_path / "w.ckpt"
    write_mindspore_ckpt(path, {"a": torch.ones(2)})
    write_mindspore_ckpt(path, {"b": torch.zeros(3)})
    assert list(read_mindspore_ckpt(path)) == ["b"]
    with pytest.raises(TypeError):
        write_mindspore_ckpt(path, {"c": np.zeros(2)})
    with pytest.raises(TypeError):
        write_mindspore_ckpt(path, {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError):
        write_mindspore_ckpt(path, {})
    assert list(read_mindspore_ckpt(path)) == ["b"]  # failed writes leave the old file alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.ckpt"]


def _value(msg, tag: str, dims: list[int], tensor_type: str, content: bytes) -> None:
    v = msg.value.add()
    v.tag = tag
    v.tensor.dims.extend(dims)
    v.tensor.tensor_type = tensor_type
    v.tensor.tensor_content = content


def test_reads_chunked_tensors_strings_old_scalars_and_crc(tmp_path):
    """Layouts MindSpore writes that our writer does not: chunks, strings, dims [0] scalars, maps, a CRC32 footer."""
    import zlib

    big = torch.arange(10, dtype=torch.float32)
    raw = big.numpy().tobytes()
    parts = []
    for chunk in (raw[:12], raw[12:]):  # serialization.py: consecutive values with one tag are one tensor
        msg = _Checkpoint()
        _value(msg, "big", [10], "Float32", chunk)
        parts.append(msg.SerializeToString())
    msg = _Checkpoint()
    _value(msg, "epoch_name", [0], "str", np.array("warmup").tobytes())  # save_checkpoint(append_dict={...: str})
    _value(msg, "old_scalar", [0], "Int32", np.int32(7).tobytes())  # MindSpore 1.x wrote scalars with dims [0]
    parts.append(msg.SerializeToString())
    body = b"".join(parts)
    path = tmp_path / "ms.ckpt"
    path.write_bytes(body + b"crc_num" + zlib.crc32(body).to_bytes(10, "big"))
    sd = read_mindspore_ckpt(path)
    assert list(sd) == ["big", "old_scalar"]
    assert torch.equal(sd["big"], big)
    assert sd["old_scalar"].shape == () and sd["old_scalar"].item() == 7
    msg = _Checkpoint()
    v = msg.value.add()
    v.tag = "table"  # a MapParameter (mindspore/train/serialization.py: _write_mapparameter)
    t = v.maptensor.tensor.add()
    t.dims.append(2)
    t.tensor_type = "int32"
    t.tensor_content = np.arange(2, dtype=np.int32).tobytes()
    path.write_bytes(body + msg.SerializeToString())
    with pytest.warns(UserWarning, match="MapParameter"):
        assert list(read_mindspore_ckpt(path)) == ["big", "old_scalar"]
    path.write_bytes(body + b"crc_num" + (zlib.crc32(body) ^ 1).to_bytes(10, "big"))
    with pytest.raises(ValueError, match="CRC32"):
        read_mindspore_ckpt(path)


def _expect_error(path: Path, match: str = "") -> None:
    with pytest.raises(ValueError) as info:
        read_mindspore_ckpt(path)
    assert str(path) in str(info.value)
    assert match in str(info.value)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"\x00" * 64, ""),
        (b"PK\x03\x04" + bytes(range(256)) * 4, ""),  # a torch zip archive
        (b"\x80\x02}q\x00.", ""),  # a pickle
        (b"\x0a\xff\xff\xff\xff\x0f", ""),  # a length prefix far beyond the end of the file
        (b"\x0a\x04\x0a\x02ab", ""),  # a Value without its required tensor
    ],
    ids=["empty", "zeros", "zip", "pickle", "huge-length", "no-tensor"],
)
def test_garbage_raises_value_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    _expect_error(path, match)


def test_random_bytes_raise_value_error(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.ckpt"
    for n in (1, 2, 7, 100, 5000):
        for _ in range(20):
            path.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            _expect_error(path)


@pytest.mark.parametrize(
    "dims, tensor_type, content, match",
    [
        ([2, 3], "Float32", b"\x00" * 20, "expected 24"),
        ([2], "Float32", b"\x00" * 12, "expected 8"),
        ([-1], "Float32", b"", "negative"),
        ([2**40, 2**40], "Float32", b"\x00" * 8, "expected"),
        ([2], "Int4", b"\x00", "unsupported tensor_type"),
        ([2], "Complex64", b"\x00" * 16, "unsupported tensor_type"),
        ([2], "Bool", b"\x00\x07", "Bool"),
    ],
)
def test_inconsistent_tensors_raise(tmp_path, dims, tensor_type, content, match):
    msg = _Checkpoint()
    _value(msg, "t", dims, tensor_type, content)
    path = tmp_path / "bad.ckpt"
    path.write_bytes(msg.SerializeToString())
    _expect_error(path, match)


def test_duplicate_and_inconsistent_chunks_raise(tmp_path):
    path = tmp_path / "dup.ckpt"
    msg = _Checkpoint()
    _value(msg, "a", [1], "Float32", b"\x00" * 4)
    _value(msg, "b", [1], "Float32", b"\x00" * 4)
    _value(msg, "a", [1], "Float32", b"\x00" * 4)
    path.write_bytes(msg.SerializeToString())
    _expect_error(path, "twice")
    msg = _Checkpoint()
    _value(msg, "a", [2], "Float32", b"\x00" * 4)
    _value(msg, "a", [2], "Float16", b"\x00" * 4)
    path.write_bytes(msg.SerializeToString())
    _expect_error(path, "inconsistent chunks")


def test_truncated_checkpoint_raises_or_is_a_clean_prefix(tmp_path):
    """Cutting the file anywhere gives a ValueError naming it, except exactly between two tensors, which the format
    cannot detect: then the tensors read are an exact prefix of the full file's."""
    data = SMALL.with_suffix(".ckpt").read_bytes()
    full = read_mindspore_ckpt(SMALL.with_suffix(".ckpt"))
    names = list(full)
    rng = np.random.default_rng(0)
    cuts = sorted({1, 2, 3, 10, 100, len(data) // 2, len(data) - 1} | set(rng.integers(1, len(data), 60).tolist()))
    path = tmp_path / "cut.ckpt"
    clean = 0
    for n in cuts:
        path.write_bytes(data[:n])
        try:
            sd = read_mindspore_ckpt(path)
        except ValueError as e:
            assert str(path) in str(e)
            continue
        clean += 1
        assert list(sd) == names[: len(sd)] and all(torch.equal(sd[k], full[k]) for k in sd)
    assert clean < len(cuts) // 4


def test_directory_and_missing_file(tmp_path):
    _expect_error(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_mindspore_ckpt(tmp_path / "missing.ckpt")


# ----------------------------------------------------------------------------------------------------------------------
# MindSpore / MindCV accept our exports (needs a Python with them: XCIT_MINDCV_PYTHON)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("XCIT_MINDCV_PYTHON"), reason="set XCIT_MINDCV_PYTHON to a MindCV python")
def test_mindcv_loads_exported_model(tmp_path):
    config, _ = load_fixture(SMALL)
    model = build(config)
    xcit.load_weights(model, SMALL.with_suffix(".ckpt"))
    path = tmp_path / "export.ckpt"
    write_mindspore_ckpt(path, timm_to_mindcv(model.state_dict()))
    proc = subprocess.run(
        [os.environ["XCIT_MINDCV_PYTHON"], str(ROOT / "scripts" / "make_mindcv_fixture.py"), "--verify-export", path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "export verification PASSED" in proc.stdout
