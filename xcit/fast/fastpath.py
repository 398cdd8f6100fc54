"""The fast paths behind :mod:`xcit.fast.forwards`: the same values as the plain ops, computed with fewer passes.

Each helper takes the plain computation's inputs and picks, by where it runs, how to compute it:

* eager inference on CPU: oneDNN's fused GEMM + GELU (:mod:`xcit.fast.fused`), GELUs in place, BatchNorm folded
  into the preceding conv, residual adds accumulated by the GEMM that produces the branch; where the CPU family
  wants it, the other GEMMs with a bias in oneDNN too (bias, LayerScale and in fp32 the residual add in the GEMM's
  epilogue, weights prepacked once per parameter);
* ``torch.compile``: bias-free GEMMs and plain adds, which inductor fuses into its own kernels, and reductions
  written as GEMVs, which it runs in parallel; the oneDNN kernels above as custom ops, which inductor calls as
  they are;
* tracing, export, and anything with autograd: the standard ops (exported graphs hold nothing custom).

Which CPU paths are taken also depends on the CPU family (:func:`xcit.fast.cpu.paths`). Every branch is covered by the
parity tests against timm and the plain forwards (values and gradients) and by ``tests/test_fused.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu, fused


def graph_capture() -> bool:
    """Under torch.compile / torch.export or torch.jit.trace: take the plain path (tracers record Python-side caches
    as constants of the traced size, and TorchScript/ONNX tracing mishandles in-place ops on views)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def act_(act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` on a freshly computed ``x``, in place when no gradient is recorded (saves a large allocation)."""
    if torch.is_grad_enabled() or graph_capture():
        return act(x)
    return torch.ops.aten.gelu_(x, approximate=act.approximate)


def _accumulates(shortcut: torch.Tensor, *operands: torch.Tensor) -> bool:
    """Whether a GEMM can accumulate in place into ``shortcut``: one dtype, and no autocast to change it."""
    if torch.is_autocast_enabled(shortcut.device.type) or torch.jit.is_tracing():
        return False
    return all(t.dtype == shortcut.dtype for t in operands)


def linear(fc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fc(x)``; for an ``nn.Linear`` in CPU inference where the family wants it, in oneDNN with the bias added by
    the GEMM (one pass fewer than ATen's addmm). Any other module (an adapter put in its place) is called."""
    dtype = fused.compute_dtype(x, fc.weight, epilogue="linear") if type(fc) is nn.Linear else None
    return fc(x) if dtype is None else fused.linear(x, fc.weight, fc.bias, dtype)


def add_linear(
    shortcut: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``shortcut + scale * (x @ weight.T + bias)`` (``scale`` a LayerScale, None for 1) with the scale folded into
    the weights and the residual add into the GEMM (one pass instead of three)."""
    onednn = fused.compute_dtype(x, weight, epilogue="linear")
    if onednn is not None:  # the scaled weights are cached per parameter
        if torch.compiler.is_compiling() or not _accumulates(shortcut, x, weight) or not shortcut.is_contiguous():
            return shortcut + fused.linear(x, weight, bias, onednn, scale)  # compiled: inductor fuses the add
        return fused.linear_add(x, shortcut, weight, bias, scale)  # one dtype, no autocast: the add in oneDNN too
    if scale is not None:
        weight, bias = weight * scale.unsqueeze(-1), bias * scale
    if torch.compiler.is_compiling():  # a bias-free GEMM; inductor fuses both adds into the next LayerNorm
        return shortcut + bias + x @ weight.t()
    if not _accumulates(shortcut, x, weight) or not shortcut.is_contiguous():  # e.g. tokens of an NCHW 1-channel stem
        return shortcut + F.linear(x, weight, bias)
    out = shortcut + bias  # a fresh tensor, so accumulating into it in place is safe for autograd
    out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return out


def add_baddbmm(shortcut: torch.Tensor | None, bias: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``shortcut + bias + x @ m`` (batched), accumulated in place where it can be; without ``shortcut``,
    ``bias + x @ m``."""
    if shortcut is None:
        return torch.baddbmm(bias, x, m)
    if torch.compiler.is_compiling():  # as in add_linear
        return shortcut + bias + x @ m
    if _accumulates(shortcut, x, m):
        return (shortcut + bias).baddbmm_(x, m)
    return shortcut + torch.baddbmm(bias, x, m)


def linear_gelu(fc: nn.Linear, act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """``act(fc(x))``: one oneDNN kernel in CPU inference, a bias-free GEMM under compile, else GELU in place."""
    dtype = fused.compute_dtype(x, fc.weight)
    if dtype is not None:  # the GELU runs in the GEMM's epilogue
        return fused.linear_gelu(x, fc.weight, fc.bias, act.approximate, dtype)
    if torch.compiler.is_compiling():  # inductor fuses the bias into the GELU
        return act(x @ fc.weight.t() + fc.bias)
    return act_(act, fc(x))


def conv_gelu(conv: nn.Conv2d, act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))`` for LPI's depthwise 3x3 conv, the GELU in place in inference."""
    return act_(act, conv(x))


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one conv, exact for BN in eval mode (running statistics)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), bias


def conv_bn_act(stage: nn.Sequential, act: nn.GELU | None, x: torch.Tensor) -> torch.Tensor:
    """``act(bn(conv(x)))`` of one patch-embedding stage (``act`` None: no activation). In eval BN is folded into
    the conv (one pass instead of two) and the GELU runs in place. The output is channels_last (oneDNN's fastest
    conv layout, and tokens are then a free view)."""
    conv, bn = stage[0], stage[1]
    x = x.contiguous(memory_format=torch.channels_last)
    if bn.training:
        x = stage(x)
    else:
        w, b = fold_bn(conv, bn)
        x = F.conv2d(x, w, b, stride=conv.stride, padding=conv.padding)
    return act_(act, x) if act is not None else x


def column_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norms over tokens of a (B, N, C) view, in fp32, at least 1e-12 (F.normalize's eps)."""
    if torch.compiler.is_compiling():  # inductor runs a strided column sum serially; a GEMV with ones is parallel
        ones = torch.ones(t.shape[0], 1, t.shape[1], device=t.device, dtype=torch.float32)
        with torch.autocast(t.device.type, enabled=False):  # autocast would run this GEMV, and round it, in bf16
            sq = torch.bmm(ones, t.float().square()).squeeze(1)
    else:  # several times faster than vector_norm over the strided token dim
        sq = (t * t).sum(dim=1, dtype=torch.float32)
    return sq.sqrt().clamp_min(1e-12)


def _batch_heads(t: torch.Tensor) -> bool:
    """oneDNN (CPU bf16, fp16) copies each head's strided view: batch the per-head GEMMs where the family wants it."""
    return t.dtype != torch.float32 and t.is_cpu and cpu.paths().batched_heads_bf16


def gram(q: torch.Tensor, k: torch.Tensor, heads: int, normalise: bool) -> torch.Tensor:
    """Per-head ``q^T k`` in fp32: (B, N, C) x (B, N, C) -> (B, h, d, d), on strided views of the qkv output; with
    ``normalise``, of q and k L2-normalised over tokens (eps 1e-12, as F.normalize), applied to the small result."""
    B, N, C = q.shape
    if not _batch_heads(q):  # one GEMM per head
        qs, ks = q.view(B, N, heads, -1).unbind(2), k.view(B, N, heads, -1).unbind(2)
        g = torch.stack([a.mT @ b for a, b in zip(qs, ks)], dim=1).float()
        if not normalise:
            return g
        qn, kn = (column_norms(t).view(B, heads, -1) for t in (q, k))
    else:  # one GEMM over (image, head) on (B, h, d, N) copies, whose rows also give the norms in one pass each
        qc, kc = (t.reshape(B, N, heads, -1).permute(0, 2, 3, 1).contiguous() for t in (q, k))
        g = (qc @ kc.mT).float()
        if not normalise:
            return g
        if torch.compiler.is_compiling():  # inductor would sum q's strided columns again: the GEMVs instead
            qn, kn = (column_norms(t).view(B, heads, -1) for t in (q, k))
        else:  # accumulated in fp32, rounded once to q's dtype (as the Gram entries are): a dtype=fp32 argument
            # would first copy all of q and k to fp32
            qn, kn = (torch.linalg.vector_norm(t, dim=-1).float().clamp_min(1e-12) for t in (qc, kc))
    return g / (qn.unsqueeze(-1) * kn.unsqueeze(-2))


def folds_mixing(v: torch.Tensor) -> bool:
    """Whether XCA folds its attention into proj's weights (one (B, C, C) matrix per image) for these values; CPU
    fp32 inference where the family wants it (``fold_mixing_fp32``) takes ``attn @ v`` then proj instead."""
    plain = torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_exporting()  # one exported form
    return v.dtype != torch.float32 or not v.is_cpu or plain or cpu.paths().fold_mixing_fp32


def attend(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per head ``attn @ v`` over channels: (B, h, d, d) attention, (B, N, h, d) values -> (B, N, h * d) tokens."""
    B, N, h, d = v.shape
    return (v.transpose(1, 2) @ attn.mT).transpose(1, 2).reshape(B, N, h * d)


def mixing(attn_t: torch.Tensor, w_h: torch.Tensor) -> torch.Tensor:
    """The (B, C, C) matrix ``blockdiag(attn_h^T) @ W_p^T``: (B, h, d, d) transposed attention, (h, d, C) weights."""
    B, h, d, _ = attn_t.shape
    C = w_h.shape[-1]
    if not _batch_heads(attn_t):  # broadcast the weights over the images
        return (attn_t @ w_h).view(B, C, C)
    m = torch.bmm(attn_t.transpose(0, 1).reshape(h, -1, d), w_h)  # one GEMM per head over all images: (h, B d, C)
    return m.view(h, B, d, C).transpose(0, 1).reshape(B, C, C)
