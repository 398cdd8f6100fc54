"""MindCV-compatible entry point: ``python train.py --config configs/xcit/xcit_tiny_12_p16_ascend.yaml --data_dir D``
(single process with ``--distribute False``; ``torchrun --nproc_per_node N train.py ...`` for several). Same as
``xcit train``."""

import sys

from xcit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
