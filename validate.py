"""MindCV-compatible entry point: ``python validate.py -c configs/xcit/xcit_tiny_12_p16_224_ascend.yaml
--data_dir D --ckpt_path C``. Same as ``xcit validate``."""

import sys

from xcit.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
