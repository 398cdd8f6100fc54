"""The Python steps of ``scripts/gpu_check.py`` (loader, sweep, bench, NCCL probe), each returning a JSON-ready dict.

Every step takes the plan (sizes for the GPU or the CPU rehearsal), the output folder and a wall-clock deadline
(``time.time()`` seconds) after which it starts no new work.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def describe() -> dict:
    """Machine and versions, for the summary."""
    from xcit.bench import runner as B

    machine = B.machine() | {"cpu_count": os.cpu_count()}
    versions = B.versions() | {"cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    return {"machine": machine, "versions": versions}


def headline(step: str, res: dict) -> str:
    """One line of a step's main figures for the log."""
    if step == "tests":
        return f"{res.get('passed')} passed, {res.get('failed')} failed, {res.get('skipped')} skipped"
    if step == "loader":
        return f"{res.get('img_per_s', 0):.0f} img/s with {res.get('workers')} workers"
    if step == "feed":
        bs, dec = res.get("batch_stage", {}), res.get("decode", {})
        dali = res.get("dali", {})
        return (f"batch work {bs.get('img_per_s', 0):.0f} img/s ({bs.get('cpu_cores_used', 0):.2f} cores), decode"
                f" {dec.get('img_per_s', 0):.0f} img/s ({dec.get('cpu_cores_used', 0):.2f} cores); dali "
                + (f"{dali['img_per_s']:.0f} img/s" if "img_per_s" in dali else dali.get("status", "")))  # fmt: skip
    if step == "sweep":
        return f"16x tokens -> {res.get('time_ratio_16x_tokens')} x time (DeiT {res.get('deit_time_ratio_16x_tokens')})"
    if step in ("demo", "torchrun"):
        loss = res.get("train_loss") or [None]
        return f"loss {loss[0]} -> {loss[-1]}, top-1 {res.get('top1')}"
    if step == "bench":
        done = [e for e in res.get("entries", []) if e.get("status") == "ok"]
        return f"{len(done)} of {len(res.get('entries', []))} entries; " + "; ".join(
            f"{e['key']} infer {e['infer']['ratio']['ratio']:.2f} train {e['train']['ratio']['ratio']:.2f}"
            for e in done[:4]
        )
    return ""


def loader(plan: dict, out: Path, deadline: float) -> dict:
    """The training loader with one worker per core, and one worker's decode + transform speed (ours and timm's)."""
    from xcit.bench import data as D

    folder = D.write_jpegs(out / "jpegs", n=plan["jpegs"], size=plan["jpeg_size"])
    res = D.loader_throughput(folder, os.cpu_count() or 1, plan["loader_batch"], plan["loader_images"])
    one = D.bench_data(folder, rounds=2, dali=False)  # DALI is timed in the feed step
    res["pipeline_img_per_s_one_worker"] = one["ours"]["img_per_s"]
    res["timm_pipeline_img_per_s_one_worker"] = one["timm"]["img_per_s"]
    return res


def _rate(fn, n_images: int, device: str, min_s: float = 1.0) -> dict:
    """Images/s of ``fn()`` (``n_images`` per call) over at least ``min_s`` s after one warm-up call, and the CPU
    cores it kept busy meanwhile (process CPU time over wall time, every thread counted)."""
    fn()
    calls, t, c = 0, time.perf_counter(), time.process_time()
    while calls < 3 or time.perf_counter() - t < min_s:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        calls += 1
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"img_per_s": calls * n_images / wall, "cpu_cores_used": cpu / wall, "calls": calls}


def feed(plan: dict, out: Path, deadline: float) -> dict:
    """What feeds a GPU: the batch work on the device (uint8 -> normalised, random erasing, mixup/cutmix with
    smoothed targets), a batched JPEG decode with torchvision (nvJPEG on a GPU), and DALI's training graph when
    DALI is installed; images/s on one device and the CPU cores each used."""
    import numpy as np
    from torchvision.io import decode_jpeg

    from xcit.bench import data as D
    from xcit.config.train_config import load_config
    from xcit.data.device import erase_seeds
    from xcit.data.pipeline import batch_stage, mixup_fn

    dev, b, size = plan["device"], plan["feed_batch"], plan["feed_size"]
    cfg = load_config(["--re_prob", "0.25", "--re_value", "pixel", "--mixup", "0.8", "--cutmix", "1.0",
                       "--label_smoothing", "0.1", "--batch_size", str(b)])[0]  # fmt: skip
    stage, mix = batch_stage(cfg, dev), mixup_fn(cfg, 1000)
    x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)
    x = x.pin_memory() if dev == "cuda" else x  # as the DataLoader hands it over
    y = torch.randint(0, 1000, (b,))
    step = {"i": 0}

    def batch_work() -> None:
        step["i"] += 1
        seeds = erase_seeds(np.arange(step["i"] * b, (step["i"] + 1) * b))  # one per image, as in training
        xs = stage(x.to(dev, non_blocking=True), seeds)
        mix(xs, y.to(dev, non_blocking=True))

    res: dict = {"device": dev, "batch": b, "img_size": size}
    res["batch_stage"] = _rate(batch_work, b, dev)
    folder = D.write_jpegs(out / "jpegs", n=plan["jpegs"], size=plan["jpeg_size"])
    files = sorted(folder.glob("*/*.jpg"))[:b]
    data = [torch.from_numpy(np.fromfile(f, dtype=np.uint8)) for f in files]
    res["decode"] = _rate(lambda: decode_jpeg(data, device=dev), len(data), dev)
    res["decode"]["jpeg_size"] = list(plan["jpeg_size"])
    res["dali"] = _dali_feed(plan, files, dev, deadline)
    return res


def _dali_feed(plan: dict, files: list[Path], dev: str, deadline: float) -> dict:
    """DALI's training graph (nvJPEG ``mixed`` decode + GPU augmentations on a GPU), or why it was skipped."""
    from xcit.data import dali

    if not dali.available():
        return {"status": "skipped: NVIDIA DALI is not installed here (pip install -e '.[dali]' on a machine with "
                          "network; the lent GPU machine has none)"}  # fmt: skip
    if time.time() > deadline - 12:  # building the graph takes seconds
        return {"status": "skipped (time budget)"}
    from xcit.bench.data import RECIPE
    from xcit.config.train_config import TrainConfig

    cfg = TrainConfig(**{**RECIPE, "batch_size": len(files), "image_resize": plan["feed_size"]})
    device = torch.device(dev)
    pipe = dali.train_pipeline(cfg, device, threads=os.cpu_count() or 1)
    rate = _rate(lambda: list(dali.file_batches(pipe, files, len(files), device)), len(files), dev)
    return {"status": "ok", **rate}


def _tokens_square(model: torch.nn.Module, size: int, device: str) -> bool:
    """Whether any op of one forward at ``size`` px outputs a tensor with two dimensions of the token count (pick a
    size where no feature map's side equals the token count: 128 px at patch 16 has 64 tokens and a 64 x 64 map)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n = (size // model.patch_size) ** 2
    found = [False]

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and sum(d in (n, n + 1) for d in t.shape) >= 2:
                    found[0] = True
            return out

    with torch.no_grad(), Shapes():
        model.eval()(torch.randn(1, 3, size, size, device=device))
    return found[0]


def sweep(plan: dict, out: Path, deadline: float) -> dict:
    import xcit
    from xcit.bench import sweep as S

    name, dev = plan["models"][0], plan["device"]
    res = S.sweep(name, plan["sweep_precision"], dev, plan["sweep_batch"], iters=3, sizes=plan["sweep_sizes"],
                  deit_max=plan["deit_max"], **plan["overrides"])  # fmt: skip
    plot = S.plot_sweep(res, out / "sweep" / "resolution_sweep.png")
    pts, ref = res["ours"], res["reference_points"]

    def ratio(points: list[dict], key: str) -> float | None:
        big = [p for p in points if p["tokens"] == 16 * points[0]["tokens"]]
        return big[0][key] / points[0][key] if big and key in big[0] else None

    model = xcit.create_model(name, **plan["overrides"]).to(dev)
    return {
        "model": name, "reference": res["reference"], "precision": res["precision"], "points": pts,
        "deit_points": ref, "time_ratio_16x_tokens": ratio(pts, "ms_per_image"),
        "deit_time_ratio_16x_tokens": ratio(ref, "ms_per_image"),
        "memory_ratio_16x_tokens": ratio(pts, "peak_memory_mib_per_image"),
        "deit_memory_ratio_16x_tokens": ratio(ref, "peak_memory_mib_per_image"),
        "tokens_square_tensor": _tokens_square(model, plan["square_check_size"], dev), "plot": str(plot),
    }  # fmt: skip


def bench_entries(plan: dict) -> list[dict]:
    """The benchmark matrix, most important first: compiled bf16 at the base size (the GPU targets), every eager
    entry (quick), compiled fp32 at the base size, then compiled at the larger size."""
    base, big = plan["sizes"]
    c = plan["compile"]
    order = [(base, c, "bf16"), (base, False, "bf16"), (base, False, "fp32"), (big, False, "bf16"),
             (big, False, "fp32"), (base, c, "fp32"), (big, c, "bf16"), (big, c, "fp32")]  # fmt: skip
    out = []
    for size, comp, prec in order:
        for m in plan["models"]:
            key = f"{m.removeprefix('xcit_').removesuffix('_224')}_{size}_{'compiled' if comp else 'eager'}_{prec}"
            out.append({"key": key, "model": m, "img_size": size, "precision": prec, "compile": comp,
                        "status": "pending"})  # fmt: skip
    return out


def _loader_share(out: Path, train: dict, batch: int, device: str) -> dict | None:
    """Compute- or data-bound: the loader step's one-worker speed against this entry's training step."""
    from xcit.bench import data as D

    path = out / "loader" / "result.json"
    if not path.exists():
        return None
    per_core = json.loads(path.read_text())["pipeline_img_per_s_one_worker"]
    threads = 0 if device == "cuda" else torch.get_num_threads()  # on a GPU every core is free for the loader
    return D.data_share(per_core, train["ours"]["ms_per_batch"], batch, threads, os.cpu_count() or 1)


def bench(plan: dict, out: Path, deadline: float) -> dict:
    from xcit.bench import runner as B

    entries = bench_entries(plan)
    needs = 75.0 if plan["device"] == "cuda" else 10.0  # seconds a compiled entry needs at least (eager: a fifth)
    res = {"entries": entries, "batch": plan["batch"], "tf32_for_fp32": plan["device"] == "cuda"}
    res["bf16_gemm_peak_gflops"] = B.matmul_peak(torch.bfloat16, torch.device(plan["device"]))
    for e in entries:
        if time.time() > deadline - (needs if e["compile"] else needs / 5):
            e["status"] = "skipped (time budget)"
            continue
        tf32 = plan["device"] == "cuda" and e["precision"] == "fp32"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        e["status"] = "running"
        _save(out, res)
        r = B.run(e["model"], plan["batch"], e["img_size"], e["precision"], e["compile"], B.MODES, "timm",
                  plan["device"], plan["warmup"], plan["rounds"], plan["iters"], True, **plan["overrides"])  # fmt: skip
        e.update({k: r[k] for k in ("infer", "train", "gmacs_per_image", "matmul_peak_gflops")}, status="ok")
        e["data_share"] = _loader_share(out, r["train"], plan["batch"], plan["device"])
        torch._dynamo.reset()  # drop the compiled graphs before the next entry
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    res["status"] = "ok"
    return res


def _save(out: Path, res: dict) -> None:
    """The bench result so far, so that a run stopped at its time limit keeps the finished entries."""
    (out / "bench").mkdir(parents=True, exist_ok=True)
    (out / "bench" / "result.json").write_text(json.dumps(res, indent=2, default=str) + "\n")


def nccl(plan: dict, out: Path, deadline: float) -> dict:
    """Run by torchrun: an all-reduce over the default process group (NCCL on a GPU, gloo on CPU)."""
    import torch.distributed as dist

    backend = "nccl" if plan["device"] == "cuda" else "gloo"
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(backend)
    try:
        t = torch.ones(4, device=dev)
        dist.all_reduce(t)
        ok = bool((t == dist.get_world_size()).all())
        return {"backend": backend, "world_size": dist.get_world_size(), "ok": ok}
    finally:
        dist.destroy_process_group()
