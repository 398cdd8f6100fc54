"""Start-up cost of the sample index: a generated ImageFolder against torchvision's listing, and a 1.3 M-entry index.

    python scripts/bench_index.py --files 20000 --small 400 --repeats 5     # start-up added by a 20,000-file tree
    python scripts/bench_index.py --synthetic 1300000                       # ImageNet-sized index: time and memory
    python scripts/bench_index.py --shards --files 20000                    # xcit shard's speed, the shard index

Tree mode writes two trees of small JPEGs in 100 class folders (``--files`` and ``--small`` images) and times, each
in a fresh Python process (warm page cache, as for a job that starts on a file system it has just read), building
the training data set exactly as ``xcit train`` does (``xcit.data.pipeline.build_datasets``: listing, index, transforms)
and torchvision's ``ImageFolder`` listing of the same large tree. The start-up added by the tree is the large
tree's time minus the small tree's; the target is at most 3 x torchvision's time + 0.75 s. Runs alternate between
the three measurements; medians are reported.

Synthetic mode builds an index of ``--synthetic`` ImageNet-style paths (1000 classes) from a generated listing
(no files are written): the arrays' size, the peak memory of building them, the cache file's size and the time to
build, save, load and pickle it (what rank 0 broadcasts).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_OURS = """
import sys, time
t = time.perf_counter()
from xcit.config.train_config import load_config
from xcit.data.pipeline import build_datasets
cfg = load_config(["--data_dir", sys.argv[1], "--image_resize", "32"])[0]
t0 = time.perf_counter()
train, _ = build_datasets(cfg, need_val=False)
print(time.perf_counter() - t0, len(train))
"""
_TORCHVISION = """
import sys, time
from torchvision.datasets import ImageFolder
t0 = time.perf_counter()
ds = ImageFolder(sys.argv[1] + "/train")
print(time.perf_counter() - t0, len(ds))
"""


def write_tree(root: Path, n: int, classes: int = 100) -> Path:
    """``n`` distinct 32x32 JPEGs in ``classes`` folders under ``root/train`` (kept between runs)."""
    import numpy as np
    from PIL import Image

    if len(list(root.glob("train/*/*.jpg"))) == n:
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"class_{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:06d}.jpg", quality=80)
    return root


def _time(script: str, root: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, env=env, check=True)
    seconds, count = out.stdout.split()[-2:]
    return float(seconds), int(count)


def tree_mode(workdir: Path, files: int, small: int, repeats: int) -> dict:
    big, little = write_tree(workdir / f"tree{files}", files), write_tree(workdir / f"tree{small}", small)
    times: dict[str, list[float]] = {"ours_large": [], "ours_small": [], "torchvision_large": []}
    for _ in range(repeats):
        for name, script, root in (("ours_large", _OURS, big), ("ours_small", _OURS, little),
                                   ("torchvision_large", _TORCHVISION, big)):  # fmt: skip
            t, count = _time(script, root)
            assert count == (small if root is little else files), (name, count)
            times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    added = med["ours_large"] - med["ours_small"]
    limit = 3 * med["torchvision_large"] + 0.75
    return {"files": files, "small": small, "runs": times, "median_s": med, "added_by_tree_s": added,
            "limit_s": limit, "met": added <= limit}  # fmt: skip


def synthetic_mode(n: int, workdir: Path) -> dict:
    import numpy as np

    from xcit.data.index_cache import load_cached, save_cached
    from xcit.data.readers import FolderSource, Listing, encode_paths

    classes = [f"n{i:08d}" for i in range(1000)]
    per = -(-n // len(classes))

    def build() -> tuple[FolderSource, float]:
        t0 = time.perf_counter()
        paths = [f"{c}/{c}_{j}.JPEG" for c in classes for j in range(per)][:n]  # what the listing returns
        listed = time.perf_counter() - t0
        targets = np.repeat(np.arange(len(classes), dtype=np.int64), per)[:n]
        return FolderSource(Path("/data/imagenet/train"), classes, classes, encode_paths(paths), targets), listed

    t0 = time.perf_counter()
    source, listed = build()
    built = time.perf_counter() - t0
    tracemalloc.start()  # a second build for its memory (tracemalloc slows allocation down)
    build()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    key, path = {"split": "/data/imagenet/train", "synthetic": n}, workdir / "synthetic_index.npz"
    t = time.perf_counter()
    save_cached(path, key, {"source": source, "listing": Listing()})
    saved = time.perf_counter() - t
    t = time.perf_counter()
    loaded = load_cached(path, key, {"FolderSource": FolderSource, "Listing": Listing})
    read = time.perf_counter() - t
    assert len(loaded["source"]) == n
    t = time.perf_counter()
    blob = pickle.dumps({"source": source, "listing": Listing()}, protocol=pickle.HIGHEST_PROTOCOL)
    pickled = time.perf_counter() - t
    index_mb = (source.paths.nbytes + source.targets.nbytes) / 2**20
    return {"entries": n, "index_mib": index_mb, "build_s": built, "of_which_names_s": listed,
            "build_peak_mib": peak / 2**20, "cache_file_mib": path.stat().st_size / 2**20, "save_s": saved,
            "load_s": read, "pickle_mib": len(blob) / 2**20, "pickle_s": pickled}  # fmt: skip


def shards_mode(workdir: Path, files: int) -> dict:
    """``xcit shard``'s writing speed and the shard index's build time on the ``--files`` tree (one process)."""
    from xcit.data.readers import list_folder
    from xcit.data.shards import list_shards, write_shards

    tree = write_tree(workdir / f"tree{files}", files)
    source, _ = list_folder(tree / "train")
    out = workdir / f"wds{files}"
    t = time.perf_counter()
    write_shards(source, out, "train", max_size=64 * 2**20, progress=False)
    written = time.perf_counter() - t
    tars = sorted((out / "train").glob("*.tar"))
    t = time.perf_counter()
    index = list_shards(tars)["source"]
    indexed = time.perf_counter() - t
    mb = sum(p.stat().st_size for p in tars) / 1e6
    return {"images": len(index), "shards": len(tars), "shard_mb": mb, "write_s": written,
            "write_img_per_s": files / written, "write_mb_per_s": mb / written, "index_s": indexed,
            "index_samples_per_s": files / indexed}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=20000)
    p.add_argument("--small", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--synthetic", type=int, default=None, metavar="N", help="index N generated paths instead")
    p.add_argument("--shards", action="store_true", help="time xcit shard and the shard index on the --files tree")
    p.add_argument("--workdir", type=Path, default=None, help="keep the trees here (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.synthetic:
            result = synthetic_mode(args.synthetic, workdir)
        elif args.shards:
            result = shards_mode(workdir, args.files)
        else:
            result = tree_mode(workdir, args.files, args.small, args.repeats)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
