"""Hub-style weights: ``save_pretrained`` / ``from_pretrained`` in the layout the Hugging Face Hub and timm use.

A model folder holds two files:

* ``model.safetensors``: the state dict in this project's (= timm's) key layout, with architecture, numerics
  flavour and class names in the safetensors metadata;
* ``config.json``: timm's hub config (``architecture``, ``num_classes``, ``num_features``, ``label_names``,
  ``pretrained_cfg`` with ``input_size`` / ``mean`` / ``std`` / ``crop_pct`` / ``interpolation``, and
  ``model_args`` for any field that differs from the named variant) plus ``xcit_config``, the full
  :class:`xcit.XCiTConfig`, and ``flavour``.

Because the keys and ``config.json`` follow timm's conventions, ``timm.create_model("local-dir:FOLDER")`` (or
``"hf-hub:USER/REPO"`` once uploaded) loads the same weights in timm, and :func:`from_pretrained` also reads folders
written by timm (for example a download of ``timm/xcit_tiny_12_p16_224.fb_in1k``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from .fileio import atomic_write
from .model import XCiT, XCiTConfig
from .variants import VARIANTS, get_config
from .weights import WeightsError, load_state_dict_checked, read_weights, save_safetensors

log = logging.getLogger("xcit")

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# XCiTConfig fields that timm's xcit constructor accepts under the same name (timm/models/xcit.py Xcit.__init__)
_TIMM_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "drop_rate",
    "drop_path_rate",
    "cls_attn_layers",
    "eta",
    "tokens_norm",
)


def default_pretrained_cfg(model: XCiT, img_size: int | None = None) -> dict:
    """timm-style preprocessing of the official weights: bicubic, ImageNet mean/std, and a full centre crop
    (crop_pct 1.0: the official README's results use ``--full_crop``; timm records the same)."""
    size = img_size or model.cfg.img_size
    return {
        "architecture": model.name,
        "input_size": (model.cfg.in_chans, size, size),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": model.num_classes,
        "fixed_input_size": False,  # the Fourier encoding is recomputed per grid: any multiple of the patch works
        "first_conv": "patch_embed.proj.0.0",
        "classifier": "head",
    }


def hub_config(model: XCiT, pretrained_cfg: dict | None = None) -> dict:
    """The ``config.json`` contents for a model (see the module docstring)."""
    if not model.name or model.name not in VARIANTS:
        raise ValueError(
            f"save_pretrained needs the model's variant name (model.name is {model.name!r}); "
            "build it with xcit.create_model(NAME, ...) or set model.name"
        )
    base = get_config(model.name)
    cfg = replace(model.cfg, num_classes=model.num_classes)
    pcfg = dict(default_pretrained_cfg(model))
    pcfg.update(pretrained_cfg or {})
    config = {
        "architecture": model.name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "token",
        "pretrained_cfg": pcfg,
        "library_name": "xcit",
        "flavour": cfg.flavour,
        "xcit_config": asdict(cfg),
    }
    if model.class_names:
        config["label_names"] = list(model.class_names)
    model_args = {k: getattr(cfg, k) for k in _TIMM_ARGS if getattr(cfg, k) != getattr(base, k)}
    model_args.pop("drop_rate", None), model_args.pop("drop_path_rate", None)  # training-only, not architecture
    if model_args:
        config["model_args"] = model_args
    return config


def save_pretrained(model: XCiT, save_directory: str | os.PathLike, pretrained_cfg: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``save_directory`` (created if needed).

    ``pretrained_cfg`` overrides entries of the recorded preprocessing (``mean``, ``std``, ``crop_pct``, ...).
    Returns the folder. MindCV-flavoured weights are saved with their flavour; timm can load their tensors but
    only this package reproduces their numerics.
    """
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    config = hub_config(model, pretrained_cfg)
    meta = {"classes": json.dumps(config["label_names"])} if "label_names" in config else {}
    save_safetensors(model.state_dict(), out / WEIGHTS_NAME, model.name, model.flavour, **meta)
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    if model.flavour != "official":
        log.warning("%s: %r-flavour weights; timm would load them with official numerics", out, model.flavour)
    return out


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


def from_pretrained(
    name_or_path: str | os.PathLike,
    num_classes: int | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    **overrides,
) -> XCiT:
    """Load a model saved by :func:`save_pretrained` (or a timm hub folder) from a local folder or a Hub repo id.

    Args:
        name_or_path: a folder with ``config.json`` and ``model.safetensors``, or ``USER/REPO`` on the Hugging Face
            Hub (needs ``huggingface_hub`` and network; the files are cached).
        num_classes: replace the head with a fresh one of this size (fine-tuning); default: the saved head.
        revision, cache_dir: passed to ``huggingface_hub.snapshot_download``.
        **overrides: :class:`xcit.XCiTConfig` fields to change (``drop_path_rate``, ``img_size``, ...).
    """
    folder = _resolve_folder(name_or_path, revision, cache_dir)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}")
    config = json.loads(config_file.read_text())
    arch = config.get("architecture")
    if "xcit_config" in config:
        known = {f.name for f in fields(XCiTConfig)}
        cfg = XCiTConfig(**{k: v for k, v in config["xcit_config"].items() if k in known})
    elif arch in VARIANTS:  # a timm hub folder: the variant plus timm's model_args
        args = {k: v for k, v in config.get("model_args", {}).items() if k in _TIMM_ARGS}
        cfg = replace(get_config(arch), num_classes=config.get("num_classes", 1000), **args)
    else:
        raise WeightsError(f"{config_file}: architecture {arch!r} is not an XCiT variant")
    cfg = replace(cfg, **overrides)
    w = read_weights(_weights_file(folder))
    if "flavour" not in overrides and "xcit_config" not in config:
        cfg = replace(cfg, flavour=w.flavour)
    model = XCiT(cfg, name=arch)
    load_state_dict_checked(model, w.state_dict, source=folder)
    labels = config.get("label_names") or w.extra.get("classes")
    if isinstance(labels, dict):  # timm allows {index: name}
        labels = [labels[str(i)] if str(i) in labels else str(i) for i in range(cfg.num_classes)]
    model.class_names = list(labels) if labels and len(labels) == cfg.num_classes else None
    if num_classes is not None and num_classes != cfg.num_classes:
        log.info("%s: replacing the %d-class head with a new %d-class head", folder, cfg.num_classes, num_classes)
        model.reset_classifier(num_classes)
        model.class_names = None
    return model.eval()


def export_timm(model: XCiT, path: str | os.PathLike) -> Path:
    """Write a model's weights as a timm checkpoint (``.safetensors`` or ``.pth``) for
    ``timm.create_model(NAME, pretrained=True, num_classes=K, pretrained_cfg_overlay=dict(file=PATH, num_classes=K))``.

    The key layout is already timm's, so this is the bare state dict (no wrapper, no custom objects).
    """
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_safetensors(sd, path, model.name, model.flavour)
    else:
        atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return path


def timm_model(path: str | os.PathLike, model: XCiT):
    """The timm model a timm user gets for weights written by :func:`export_timm` from ``model`` (``model_args``
    carry any architecture change from the named variant)."""
    import timm

    k = model.num_classes
    args = hub_config(model).get("model_args", {})
    overlay = dict(file=str(path), num_classes=k)  # without num_classes here timm drops a head of another size
    return timm.create_model(model.name, pretrained=True, num_classes=k, pretrained_cfg_overlay=overlay, **args).eval()
