"""The architecture record (:class:`XCiTConfig`) and the 28 official variants: data only, no modules or files."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..runtime.limits import check_architecture

FLAVOURS: tuple[str, ...] = ("official", "mindcv")


@dataclass(frozen=True)
class XCiTConfig:
    """Architecture of one XCiT model. Variants are instances of this (see :mod:`xcit.weights.factory`)."""

    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 4
    patch_size: int = 16
    img_size: int = 224  # default (training) resolution; any multiple of patch_size runs
    mlp_ratio: float = 4.0
    eta: float = 1.0  # LayerScale init: 1.0 for depth 12, 1e-5 for depth 24 (paper sec. 4.1)
    tokens_norm: bool = True  # False only for nano
    cls_attn_layers: int = 2
    num_classes: int = 1000
    in_chans: int = 3
    # official xcit.py and MindCV: dropout after the positional encoding, after the XCA and class-attention
    # projections and twice in every MLP (after the GELU and after fc2). timm calls these pos_drop_rate/proj_drop_rate
    drop_rate: float = 0.0
    head_drop_rate: float = 0.0  # dropout before the head: timm's drop_rate (the official code and MindCV have none)
    drop_path_rate: float = 0.0  # constant across blocks, not a linear ramp (official xcit.py)
    flavour: str = "official"

    def __post_init__(self) -> None:
        check_architecture(vars(self))  # types, ranges and size, before any division or allocation
        if self.patch_size not in (8, 16):
            raise ValueError(f"patch_size must be 8 or 16 (conv patch embedding), got {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 8:
            raise ValueError(f"embed_dim must be a multiple of 8 for the conv patch embedding, got {self.embed_dim}")
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")


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
