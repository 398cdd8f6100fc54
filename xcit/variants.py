"""The 28 official XCiT variants, ``create_model`` and ``list_models``."""

from __future__ import annotations

import difflib
import logging
from dataclasses import fields, replace
from pathlib import Path

from .model import XCiT, XCiTConfig, XCiTPyramid
from .weights import load_state_dict_checked, read_weights

log = logging.getLogger("xcit")

# (embed_dim, depth, num_heads, eta, tokens_norm): paper table 1 / official xcit.py
_SIZES: dict[str, tuple[int, int, int, float, bool]] = {
    "nano_12": (128, 12, 4, 1.0, False),
    "tiny_12": (192, 12, 4, 1.0, True),
    "tiny_24": (192, 24, 4, 1e-5, True),
    "small_12": (384, 12, 8, 1.0, True),
    "small_24": (384, 24, 8, 1e-5, True),
    "medium_24": (512, 24, 8, 1e-5, True),
    "large_24": (768, 24, 16, 1e-5, True),
}

VARIANTS: dict[str, XCiTConfig] = {
    f"xcit_{size}_p{p}_{res}": XCiTConfig(
        embed_dim=d, depth=depth, num_heads=h, eta=eta, tokens_norm=tn, patch_size=p, img_size=res
    )
    for size, (d, depth, h, eta, tn) in _SIZES.items()
    for p in (16, 8)
    for res in (224, 384)
}

# ImageNet-1k top-1 of the official weights (paper table 9; 384 = distilled, fine-tuned at 384)
_TOP1 = {
    "nano_12": ((69.9, 75.4), (73.8, 77.8)),
    "tiny_12": ((77.1, 80.9), (79.7, 82.4)),
    "tiny_24": ((79.4, 82.6), (81.9, 83.7)),
    "small_12": ((82.0, 84.7), (83.4, 85.1)),
    "small_24": ((82.6, 85.1), (83.9, 85.6)),
    "medium_24": ((82.7, 85.4), (83.7, 85.8)),
    "large_24": ((82.9, 85.8), (84.4, 86.0)),
}


def official_top1(name: str) -> float:
    """The paper's ImageNet top-1 for a variant's official weights."""
    size = name[len("xcit_") :].rsplit("_p", 1)[0]
    p16, p8 = _TOP1[size]
    return (p16 if "_p16_" in name else p8)[1 if name.endswith("_384") else 0]


def list_models(pattern: str = "") -> list[str]:
    """Names of all official variants, optionally filtered by a substring."""
    return [n for n in VARIANTS if pattern in n]


def get_config(name: str) -> XCiTConfig:
    """The architecture of a named variant; an unknown name raises with the closest matches."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(name, list(VARIANTS), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} See `xcit models` for all {len(VARIANTS)} names.")
    return VARIANTS[name]


_CFG_FIELDS = {f.name for f in fields(XCiTConfig)}


def create_model(
    name: str,
    pretrained: str | Path | None = None,
    num_classes: int | None = None,
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: list[int] | None = None,
    strict: bool = True,
    use_ema: bool = False,
    **overrides,
) -> XCiT | XCiTPyramid:
    """Build a variant by name.

    Args:
        name: one of :func:`list_models`.
        pretrained: path to weights in any supported format (official ``.pth``, timm ``.pth``/``.safetensors``,
            MindCV ``.ckpt``, or this project's checkpoints). MindCV weights switch the model to the ``mindcv``
            numerics flavour. If ``num_classes`` differs from the file's head, the head is dropped with a notice.
        num_classes: classifier size (0 for no head). Default: the weight file's, else 1000. Asking for a size
            other than the file's replaces its head with a new one (logged).
        drop_path_rate: stochastic depth, constant across blocks.
        in_chans: input channels.
        features_only: return an :class:`XCiTPyramid` giving stride 4/8/16/32 maps instead of a classifier.
        out_indices: blocks tapped by the pyramid (default: the official detection backbone's).
        strict: refuse weight files with missing or unexpected keys.
        use_ema: load the EMA copy of a training checkpoint.
        **overrides: any :class:`XCiTConfig` field (``embed_dim``, ``depth``, ``flavour``, ``drop_rate``, ...).
    """
    unknown = set(overrides) - _CFG_FIELDS
    if unknown:
        bad = sorted(unknown)[0]
        close = difflib.get_close_matches(bad, sorted(_CFG_FIELDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"create_model got an unknown argument {bad!r}{hint}")
    w = read_weights(pretrained, use_ema=use_ema) if pretrained is not None else None
    file_classes = w.num_classes if w is not None else None
    n_cls = num_classes if num_classes is not None else (file_classes if file_classes is not None else 1000)
    if w is not None and "flavour" not in overrides and w.flavour != "official":
        log.info("%s: %s weights, using the %r numerics flavour", pretrained, w.source_format, w.flavour)
        overrides["flavour"] = w.flavour
    cfg = replace(get_config(name), num_classes=n_cls, drop_path_rate=drop_path_rate, in_chans=in_chans, **overrides)
    model = XCiT(cfg, name=name)
    if w is not None:
        drop = num_classes is not None and file_classes is not None and num_classes != file_classes
        load_state_dict_checked(model, w.state_dict, strict=strict, drop_head=drop, source=pretrained)
        if "classes" in w.extra:
            model.class_names = list(w.extra["classes"])
    if features_only:
        return XCiTPyramid(model, out_indices)
    return model


def gmacs(cfg: XCiTConfig, img_size: int | tuple[int, int] | None = None) -> float:
    """Multiply-accumulates of one forward pass, in billions, counted analytically (convs, linears, XCA, CA)."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else (img_size or (cfg.img_size, cfg.img_size))
    D, p = cfg.embed_dim, cfg.patch_size
    macs = 0
    # patch embedding: 3x3 stride-2 convs
    n = 4 if p == 16 else 3
    widths = [cfg.in_chans] + [D // 2 ** (n - 1 - i) for i in range(n)]
    h, w = H, W
    for i in range(n):
        h, w = (h + 1) // 2, (w + 1) // 2
        macs += h * w * widths[i] * widths[i + 1] * 9
    N = h * w
    macs += N * 64 * D  # pos-enc projection
    hid = int(D * cfg.mlp_ratio)
    d = D // cfg.num_heads
    per_block = N * D * 3 * D + 2 * N * d * D + N * D * D  # qkv, q^T k and attn @ v, proj
    per_block += 2 * N * D * 9  # two depthwise 3x3 convs
    per_block += 2 * N * D * hid  # MLP
    macs += cfg.depth * per_block
    per_ca = D * D + 2 * (N + 1) * D * D + 2 * (N + 1) * D + D * D + 2 * D * hid  # q, k, v, attn, proj, mlp (cls)
    macs += cfg.cls_attn_layers * per_ca
    macs += D * cfg.num_classes
    return macs / 1e9
