"""MindCV-compatible entry point: ``python validate.py -c configs/xcit/xcit_tiny_12_p16_224_ascend.yaml
--data_dir D --ckpt_path C``. Same as ``xcit validate``."""

import logging
import sys

from xcit.commands.validate import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
