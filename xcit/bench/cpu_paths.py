"""The measurements behind :data:`xcit.fast.cpu.CHOICES`: every fast-path switch on and off, on the CPU at hand.

For each switch of :class:`xcit.fast.cpu.FastPaths`, the same model (XCiT-T12 by default, batch 16, 224 px, inference in
the precision the switch concerns) runs with the switch on and off in alternating rounds in one process, so that
other load on the machine hits both alike; the ratio of the median batch times says which is faster here. The
op-level times (the fused GEMM + GELU against GEMM then GELU, the batched head GEMMs against one per head) show
where the difference comes from. ``xcit benchmark --cpu-paths`` runs it and prints the switches it would choose.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..fast import cpu

SWITCH_DTYPE = {  # the precision in which each switch matters
    "fused_gelu_fp32": None,
    "fused_gelu_bf16": torch.bfloat16,
    "batched_heads_bf16": torch.bfloat16,
    "cache_bf16_weights": torch.bfloat16,
    "onednn_linear_bf16": torch.bfloat16,
    "onednn_linear_fp32": None,
    "prepack_weights": torch.bfloat16,
    "fold_mixing_fp32": None,
}
BOTH_PRECISIONS = {"prepack_weights"}  # matters in fp32 too: measured in fp32 where bf16 is emulated


def bf16_native() -> dict:
    """The bf16 and fp32 GEMM peaks here, and whether bf16 is at least as fast as fp32 (AVX-512 BF16, AMX). Where it
    is not, bf16 runs through conversions (AVX2: about 100x slower than fp32): nobody runs bf16 there, and timing
    its switches would take an hour, so they are left as the family's defaults."""
    from .checks import emulated
    from .runner import matmul_peak

    cpu_ = torch.device("cpu")
    peaks = {"fp32": matmul_peak(torch.float32, cpu_), "bf16": matmul_peak(torch.bfloat16, cpu_)}
    return {"gemm_peak_gflops": peaks, "native": not emulated(peaks, "bf16")}


def _median_ms(fn: Callable[[], object], iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _alternate(fns: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, list[float]]:
    """Per name, one median per round; the names take turns, in reversed order every other round."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            out[k].append(_median_ms(fns[k], iters))
    return out


def op_times(tokens: int = 3136, dim: int = 192, rounds: int = 5, iters: int = 5, bf16: bool = True) -> dict:
    """ms of the MLP's first GEMM + GELU (XCiT-T12: 16 x 196 tokens, 192 -> 768), fused and not, fp32 and bf16; and
    XCA's per-head q^T k (4 heads of 48 channels), batched over (image, head) and one GEMM per head, in bf16.
    ``bf16`` False: the fp32 GEMM + GELU only."""
    from ..fast import fused

    out: dict = {}
    x32, w, b = torch.randn(tokens, dim), torch.randn(4 * dim, dim) * 0.05, torch.zeros(4 * dim)
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))[: 2 if bf16 else 1]:
        x, wd, bd = x32.to(dt), w.to(dt), b.to(dt)
        fns = {
            "fused": lambda x=x, wd=wd, bd=bd, dt=dt: fused.linear_gelu(x, wd, bd, "none", dt),
            "unfused": lambda x=x, wd=wd, bd=bd: F.gelu(F.linear(x, wd, bd)),
        }
        with torch.inference_mode():
            t = _alternate(fns, rounds, iters)
        out[f"linear_gelu_{name}_ms"] = {k: statistics.median(v) for k, v in t.items()}
    if not bf16:
        return out
    B, N, h = 16, tokens // 16, 4
    qkv = torch.randn(B, N, 3 * dim, dtype=torch.bfloat16)
    q, k = qkv[..., :dim], qkv[..., dim : 2 * dim]
    fns = {
        "batched": lambda: q.reshape(B, N, h, -1).permute(0, 2, 3, 1) @ k.reshape(B, N, h, -1).transpose(1, 2),
        "per_head": lambda: torch.stack(
            [a.mT @ c for a, c in zip(q.view(B, N, h, -1).unbind(2), k.view(B, N, h, -1).unbind(2))], dim=1
        ),
    }
    with torch.inference_mode():
        t = _alternate(fns, rounds, iters)
    out["gram_bf16_ms"] = {k: statistics.median(v) for k, v in t.items()}
    return out


def switch_effects(
    name: str = "xcit_tiny_12_p16_224", batch: int = 16, rounds: int = 5, iters: int = 3, bf16: dict | None = None
) -> dict:
    """For every switch, eager inference of ``name`` with it on and off (the others as chosen): img/s and on/off.
    Where bf16 is emulated (:func:`bf16_native`), the bf16-only switches are skipped (``"skipped"`` says why)."""
    import xcit

    model = xcit.create_model(name).eval()
    x = torch.randn(batch, 3, model.cfg.img_size, model.cfg.img_size)
    base = cpu.paths()
    bf16 = bf16 or bf16_native()
    peaks = bf16["gemm_peak_gflops"]
    emulated = f"bf16 is emulated here (GEMM peak {peaks['bf16']:.1f} GFLOP/s against fp32's {peaks['fp32']:.1f})"
    out: dict = {}
    try:
        for f in dataclasses.fields(cpu.FastPaths):
            dtype = SWITCH_DTYPE[f.name]
            if dtype is torch.bfloat16 and not bf16["native"]:
                if f.name not in BOTH_PRECISIONS:
                    out[f.name] = {
                        "precision": "bf16",
                        "chosen_here": getattr(base, f.name),
                        "skipped": emulated,
                    }
                    continue
                dtype = None

            def run(on: bool, f=f, dtype=dtype) -> None:
                cpu.set_paths(**{**dataclasses.asdict(base), f.name: on})
                with torch.inference_mode(), torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
                    model(x)

            t = _alternate({"on": lambda run=run: run(True), "off": lambda run=run: run(False)}, rounds, iters)
            on, off = statistics.median(t["on"]), statistics.median(t["off"])
            per_round = [b / a for a, b in zip(t["on"], t["off"])]
            out[f.name] = {
                "precision": "fp32" if dtype is None else "bf16",
                "img_per_s_on": batch / on * 1e3,
                "img_per_s_off": batch / off * 1e3,
                "on_over_off": off / on,
                "round_on_over_off": [min(per_round), max(per_round)],
                "chosen_here": getattr(base, f.name),
                "faster_here": off / on >= 1.0,
            }
    finally:
        cpu.set_paths(**dataclasses.asdict(base))
    return out


def measure(name: str = "xcit_tiny_12_p16_224", batch: int = 16, rounds: int = 5, iters: int = 3) -> dict:
    """The CPU's family, the switches chosen for it, and both sets of measurements."""
    from .runner import machine

    bf16 = bf16_native()
    return {
        "family": cpu.family(),
        "detected_family": cpu.detect(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "chosen": dataclasses.asdict(cpu.paths()),
        "model": {"name": name, "batch": batch, "rounds": rounds, "iters": iters},
        "bf16": bf16,
        "switches": switch_effects(name, batch, rounds, iters, bf16),
        "ops": op_times(rounds=rounds, bf16=bf16["native"]),
    }
