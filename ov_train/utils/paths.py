"""Where ov_train keeps what it builds once and reuses (tokenizer, synthetic shards)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("OV_TRAIN_CACHE", Path.home() / ".cache" / "ov_train"))
