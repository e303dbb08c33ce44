"""Atomic WebDataset tar shard writer: webdataset's TarWriter per shard, under a temporary name until complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

from webdataset import TarWriter

_TAR_BLOCK = 512


def _encode_field(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"cannot serialise field of type {type(value).__name__}")


def _member_size(payload: bytes) -> int:
    # One header block plus the payload padded to whole blocks.
    return _TAR_BLOCK + -(-len(payload) // _TAR_BLOCK) * _TAR_BLOCK


class ShardWriter:
    """Writes samples to `{prefix}-{index:06d}.tar` shards in `out_dir`.

    Each shard is written under a temporary name and renamed into place only when complete,
    so readers never see a partial shard, even after a crash or Ctrl-C.
    """

    def __init__(self, out_dir, prefix: str, samples_per_shard: int = 1000, max_shard_bytes: int = 1 << 30):
        if samples_per_shard < 1 or max_shard_bytes < 1:
            raise ValueError("samples_per_shard and max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[str] = []
        self._tar: TarWriter | None = None
        self._tmp_path: Path | None = None
        self._name = ""
        self._count = 0
        self._bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: dict) -> None:
        key = sample.get("__key__")
        if not key or "." in key:
            # WebDataset splits member names at the first dot, so the key must not contain one.
            raise ValueError(f"invalid sample key {key!r}")
        fields = {name: _encode_field(v) for name, v in sample.items() if not name.startswith("__")}
        if not fields:
            raise ValueError(f"sample {key!r} has no fields")
        size = sum(_member_size(p) for p in fields.values())

        # Roll over before the sample that would overflow (ignoring tar's end-of-archive padding);
        # a lone oversized sample still gets a shard of its own.
        if self._tar is not None and (
            self._count >= self.samples_per_shard or self._bytes + size > self.max_shard_bytes
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()

        self._tar.write({"__key__": key, **fields})
        self._count += 1
        self._bytes += size

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()

    def _open_shard(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp_path = self.out_dir / f".{name}.tmp{os.getpid()}"
        # Fixed mtime and owner: the same samples make the same bytes. encoder=False: fields are bytes already.
        self._file = open(self._tmp_path, "wb")  # noqa: SIM115 (closed by _finish_shard or _abort)
        self._tar = TarWriter(self._file, encoder=False, mtime=0, mode=0o644, user="", group="", format="USTAR_FORMAT")
        self._name = name
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        self._tar.close()
        self._file.close()
        os.replace(self._tmp_path, self.out_dir / self._name)
        self.shards.append(self._name)
        self._tar = None
        self._tmp_path = None

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tmp_path.unlink(missing_ok=True)
            self._tar = None
            self._tmp_path = None
