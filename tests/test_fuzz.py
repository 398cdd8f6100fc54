"""Property-based fuzzing: broken weight files, checkpoints, images and configs give clean, named errors.

"Clean" means one of this project's error types (all ``ValueError`` subclasses) or ``FileNotFoundError``, with a
message that names the file, instead of a traceback from inside torch, PIL, protobuf or safetensors; no hangs
(per-example deadline plus a per-test timeout) and no crashes.
"""

import io
import os
import struct
import tempfile
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import xcit
from xcit.data.imageio import MAX_PIXELS, ImageError, load_rgb
from xcit.runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xcit.weights.mindspore_ckpt import (
    MindSporeCheckpointError,
    read_mindspore_ckpt,
    timm_to_mindcv,
    write_mindspore_ckpt,
)

# XCIT_FUZZ_EXAMPLES=N XCIT_FUZZ_SEED=S runs a longer campaign with other examples (the suite: 60, fixed)
_CAMPAIGN = os.environ.get("XCIT_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_CAMPAIGN or 60),
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=_CAMPAIGN is None,  # the suite sees the same examples every run: a failure reproduces
)
CLEAN = (xcit.WeightsError, CheckpointError, MindSporeCheckpointError, ImageError)

_DIR = Path(tempfile.mkdtemp(prefix="xcit-fuzz-"))


def _tiny_state() -> dict[str, torch.Tensor]:
    model = xcit.create_model("xcit_nano_12_p16_224", embed_dim=16, depth=1, num_heads=2, num_classes=3, img_size=32)
    return model.state_dict()


def _bytes_of(write) -> bytes:
    p = _DIR / f"seed-{id(write)}"
    write(p)
    data = p.read_bytes()
    p.unlink()
    return data


def _weight_seeds() -> dict[str, bytes]:
    from safetensors.torch import save_file

    sd = _tiny_state()
    legacy = io.BytesIO()
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    zipped = io.BytesIO()
    torch.save({"model": sd, "arch": "xcit_nano_12_p16_224"}, zipped)
    return {
        ".pth": zipped.getvalue(),
        ".pt": legacy.getvalue(),  # legacy (non-zip) pickle format
        ".ckpt": _bytes_of(lambda p: write_mindspore_ckpt(p, timm_to_mindcv(sd))),
        ".safetensors": _bytes_of(lambda p: save_file(sd, str(p))),
        ".tar": _bytes_of(lambda p: save_checkpoint(p, {"model": sd, "arch": "x", "step": 3})),  # sealed checkpoint
    }


WEIGHT_SEEDS = _weight_seeds()


@st.composite
def mutated(draw, seeds: dict[str, bytes]):
    """A valid file of some format with a few bit flips, overwrites, insertions, deletions or a truncation."""
    suffix = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[suffix])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            del data[pos:]
    return suffix, bytes(data)


def _write(suffix: str, data: bytes) -> Path:
    p = _DIR / f"fuzz{suffix}"
    p.write_bytes(data)
    return p


def _expect_clean(fn, path: Path):
    """Run ``fn(path)``; success is fine, an error must be a clean one naming the file."""
    try:
        return fn(path)
    except CLEAN as e:
        assert path.name in str(e), f"error does not name the file: {e}"
    except FileNotFoundError:
        raise AssertionError("the file exists") from None
    return None


def _readers(suffix: str):
    readers = [xcit.read_weights]
    if suffix == ".ckpt":
        readers.append(read_mindspore_ckpt)
    if suffix in (".pth", ".pt", ".tar"):
        readers.append(load_checkpoint)
    return readers


def test_seed_files_are_valid():
    for suffix, data in WEIGHT_SEEDS.items():
        p = _write(suffix, data)
        for read in _readers(suffix):
            assert read(p) is not None


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # a mutated protocol byte
@pytest.mark.timeout(90)
@FUZZ
@given(mutated(WEIGHT_SEEDS))
def test_mutated_weight_files_give_clean_errors(case):
    suffix, data = case
    p = _write(suffix, data)
    for read in _readers(suffix):
        _expect_clean(read, p)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # a mutated protocol byte
@pytest.mark.timeout(90)
@FUZZ
@given(st.sampled_from(sorted(WEIGHT_SEEDS)), st.binary(max_size=2048))
def test_random_bytes_as_weight_files_give_clean_errors(suffix, data):
    p = _write(suffix, data)
    for read in _readers(suffix):
        _expect_clean(read, p)


@pytest.mark.timeout(60)
@FUZZ
@given(st.integers(0, len(WEIGHT_SEEDS[".tar"]) - 1), st.integers(0, 7))
def test_any_bit_flip_in_a_checkpoint_is_caught_by_the_checksum(pos, bit):
    data = bytearray(WEIGHT_SEEDS[".tar"])
    data[pos] ^= 1 << bit
    p = _write(".pth", bytes(data))
    with pytest.raises(CheckpointError, match="fuzz.pth"):
        load_checkpoint(p, require_checksum=True)


def test_missing_files_are_file_not_found():
    for read in (xcit.read_weights, load_checkpoint, load_rgb):
        with pytest.raises(FileNotFoundError):
            read(_DIR / "does-not-exist.pth")


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------


def _image_seeds() -> dict[str, bytes]:
    rgb = Image.radial_gradient("L").resize((24, 16)).convert("RGB")
    out = {}
    for name, im, fmt in [
        (".jpg", rgb, "JPEG"),
        (".cmyk.jpg", rgb.convert("CMYK"), "JPEG"),
        (".png", rgb, "PNG"),
        (".rgba.png", rgb.convert("RGBA"), "PNG"),
        (".p.png", rgb.convert("P"), "PNG"),
        (".16.png", Image.fromarray((torch.arange(24 * 16).reshape(16, 24) * 170).numpy().astype("uint16")), "PNG"),
        (".gif", rgb.convert("P"), "GIF"),
        (".bmp", rgb, "BMP"),
        (".tif", rgb, "TIFF"),
        (".webp", rgb, "WEBP"),
    ]:
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out[name] = buf.getvalue()
    return out


IMAGE_SEEDS = _image_seeds()


def _check_image(path: Path) -> None:
    im = _expect_clean(load_rgb, path)
    if im is not None:
        assert im.mode == "RGB" and im.width * im.height <= MAX_PIXELS


def test_image_seeds_decode_to_rgb():
    for suffix, data in IMAGE_SEEDS.items():
        im = load_rgb(_write(suffix, data))
        assert im.mode == "RGB" and im.size == (24, 16)


@pytest.mark.timeout(90)
@FUZZ
@given(mutated(IMAGE_SEEDS))
def test_mutated_images_give_rgb_or_clean_errors(case):
    _check_image(_write(*case))


@pytest.mark.timeout(60)
@FUZZ
@given(st.sampled_from([".jpg", ".png", ".gif", ".bin"]), st.binary(max_size=1024))
def test_random_bytes_as_images_give_clean_errors(suffix, data):
    _check_image(_write(suffix, data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels (valid signature, IHDR and CRC) and then one
    tiny IDAT: the classic decompression-bomb shape, a few dozen bytes promising gigabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif_header(width: int, height: int) -> bytes:
    """A GIF whose screen and single frame declare ``width`` x ``height`` with a 2-byte LZW stream."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"  # 2-colour table
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b"\x3b"


@pytest.mark.timeout(60)
@FUZZ
@given(
    st.sampled_from([_png_header, _gif_header]),
    st.integers(1, 65535),
    st.integers(MAX_PIXELS // 65535 + 1, 65535),
)
def test_decompression_bombs_are_refused_before_decoding(make, width, height):
    if width * height <= MAX_PIXELS:
        width = MAX_PIXELS // height + 1
    p = _write(".png" if make is _png_header else ".gif", make(width, height))
    with pytest.raises(ImageError, match=r"fuzz\.(png|gif): refused.*decompression bomb"):
        load_rgb(p)


def test_bomb_between_pils_warning_and_error_thresholds_is_refused():
    # PIL only warns between MAX_IMAGE_PIXELS and twice that; load_rgb refuses from the first threshold
    p = _write(".png", _png_header(10_000, MAX_PIXELS // 10_000 + 1))
    with pytest.raises(ImageError, match="decompression bomb"):
        load_rgb(p)


def test_empty_and_truncated_images_are_named():
    with pytest.raises(ImageError, match="fuzz.jpg: empty file"):
        load_rgb(_write(".jpg", b""))
    with pytest.raises(ImageError, match="fuzz.jpg: cannot decode image"):
        load_rgb(_write(".jpg", IMAGE_SEEDS[".jpg"][: len(IMAGE_SEEDS[".jpg"]) // 2]))


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------

_TRICKY = [
    "True",
    "none",
    "[1, 2",
    "{a: 1",
    "1e-5",
    "nan",
    "-inf",
    "1e999",
    "[0.1, nan]",
    "{embed_dim: 64}",
    "- -",
    "\x83",
]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(), st.text(max_size=16), st.sampled_from(_TRICKY)
)
_VALUES = st.recursive(
    _SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=2)
)


def _config_keys():
    from xcit.config.train_config import KEYS

    return st.one_of(st.sampled_from(KEYS), st.text(max_size=12))


def _check_config(make):
    import math

    from xcit.config.train_config import ConfigError

    try:
        cfg = make()
    except ConfigError as e:
        assert str(e)
        return
    for value in cfg.to_dict().values():  # a config that validates holds only finite numbers
        for x in value if isinstance(value, list) else [value]:
            assert not (isinstance(x, float) and not math.isfinite(x)), cfg


@pytest.mark.timeout(90)
@FUZZ
@given(st.dictionaries(st.deferred(_config_keys), _VALUES, max_size=3))
def test_config_values_give_clean_errors(values):
    from xcit.config.train_config import config_from_dict

    _check_config(lambda: config_from_dict(values))


@pytest.mark.timeout(90)
@FUZZ
@given(st.one_of(st.text(max_size=200), st.dictionaries(st.deferred(_config_keys), _VALUES, max_size=3)))
def test_config_yaml_files_give_clean_errors(content):
    import yaml

    from xcit.config.train_config import load_config

    text = content if isinstance(content, str) else yaml.safe_dump(content)
    p = _DIR / "fuzz.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check_config(lambda: load_config(["-c", str(p)])[0])


@pytest.mark.timeout(90)
@FUZZ
@given(st.lists(st.one_of(st.deferred(_config_keys).map(lambda k: f"--{k}"), st.text(max_size=10)), max_size=4))
def test_config_flags_give_clean_errors(argv):
    from xcit.config.train_config import load_config

    try:
        _check_config(lambda: load_config(argv)[0])
    except SystemExit as e:  # argparse's own usage error (e.g. a flag without its value): exit status 2
        assert e.code == 2


def test_non_finite_numbers_and_broken_yaml_lists_are_config_errors():
    from xcit.config.train_config import _TYPES, ConfigError, config_from_dict

    numeric = [k for k, tp in _TYPES.items() if "float" in str(tp)]
    listy = [k for k, tp in _TYPES.items() if any(s in str(tp) for s in ("list", "tuple", "dict"))]
    assert "lr" in numeric and "mean" in listy and "model_overrides" in listy
    for key in numeric:
        for bad in ("nan", "inf", float("nan"), float("-inf"), "1e999"):
            with pytest.raises(ConfigError, match=repr(key)):
                config_from_dict({key: bad})
    for key in listy:
        for bad in ("[1, 2", "{a: 1", "\x83", "!!python/object:os.system x"):
            with pytest.raises(ConfigError, match=repr(key)):
                config_from_dict({key: bad})


@pytest.mark.timeout(90)
@settings(FUZZ, max_examples=25)
@given(mutated(IMAGE_SEEDS))
def test_training_image_folder_skips_or_decodes_broken_files(case):
    """Through the training data path: a broken file is replaced by the good one when read, and named."""
    from xcit.data.pipeline import image_folder

    suffix, data = case
    cls = _DIR / "folder" / "a"
    cls.mkdir(parents=True, exist_ok=True)
    for old in cls.iterdir():
        old.unlink()
    (cls / f"broken{suffix}").write_bytes(data)
    (cls / "good.png").write_bytes(IMAGE_SEEDS[".png"])
    ds = image_folder(_DIR / "folder")
    assert 1 <= len(ds) <= 2 and len(ds) + len(ds.listing.not_images) == 2
    for i in range(len(ds)):
        img, label, bad = ds[i]
        assert img.mode == "RGB" and label == 0 and all("broken" in msg for msg in bad)


@pytest.mark.parametrize("policy", ["rand-m10-inc1", "rand-m0", "randaug-m9-mstd0.5-inc1"])
def test_randaugment_extremes_never_raise(policy):
    """Posterize keeps 0 bits at magnitude 10 (increasing variant) or 0 (plain): a black image, not a ValueError."""
    import random

    from xcit.config.train_config import config_from_dict
    from xcit.data.pipeline import train_transform

    transform = train_transform(config_from_dict({"auto_augment": policy, "image_resize": 16, "re_prob": 0.25}))
    image = Image.open(io.BytesIO(IMAGE_SEEDS[".png"])).convert("RGB")
    random.seed(0)
    for _ in range(300):  # posterize is drawn for ~1 image in 8
        assert transform(image).shape == (3, 16, 16)
