"""``xcit shard DATA_DIR OUT_DIR``: write an ImageFolder's splits as WebDataset tar shards plus their class names.

Each split ``DATA_DIR/<split>/<class>/<image>`` becomes ``OUT_DIR/<split>/<split>-NNNNNN.tar`` (webdataset's
``ShardWriter``, at most ``--max-size`` per shard), and ``OUT_DIR/classes.json`` holds the training classes, so
``xcit train --data_dir OUT_DIR`` trains on the shards with the same labels. Images are copied byte for byte.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config.options import Parser

log = logging.getLogger("xcit")


def main(argv: list[str] | None = None) -> int:
    from ..data.formats import relabel
    from ..data.pipeline import DataError
    from ..data.readers import list_folder
    from ..data.shards import parse_size, write_shards

    p = Parser(prog="xcit shard", description=__doc__)
    p.add_argument("data_dir", help="an ImageFolder dataset root (DATA_DIR/<split>/<class>/<image>)")
    p.add_argument("out_dir", help="where the shards go (created)")
    p.add_argument("--max-size", default="1GB", help="largest shard, e.g. 1GB, 500MB (default 1GB)")
    p.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="split folders to convert (default: train val)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order within the shards")
    args = p.parse_args(argv)
    root, out = Path(args.data_dir), Path(args.out_dir)
    max_size = parse_size(args.max_size)
    splits = [s for s in args.splits if (root / s).is_dir()]
    if not splits:
        raise DataError(f"{root}: none of the splits {args.splits} is a folder")
    classes = None
    for split in splits:
        source, listing = list_folder(root / split)
        classes = classes or source.classes  # the first split's (train's) classes label every split
        unknown = sorted(set(source.classes) - set(classes))
        if unknown:
            raise DataError(f"{root / split}: {len(unknown)} classes are not in {root / splits[0]}: {unknown[:10]}")
        for loop in listing.loops:
            log.warning("%s: symlink loop %s not followed", root / split, loop)
        done = write_shards(relabel(source, classes), out, split, max_size, args.seed)
        log.info("%s: %d images in %d shards under %s", split, done["images"], done["shards"], out / split)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.json").write_text(json.dumps(classes, indent=0) + "\n")
    log.info("classes: %d names in %s; train with: xcit train --data_dir %s", len(classes), out / "classes.json", out)
    return 0
