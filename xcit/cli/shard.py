"""``xcit shard DATA_DIR OUT_DIR``: write an ImageFolder's splits as WebDataset tar shards plus their class names.

Each split ``DATA_DIR/<split>/<class>/<image>`` becomes ``OUT_DIR/<split>/<split>-NNNNNN.tar`` (webdataset's
``ShardWriter``, at most ``--max-size`` per shard), and ``OUT_DIR/classes.json`` holds the training classes, so
``xcit train --data_dir OUT_DIR`` trains on the shards with the same labels. Images are copied byte for byte.

An OUT_DIR that already holds shards is refused unless ``--overwrite`` is given; then the new set is written
beside the old one in a hidden folder and swapped in when complete, so readers see either set, never a mix.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..config.options import Parser

log = logging.getLogger("xcit")
DEFAULT_SPLITS = ("train", "val")


def _splits(root: Path, asked: list[str] | None) -> list[str]:
    """The split folders to write: all of ``asked`` (each must exist), else those of train/val that exist."""
    from ..data.pipeline import DataError

    if not root.is_dir():
        raise DataError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) or ["none"]
    if asked:
        missing = [s for s in asked if not (root / s).is_dir()]
        if missing:
            raise DataError(f"{root}: no split folder {', '.join(missing)} (its folders: {', '.join(folders[:10])})")
        return list(dict.fromkeys(asked))
    found = [s for s in DEFAULT_SPLITS if (root / s).is_dir()]
    if not found:
        raise DataError(
            f"{root} has no train/ or val/ folder: xcit shard reads DATA_DIR/<split>/<class>/<image>; name the "
            f"split folders with --splits (its folders: {', '.join(folders[:10])})"
        )
    return found


def main(argv: list[str] | None = None) -> int:
    from ..data.formats import relabel
    from ..data.pipeline import DataError
    from ..data.readers import list_folder
    from ..data.shards import check_split_folders, parse_size, shard_set, staging_folder, swap_in, write_shards

    p = Parser(prog="xcit shard", description=__doc__)
    p.add_argument("data_dir", help="an ImageFolder dataset root (DATA_DIR/<split>/<class>/<image>)")
    p.add_argument("out_dir", help="where the shards go (created)")
    p.add_argument("--max-size", default="1GB", help="largest shard, e.g. 1GB, 500MB (default 1GB)")
    p.add_argument("--splits", nargs="+", default=None, help="split folders to convert (default: train val)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order within the shards")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shard set already in OUT_DIR (every split folder of shards and classes.json)",
    )
    args = p.parse_args(argv)
    root, out = Path(args.data_dir), Path(args.out_dir)
    max_size = parse_size(args.max_size)
    splits = _splits(root, args.splits)
    old = shard_set(out)
    if old and not args.overwrite:
        names = ", ".join(q.name for q in old)
        raise DataError(f"{out} already holds shards ({names}); pass --overwrite to replace them, or another OUT_DIR")
    check_split_folders(out, splits)
    staged = staging_folder(out)
    try:
        classes = None
        for split in splits:
            source, listing = list_folder(root / split)
            classes = classes or source.classes  # the first split's (train's) classes label every split
            unknown = sorted(set(source.classes) - set(classes))
            if unknown:
                raise DataError(f"{root / split}: {len(unknown)} classes are not in {root / splits[0]}: {unknown[:10]}")
            for loop in listing.loops:
                log.warning("%s: symlink loop %s not followed", root / split, loop)
            done = write_shards(relabel(source, classes), staged, split, max_size, args.seed)
            log.info("%s: %d images in %d shards under %s", split, done["images"], done["shards"], out / split)
        (staged / "classes.json").write_text(json.dumps(classes, indent=0) + "\n")
        swap_in(out, staged)
    except BaseException:  # nothing of a failed run stays behind; the old set was never touched
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if old:
        log.info("replaced the earlier shard set (%s)", ", ".join(q.name for q in old))
    log.info("classes: %d names in %s; train with: xcit train --data_dir %s", len(classes), out / "classes.json", out)
    return 0
