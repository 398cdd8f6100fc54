"""oneDNN's fused GEMM + GELU (and GEMMs with their bias and residual add in the epilogue) for CPU inference.

A GELU after a GEMM costs a full pass over the largest activations of the network (the MLP's 4x hidden layer).
oneDNN computes it in the GEMM's epilogue, while the output tile is still in registers, with the same exact erf
(or tanh) formula. inductor's own erf is about twice as
slow as ATen's and oneDNN's, and inductor only fuses these epilogues for frozen graphs, so the fused kernels are
wrapped in custom ops that both eager mode and ``torch.compile`` call as they are.

Used only where it changes nothing but speed: on CPU, with no gradient to record, not while exporting or tracing
(exported graphs keep standard ops), in fp32 or bf16 (explicit or autocast), and only if this build of torch
has oneDNN's fused ops (checked once, with a call), and where :func:`xcit.fast.cpu.paths` chooses them for this CPU
family. In bf16 the kernels take bf16 copies of the fp32 weights, kept
per parameter until it changes in place or is freed (like autocast's own weight cache, but across calls); where the
family wants it (``prepack_weights``), the GEMMs take their weights in oneDNN's blocked layout, prepacked once per
parameter (a LayerScale folded in) and kept the same way, instead of reordering them at every call.

:func:`linear` and :func:`linear_add` run the other GEMMs with a bias (XCA's qkv, the MLP's fc2) in oneDNN with the
bias, and in fp32 the residual add, in the epilogue: ATen's addmm first copies the bias into every output row.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from . import cpu

__all__ = ["AVAILABLE", "compute_dtype", "linear", "linear_add", "linear_gelu"]


# bf16 copies of fp32 parameters (and, where the family wants it, GEMM weights in oneDNN's blocked layout), kept
# while the parameter lives and is unchanged: casting them at every call costs a fresh buffer each time, which
# oneDNN then reorders again (about 3% of compiled bf16 inference)
_CASTS: dict[tuple, tuple] = {}


def _cached(w: torch.Tensor, dtype: torch.dtype, packed: bool, rows: int, scale: torch.Tensor | None = None):
    """``(w * scale[:, None]).to(dtype)`` (no ``scale``: ``w.to(dtype)``), reordered for oneDNN's GEMM if ``packed``
    (laid out for the first call's ``rows`` input rows; any row count computes the same values with it); cached per
    (parameters, dtype, packed) and invalidated by any in-place change of either parameter (their version counters)
    or when one is freed."""
    sources = (w,) if scale is None else (w, scale)
    key = (*(id(t) for t in sources), dtype, packed)
    hit = _CASTS.get(key)
    if hit is not None and all(ref() is t and v == t._version for (ref, v), t in zip(hit[0], sources)):
        return hit[1]
    out = _scaled(w.detach(), None if scale is None else scale.detach()).to(dtype)
    if packed:
        out = torch.ops.mkldnn._reorder_linear_weight(out, rows)
    drop = lambda _, k=key: _CASTS.pop(k, None)  # noqa: E731
    _CASTS[key] = (tuple((weakref.ref(t, drop), t._version) for t in sources), out)
    return out


def _scaled(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``w`` with its output rows scaled by ``scale`` (a LayerScale folded in), or ``w`` itself without one."""
    return w if scale is None else w * scale.unsqueeze(-1)


def _cacheable(w: torch.Tensor) -> bool:
    """Parameters only, as autocast's cache: a computed weight (BN or a LayerScale folded in) is new at every call,
    and an inference tensor has no version counter."""
    return not w.is_inference() and w.is_leaf and w.requires_grad


def _cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w.to(dtype)``, cached for parameters where the family wants it (``cache_bf16_weights``)."""
    if w.dtype == dtype:
        return w
    if not (cpu.paths().cache_bf16_weights and _cacheable(w)):  # chosen per CPU family (xcit.fast.cpu)
        return w.to(dtype)
    return _cached(w, dtype, False, 0)


def _gemm_weight(w: torch.Tensor, dtype: torch.dtype, rows: int, scale: torch.Tensor | None) -> torch.Tensor:
    """A linear layer's weight for oneDNN, its output rows scaled by ``scale`` (a LayerScale folded in): prepacked in
    oneDNN's blocked layout where the family wants it (``prepack_weights``: the GEMM then skips its own reorder of
    the weight), else as :func:`_cast`."""
    if _PREPACK and cpu.paths().prepack_weights and _cacheable(w) and (scale is None or _cacheable(scale)):
        return _cached(w, dtype, True, rows, scale)
    return _plain_weight(w, dtype, scale)


def _plain_weight(w: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """The weight in ``dtype`` and ATen's layout (its bf16 copy cached as :func:`_cast` does when unscaled)."""
    return _cast(w, dtype) if scale is None else _scaled(w, scale).to(dtype)


def _scaled_bias(bias: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return _cast(bias, dtype) if scale is None else (bias * scale).to(dtype)


def _linear_pointwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    attr: str,
    approximate: str,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attr(x @ weight.T + bias)`` (attr "gelu" or "none"), the bias and GELU in oneDNN's epilogue; with
    ``scale`` (attr "none"), ``scale * (x @ weight.T + bias)``."""
    bias = _scaled_bias(bias, scale, dtype)
    try:
        w = _gemm_weight(weight, dtype, x.numel() // x.shape[-1], scale)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, bias, attr, [], approximate)
    except RuntimeError:  # a shape or dtype this oneDNN has no kernel for
        y = F.linear(x, _plain_weight(weight, dtype, scale), bias)
        return F.gelu(y, approximate=approximate) if attr == "gelu" else y


@torch.library.custom_op("xcit::linear_gelu", mutates_args=())
def _linear_gelu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, dtype: torch.dtype
) -> torch.Tensor:
    return _linear_pointwise(x, weight, bias, "gelu", approximate, dtype)


@_linear_gelu_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, dtype: torch.dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("xcit::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None
) -> torch.Tensor:
    return _linear_pointwise(x, weight, bias, "none", "", dtype, scale)


@_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    if args and isinstance(args[0], (list, tuple)) and len(args[0]) == 2:  # (x, other, weight, ...): the binary form
        w_shape = args[0]
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]  # the GEMM's, as FlopCounterMode counts addmm


# the custom ops (what torch.compile sees) and the oneDNN kernels behind them (what eager mode calls)
register_flop_formula([torch.ops.xcit.linear_gelu, torch.ops.xcit.linear, torch.ops.mkldnn._linear_pointwise])(
    _linear_flops
)


def _probe() -> bool:
    """Whether this build has oneDNN's fused ops and they agree with the unfused ones."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        x = torch.linspace(-3, 3, 2 * 8 * 16).view(2, 8, 16)
        w, b = torch.linspace(-1, 1, 8 * 16).view(8, 16), torch.linspace(-1, 1, 8)
        with torch.no_grad():
            lin = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
            return bool(torch.allclose(lin, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5))
    except RuntimeError:
        return False


AVAILABLE = _probe()  # once, at import: a constant for torch.compile
_PREPACK = AVAILABLE and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # (older builds lack these two)
_BINARY = AVAILABLE and "binary" in torch.ops.mkldnn._linear_pointwise.overloads()


def compute_dtype(x: torch.Tensor, *params: torch.Tensor, epilogue: str = "gelu") -> torch.dtype | None:
    """The dtype a fused kernel would run ``x`` in (autocast's if it is on), or None where it must not be used.
    ``epilogue``: "gelu" for GEMM + GELU, "linear" for a GEMM with its bias (and residual) in the epilogue."""
    if x.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return None  # the fused ops have no backward; training keeps the unfused path
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype not in (torch.float32, torch.bfloat16) or not AVAILABLE:
        return None
    chosen = cpu.paths()  # by CPU family (xcit.fast.cpu): where the fused kernels are faster than the plain ops
    if epilogue == "linear":
        return dtype if (chosen.onednn_linear_fp32 if dtype == torch.float32 else chosen.onednn_linear_bf16) else None
    return dtype if (chosen.fused_gelu_fp32 if dtype == torch.float32 else chosen.fused_gelu_bf16) else None


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, dtype: torch.dtype
) -> torch.Tensor:
    """``gelu(x @ weight.T + bias)`` in ``dtype`` (from :func:`compute_dtype`), one oneDNN kernel."""
    if torch.compiler.is_compiling():  # an opaque op for inductor; eager calls the kernel without the op's dispatch
        return _linear_gelu_op(x.to(dtype), weight, bias, approximate, dtype)
    return _linear_pointwise(x.to(dtype), weight, bias, "gelu", approximate, dtype)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` in ``dtype`` (from ``compute_dtype(..., epilogue="linear")``), the bias added in the
    GEMM's epilogue (ATen's addmm first copies the bias into every output row: one more pass over the output); with
    ``scale``, times ``scale`` per output channel, folded into the (cached) weight."""
    if torch.compiler.is_compiling():
        return _linear_op(x.to(dtype), weight, bias, dtype, scale)
    return _linear_pointwise(x.to(dtype), weight, bias, "none", "", dtype, scale)


def linear_add(
    x: torch.Tensor, shortcut: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """``shortcut + scale * (x @ weight.T + bias)`` in one oneDNN kernel (eager; every tensor of one dtype)."""
    if not _BINARY:
        return shortcut + linear(x, weight, bias, x.dtype, scale)
    bias = _scaled_bias(bias, scale, x.dtype)
    try:
        w = _gemm_weight(weight, x.dtype, x.numel() // x.shape[-1], scale)
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), shortcut, w, bias, "add")
    except RuntimeError:  # a shape or dtype this oneDNN has no kernel for
        return shortcut + F.linear(x, _plain_weight(weight, x.dtype, scale), bias)
