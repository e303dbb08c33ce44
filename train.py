"""Entry point in a checkout: `python train.py stage=onevision` is `ov-train stage=onevision` (ov_train/cli/)."""
import sys

from ov_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
