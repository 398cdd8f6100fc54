"""Building a model from a weight file or a hub folder: the one path every command takes.

:func:`xcit.read_weights` reads a file once (a training checkpoint's checksum is checked while it is read) into a
:class:`xcit.weights.files.Weights`; :func:`model_from_weights` builds the model those weights fit and loads them;
:func:`load_model` does both for a file or a ``save_pretrained`` folder (:func:`from_pretrained`).

The architecture comes from, in order: a training checkpoint's recorded ``model_config`` (overrides included);
else the named variant (or the one the file records) with the fields the tensors' shapes pin down (width, depth,
heads, patch, class-attention layers, input channels, MLP ratio); explicit ``overrides`` apply last. An
``in_chans`` other than the file's adapts the stem convolution as timm does (:func:`adapt_input_channels`). Each
model carries timm's ``pretrained_cfg`` (the evaluation preprocessing the file records, else the defaults of
:class:`xcit.model.preprocessing.Preprocessing`) and ``feature_info``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields, replace
from pathlib import Path

import torch

from ..fast import accelerate
from ..model.arch import VARIANTS, XCiTConfig, get_config
from ..model.preprocessing import Preprocessing, timm_conventions
from ..model.xcit import XCiT
from .files import Weights, WeightsError, arch_from_state_dict, load_state_dict_checked, read_weights
from .hub import CONFIG_NAME, TIMM_ARGS, WEIGHTS_NAME

log = logging.getLogger("xcit")

_FIELDS = {f.name for f in fields(XCiTConfig)}
_NOT_ARCH = ("num_classes", "drop_path_rate")  # a recorded head size and training setting, not the architecture


def load_model(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    use_ema: bool | None = None,
    num_classes: int | None = None,
    strict: bool = True,
    **overrides,
) -> XCiT:
    """The model stored at ``path`` (any supported weight file, or a ``save_pretrained`` / timm hub folder), in
    eval mode. ``use_ema=None`` takes the EMA weights when the file has them; ``num_classes`` other than the
    file's replaces the head (fine-tuning); ``overrides`` are :class:`xcit.XCiTConfig` fields."""
    if Path(path).is_dir():
        model = from_pretrained(path, num_classes=num_classes, **overrides)
        if name and name != model.name:
            raise ValueError(f"--model {name} does not match the folder's architecture {model.name}")
        return model
    w = read_weights(path, use_ema=use_ema)
    return model_from_weights(w, name, num_classes=num_classes, strict=strict, **overrides).eval()


def model_from_weights(
    w: Weights,
    name: str | None = None,
    *,
    num_classes: int | None = None,
    strict: bool = True,
    trust_name: bool = False,
    **overrides,
) -> XCiT:
    """Build the model ``w`` fits (see the module docstring) and load it. ``trust_name`` builds exactly the named
    variant plus ``overrides`` (:func:`xcit.create_model`'s rule), so weights of another shape are reported."""
    recorded = {k: v for k, v in w.model_config.items() if k in _FIELDS and k not in _NOT_ARCH}
    if recorded and not trust_name:
        if name and w.arch and name != w.arch:
            log.info("%s holds %s; loading that (%s was asked for)", w.source, w.arch, name)
        name = w.arch or name
        base = XCiTConfig(**recorded)
    else:
        name = name or w.arch
        if name is None:
            raise ValueError(f"{w.source} does not record its architecture: pass --model NAME")
        base = get_config(name)
        if not trust_name:
            found = arch_from_state_dict(w.state_dict)
            base = replace(base, **{k: type(getattr(base, k))(v) for k, v in found.items() if v != getattr(base, k)})
    file_classes = w.num_classes
    n_cls = num_classes if num_classes is not None else (file_classes if file_classes is not None else 1000)
    if "flavour" not in overrides and w.flavour != base.flavour:
        log.info("%s: %s weights, using the %r numerics flavour", w.source, w.source_format, w.flavour)
        overrides["flavour"] = w.flavour
    model = XCiT(replace(base, num_classes=n_cls, **overrides), name=name)
    drop = num_classes is not None and file_classes is not None and num_classes != file_classes
    sd = adapt_input_channels(w.state_dict, model.cfg.in_chans, w.source)
    load_state_dict_checked(model, sd, strict=strict, drop_head=drop, source=w.source)
    classes = w.extra.get("classes")
    model.class_names = list(classes) if classes and not drop else None
    timm_conventions(model, w.preprocessing)
    epoch = f" from epoch {w.extra['epoch']}" if "epoch" in w.extra else ""
    if w.used_ema:
        log.info("%s: EMA weights%s", w.source, epoch)
    elif w.has_ema:
        log.info("%s: model weights%s (its EMA weights are not used)", w.source, epoch)
    return accelerate(model)  # the fast forwards, as xcit.create_model gives them (validate, predict)


def adapt_input_channels(sd: dict[str, torch.Tensor], in_chans: int, source: object) -> dict[str, torch.Tensor]:
    """``sd`` with its stem convolution (``...patch_embed.proj.0.0.weight``) adapted to ``in_chans`` input channels
    by timm's ``adapt_input_conv``: summed over the file's channels for 1 (a grey image then gives what its
    3-channel copy gives), repeated and scaled by ``3 / in_chans`` for more. A notice says so; other keys are
    untouched."""
    from timm.models import adapt_input_conv

    out = dict(sd)
    for k, v in sd.items():
        if k.endswith("patch_embed.proj.0.0.weight") and v.ndim == 4 and v.shape[1] != in_chans:
            out[k] = adapt_input_conv(in_chans, v, base_chans=v.shape[1])
            how = "summed" if in_chans == 1 else f"repeated and scaled by {v.shape[1]}/{in_chans}"
            log.info("%s: stem convolution adapted from %d to %d input channels (%s)", source, v.shape[1],
                     in_chans, how)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Hub folders
# ----------------------------------------------------------------------------------------------------------------------


def from_pretrained(
    name_or_path: str | os.PathLike,
    num_classes: int | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    **overrides,
) -> XCiT:
    """Load a model saved by :func:`xcit.weights.hub.save_pretrained` (or a timm hub folder) from a local folder or a
    Hub repo id.

    Args:
        name_or_path: a folder with ``config.json`` and ``model.safetensors``, or ``USER/REPO`` on the Hugging Face
            Hub (needs ``huggingface_hub`` and network; the files are cached).
        num_classes: replace the head with a fresh one of this size (fine-tuning); default: the saved head.
        revision: passed to ``huggingface_hub.snapshot_download``.
        cache_dir: passed to ``huggingface_hub.snapshot_download``.
        **overrides: :class:`xcit.XCiTConfig` fields to change (``drop_path_rate``, ``img_size``, ...).
    """
    folder = _resolve_folder(name_or_path, revision, cache_dir)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}")
    config = json.loads(config_file.read_text())
    arch = config.get("architecture")
    if "xcit_config" in config:
        cfg = XCiTConfig(**{k: v for k, v in config["xcit_config"].items() if k in _FIELDS})
    elif arch in VARIANTS:  # a timm hub folder: the variant plus timm's model_args
        args = {k: v for k, v in config.get("model_args", {}).items() if k in TIMM_ARGS}
        if isinstance(args.get("img_size"), (list, tuple)):  # timm records (H, W); any multiple of the patch runs
            args["img_size"] = int(max(args["img_size"]))
        cfg = replace(get_config(arch), num_classes=config.get("num_classes", 1000), **args)
    else:
        raise WeightsError(f"{config_file}: architecture {arch!r} is not an XCiT variant")
    cfg = replace(cfg, **overrides)
    w = read_weights(_weights_file(folder))
    if "flavour" not in overrides and "xcit_config" not in config:
        cfg = replace(cfg, flavour=w.flavour)
    model = XCiT(cfg, name=arch)
    load_state_dict_checked(model, adapt_input_channels(w.state_dict, cfg.in_chans, folder), source=folder)
    labels = config.get("label_names") or w.extra.get("classes")
    if isinstance(labels, dict):  # timm allows {index: name}
        labels = [labels[str(i)] if str(i) in labels else str(i) for i in range(cfg.num_classes)]
    model.class_names = list(labels) if labels and len(labels) == cfg.num_classes else None
    if num_classes is not None and num_classes != cfg.num_classes:
        log.info("%s: replacing the %d-class head with a new %d-class head", folder, cfg.num_classes, num_classes)
        model.reset_classifier(num_classes)
        model.class_names = None
    recorded = config.get("pretrained_cfg")
    timm_conventions(model, Preprocessing.from_pretrained_cfg(recorded) if recorded else None)
    return accelerate(model).eval()  # the fast forwards, as xcit.create_model gives them


def _resolve_folder(name_or_path: str | os.PathLike, revision: str | None, cache_dir: str | None) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"{name_or_path}: not a model folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{name_or_path}: no such folder, and huggingface_hub is not installed to fetch it from the Hub "
            "(pip install huggingface_hub)"
        ) from None
    patterns = [CONFIG_NAME, "*.safetensors", "pytorch_model.bin"]
    try:
        folder = snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, ...: one clear message
        raise FileNotFoundError(
            f"{name_or_path}: no such local folder, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from e
    return Path(folder)


def _weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, "open_clip_model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} (or pytorch_model.bin) in the folder")
