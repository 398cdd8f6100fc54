"""Hub-style weights: ``save_pretrained`` / ``from_pretrained`` in the layout the Hugging Face Hub and timm use.
``model`` is an :class:`xcit.XCiT` throughout.

A model folder holds two files:

* ``model.safetensors``: the state dict in this project's (= timm's) key layout, with architecture, numerics
  flavour and class names in the safetensors metadata;
* ``config.json``: timm's hub config (``architecture``, ``num_classes``, ``num_features``, ``label_names``,
  ``pretrained_cfg`` with ``input_size`` / ``mean`` / ``std`` / ``crop_pct`` / ``interpolation``, and
  ``model_args`` for any field that differs from the named variant) plus ``xcit_config``, the full
  :class:`xcit.XCiTConfig`, and ``flavour``.

Because the keys and ``config.json`` follow timm's conventions, ``timm.create_model("local-dir:FOLDER")`` (or
``"hf-hub:USER/REPO"`` once uploaded) loads the same weights in timm, and :func:`from_pretrained` also reads folders
written by timm (for example a download of ``timm/xcit_tiny_12_p16_224.fb_in1k``). Reading lives in
:mod:`xcit.weights.loading`; this module writes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from ..model import preprocessing
from ..model.arch import VARIANTS, get_config
from ..runtime.fileio import atomic_write
from .files import save_safetensors

log = logging.getLogger("xcit")

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# XCiTConfig fields that timm's xcit constructor accepts under the same name and meaning (timm/models/xcit.py
# Xcit.__init__). Not drop_rate: timm's is the head dropout (head_drop_rate here), ours the official one
TIMM_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "drop_path_rate",
    "cls_attn_layers",
    "eta",
    "tokens_norm",
)


def hub_config(model: nn.Module, pretrained_cfg: dict | None = None) -> dict:
    """The ``config.json`` contents for a model (see the module docstring)."""
    if not model.name or model.name not in VARIANTS:
        raise ValueError(
            f"save_pretrained needs the model's variant name (model.name is {model.name!r}); "
            "build it with xcit.create_model(NAME, ...) or set model.name"
        )
    base = get_config(model.name)
    cfg = replace(model.cfg, num_classes=model.num_classes)
    pcfg = preprocessing.pretrained_cfg(model, preprocessing.model_preprocessing(model))
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
    model_args = {k: getattr(cfg, k) for k in TIMM_ARGS if getattr(cfg, k) != getattr(base, k)}
    model_args.pop("drop_path_rate", None)  # training-only, not architecture
    if model_args:
        config["model_args"] = model_args
    return config


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, pretrained_cfg: dict | None = None) -> Path:
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


def export_timm(model: nn.Module, path: str | os.PathLike) -> Path:
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


def timm_model(path: str | os.PathLike, model: nn.Module):
    """The timm model a timm user gets for weights written by :func:`export_timm` from ``model`` (``model_args``
    carry any architecture change from the named variant)."""
    import timm

    k = model.num_classes
    args = hub_config(model).get("model_args", {})
    overlay = dict(file=str(path), num_classes=k)  # without num_classes here timm drops a head of another size
    return timm.create_model(model.name, pretrained=True, num_classes=k, pretrained_cfg_overlay=overlay, **args).eval()
