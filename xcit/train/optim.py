"""Parameter groups, the optimiser, the per-step learning-rate schedule and the weight EMA.

**Weight decay groups** (``weight_decay_filter``):

* ``official`` (default): the official recipe exactly. ``main.py`` calls timm 0.4's ``create_optimizer``, whose
  ``add_weight_decay`` exempts parameters with ``len(shape) == 1``, names ending in ``.bias`` and the model's
  ``no_weight_decay()`` names (``cls_token``). So LayerNorm/BatchNorm weights, all biases and the LayerScale
  gammas get no decay, while the XCA ``temperature`` (shape ``(heads, 1, 1)``, three dimensions) IS decayed,
  as are ``cls_token``-free conv and linear weights.
* ``all``: additionally exempts every ``temperature`` (norms, biases, gammas and ``cls_token`` already are).
* ``norm_and_bias``: MindCV's filter: 1-D parameters and biases only (``cls_token`` and ``temperature`` decayed).
* ``disable``: decay everything.

**Layer-wise lr decay** (``layer_decay``, BEiT/timm style): layer id 0 is the stem (patch embedding, positional
encoding, ``cls_token``, as timm's ``group_matcher`` for XCiT), XCA block ``i`` is ``i + 1``, class attention,
the final norm and the head are ``depth + 1``; a parameter's lr is ``lr x layer_decay ** (depth + 1 - id)``.

The learning-rate schedule is in :mod:`xcit.train.schedule`, the weight EMA in :mod:`xcit.train.ema`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config.mindcv_rules import MINDCV_EPS, WD_FILTERS
from .mindspore_optim import MindCVNAdam, MindSporeAdam


def layer_id(name: str, depth: int) -> int:
    """Layer index of a parameter for layer-wise lr decay: 0 stem, 1..depth XCA blocks, depth + 1 the rest."""
    if name.startswith(("patch_embed.", "pos_embed.", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def _no_decay(name: str, p: torch.Tensor, wd_filter: str, skip: set[str]) -> bool:
    one_d = p.ndim <= 1 or name.endswith(".bias")
    if wd_filter == "disable":
        return False
    if wd_filter == "norm_and_bias":
        return one_d
    if wd_filter == "all":
        return one_d or name in skip or name.endswith("temperature")
    return one_d or name in skip  # official


def param_groups(
    model: nn.Module, weight_decay: float, wd_filter: str = "official", layer_decay: float | None = None
) -> list[dict]:
    """Optimiser parameter groups: ``weight_decay`` 0 or ``weight_decay`` per the filter, and an ``lr_scale``
    per layer when ``layer_decay`` is set. Each group lists its ``param_names``."""
    if wd_filter not in WD_FILTERS:
        raise ValueError(f"weight_decay_filter must be one of {WD_FILTERS}, got {wd_filter!r}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = _no_decay(name, p, wd_filter, skip)
        lid = layer_id(name, depth) if layer_decay else depth + 1
        scale = layer_decay ** (depth + 1 - lid) if layer_decay else 1.0
        g = groups.setdefault(
            (lid, no_wd),
            {"params": [], "param_names": [], "weight_decay": 0.0 if no_wd else weight_decay, "lr_scale": scale},
        )
        g["params"].append(p)
        g["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


# The epsilon of each optimiser as MindCV builds it: create_optimizer passes its ``eps`` to RMSProp only, every other
# optimiser keeps its class default (mindcv/optim/adamw.py, nadam.py; mindspore.nn.Adam, nn.Lamb); the rest have none


def create_optimizer(
    groups: list[dict],
    opt: str,
    lr: float,
    momentum: float = 0.9,
    eps: float = 1e-10,
    nesterov: bool = False,
    device: torch.device | str = "cpu",
) -> torch.optim.Optimizer:
    """The optimiser named by MindCV's ``opt``, with MindCV's formula and defaults (``momentum`` reaches sgd,
    momentum and rmsprop, ``eps`` rmsprop only, as in MindCV's ``create_optimizer``). Weight decay is decoupled for
    adamw, lamb and lion and an L2 gradient term for the others, as in MindSpore. torch kernels (fused on CUDA,
    foreach otherwise) where torch has the formula, timm's otherwise."""
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    fast = {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}
    if opt == "adamw":  # mindcv/optim/adamw.py: eps after the bias-corrected sqrt(v), as torch
        return torch.optim.AdamW(groups, lr=lr, eps=MINDCV_EPS[opt], **fast)
    if opt == "adam":
        return MindSporeAdam(groups, lr=lr, eps=MINDCV_EPS[opt], **fast)
    if opt in ("sgd", "momentum"):  # nn.SGD (dampening 0) and nn.Momentum: torch's SGD
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **fast)
    if opt == "nadam":
        return MindCVNAdam(groups, lr=lr, eps=MINDCV_EPS[opt])
    if opt == "adagrad":  # nn.Adagrad: accumulator starts at 0.1, no epsilon
        return torch.optim.Adagrad(groups, lr=lr, initial_accumulator_value=0.1, eps=0.0, foreach=True)
    from timm.optim import Lamb, Lion, RMSpropTF

    if opt == "rmsprop":  # nn.RMSProp: decay 0.9, mean square starts at 1, eps inside the sqrt, lr in the momentum
        return RMSpropTF(groups, lr=lr, alpha=0.9, eps=eps, momentum=momentum, lr_in_momentum=True)
    if opt == "lamb":  # nn.Lamb: no gradient clipping, the trust ratio on every parameter
        return Lamb(groups, lr=lr, eps=MINDCV_EPS[opt], max_grad_norm=None, always_adapt=True)
    if opt == "lion":  # mindcv/optim/lion.py: betas (0.9, 0.99), decoupled decay
        return Lion(groups, lr=lr, betas=(0.9, 0.99))
    raise ValueError(f"unknown optimiser {opt!r}")
