"""Parquet sources: the released OneVision parquet layout (id, conversations, data_source, image {bytes, path})
trained directly, with the checks and the accounting of `ov-data convert`.

An index, in the format of convert's index.json (per sample: modality, image sizes, text and visual tokens at
the real OneVision geometry; rejects by reason), plus each file's fingerprint and rejected rows, is built once
per source: ahead of time by `ov-data index` (written beside the files, or where --out says and the recipe's
`index:` names), or else on first read into `data.index_dir` (beside the run). Training skips the rows it
rejects without decoding them, counted under convert's reasons, and checks the others as convert does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from ov_train.config.options import IOSettings
from ov_train.constants import PARQUET
from ov_train.data.convert import MediaRoot, Reject, build_sample, shipped_token_geometry, text_token_counts
from ov_train.data.formats import PARQUET_BATCH_ROWS, Item, parquet_items, parquet_missing_columns
from ov_train.data.inspect import summarise
from ov_train.data.remote import (
    filesystem,
    is_remote,
    named_errors,
    parquet_file,
    read_bytes,
    redact,
    redact_text,
    retrying,
    upload,
)
from ov_train.utils.logging import get_logger
from ov_train.utils.paths import write_atomic

log = get_logger(__name__)

INDEX_VERSION = 1
INDEX_NAME = "index.json"


class ParquetIndexError(ValueError):
    """An index that cannot be built or used; the message names the file."""


class _NoMedia(MediaRoot):
    """Parquet rows carry their images; a row that only names a file has nothing to read it from."""

    def read(self, ref: str, reason: str) -> bytes:
        raise Reject(reason, f"{ref!r}: parquet sources read images from the image bytes column, not from paths")


NO_MEDIA = _NoMedia(Path("/"))


def sample_key(location: str, row: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", location.rsplit("/", 1)[-1].removesuffix(".parquet"))
    return f"{stem}-{row:09d}"


def row_sample(item: Item, location: str, row: int, rejected: str | None = None) -> dict:
    """The shard sample `ov-data convert` would write for this row, or {"__skip__": reason} when the index
    rejected it (not decoded again) or convert's checks reject it now."""
    key = sample_key(location, row)
    if rejected:
        return {"__key__": key, "__skip__": rejected, "__detail__": f"{item.where}: rejected by the index ({rejected})"}
    try:
        sample, _ = build_sample(item, key, NO_MEDIA, shipped_token_geometry())
    except Reject as rej:
        return {"__key__": key, "__skip__": rej.reason, "__detail__": f"{item.where}: {rej.detail}"}
    sample["json"] = json.dumps(sample["json"], ensure_ascii=False).encode()
    return sample


# ---------------------------------------------------------------- building

def fingerprint(location: str, io: IOSettings) -> dict:
    """Size and version (ETag or modification time) of a file: an index holds for the files it was built from."""
    fs, path = filesystem(location, io)

    def stat():
        with named_errors(location):
            return fs.info(path)

    info = retrying(stat, f"stat {redact(location)}", io)
    version = next((info.get(k) for k in ("ETag", "etag", "mtime", "LastModified", "last_modified") if info.get(k)), "")
    return {"size": info.get("size"), "version": str(version)}


def _index_file(location: str, tokenizer, io: IOSettings, bar) -> tuple[dict, list[dict], list[dict]]:
    parquet = parquet_file(location, io)
    missing = parquet_missing_columns(parquet)
    if missing:
        raise ParquetIndexError(f"{redact(location)}: parquet lacks column(s) {missing}")
    name, samples, rejects, rejected = redact(location), [], [], {}
    batch: list[tuple[int, Item]] = []

    def flush():
        counts = text_token_counts(tokenizer, [item for _, item in batch])
        for (row, item), tokens in zip(batch, counts):
            try:
                _, entry = build_sample(item, sample_key(location, row), NO_MEDIA, shipped_token_geometry())
            except Reject as rej:
                rejected[str(row)] = rej.reason
                rejects.append({"id": item.record.get("id") if isinstance(item.record, dict) else None,
                                "reason": rej.reason, "detail": rej.detail, "where": item.where})
                continue
            samples.append({**entry, "text_tokens": tokens, "shard": name, "row": row})
        bar.update(len(batch))
        batch.clear()

    for row_item in parquet_items(parquet, location.rsplit("/", 1)[-1]):
        batch.append(row_item)
        if len(batch) == PARQUET_BATCH_ROWS:
            flush()
    flush()
    info = {"fingerprint": fingerprint(location, io), "rows": parquet.metadata.num_rows, "rejected": rejected}
    return info, samples, rejects


def _index_read(location: str, tokenizer, io: IOSettings, bar) -> tuple[dict, list[dict], list[dict]]:
    """_index_file, read again from the start after a failed read (data.io); a file that stays unreadable is
    named, whatever the client raised (an FSTimeoutError has no message)."""
    try:
        return retrying(lambda: _index_file(location, tokenizer, io, bar), f"index {redact(location)}", io,
                        fatal=(ParquetIndexError,))
    except (ParquetIndexError, FileNotFoundError):
        raise
    except Exception as err:  # OSError, timeouts, aiohttp / botocore errors, a truncated file...
        raise ParquetIndexError(f"{redact(location)}: unreadable after {io.retries + 1} attempt(s): "
                                f"{type(err).__name__}: {redact_text(err)}") from None


def build_index(files: list[str], tokenizer, io: IOSettings = IOSettings()) -> dict:
    """convert's index.json for parquet files (`ov-data inspect` reads it), with each file's rows and rejects."""
    files_info, samples, rejects = {}, [], []
    with tqdm(unit="row", desc="ov-data index", disable=None) as bar:
        for location in files:
            info, more, lost = _index_read(location, tokenizer, io, bar)
            files_info[redact(location)] = info
            samples += more
            rejects += lost
    return {
        "version": INDEX_VERSION,
        "settings": {"format": PARQUET},
        "geometry": shipped_token_geometry().index_fields(),
        "totals": summarise(samples, rejects),
        "files": files_info,
        "shards": list(files_info),
        "samples": samples,
        "rejects": rejects,
    }


def write_index(index: dict, location: str, io: IOSettings = IOSettings()) -> None:
    """Write the index whole: a local file appears by rename, a remote one by a complete upload."""
    text = json.dumps(index, ensure_ascii=False)
    if is_remote(location):
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f".ov-index-{os.getpid()}.json"
        tmp.write_text(text, encoding="utf-8")
        try:
            upload(tmp, location, io)
        finally:
            tmp.unlink(missing_ok=True)
        return
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(location), text)


# ---------------------------------------------------------------- using

def _read_index(location: str, io: IOSettings) -> dict | None:
    try:
        return json.loads(read_bytes(location, io))
    except FileNotFoundError:
        return None


def _holds(index: dict | None, files: list[str], io: IOSettings) -> bool:
    if not index or index.get("version") != INDEX_VERSION or not isinstance(index.get("files"), dict):
        return False
    known = index["files"]
    return all(redact(f) in known and known[redact(f)].get("fingerprint") == fingerprint(f, io) for f in files)


def default_index_location(files: list[str]) -> str:
    return files[0].rsplit("/", 1)[0] + "/" + INDEX_NAME


def _by_folder(files: list[str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(f.rsplit("/", 1)[0], []).append(f)
    return list(groups.values())


def source_index(source, files: list[str], index_dir: str | Path | None, tokenizer, io: IOSettings = IOSettings()) -> dict:
    """The index of some of a parquet source's files (one folder's): the recipe's `index:`, an index.json beside
    them, or one cached in index_dir (built there on first read, under a lock so that ranks build it once)."""
    for location, named in ((source.index, True), (default_index_location(files), False)):
        if location is None:
            continue
        index = _read_index(location, io)
        if _holds(index, files, io):
            return index
        if named and index is None:
            raise ParquetIndexError(f"source {source.name!r}: index {redact(location)} does not exist")
    if index_dir is None:
        raise ParquetIndexError(f"source {source.name!r}: no index of its parquet files; run `ov-data index` or set"
                                " data.index_dir")
    digest = hashlib.sha256(json.dumps([redact(f) for f in files]).encode()).hexdigest()[:16]
    cached = Path(index_dir) / f"{re.sub(r'[^A-Za-z0-9_-]', '_', source.name)}-{digest}.json"
    cached.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cached) + ".lock"):
        index = _read_index(str(cached), io) if cached.exists() else None
        if not _holds(index, files, io):
            log.info("source %s: indexing %d parquet file(s) into %s", source.name, len(files), cached)
            index = build_index(files, tokenizer, io)
            write_index(index, str(cached), io)
    return index


def with_indexes(recipe, index_dir, tokenizer, io: IOSettings = IOSettings()):
    """The recipe with each parquet source's rejected rows attached, and its accounting logged."""
    sources = []
    for source in recipe.sources:
        if source.format == PARQUET:
            rejects = {}
            for files in _by_folder(list(source.train_shards) + list(source.val_shards)):
                index = source_index(source, files, index_dir, tokenizer, io)
                rejects.update({f: {int(r): why for r, why in info["rejected"].items()}
                                for f, info in index["files"].items()})
                totals = index["totals"]
                log.info("source %s, %s: %d usable rows (%s), %d rejected (%s)", source.name,
                         redact(files[0].rsplit("/", 1)[0]), totals["samples"],
                         ", ".join(f"{m} {n}" for m, n in totals["by_modality"].items() if n),
                         sum(totals["rejects"].values()), ", ".join(f"{r} {n}" for r, n in totals["rejects"].items()))
            source = dataclasses.replace(source, rejects=rejects)
        sources.append(source)
    return dataclasses.replace(recipe, sources=tuple(sources))
