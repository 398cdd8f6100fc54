"""Time per image and peak memory of XCiT against the token count, beside timm's token-attention DeiT-Tiny.

Batches shrink with resolution so that every point processes about the same number of tokens per call; the two
models take turns at every size. :func:`plot_sweep` draws both on log-log axes with linear and quadratic guides.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch import nn

from ..runtime.precision import PRECISIONS
from .runner import infer_step, peak_memory_mib, settle, timed

DEIT = "deit_tiny_patch16_224"  # timm's token-attention baseline for the resolution sweep


def sweep_sizes(name: str, patch: int) -> list[int]:
    """224 up to 1024 (2048 for nano), including 896 = 16x the tokens of 224."""
    sizes = [224, 320, 448, 640, 896, 1024]
    if "nano" in name:
        sizes += [1536, 2048]
    return [s for s in sizes if s % patch == 0]


def sweep_point(
    model: nn.Module,
    size: int,
    patch: int,
    tokens_per_call: int,
    dtype,
    device,
    iters: int,
    memory: bool,
    max_busy: float | None = None,
) -> dict:
    """Time per image and peak memory of one model at one resolution."""
    tokens = (size // patch) ** 2
    batch = max(1, round(tokens_per_call / tokens))
    x = torch.randn(batch, 3, size, size, device=device)
    step = infer_step(model, x, dtype)
    step()
    settle(max_busy)
    times = [timed(step, device) for _ in range(iters)]
    point = {"img_size": size, "tokens": tokens, "batch": batch, "ms_per_image": statistics.median(times) / batch * 1e3}
    if memory:
        point["peak_memory_mib"] = peak_memory_mib(step, device)
        point["peak_memory_mib_per_image"] = point["peak_memory_mib"] / batch
    return point


def sweep(
    name: str = "xcit_tiny_12_p16_224",
    precision: str = "fp32",
    device: str = "cpu",
    batch: int = 16,
    iters: int = 3,
    sizes: list[int] | None = None,
    deit_max: int = 1024,
    memory: bool = True,
    max_busy: float | None = None,
    **overrides,
) -> dict:
    """XCiT and DeiT-Tiny from 224 up: time per image and peak memory against tokens."""
    import timm

    import xcit

    dev, dtype = torch.device(device), PRECISIONS[precision]
    ours = xcit.create_model(name, **overrides).to(dev)
    sizes = sizes or sweep_sizes(name, ours.patch_size)
    tokens_per_call = batch * (224 // ours.patch_size) ** 2
    out: dict = {"model": name, "reference": DEIT, "precision": precision, "tokens_per_call": tokens_per_call}
    opts = dict(tokens_per_call=tokens_per_call, dtype=dtype, device=dev, iters=iters, memory=memory, max_busy=max_busy)
    out["ours"], out["reference_points"] = [], []
    for s in sizes:  # the two models take turns at every size, so drifting load hits both
        out["ours"].append(sweep_point(ours, s, ours.patch_size, **opts))
        if s <= deit_max:  # DeiT's attention is quadratic: beyond this it takes minutes per image
            deit = timm.create_model(DEIT, img_size=s).to(dev)  # learned position table resized to the grid
            out["reference_points"].append(sweep_point(deit, s, 16, **opts))
    out["scaling"] = scaling(out["ours"]) | {"reference": scaling(out["reference_points"])}
    return out


def scaling(points: list[dict]) -> dict:
    """Time-per-image growth at 16x the tokens of the first point (224 -> 896 for patch 16)."""
    base = points[0]
    for p in points:
        if p["tokens"] == 16 * base["tokens"]:
            return {"tokens_ratio": 16, "time_ratio": p["ms_per_image"] / base["ms_per_image"]}
    return {}


def plot_sweep(result: dict, path: str | Path) -> Path:
    """Two log-log panels, time per image and peak memory per image against tokens, with linear references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator, StrMethodFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        (result["model"], result["ours"], "tab:blue"),
        (result["reference"], result["reference_points"], "tab:red"),
    ]
    for ax, key, label in zip(axes, ("ms_per_image", "peak_memory_mib_per_image"), ("ms / image", "peak MiB / image")):
        for name, pts, colour in series:
            pts = [p for p in pts if key in p]
            if not pts:
                continue
            n = [p["tokens"] for p in pts]
            ax.plot(n, [p[key] for p in pts], "o-", color=colour, label=name)
        base = [p for p in result["ours"] if key in p]
        if base:
            n0, y0 = base[0]["tokens"], base[0][key]
            n = [p["tokens"] for p in base]
            ax.plot(n, [y0 * t / n0 for t in n], ":", color="gray", label="linear in tokens")
            ax.plot(n, [y0 * (t / n0) ** 2 for t in n], "--", color="lightgray", label="quadratic in tokens")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [p["tokens"] for p in result["ours"]]
        labels = [f"{t}\n{p['img_size']}px" for t, p in zip(ticks, result["ours"])]
        ax.set_xticks(ticks, labels, fontsize=7, rotation=45 if len(ticks) > 6 else 0)
        ax.xaxis.set_minor_locator(NullLocator())  # the sizes measured are the x ticks
        # 1, 2 and 5 per decade; over less than a decade LogLocator leaves one tick or none, so evenly spaced ones
        # there. "{x:g}" prints 20, not 2x10^1.
        lo, hi = ax.get_ylim()
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6) if hi < 10 * lo else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("tokens per image (resolution)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{result['model']} vs {result['reference']}, {result['precision']}, {torch.get_num_threads()} threads"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
