"""Where ov_train keeps what it builds once and reuses (tokenizer, synthetic shards), and writing a file whole."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("OV_TRAIN_CACHE", Path.home() / ".cache" / "ov_train"))


def write_atomic(path: Path, text: str) -> None:
    """Write `text` beside `path` and rename it over it: a reader (or a kill) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def permissions_as_umask_allows(directory: Path) -> None:
    """Every file under `directory` readable as the umask allows (0644 under 022): safetensors writes through a
    private temporary file (0600) that keeps its mode when renamed into place, unlike the rest of an export."""
    mask = os.umask(0)
    os.umask(mask)
    for file in Path(directory).rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~mask)
