"""Limits checked before anything is allocated from a value: architecture fields (from ``model_overrides``, a
checkpoint's recorded ``model_config`` or a hub ``config.json``), the run values of a training config, what a weight
file records about itself, and the inflated size of a PyTorch zip file.

A value past a limit is refused with one line naming the value (and the file it came from) and the limit, instead of
a multi-gigabyte allocation or a ``TypeError`` / ``ZeroDivisionError`` deep in the model.
"""

from __future__ import annotations

import math
import numbers
import os
import zipfile
from collections.abc import Mapping
from typing import IO, Any

from .errors import WeightsError

MAX_DEPTH = 1024  # XCA blocks (the largest published XCiT has 24)
MAX_EMBED_DIM = 16384
MAX_IMAGE_SIZE = 4096  # pixels per side, for img_size and image_resize
MAX_CLASSES = 10_000_000
MAX_PARAMS = 20_000_000_000  # 80 GB of fp32 weights; the largest published XCiT has 189 M
MAX_BATCH = 1 << 20  # images per process and step
MAX_SEED = (1 << 32) - (1 << 16)  # numpy's seeds are 32-bit, and each rank adds its rank
MAX_LR = 1e6
ZIP_INFLATION = 4  # torch.save stores tensors uncompressed: a PyTorch zip inflates to about its own size

# field -> (lowest, highest); ints must be integers, the others finite numbers
_ARCH_INTS = {
    "embed_dim": (8, MAX_EMBED_DIM),
    "depth": (1, MAX_DEPTH),
    "num_heads": (1, MAX_EMBED_DIM),
    "patch_size": (1, 64),
    "img_size": (1, MAX_IMAGE_SIZE),
    "cls_attn_layers": (0, MAX_DEPTH),
    "num_classes": (0, MAX_CLASSES),
    "in_chans": (1, 64),
}
_ARCH_FLOATS = {
    "mlp_ratio": (1 / 64, 64.0),
    "eta": (0.0, 1e6),
    "drop_rate": (0.0, 1.0),
    "head_drop_rate": (0.0, 1.0),
    "drop_path_rate": (0.0, 1.0),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_range(key: str, v: Any, lo: float, hi: float, integer: bool) -> None:
    if integer and not _is_int(v):
        raise ValueError(f"{key} must be an integer, got {v!r}")
    if not integer and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
        raise ValueError(f"{key} must be a finite number, got {v!r}")
    if not lo <= v <= hi:
        shown = (lo, hi, v) if integer else tuple(format(x, "g") for x in (lo, hi, v))
        raise ValueError(f"{key} must be in [{shown[0]}, {shown[1]}], got {shown[2]}")


def estimated_params(arch: Mapping[str, Any]) -> float:
    """Weights of an architecture, to within a few percent: blocks and class attention (qkv, proj, MLP), the head."""
    d, mlp = arch.get("embed_dim", 192), arch.get("mlp_ratio", 4.0)
    blocks = arch.get("depth", 12) + arch.get("cls_attn_layers", 2)
    return blocks * (4 + 2 * mlp) * d * d + arch.get("num_classes", 1000) * d


def check_architecture(arch: Mapping[str, Any]) -> None:
    """Types and ranges of the architecture fields present in ``arch``, then the parameter count; ValueError."""
    for key, (lo, hi) in _ARCH_INTS.items():
        if key in arch:
            _check_range(key, arch[key], lo, hi, True)
    for key, (lo, hi) in _ARCH_FLOATS.items():
        if key in arch:
            _check_range(key, arch[key], lo, hi, False)
    if arch.get("num_heads", 1) > arch.get("embed_dim", MAX_EMBED_DIM):
        raise ValueError(f"num_heads must be at most embed_dim, got {arch['num_heads']} > {arch['embed_dim']}")
    params = estimated_params(arch)
    if params > MAX_PARAMS:
        raise ValueError(f"the architecture has about {params:.3g} parameters, more than the limit of {MAX_PARAMS:.0e}")


def check_config_limits(cfg: Any, variant: Any) -> None:
    """A training config's ``model_overrides`` (built into ``variant``, the named variant's architecture record)
    and the values that size an allocation or seed a generator: :class:`ConfigError` naming the key, before any
    work."""
    from dataclasses import replace

    from .errors import ConfigError

    try:
        replace(variant, **cfg.model_overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad value for 'model_overrides': {e}") from None
    try:
        _check_run_values(cfg)
    except ValueError as e:
        raise ConfigError(f"bad value for {str(e).split()[0]!r}: {e}") from None


def _check_run_values(cfg: Any) -> None:
    limits = {"seed": (0, MAX_SEED), "batch_size": (1, MAX_BATCH), "image_resize": (1, MAX_IMAGE_SIZE)}
    limits.update({k: (0, (1 << 31) - 1) for k in ("epoch_size", "gradient_accumulation_steps", "num_samples")})
    for key, (lo, hi) in limits.items():
        v = getattr(cfg, key, None)
        if v is not None:
            _check_range(key, v, lo, hi, True)
    _check_range("lr", cfg.lr, 0.0, MAX_LR, False)


def check_recorded(path: object, model_config: Mapping, config: Mapping, state_dict: Mapping) -> None:
    """What a weight file records about the model it holds, checked before a model is built from it: the
    architecture's limits, its depth against the blocks the file holds, and the evaluation resolution."""
    try:
        check_architecture(model_config)
        if "image_resize" in config:
            _check_range("image_resize", config["image_resize"], 1, MAX_IMAGE_SIZE, True)
    except ValueError as e:
        raise WeightsError(f"{path}: the recorded {e}") from None
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.count(".") > 1}
    if blocks and "depth" in model_config and model_config["depth"] != len(blocks):
        raise WeightsError(f"{path}: records depth {model_config['depth']} but holds {len(blocks)} blocks")


def check_zip_inflation(f: IO[bytes], path: object) -> None:
    """Refuse a zip whose members inflate to more than ``ZIP_INFLATION`` x the file's size (+ 1 MiB), read from its
    central directory before any member is extracted. A file that is not a readable zip is left to torch."""
    size = os.fstat(f.fileno()).st_size
    try:
        with zipfile.ZipFile(f) as z:
            inflated = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    finally:
        f.seek(0)
    limit = ZIP_INFLATION * size + (1 << 20)
    if inflated > limit:
        raise WeightsError(
            f"{path}: its zip members inflate to {inflated / 2**30:.2f} GiB, more than the limit of {ZIP_INFLATION}x "
            f"the file's {size / 2**20:.1f} MiB + 1 MiB (PyTorch stores tensors uncompressed): refused before reading"
        )


# fields that only regularise training or size the head (checked against the class list separately)
_NOT_ARCHITECTURE = ("num_classes", "drop_rate", "head_drop_rate", "drop_path_rate")


def check_same_architecture(path: object, recorded: Mapping | None, built: Mapping[str, Any]) -> None:
    """Refuse to resume a checkpoint whose recorded architecture (``model_config``) differs from the run's, naming
    the fields, instead of a ``load_state_dict`` traceback. A checkpoint that records none is not checked here."""
    from .errors import ConfigError

    if not recorded:
        return
    differ = [
        f"{k} {recorded[k]!r} (this run: {built[k]!r})"
        for k in built
        if k in recorded and k not in _NOT_ARCHITECTURE and recorded[k] != built[k]
    ]
    if differ:
        raise ConfigError(
            f"{path} was trained with another architecture: {', '.join(differ)}; resume with the same model_overrides "
            f"(its config.yaml), or start a new run in another ckpt_save_dir"
        )
