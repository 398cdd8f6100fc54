"""Which CPU fast paths to take, by CPU family, measured rather than assumed.

The fastest way to run XCiT's small GEMMs and the work around them depends on what the CPU has. On a CPU with AMX
(Intel Xeon 4th generation and later) a bf16 GEMM runs at several TFLOP/s and the element-wise passes dominate, so
fusing the GELU into the GEMM and batching the per-head GEMMs pay; on AVX-512 BF16 without AMX (AMD EPYC Zen 4
and 5) the bf16 GEMM peak is 5-7x lower and the balance differs; on AVX2-only CPUs there is no native bf16 at all.

:func:`family` names the CPU's family once per process (from ``torch.backends.cpu.get_cpu_capability()`` and the
``/proc/cpuinfo`` flags); :func:`paths` gives the :class:`FastPaths` chosen for it, from :data:`CHOICES`, whose
every entry was decided by :func:`xcit.bench.cpu_paths.measure` on a CPU of that family (the README's performance
section has the figures; ``xcit benchmark --cpu-paths`` measures the machine at hand). Both are cached for the
process, so ``torch.compile`` sees constants.

Override, for a whole process or from code:

* ``XCIT_CPU_FAMILY=amx|avx512_bf16|avx2|other``: take another family's choices;
* ``XCIT_CPU_PATHS="fused_gelu_bf16=0,batched_heads_bf16=1"``: set single switches (after the family's);
* :func:`set_paths` (``xcit.fast.cpu.set_paths(fused_gelu_bf16=False)``), or ``set_paths()`` to return to the default.

The switches change speed only: every path gives the same values up to floating-point rounding (tested).

Each switch is here because some family measured a gain beyond the run-to-run noise with it one way or the other
(the figures by each family below). A switch that measured within the noise everywhere was removed with its code
path: ``fused_conv_gelu`` (oneDNN conv + GELU in one kernel for the patch embedding and LPI) measured 0.98x on/off
on AMD EPYC Zen 4 (7 alternating rounds, per-round 0.91-1.15x), within 2% either way on the AVX2 family, and neutral
compiled (LPI's conv + GELU as a plain conv and inductor's GELU + BatchNorm pass); the convs now run as plain convs
with the GELU in place.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CHOICES", "FAMILIES", "FastPaths", "family", "paths", "set_paths"]

FAMILIES = ("amx", "avx512_bf16", "avx2", "other")


@dataclass(frozen=True)
class FastPaths:
    """One CPU family's fast-path switches (inference and training on CPU; CUDA ignores them)."""

    fused_gelu_fp32: bool = True  # oneDNN GEMM + GELU (the MLP's fc1) in one kernel, fp32 inference
    fused_gelu_bf16: bool = True  # the same in bf16 (explicit or autocast)
    batched_heads_bf16: bool = True  # bf16 q^T k as one GEMM over (image, head), channel mixing per head
    cache_bf16_weights: bool = True  # the fused kernels keep bf16 copies of fp32 weights across calls
    onednn_linear_bf16: bool = False  # qkv and fc2 in oneDNN, bias added in the epilogue (ATen's addmm: a pass more)
    onednn_linear_fp32: bool = False  # the same in fp32, fc2's residual add also in the epilogue (ATen: MKL's sgemm)
    prepack_weights: bool = False  # oneDNN GEMMs take their weights prepacked (cached per parameter), not reordered
    fold_mixing_fp32: bool = True  # fp32 inference: attn folded into proj per image (one (B, C, C) batched GEMM);
    # off: attn @ v per head, then proj as one GEMM over every token (and its oneDNN epilogue where chosen)


CHOICES: dict[str, FastPaths] = {
    # Intel Xeon with AMX, 2 threads: fused GELU +9% compiled bf16, +1-2% eager; batched heads +6% compiled bf16,
    # +3% eager; cached weights +3% compiled bf16; fused GELU in fp32 unchanged; prepacked oneDNN weights no faster
    # (README, Performance). The oneDNN linear switches were added later and are not measured there: off, as before
    "amx": FastPaths(),
    # AMD EPYC Zen 4 (AVX-512 BF16, no AMX), 2 threads. Eager, one switch off at a time: fused GELU bf16 +6%, fp32
    # +4%; oneDNN linears fp32 +3%, bf16 +1%; batched heads and cached weights within the noise. Compiled, alternating
    # rounds: prepacked weights +10% bf16, +6% fp32; oneDNN linears fp32 +5%; fused GELU fp32 +5%. fp32 channel mixing
    # unfolded: the (B, C, C) batched GEMM runs at 80% of one GEMM over all tokens here, so attn @ v then proj is
    # +1.5-1.8% eager and +1.2-3% compiled in fp32 (in bf16 the fold stays: unfolded is 1-3% slower) (README)
    "avx512_bf16": FastPaths(
        onednn_linear_bf16=True, onednn_linear_fp32=True, prepack_weights=True, fold_mixing_fp32=False
    ),
    # AVX2 only (measured on a Zen 4 with ATen, inductor and oneDNN capped to AVX2), 2 threads, fp32, alternating
    # runs: oneDNN's GELU epilogue costs 1.8 ms on fc1's output where ATen's GELU pass costs 1.2 and inductor's 0.7,
    # so the unfused fc1 is 4-8% faster in eager and 2-6% compiled; the conv + GELU kernels are within 2% either
    # way (kept); the oneDNN linears 1-3% slower than ATen's (off); prepacking only matters with them. bf16 runs
    # through conversions, ~100x slower than fp32 (nobody uses it): its switches are not measured. fp32 channel
    # mixing unfolded (attn @ v, then proj as one GEMM): +2.7% eager, +4.6% compiled in 20 alternating rounds
    "avx2": FastPaths(fused_gelu_fp32=False, fold_mixing_fp32=False),
    "other": FastPaths(),
}


def _flags() -> set[str]:
    """The CPU flags of the first processor in ``/proc/cpuinfo`` (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect(capability: str | None = None, flags: set[str] | None = None) -> str:
    """The family of a CPU with ATen ``capability`` and ``/proc/cpuinfo`` ``flags`` (this one's by default)."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    flags = _flags() if flags is None else flags
    if capability == "AVX2":  # an AVX2-only CPU, or ATen capped to AVX2 (ATEN_CPU_CAPABILITY=avx2) on any x86
        return "avx2"
    if "amx_bf16" in flags or "amx_tile" in flags:
        return "amx"
    if capability == "AVX512" and "avx512_bf16" in flags:
        return "avx512_bf16"
    if capability in ("AVX2", "AVX512"):  # AVX-512 without BF16 (Skylake, Zen 3 lacks AVX-512) converts like AVX2
        return "avx2"
    return "other"


@functools.cache
def family() -> str:
    """This CPU's family (one of :data:`FAMILIES`), or ``XCIT_CPU_FAMILY``'s; decided once per process."""
    forced = os.environ.get("XCIT_CPU_FAMILY", "").strip().lower()
    if forced:
        if forced not in FAMILIES:
            raise ValueError(f"XCIT_CPU_FAMILY must be one of {', '.join(FAMILIES)}, got {forced!r}")
        return forced
    return detect()


def parse_switches(spec: str) -> dict[str, bool]:
    """``"name=0,other=1"`` -> ``{"name": False, "other": True}``; unknown names and values are errors."""
    names = {f.name for f in dataclasses.fields(FastPaths)}
    out: dict[str, bool] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if name not in names:
            raise ValueError(f"XCIT_CPU_PATHS: unknown switch {name!r}; the switches are {', '.join(sorted(names))}")
        if value not in ("0", "1", "true", "false", "on", "off"):
            raise ValueError(f"XCIT_CPU_PATHS: {name} must be 0 or 1, got {value!r}")
        out[name] = value in ("1", "true", "on")
    return out


def default_paths() -> FastPaths:
    """This family's :data:`CHOICES` entry with ``XCIT_CPU_PATHS`` applied."""
    return dataclasses.replace(CHOICES[family()], **parse_switches(os.environ.get("XCIT_CPU_PATHS", "")))


_current = default_paths()  # once, at import; a plain global, which torch.compile reads as a guarded constant


def paths() -> FastPaths:
    """The fast paths in force: this family's, with ``XCIT_CPU_PATHS`` and :func:`set_paths` applied."""
    return _current


def set_paths(**switches: bool) -> FastPaths:
    """Set switches for this process (on top of the default); no arguments return to the default. A compiled
    model recompiles for the new paths on its next call."""
    global _current
    _current = dataclasses.replace(default_paths(), **switches)
    return _current
