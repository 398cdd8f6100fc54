"""Speed, memory and FLOPs of XCiT, optionally beside timm's implementation of the same model.

Everything here measures; nothing is assumed:

* **Throughput.** Inference (``torch.inference_mode``) and a training step (forward, cross-entropy, backward,
  AdamW step) in images/s, eager or ``torch.compile``-d, in fp32 or under bf16/fp16 autocast. With a reference
  model the two run in the same process in alternating rounds (order flipped every round) so that other load on
  the machine hits both alike; ratios are ours/reference of the median times.
* **Peak memory.** CUDA: ``torch.cuda.max_memory_allocated`` over one step. CPU: the peak of live tensor bytes
  over one step, from the PyTorch profiler's allocation records (weights and the input included; the CPU
  allocator's cache and the Python heap are not).
* **FLOPs.** ``torch.utils.flop_counter.FlopCounterMode`` on one image (matmuls, convolutions, attention), so both
  implementations are counted the same way. GMACs = FLOPs / 2.
* **The machine's peak.** A square GEMM measured in the same run for fp32 and bf16 (and fp16 when benchmarked);
  the fraction of peak is the model's counted FLOPs per second over the same precision's GEMM (3x the forward
  FLOPs for a training step), and ``fraction_of_bf16_peak`` is over the bf16 GEMM.
* **GEMMs alone.** For inference, every matmul and convolution of one eager batch is timed again on its own
  (see :func:`gemm_time`): the sum bounds the batch time from below at this library's GEMM speed, and the share
  of a measured batch it makes says how much time goes elsewhere (norms, softmax, GELU, copies).

The resolution sweep is in :mod:`xcit.bench.sweep`, the data pipeline's speed in :mod:`xcit.bench.data`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..fast import cpu
from ..runtime.precision import PRECISIONS, autocast

MODES = ("infer", "train")


# ----------------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call, GPU work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


@functools.cache  # once per process: every configuration of a run sees the same peak
def matmul_peak(dtype: torch.dtype, device: torch.device, n: int | None = None, reps: int = 5) -> float:
    """Best GFLOP/s of an ``n x n`` GEMM in ``dtype`` (``2 n^3`` FLOPs per call). Without ``n``, the size doubles
    from 256 while one call takes under 50 ms, up to 2048 on CPU and 8192 on a GPU (where a 2048 GEMM is
    launch-bound): a dtype the CPU only emulates (bf16 without AVX-512 BF16, AMX or oneDNN's kernels for it: 100x
    slower than fp32) is then measured in about a second instead of minutes."""
    if n is None:
        n, largest = 256, 8192 if device.type == "cuda" else 2048
        while n < largest and _gemm_seconds(dtype, device, n, 1) < 0.05:
            n *= 2
    return 2 * n**3 / _gemm_seconds(dtype, device, n, reps) / 1e9


def _gemm_seconds(dtype: torch.dtype, device: torch.device, n: int, reps: int) -> float:
    """The fastest of ``reps`` calls of an ``n x n`` GEMM in ``dtype``, after one untimed call."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return min(timed(lambda: a @ b, device) for _ in range(reps))


def _raw(formula: Callable) -> Callable:
    """A registered flop formula (already shape-wrapped by torch) marked so FlopCounterMode does not wrap it again."""

    def f(*args, **kwargs):
        return formula(*args, **kwargs)

    f._get_raw = True
    return f


def count_flops(
    model: nn.Module, img_size: int, device: torch.device, in_chans: int = 3, dtype: torch.dtype | None = None
) -> float:
    """Forward FLOPs of one image, counted by ``FlopCounterMode`` (matmul, conv, attention), under ``dtype``'s
    autocast when given (the paths taken, and so the GEMMs, may depend on the precision)."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    aten = torch.ops.aten
    # the in-place GEMMs that accumulate into a residual cost what their out-of-place forms do
    inplace = {aten.addmm_: _raw(flop_registry[aten.addmm]), aten.baddbmm_: _raw(flop_registry[aten.baddbmm])}
    x = torch.randn(1, in_chans, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=inplace)
    with torch.no_grad(), torch.autocast(device.type, dtype or torch.float32, enabled=dtype is not None), counter:
        model(x)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------------------------
# The time of the GEMMs alone
# ----------------------------------------------------------------------------------------------------------------------


def _spec(a):
    """A hashable stand-in for one argument: tensors by shape, strides, dtype and device; lists as tuples."""
    if isinstance(a, torch.Tensor) and a.layout == torch._mkldnn:  # a GEMM weight prepacked for oneDNN
        return ("packed", tuple(a.shape), a.dtype)
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype, a.device)
    if isinstance(a, (list, tuple)):
        return ("seq", type(a).__name__, tuple(_spec(v) for v in a))
    return ("value", a)


def _build(s):
    """A fresh argument from :func:`_spec`'s description, tensors filled with unit normals."""
    kind = s[0]
    if kind == "tensor":
        shape, stride, dtype, device = s[1:]
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return t.normal_() if t.is_floating_point() else t.zero_()
    if kind == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(torch.randn(s[1]).to(s[2]))
    if kind == "seq":
        return (list if s[1] == "list" else tuple)(_build(v) for v in s[2])
    return s[1]


def _gemm_of(func, args: tuple) -> Callable[[], object]:
    """A call of ``func`` on fresh arguments; the fused GEMM + GELU ops without their GELU."""
    a = [_build(s) for s in args]
    if func is torch.ops.xcit.linear_gelu.default:
        x, w, b, _, dtype = a
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        return lambda: F.linear(x, w, b)
    if func is torch.ops.mkldnn._linear_pointwise.default:  # eager's fused kernels, without the epilogue
        return lambda: func(*a[:3], "none", [], "")
    if func is torch.ops.mkldnn._linear_pointwise.binary:  # (x, other, weight, bias, attr)
        return lambda: torch.ops.mkldnn._linear_pointwise(a[0], a[2], a[3], "none", [], "")
    if func is torch.ops.mkldnn._convolution_pointwise.default:
        return lambda: func(*a[:7], "none", [], "")
    return lambda: func(*a)


def gemm_time(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, reps: int = 5) -> dict:
    """The time one inference batch spends in its matmuls and convolutions, each timed alone.

    One eager forward records every call of an op that ``FlopCounterMode`` counts (in the dtypes autocast gives
    it); every distinct call (op, shapes, strides, dtypes) is then timed on fresh tensors, best of ``reps`` as for
    the GEMM peak, and weighted by how often it ran. The sum is a lower bound on the batch time at this library's
    GEMM speed; the rest of a measured batch is everything else (norms, softmax, GELU, copies, overheads).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    formulas = {**flop_registry, aten.addmm_: flop_registry[aten.addmm], aten.baddbmm_: flop_registry[aten.baddbmm]}
    calls: dict[tuple, int] = {}
    flops = [0]

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = formulas.get(func.overloadpacket)
            if formula is not None:
                if kwargs:
                    raise NotImplementedError(f"cannot replay {func} with keyword arguments")
                key = (func, tuple(_spec(a) for a in args))
                calls[key] = calls.get(key, 0) + 1
                flops[0] += formula(*args, out_val=out)
            return out

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(x.device, dtype), Record():  # (inference_mode would show composite ops)
            model(x)
    finally:
        model.train(was_training)
    total = 0.0
    with torch.inference_mode():
        for (func, args), n in calls.items():
            call = _gemm_of(func, args)
            call()
            total += n * min(timed(call, x.device) for _ in range(reps))
    return {
        "ms_per_batch": total * 1e3,
        "gflop_per_batch": flops[0] / 1e9,  # what FlopCounterMode counts: the same calls
        "calls": sum(calls.values()),
        "distinct_calls": len(calls),
    }


@contextlib.contextmanager
def _quiet_fd2():
    """Mute file descriptor 2 meanwhile: the profiler's C++ side prints start/stop lines there (the step being
    measured already ran cleanly during warm-up, so nothing of value is hidden)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mib(step: Callable[[], object], device: torch.device) -> float:
    """Peak tensor memory (MiB) during one call of ``step``; see the module docstring for what it counts."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    # the timeline follows every allocation by id (needs shapes and stacks), so transients inside ops count too
    with (
        _quiet_fd2(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p,
    ):
        step()
    _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(device)
    return max((sum(s) for s in sizes), default=0) / 2**20


# ----------------------------------------------------------------------------------------------------------------------
# What is timed
# ----------------------------------------------------------------------------------------------------------------------


def infer_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    """One inference batch."""
    model.eval()

    def step() -> torch.Tensor:
        with torch.inference_mode(), autocast(x.device, dtype):
            return model(x)

    return step


def adamw(params, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel where the device has one, else the multi-tensor (foreach) one."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, foreach=True)


def train_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    """One training step: forward, cross-entropy on random labels, backward, AdamW step. fp16 uses a GradScaler."""
    model.train()
    opt = adamw(list(model.parameters()), x.device)
    y = torch.randint(0, 10, (x.shape[0],), device=x.device)
    scaler = torch.amp.GradScaler(x.device.type, enabled=dtype == torch.float16)

    def step() -> torch.Tensor:
        with autocast(x.device, dtype):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _cpu_busy(window: float = 0.5) -> float | None:
    """Percent of the machine's CPU time spent busy over ``window`` seconds (Linux ``/proc/stat``), else None."""

    def read() -> tuple[int, int]:
        v = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(v) - v[3] - v[4], v[3] + v[4]  # busy, idle + iowait

    try:
        b0, i0 = read()
        time.sleep(window)
        b1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return 100.0 * (b1 - b0) / max(1, (b1 - b0) + (i1 - i0))


def settle(max_busy: float | None, timeout: float = 120.0) -> float | None:
    """On a shared machine, wait (at most ``timeout`` s) until other processes use less than ``max_busy`` percent
    of the CPU; returns the last reading. Our own process is idle meanwhile, so the reading is everyone else."""
    if max_busy is None:
        return None
    deadline = time.monotonic() + timeout
    busy = _cpu_busy()
    while busy is not None and busy > max_busy and time.monotonic() < deadline:
        busy = _cpu_busy()
    return busy


def alternate(
    steps: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    iters: int,
    max_busy: float | None = None,
) -> tuple[dict[str, list[list[float]]], list[float | None]]:
    """Per name, ``rounds`` lists of ``iters`` call times; the names take turns, in reversed order every round.
    With ``max_busy`` every round first waits for the machine to be quiet (see :func:`settle`); the load seen
    before each round is returned too."""
    times: dict[str, list[list[float]]] = {k: [] for k in steps}
    loads = []
    names = list(steps)
    for r in range(rounds):
        loads.append(settle(max_busy))
        for k in names if r % 2 == 0 else names[::-1]:
            times[k].append([timed(steps[k], device) for _ in range(iters)])
    return times, loads


def summarise(times: list[list[float]], batch: int) -> dict:
    """img/s and ms per batch from the median call time; every call time is kept."""
    flat = [t for rnd in times for t in rnd]
    med = statistics.median(flat)
    return {
        "img_per_s": batch / med,
        "ms_per_batch": med * 1e3,
        "ms_per_batch_min": min(flat) * 1e3,
        "round_medians_ms": [statistics.median(r) * 1e3 for r in times],
    }


def ratio(ours: list[list[float]], ref: list[list[float]]) -> dict:
    """ours/ref throughput: from the overall medians, from the fastest calls (the least disturbed by other load),
    and the spread of the per-round ratios."""
    per_round = [statistics.median(b) / statistics.median(a) for a, b in zip(ours, ref)]
    flat_o, flat_r = [t for r in ours for t in r], [t for r in ref for t in r]
    return {
        "ratio": statistics.median(flat_r) / statistics.median(flat_o),
        "ratio_of_fastest": min(flat_r) / min(flat_o),
        "round_ratio_median": statistics.median(per_round),
        "round_ratio_min": min(per_round),
        "round_ratio_max": max(per_round),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def build_pair(
    name: str, device: torch.device, compare: str | None, pretrained: str | None = None, **overrides
) -> dict[str, nn.Module]:
    """Our model and, with ``compare="timm"``, timm's with the very same weights."""
    import xcit

    # EMA weights when the file has them, every command's rule (speed does not depend on which)
    ours = xcit.create_model(name, pretrained=pretrained, use_ema=None, **overrides).to(device)
    models = {"ours": ours}
    if compare == "timm":
        import timm

        shared = ("embed_dim", "depth", "num_heads", "eta", "tokens_norm", "patch_size", "mlp_ratio", "img_size")
        kw = {k: v for k, v in overrides.items() if k in shared}  # timm's XCiT takes the same architecture keys
        ref = timm.create_model(name, num_classes=ours.num_classes, **kw).to(device)
        ref.load_state_dict(ours.state_dict())  # the layouts are the same, so are the weights
        models["timm"] = ref
    elif compare is not None:
        raise ValueError(f"--compare supports 'timm', got {compare!r}")
    return models


def maybe_compile(model: nn.Module, enabled: bool | str) -> nn.Module:
    """``torch.compile`` with inductor for True, with the backend named by a string (e.g. "eager"), else as is."""
    if enabled:
        uncached_if_capped()
    return torch.compile(model, backend=enabled if isinstance(enabled, str) else "inductor") if enabled else model


def uncached_if_capped() -> bool:
    """With ``ATEN_CPU_CAPABILITY`` set, turn off inductor's on-disk graph caches for this process and return True.
    Their keys do not include the CPU vector ISA, so a graph compiled earlier without the cap comes back with its
    AVX-512 kernels in an AVX2-capped run (timm's did, for the same model, while ours, changed since, compiled
    anew: the comparison then measured AVX-512 against AVX2 code)."""
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        return False
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False
    return True


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["cpu_family"] = cpu.family()  # the fast paths' family (xcit.fast.cpu), and what set or capped it
    info["aten_capability"] = torch.backends.cpu.get_cpu_capability()
    overrides = ("XCIT_CPU_FAMILY", "XCIT_CPU_PATHS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
    info["environment"] = {k: os.environ[k] for k in overrides if os.environ.get(k)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    out = {"torch": torch.__version__}
    with contextlib.suppress(ImportError):
        import timm

        out["timm"] = timm.__version__
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------


def bench_mode(
    models: dict[str, nn.Module],
    mode: str,
    x: torch.Tensor,
    dtype: torch.dtype | None,
    compile_: bool | str,
    warmup: int,
    rounds: int,
    iters: int,
    memory: bool,
    max_busy: float | None = None,
) -> dict:
    """Time ``mode`` ("infer" or "train") for every model, alternating; results per model plus ratios."""
    device = x.device
    make = infer_step if mode == "infer" else train_step
    steps = {k: make(maybe_compile(m, compile_), x, dtype) for k, m in models.items()}
    out: dict = {}
    for k, step in steps.items():
        t = time.perf_counter()
        for _ in range(max(1, warmup)):  # the first call compiles
            step()
        sync(device)
        out[k] = {"warmup_s": time.perf_counter() - t}
    times, loads = alternate(steps, device, rounds, iters, max_busy)
    out["cpu_busy_before_rounds"] = loads
    for k, step in steps.items():
        out[k].update(summarise(times[k], x.shape[0]))
        if memory:
            out[k]["peak_memory_mib"] = peak_memory_mib(step, device)
    if "timm" in steps:
        out["ratio"] = ratio(times["ours"], times["timm"])
    return out


def add_efficiency(result: dict, flops: dict[str, float], peaks: dict[str, float], dtype_name: str) -> None:
    """Achieved GFLOP/s and the fraction of the measured GEMM peak (same dtype, and bf16) for every entry."""
    for mode in MODES:
        for k, r in result.get(mode, {}).items():
            if k not in flops:
                continue
            gflop = flops[k] * (3 if mode == "train" else 1) / 1e9  # backward is about twice the forward
            r["gflops_per_s"] = gflop * r["img_per_s"]
            r["fraction_of_peak"] = r["gflops_per_s"] / peaks[dtype_name]  # the GEMM peak of the same precision
            r["fraction_of_bf16_peak"] = r["gflops_per_s"] / peaks["bf16"]
            g = r.get("gemm_only")
            if g and g["ms_per_batch"] > 0:  # what the GEMMs alone would allow, and their share of a batch
                g["share_of_batch_time"] = g["ms_per_batch"] / r["ms_per_batch"]
                g["img_per_s_bound"] = r["img_per_s"] * r["ms_per_batch"] / g["ms_per_batch"]
                g["bound_fraction_of_peak"] = gflop * g["img_per_s_bound"] / peaks[dtype_name]
                g["bound_fraction_of_bf16_peak"] = gflop * g["img_per_s_bound"] / peaks["bf16"]


def run(
    name: str = "xcit_tiny_12_p16_224",
    batch: int = 16,
    img_size: int = 224,
    precision: str = "fp32",
    compile_: bool | str = False,  # True: inductor; a string: that torch.compile backend
    modes: tuple[str, ...] = MODES,
    compare: str | None = None,
    device: str = "cpu",
    warmup: int = 2,
    rounds: int = 5,
    iters: int = 3,
    memory: bool = True,
    pretrained: str | None = None,
    max_busy: float | None = None,
    **overrides,
) -> dict:
    """The full benchmark of one configuration; returns a JSON-ready dict (see ``xcit benchmark --help``)."""
    dev = torch.device(device)
    dtype = PRECISIONS[precision]
    models = build_pair(name, dev, compare, pretrained, **overrides)
    in_chans = models["ours"].cfg.in_chans
    flops = {k: count_flops(m.eval(), img_size, dev, in_chans, dtype) for k, m in models.items()}
    peaks = {p: matmul_peak(PRECISIONS[p] or torch.float32, dev) for p in dict.fromkeys(("fp32", "bf16", precision))}
    result: dict = {
        "model": name,
        "batch": batch,
        "img_size": img_size,
        "precision": precision,
        "compile": compile_,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "versions": versions(),
        "gmacs_per_image": {k: f / 2e9 for k, f in flops.items()},
        "matmul_peak_gflops": peaks,
    }
    x = torch.randn(batch, in_chans, img_size, img_size, device=dev)
    for mode in modes:
        result[mode] = bench_mode(models, mode, x, dtype, compile_, warmup, rounds, iters, memory, max_busy)
    if "infer" in result:
        for k, m in models.items():
            result["infer"][k]["gemm_only"] = gemm_time(m, x, dtype)
    add_efficiency(result, flops, peaks, precision)
    return result
