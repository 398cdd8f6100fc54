"""The fast forwards: subclasses of :mod:`xcit.model.xcit`'s modules that override ``forward`` only (the pattern of
dinov2's ``MemEffAttention(Attention)``), and the one switch between them and the plain forwards (the pattern of
timm's ``reparameterize_model``): :func:`accelerate` and :func:`plain`. Both change each module's class in place, so
parameters, buffers and state dict stay exactly as they are.

The fast forwards give the plain forwards' values up to floating-point rounding (``tests/test_fast.py`` compares
values and gradients under every CPU switch combination) with fewer passes over the activations:

* the LayerScale folded into the last linear map of each branch and the residual add accumulated by its GEMM;
* XCA's ``q^T k`` on strided views of the qkv output with the L2 norms applied to the small (d_h x d_h) result, and
  the channel mixing ``attn @ v`` folded into ``proj`` (``proj(v attn^T) = v (W_p blockdiag(attn))^T``);
* class attention without materialising k and v: with one query, ``q . (W_k x + b_k)`` is ``(W_k^T q) . x`` plus
  a constant the softmax cancels, and the weighted sum of ``W_v x + b_v`` is ``W_v`` of the weighted sum plus b_v;
* only the class token through the last class-attention block (the logits read nothing else);
* BatchNorm folded into the patch embedding's convs in eval, the Fourier features cached per grid;
* on CPU, oneDNN's fused kernels where :mod:`xcit.fast.cpu` chooses them for the CPU family (:mod:`xcit.fast.fused`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..model.xcit import (
    LPI,
    XCA,
    ClassAttentionBlock,
    ClassAttn,
    ConvPatchEmbed,
    Mlp,
    PositionalEncodingFourier,
    XCABlock,
    XCiT,
)
from . import fastpath

__all__ = ["accelerate", "is_accelerated", "plain", "plain_forwards"]


class FastConvPatchEmbed(ConvPatchEmbed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, D, H/p, W/p) grid, in channels_last memory (so tokens are a free view)."""
        layers = list(self.proj)
        stages, acts = layers[0::2], layers[1::2]  # conv-BN stages with a GELU between each pair
        for i, stage in enumerate(stages):
            x = fastpath.conv_bn_act(stage, acts[i] if i < len(acts) else None, x)
        return x


class FastPositionalEncoding(PositionalEncodingFourier):
    def forward(self, H: int, W: int) -> torch.Tensor:
        """(1, H*W, D) positional tokens; the Fourier features depend on the grid alone and are kept for the last
        (H, W, device) seen, so only the 1x1 projection runs at every call."""
        w = self.token_projection.weight
        if fastpath.graph_capture():  # tracers would record the cached tensor as a constant of the traced size
            return super().forward(H, W)
        key = (H, W, w.device)
        cache = self.__dict__.setdefault("_fast_cache", {})
        if key not in cache:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in training too
                cache.clear()
                cache[key] = self.features(H, W, w.device).flatten(2).transpose(1, 2).contiguous()
        return F.linear(cache[key].to(w.dtype), w.flatten(1), self.token_projection.bias)


def _channel_attention(xca: XCA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """XCA's (B, h, d, d) channel attention (fp32) and v as (B, N, h, d), tokens kept in (B, N, C) layout: each
    head's ``q^T k`` one GEMM on strided views of the qkv output, the L2 normalisation over tokens applied to the
    small Gram matrix (``q^T k / (|q| |k|)`` is the same value) in fp32, so bf16 never divides by an underflowed
    norm."""
    B, N, C = x.shape
    h = xca.num_heads
    qkv = fastpath.linear(xca.qkv, x)  # (B, N, 3C)
    q, k, v = qkv.unflatten(-1, (3, C)).unbind(-2)  # each (B, N, C), views
    if xca.qk_norm and q.dtype == torch.float16:  # fp16 Gram entries can overflow before normalisation:
        # normalise first (1 / 1e-12 is inf in fp16, so scale in fp32; unit vectors then fit fp16)
        qn, kn = (fastpath.column_norms(t) for t in (q, k))  # (B, C)
        q, k = (q.float() / qn.unsqueeze(1)).to(q.dtype), (k.float() / kn.unsqueeze(1)).to(k.dtype)
        attn = fastpath.gram(q, k, h, normalise=False)
    else:
        attn = fastpath.gram(q, k, h, normalise=xca.qk_norm)
    attn = (attn * xca.temperature.float()).softmax(dim=-1)
    return attn, v.view(B, N, h, C // h)


class FastXCA(XCA):
    def forward(
        self, x: torch.Tensor, shortcut: torch.Tensor | None = None, gamma: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``proj(XCA(x))``, or ``shortcut + gamma * proj(XCA(x))`` with the residual accumulated by the GEMM (no
        dropout then: :class:`FastXCABlock` passes a shortcut only while dropout is off)."""
        B, N, C = x.shape
        h = self.num_heads
        attn, v = _channel_attention(self, x)
        if not fastpath.folds_mixing(v):  # attn @ v, then proj as one GEMM over every token
            z = fastpath.attend(attn.to(v.dtype), v)
            if shortcut is not None:
                return fastpath.add_linear(shortcut, z, self.proj.weight, self.proj.bias, gamma)
            out = fastpath.linear(self.proj, z)
            return self.proj_drop(out if gamma is None else out * gamma)
        v = v.flatten(2)
        w_t, b = self.proj.weight.t(), self.proj.bias  # (C_in, C_out)
        if gamma is not None:  # LayerScale folded into proj's output columns
            w_t, b = w_t * gamma, b * gamma
        # out[n, o] = sum_{h,i,j} Wp[o, (h, i)] attn[h, i, j] v[n, (h, j)]: mixing[(h, j), o] = (attn_h^T Wp_h^T)[j, o]
        mixing = fastpath.mixing(attn.to(v.dtype).mT, w_t.view(h, C // h, C))
        out = fastpath.add_baddbmm(shortcut, b, v, mixing)
        return self.proj_drop(out) if shortcut is None else out


class FastLPI(LPI):
    def forward(
        self,
        x: torch.Tensor,
        H: int,
        W: int,
        shortcut: torch.Tensor | None = None,
        gamma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``LPI(x)`` on (B, N, C) tokens, or ``shortcut + gamma * LPI(x)``."""
        B, N, C = x.shape
        # (B, N, C) is already NHWC in memory: view it as a channels_last NCHW tensor, no copy
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)
        x = self.bn(fastpath.conv_gelu(self.conv1, self.act, x))
        w, b = self.conv2.weight, self.conv2.bias
        # eager: conv2 is linear, so the LayerScale folds into its weights exactly. Compiled: inductor fuses it into
        # the residual add, and oneDNN's depthwise conv with computed weights is ~1.7x slower inside its graphs
        fold = gamma is not None and not torch.compiler.is_compiling()
        if fold:
            w, b = w * gamma.view(-1, 1, 1, 1), b * gamma
        x = F.conv2d(x, w, b, padding=1, groups=C).permute(0, 2, 3, 1).reshape(B, N, C)
        if gamma is not None and not fold:
            x = x * gamma
        return x if shortcut is None else shortcut + x


class FastMlp(Mlp):
    def forward(
        self, x: torch.Tensor, shortcut: torch.Tensor | None = None, gamma: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``fc2(act(fc1(x)))``, or ``shortcut + gamma * fc2(...)`` with the residual accumulated by the GEMM."""
        x = self.drop(fastpath.linear_gelu(self.fc1, self.act, x))
        w, b = self.fc2.weight, self.fc2.bias
        if shortcut is not None:  # LayerScale folded into fc2's output rows, the residual add into its GEMM
            return fastpath.add_linear(shortcut, x, w, b, gamma)
        if gamma is not None:  # (dropout's mask commutes with the LayerScale)
            w, b = w * gamma.unsqueeze(-1), b * gamma
        return self.drop(F.linear(x, w, b))


class FastXCABlock(XCABlock):
    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``x + gamma * branch(norm(x))`` three times, each gamma folded into its branch's last linear map and
        each residual accumulated by it; while drop path or dropout is active, the plain three residual lines."""
        fast = type(self.attn) is FastXCA and type(self.local_mp) is FastLPI and type(self.mlp) is FastMlp
        if not fast or (self.training and (self.drop_path.p > 0 or self.mlp.drop.p > 0)):
            return super().forward(x, H, W)
        x = self.attn(self.norm1(x), shortcut=x, gamma=self.gamma1)
        x = self.local_mp(self.norm3(x), H, W, shortcut=x, gamma=self.gamma3)
        return self.mlp(self.norm2(x), shortcut=x, gamma=self.gamma2)


class FastClassAttn(ClassAttn):
    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :class:`ClassAttn`, in O(h N C) instead of O(N C^2), exactly: k and v are never materialised."""
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        q = self.q(x[:, 0]).view(B, h, d) * d**-0.5
        qk = (q.transpose(0, 1) @ self.k.weight.view(h, d, C)).transpose(0, 1)  # (B, h, C) = W_k^T q per head
        # the constant q . b_k changes nothing after the softmax but keeps b_k in the graph (DDP wants every
        # parameter to receive a gradient)
        logits = torch.baddbmm((q * self.k.bias.view(h, d)).sum(-1, keepdim=True), qk, x.mT)
        attn = logits.float().softmax(dim=-1)  # (B, h, N)
        mean = attn.to(x.dtype) @ x  # (B, h, C): attention-weighted token average per head
        v = (mean.transpose(0, 1) @ self.v.weight.view(h, d, C).mT).transpose(0, 1).reshape(B, C) + self.v.bias
        out = self.proj_drop(self.proj(v)).unsqueeze(1)
        return out, attn.unsqueeze(2) if return_attention else None


class FastClassAttentionBlock(ClassAttentionBlock):
    def forward(
        self, x: torch.Tensor, return_attention: bool = False, cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1 + N, C) -> the same shape, or only the (B, 1, C) class token if ``cls_only`` (the logits need no
        more from the last block)."""
        x_norm = self.norm1(x)
        update, attn = self.attn(x_norm, return_attention)
        cls = x[:, :1] + self.gamma1 * update
        if cls_only:  # norm2 always reaches the class token, with or without tokens_norm
            cls = self.norm2(cls)
            return cls + self.gamma2 * self.mlp(cls), attn
        # official quirk kept for weight parity: patch tokens get gamma1 * norm1(x) added, not left untouched
        x = torch.addcmul(x, self.gamma1, x_norm)
        x[:, :1] = cls
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        # official quirk: x + cat(gamma2 * mlp(cls), x[:, 1:]) doubles the patch tokens (x + x == 2 x exactly)
        cls = x[:, :1]
        cls = cls + self.gamma2 * self.mlp(cls)
        x = x * 2
        x[:, :1] = cls
        return x, attn


class FastXCiT(XCiT):
    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """As :meth:`XCiT.forward`; the last class-attention block computes the class token only."""
        x, Hp, Wp = self.embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, Hp, Wp)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        attn, last = None, len(self.cls_attn_blocks) - 1
        for i, blk in enumerate(self.cls_attn_blocks):
            if type(blk) is FastClassAttentionBlock:  # the logits only read the class token
                x, attn = blk(x, return_attention and i == last, cls_only=i == last)
            else:
                x, attn = blk(x, return_attention and i == last)
        logits = self.forward_head(self.norm(x))
        if not return_attention:
            return logits
        return logits, attn[:, :, 0, 1:].reshape(x.shape[0], -1, Hp, Wp)


# each plain module class and its fast subclass; only these exact classes are switched (a subclass of a plain
# module, or an adapter put in a module's place, keeps its own forward)
FAST: dict[type[nn.Module], type[nn.Module]] = {
    ConvPatchEmbed: FastConvPatchEmbed,
    PositionalEncodingFourier: FastPositionalEncoding,
    XCA: FastXCA,
    LPI: FastLPI,
    Mlp: FastMlp,
    XCABlock: FastXCABlock,
    ClassAttn: FastClassAttn,
    ClassAttentionBlock: FastClassAttentionBlock,
    XCiT: FastXCiT,
}
PLAIN: dict[type[nn.Module], type[nn.Module]] = {fast: plain for plain, fast in FAST.items()}


def _switch(model: nn.Module, classes: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    for m in model.modules():
        cls = classes.get(type(m))
        if cls is not None:
            m.__class__ = cls
            m.__dict__.pop("_fast_cache", None)
    return model


def accelerate(model: nn.Module) -> nn.Module:
    """Switch every XCiT module in ``model`` to its fast forward, in place (parameters and state dict unchanged);
    returns ``model``. :func:`plain` switches back."""
    return _switch(model, FAST)


def plain(model: nn.Module) -> nn.Module:
    """Switch every XCiT module in ``model`` back to its plain forward, in place; returns ``model``."""
    return _switch(model, PLAIN)


def is_accelerated(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a fast forward."""
    return any(type(m) in PLAIN for m in model.modules())


@contextlib.contextmanager
def plain_forwards(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with the plain forwards inside the block (tracing, export), its own ones again after it."""
    saved = [(m, type(m)) for m in model.modules() if type(m) in PLAIN]
    plain(model)
    try:
        yield model
    finally:
        for m, cls in saved:
            m.__class__ = cls
