"""XCiT: Cross-Covariance Image Transformer, in pure PyTorch.

Reference: El-Nouby et al., "XCiT: Cross-Covariance Image Transformers", NeurIPS 2021 (arXiv 2106.09681), and
the official release (github.com/facebookresearch/xcit). The parameter layout follows timm's port, so timm
state dicts load directly; official and MindCV files are converted in :mod:`xcit.weights.files`.

The file reads in the order the network runs: patch embedding, Fourier positional encoding, XCA, LPI, the XCA
block, class attention, then the model. The architecture record and the variants live in :mod:`xcit.model.arch`.
Every forward here is the plain computation, as in timm's ``models/xcit.py``: what GPUs, tracing and export run.
:mod:`xcit.fast` subclasses these modules with forwards that compute the same values in fewer passes, and
:func:`xcit.fast.accelerate` switches a model to them (``xcit.create_model`` does so by default).

Two numerics flavours exist:

* ``"official"``: the paper and the official weights (q/k L2-normalised over tokens, exact erf GELU).
* ``"mindcv"``: MindCV's port, which skips the q/k normalisation and uses MindSpore's default tanh GELU.
  MindCV-trained checkpoints only reproduce MindCV's predictions under this flavour.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .arch import XCiTConfig
from .indices import block_indices
from .timm_api import TimmModelApi


def _gelu(flavour: str) -> nn.GELU:
    # MindSpore's nn.GELU defaults to approximate=True (tanh); the official code uses exact erf GELU.
    return nn.GELU(approximate="tanh" if flavour == "mindcv" else "none")


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016), as in the official code via timm."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in ``module`` normalise with batch statistics as usual but leave their running statistics
    as they were: a checkpointed block runs its forward again in backward, and its batch must count once."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    bns = [m for m in bns if m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, seen) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(seen)


# ----------------------------------------------------------------------------------------------------------------------
# Patch embedding and positional encoding
# ----------------------------------------------------------------------------------------------------------------------


def _conv_bn(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch))


class ConvPatchEmbed(nn.Module):
    """Stack of stride-2 3x3 conv + BN with GELU between (none after the last): p16 has 4 stages, p8 has 3.

    Key layout ``proj.{0,2,4,6}.{0: conv, 1: bn}`` matches the official and timm checkpoints.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, flavour: str = "official") -> None:
        super().__init__()
        self.patch_size = patch_size
        n = int(math.log2(patch_size))  # 4 stages for p16, 3 for p8
        widths = [in_chans] + [embed_dim // 2 ** (n - 1 - i) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            if i:
                layers.append(_gelu(flavour))
            layers.append(_conv_bn(widths[i], widths[i + 1]))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, D, H/p, W/p) grid."""
        return self.proj(x)


class PositionalEncodingFourier(nn.Module):
    """Fourier features of the (y, x) patch position projected to D by a 1x1 conv (official xcit.py).

    Computed from the grid size, so any resolution works without interpolation.
    """

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.scale = 2 * math.pi
        self.eps = 1e-6

    def features(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """The (1, 2*hidden_dim, H, W) Fourier features, in fp32."""
        y = torch.arange(1, H + 1, device=device, dtype=torch.float32)
        x = torch.arange(1, W + 1, device=device, dtype=torch.float32)
        y = y / (y[-1:] + self.eps) * self.scale
        x = x / (x[-1:] + self.eps) * self.scale
        i = torch.arange(self.hidden_dim, device=device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.hidden_dim)
        py, px = y[:, None] / dim_t, x[:, None] / dim_t  # (H, hd), (W, hd)
        # sin of even channels interleaved with cos of odd channels
        py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
        px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
        pos = torch.cat([py[:, None, :].expand(H, W, -1), px[None, :, :].expand(H, W, -1)], dim=2)
        return pos.permute(2, 0, 1).unsqueeze(0)

    def forward(self, H: int, W: int) -> torch.Tensor:
        """(1, H*W, D) positional tokens: the 1x1 projection of the features, as a linear map over tokens."""
        w = self.token_projection.weight
        pos = self.features(H, W, w.device).flatten(2).transpose(1, 2)
        return F.linear(pos.to(w.dtype), w.flatten(1), self.token_projection.bias)


# ----------------------------------------------------------------------------------------------------------------------
# XCA block
# ----------------------------------------------------------------------------------------------------------------------


def _l2_normalize(t: torch.Tensor) -> torch.Tensor:
    """``F.normalize(t, dim=-1)`` (eps 1e-12), written as a sum of squares: ONNX exports before opset 18 (whose
    ReduceL2 takes its axes as an attribute) cannot convert F.normalize's ReduceL2."""
    return t / t.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-12)


class XCA(nn.Module):
    """Cross-covariance attention (paper sec. 3.1): each head mixes its d_h channels by the softmax of the
    (d_h x d_h) cross-covariance ``temperature * q^T k`` of L2-normalised q and k (normalised over tokens), so the
    cost is linear in the number of tokens. MindCV's port skips the normalisation (``qk_norm`` False)."""

    def __init__(self, dim: int, num_heads: int, flavour: str = "official", proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk_norm = flavour != "mindcv"  # MindCV's port does not normalise q and k
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, h, d_h, d_h) channel attention (fp32) and v as (B, h, d_h, N)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
        if self.qk_norm:  # F.normalize over tokens, in fp32: in fp16 |q|^2 overflows and the eps 1e-12 is 0
            q, k = (_l2_normalize(t.float()).to(t.dtype) for t in (q, k))  # unit rows: q k^T fits fp16
        attn = (q @ k.mT).float() * self.temperature.float()
        return attn.softmax(dim=-1), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens -> ``proj`` of every head's channels mixed by its attention."""
        B, N, C = x.shape
        attn, v = self.attention(x)
        x = (attn.to(v.dtype) @ v).permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class LPI(nn.Module):
    """Local patch interaction (paper sec. 3.2): depthwise 3x3 conv -> GELU -> BN -> depthwise 3x3 conv."""

    def __init__(self, dim: int, flavour: str = "official") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = _gelu(flavour)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        for conv in (self.conv1, self.conv2):  # the strides their gradients come back with (channels_last tokens):
            # the same memory, and DDP then finds the gradient's strides equal to its bucket view's
            w = conv.weight.data
            conv.weight.data = w.as_strided(w.shape, (w.shape[2] * w.shape[3], 1, w.shape[3], 1))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, N, C) tokens of an H x W grid -> the same shape."""
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)  # a view: channels_last memory
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(B, C, N).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 (D -> 4D), GELU, fc2, with dropout after the GELU and after fc2 (official Mlp)."""

    def __init__(self, dim: int, hidden: int, flavour: str = "official", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _gelu(flavour)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class XCABlock(nn.Module):
    """XCA -> LPI -> MLP, each residual with a LayerScale. Naming trap: norm3/gamma3 are LPI's, which runs second."""

    def __init__(self, cfg: XCiTConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = XCA(D, cfg.num_heads, cfg.flavour, cfg.drop_rate)
        self.norm3 = nn.LayerNorm(D, eps=1e-6)
        self.local_mp = LPI(D, cfg.flavour)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), cfg.flavour, cfg.drop_rate)
        self.drop_path = DropPath(cfg.drop_path_rate)
        self.gamma1 = nn.Parameter(cfg.eta * torch.ones(D))
        self.gamma3 = nn.Parameter(cfg.eta * torch.ones(D))
        self.gamma2 = nn.Parameter(cfg.eta * torch.ones(D))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma3 * self.local_mp(self.norm3(x), H, W))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------------------------
# Class attention (CaiT, Touvron et al. 2021), as used by XCiT
# ----------------------------------------------------------------------------------------------------------------------


class ClassAttn(nn.Module):
    """Attention with the class token as the only query; keys and values are all N+1 tokens (CaiT)."""

    def __init__(self, dim: int, num_heads: int, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, C) tokens, class token first -> the class token's update (B, 1, C), and the (B, h, 1, N) weights
        if ``return_attention``."""
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x[:, :1]).reshape(B, 1, h, C // h).transpose(1, 2) * (C // h) ** -0.5
        k = self.k(x).reshape(B, N, h, C // h).transpose(1, 2)
        v = self.v(x).reshape(B, N, h, C // h).transpose(1, 2)
        attn = (q @ k.mT).float().softmax(dim=-1)  # (B, h, 1, N)
        cls = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(cls)), attn if return_attention else None


class ClassAttentionBlock(nn.Module):
    """Class attention and an MLP on the class token; the patch tokens pass through (with the official quirks)."""

    def __init__(self, cfg: XCiTConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = ClassAttn(D, cfg.num_heads, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), cfg.flavour, cfg.drop_rate)
        self.gamma1 = nn.Parameter(cfg.eta * torch.ones(D))
        self.gamma2 = nn.Parameter(cfg.eta * torch.ones(D))
        self.tokens_norm = cfg.tokens_norm

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1 + N, C) -> the same shape, and the class attention if ``return_attention``."""
        x_norm = self.norm1(x)
        cls, attn = self.attn(x_norm, return_attention)
        # official quirk kept for weight parity: the patch tokens get gamma1 * norm1(x) added, not left untouched
        x = x + self.gamma1 * torch.cat([cls, x_norm[:, 1:]], dim=1)
        x = self.norm2(x) if self.tokens_norm else torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        # official quirk: x + cat(gamma2 * mlp(cls), x[:, 1:]) doubles the patch tokens
        return x + torch.cat([self.gamma2 * self.mlp(x[:, :1]), x[:, 1:]], dim=1), attn


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


class XCiT(TimmModelApi, nn.Module):
    """Cross-covariance image transformer.

    ``forward(x)`` gives logits. ``forward(x, return_attention=True)`` gives ``(logits, attn)`` with ``attn`` the
    last class-attention block's cls->patch weights, shape (B, heads, H/p, W/p).
    """

    def __init__(self, cfg: XCiTConfig, name: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.class_names: list[str] | None = None  # set when loaded from a checkpoint that records them
        D = cfg.embed_dim
        self.num_features = D
        self.num_classes = cfg.num_classes
        self.patch_size = cfg.patch_size
        self.grad_checkpointing = False
        self.patch_embed = ConvPatchEmbed(cfg.patch_size, cfg.in_chans, D, cfg.flavour)
        self.pos_embed = PositionalEncodingFourier(D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList([XCABlock(cfg) for _ in range(cfg.depth)])
        self.cls_attn_blocks = nn.ModuleList([ClassAttentionBlock(cfg) for _ in range(cfg.cls_attn_layers)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head_drop = nn.Dropout(cfg.head_drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- construction ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """trunc_normal(std .02) for Linear weights and cls_token, zero Linear biases (official xcit.py)."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_flavour(self, flavour: str) -> None:
        """Switch numerics in place: ``"official"`` or ``"mindcv"`` (no q/k norm, tanh GELU)."""
        self.cfg = replace(self.cfg, flavour=flavour)
        for m in self.modules():
            if isinstance(m, XCA):
                m.qk_norm = flavour != "mindcv"
            elif isinstance(m, nn.GELU):
                m.approximate = "tanh" if flavour == "mindcv" else "none"

    @property
    def flavour(self) -> str:
        return self.cfg.flavour

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0 gives pooled features)."""
        self.num_classes = num_classes
        self.cfg = replace(self.cfg, num_classes=num_classes)
        w = self.cls_token
        self.head = (
            nn.Linear(self.num_features, num_classes).to(w.device, w.dtype) if num_classes > 0 else nn.Identity()
        )
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each XCA block's activations in backward to save memory (BatchNorm running statistics are
        updated once per step, not again by the recomputation)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names the official recipe exempts from weight decay (besides all 1-D params)."""
        return {"cls_token"}

    # -- forward pieces ----------------------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Grid size for an input, or a ValueError naming the valid sizes."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected a (B, {self.cfg.in_chans}, H, W) image batch, got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p or H == 0 or W == 0:

            def near(s: int) -> str:
                lo = max(p, s // p * p)
                return f"{lo} or {lo + p}" if lo != s else str(s)

            raise ValueError(
                f"input size {H}x{W} is not a multiple of the patch size {p}; valid sizes are multiples of {p}, "
                f"e.g. {near(H)} for height and {near(W)} for width"
            )
        return H // p, W // p

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Image -> (B, N, D) tokens with positional encoding, and the grid (Hp, Wp)."""
        Hp, Wp = self.check_input(x)
        x = self.patch_embed(x)
        x = x.flatten(2).transpose(1, 2)
        return self.pos_drop(x + self.pos_embed(Hp, Wp).to(x.dtype)), Hp, Wp

    def _run_block(self, blk: XCABlock, x: torch.Tensor, Hp: int, Wp: int) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            if torch.compiler.is_compiling():  # the backward graph recomputes activations only, no buffer updates
                return checkpoint(blk, x, Hp, Wp, use_reentrant=False)
            contexts = lambda: (contextlib.nullcontext(), running_stats_frozen(blk))  # noqa: E731 (forward, recompute)
            return checkpoint(blk, x, Hp, Wp, use_reentrant=False, context_fn=contexts)
        return blk(x, Hp, Wp)

    def forward_cls(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepend the class token and run the class-attention blocks. Returns the (B, 1 + N, D) tokens and the
        last block's (B, h, 1, 1 + N) class attention if ``return_attention``."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        attn = None
        for i, blk in enumerate(self.cls_attn_blocks):
            x, attn = blk(x, return_attention and i == len(self.cls_attn_blocks) - 1)
        return x, attn

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised (B, 1 + N, D) tokens, class token first."""
        x, Hp, Wp = self.embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, Hp, Wp)
        x, _ = self.forward_cls(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class token -> logits (or the pooled features if ``pre_logits``)."""
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Logits, or ``(logits, attn)`` with the last class-attention block's cls->patch weights if
        ``return_attention``."""
        x, Hp, Wp = self.embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, Hp, Wp)
        x, attn = self.forward_cls(x, return_attention)
        logits = self.forward_head(self.norm(x))
        if not return_attention:
            return logits
        return logits, attn[:, :, 0, 1:].reshape(x.shape[0], -1, Hp, Wp)

    def class_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Full attention of the last class-attention block: (B, heads, 1 + N) over [cls, patches], sums to 1."""
        x, Hp, Wp = self.embed(x)
        for blk in self.blocks:
            x = blk(x, Hp, Wp)
        _, attn = self.forward_cls(x, return_attention=True)
        return attn[:, :, 0]

    def channel_attention(self, x: torch.Tensor, indices: list[int] | None = None) -> dict[int, torch.Tensor]:
        """XCA channel-covariance maps (B, heads, d_h, d_h) of the chosen blocks (default: all; negative indices
        count from the end; an index past either end is a ValueError)."""
        want = set(block_indices(indices, len(self.blocks)))
        x, Hp, Wp = self.embed(x)
        maps = {}
        for i, blk in enumerate(self.blocks):
            if i in want:
                maps[i], _ = blk.attn.attention(blk.norm1(x))
            x = blk(x, Hp, Wp)
        return maps

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        intermediates_only: bool = False,
        output_fmt: str = "NCHW",
    ):
        """Outputs of chosen XCA blocks as (B, D, H/p, W/p) maps (or (B, N, D) with ``output_fmt="NLC"``).

        ``indices``: None for all blocks, an int n for the last n, or a list of block indices (negative ones count
        from the end; an index past either end is a ValueError, as in timm).
        Returns ``(final_tokens, intermediates)``, or only the list if ``intermediates_only``.
        """
        depth = len(self.blocks)
        take = block_indices(indices, depth)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        x, Hp, Wp = self.embed(x)
        B = x.shape[0]
        feats = []
        last = max(take) if intermediates_only else depth - 1
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = self._run_block(blk, x, Hp, Wp)
            if i in take:
                y = self.norm(x) if norm else x
                feats.append(y.transpose(1, 2).reshape(B, -1, Hp, Wp) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return feats
        x, _ = self.forward_cls(x)
        return self.norm(x), feats
