"""Axis ticks that stay readable over short ranges (matplotlib's defaults give one tick on a log axis spanning less
than a decade, and fractional or negative ticks around a single point)."""

from __future__ import annotations


def log_ticks(ax) -> None:
    """Readable ticks on a log y axis, printed plainly (``20``, not ``2x10^1``): evenly spaced values when the data
    span less than a decade, else 1, 2 and 5 times each power of ten; no minor ticks on either axis (the x ticks
    of a sweep are set explicitly). Call it after plotting."""
    import math

    from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator, StrMethodFormatter

    lo, hi = ax.get_ylim()
    short = lo > 0 and math.log10(hi / lo) < 1
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6) if short else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_locator(NullLocator())


def epoch_ticks(axes, epochs: list[int], top1: list[float]) -> None:
    """Whole-number epochs on every panel (half an epoch of margin around a short run), and the top-1 panel kept
    inside [0, 100] even for a single point."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if epochs and max(epochs) - min(epochs) < 4:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    if top1:
        lo, hi = min(top1), max(top1)
        pad = max(2.0, 0.05 * (hi - lo))
        axes[-1].set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
