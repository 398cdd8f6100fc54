"""Warnings for benchmark figures that should not be read as printed.

On a shared machine one short run can give ours/timm ratios far apart for the same code, and a GEMM peak measured
in a busy moment can be below what the models then reach. :func:`check` looks at one :func:`xcit.bench.runner.run`
result and says so, with the number of rounds that the observed spread needs for a stable ratio.
"""

from __future__ import annotations

import math
import statistics

SPREAD_LIMIT = 0.10  # per-round ratios further apart than this (max / min - 1) are a warning
TARGET_ERROR = 0.02  # "stable": the median ratio's standard error within 2%
_MEDIAN_SE = 1.2533  # standard error of a median = 1.2533 x sigma / sqrt(n) for normal noise


def round_ratios(mode_result: dict) -> list[float]:
    """ours/timm throughput ratio of every round (timm's median call time over ours), from the per-round medians."""
    ours, ref = mode_result["ours"]["round_medians_ms"], mode_result["timm"]["round_medians_ms"]
    return [r / o for o, r in zip(ours, ref)]


def rounds_needed(ratios: list[float], target: float = TARGET_ERROR) -> int | None:
    """Rounds for the median ratio to have a relative standard error of ``target``, given the rounds' spread."""
    if len(ratios) < 2:
        return None
    sigma = statistics.stdev(math.log(r) for r in ratios)
    return max(len(ratios), math.ceil((_MEDIAN_SE * sigma / target) ** 2))


def _ratio_warnings(mode: str, ratios: list[float]) -> list[str]:
    if len(ratios) < 2:
        return [f"{mode}: one round gives no spread, so the ours/timm ratio may be far off; use --rounds 5 or more"]
    lo, hi = min(ratios), max(ratios)
    if hi / lo - 1 <= SPREAD_LIMIT:
        return []
    n = rounds_needed(ratios)
    return [
        f"{mode}: the rounds disagree: per-round ours/timm ratios {lo:.3f} .. {hi:.3f} ({100 * (hi / lo - 1):.0f}% "
        f"apart, over the {100 * SPREAD_LIMIT:.0f}% limit), so the load on the machine changed during the run; "
        f"a ratio within {100 * TARGET_ERROR:.0f}% needs about {n} rounds at this spread (--rounds {n}; --settle "
        f"waits for a quiet CPU)"
    ]


def emulated(peaks: dict, precision: str) -> bool:
    """Whether ``precision``'s measured GEMM peak is below fp32's: the CPU converts it (bf16 without AVX-512 BF16 or
    AMX), so its fast paths and fractions of peak mean little."""
    return precision != "fp32" and peaks.get(precision, 0) < peaks.get("fp32", 0)


def _peak_warnings(mode: str, mode_result: dict, peaks: dict, precision: str) -> list[str]:
    out = []
    slow = emulated(peaks, precision)
    for name, r in mode_result.items():
        if isinstance(r, dict) and r.get("fraction_of_peak", 0) > 1:
            why = (
                f"{precision} is emulated on this CPU (its GEMM peak is below fp32's {peaks.get('fp32', 0):.0f}), and "
                f"the model's other kernels convert faster than that GEMM, so the fractions of peak mean little"
                if slow
                else "the peak was measured in a busier moment than the run, so the fractions of peak are not "
                "meaningful (--settle helps)"
            )
            out.append(
                f"{mode} {name}: {r['gflops_per_s']:.0f} GFLOP/s is {100 * r['fraction_of_peak']:.0f}% of the "
                f"measured {precision} GEMM peak ({peaks[precision]:.0f} GFLOP/s): {why}"
            )
            if slow:
                break  # one line says it for every model
    return out


def check(result: dict) -> list[str]:
    """Every warning for a benchmark result: rounds that disagree, and a measured peak below what was achieved."""
    out = []
    for mode in ("infer", "train"):
        res = result.get(mode)
        if not res:
            continue
        if "ratio" in res:
            out += _ratio_warnings(mode, round_ratios(res))
        out += _peak_warnings(mode, res, result.get("matmul_peak_gflops", {}), result.get("precision", "fp32"))
    return out


STARVED = 0.5  # CPUs' worth of time other processes used while the rounds ran


def starvation_warnings(busy_elsewhere: float | None, available: int, threads: int) -> list[str]:
    """A warning when other processes kept CPUs busy while the CPU rounds ran with more threads than were left:
    torch's threads wait at every operator for the one that shares a core, so throughput collapses and rounds
    spread (see :mod:`xcit.runtime.threads`)."""
    if busy_elsewhere is None or busy_elsewhere < STARVED:
        return []
    free = max(1, round(available - busy_elsewhere))
    if threads <= free:
        return []
    return [
        f"the rounds were starved: other processes kept {busy_elsewhere:.1f} of {available} CPU(s) busy while "
        f"{threads} threads ran; the figures are low and spread. Rerun on a quiet machine, or with --threads {free}"
    ]
