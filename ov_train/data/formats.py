"""Readers of the input formats people hold LLaVA data in: LLaVA JSON / JSONL, LLaVA-NeXT data YAML, parquet; each
record a conversation or a preference pair (`is_preference`).

Every reader yields `Item`s in a fixed order (the conversion plans its shards from that order)
and never judges a record beyond parsing it: validation belongs to the conversion.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

FORMATS = {".json": "json", ".jsonl": "jsonl", ".yaml": "yaml", ".yml": "yaml", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 256
HEAD_BYTES = 1 << 20  # how much of an input file its fingerprint hashes


class InputError(ValueError):
    """The input as a whole cannot be read (missing file, unparsable JSON, bad YAML entry)."""


class Reject(Exception):
    """A record that is skipped; `reason` is the counter it goes under in rejects.jsonl."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# A record naming either is a preference record (data/pair_records.py reads both of its layouts).
PREFERENCE_KEYS = ("chosen", "rejected")


def is_preference(record) -> bool:
    """Whether a record is a preference pair (a prompt, a chosen and a rejected reply) rather than a conversation."""
    return isinstance(record, dict) and any(k in record for k in PREFERENCE_KEYS)


@dataclass
class Item:
    source: str  # recorded with the sample: input file name or parquet data_source
    where: str  # "file:line" or "file#row": names the record in messages and stands in for a missing id
    record: object  # the parsed value; a LLaVA dict when well-formed
    error: str | None = None  # why the line did not parse
    image_bytes: list[bytes] | None = field(default=None, repr=False)  # parquet: embedded images


@dataclass
class Input:
    total: int  # number of items `items` yields (for the progress bar)
    items: Iterator[Item]
    files: list[dict]  # fingerprint() of every file read (a data YAML and each json it lists)


def fingerprint(path: Path) -> dict:
    """Size, modification time and a hash of the head of a file: a resumed conversion checks its input did not change.

    Taken just before the file is read, so an edit made while it is read shows as a change next time.
    """
    try:
        stat = path.stat()
        with open(path, "rb") as f:
            head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    except OSError as err:
        raise InputError(f"{path}: not readable ({err.strerror or err})") from err
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


def detect_format(path: Path, forced: str | None) -> str:
    if forced:
        return forced
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the extension {path.suffix!r}; pass --format")
    return fmt


def open_input(path: str | Path, fmt: str | None = None, seed: int = 0) -> Input:
    path = Path(path)
    fmt = detect_format(path, fmt)
    if fmt == "parquet":
        return _parquet(path)
    files: list[dict] = []
    items = _data_yaml(path, seed, files) if fmt == "yaml" else _llava_file(path, fmt, files)
    return Input(len(items), iter(items), files)


def _llava_file(path: Path, fmt: str, files: list[dict]) -> list[Item]:
    files.append(fingerprint(path))
    return _json_list(path) if fmt == "json" else list(_jsonl(path))


def _json_list(path: Path) -> list[Item]:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not readable as JSON ({err})") from err
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return [Item(path.name, f"{path.name}#{i}", record) for i, record in enumerate(records)]


def _jsonl(path: Path) -> Iterator[Item]:
    try:
        # Bytes, decoded line by line: one line of bad UTF-8 is one malformed line, not an unreadable file.
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path.name}:{number}"
                try:
                    yield Item(path.name, where, json.loads(line.decode("utf-8")))
                except UnicodeDecodeError as err:
                    yield Item(path.name, where, None, error=f"invalid UTF-8 ({err})")
                except ValueError as err:
                    yield Item(path.name, where, None, error=f"invalid JSON ({err})")
    except OSError as err:
        raise InputError(f"{path}: not readable as JSON lines ({err})") from err


# ---------------------------------------------------------------- LLaVA-NeXT data YAML


def _data_yaml(path: Path, seed: int, files: list[dict]) -> list[Item]:
    files.append(fingerprint(path))
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{path}: not readable as YAML ({err})") from err
    datasets = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise InputError(f"{path}: needs a non-empty 'datasets' list")
    items = []
    for i, entry in enumerate(datasets):
        where = f"{path.name}: datasets[{i}]"
        if not isinstance(entry, dict) or not entry.get("json_path"):
            raise InputError(f"{where}: needs a 'json_path'")
        json_path = Path(entry["json_path"])
        if not json_path.is_absolute():
            json_path = path.parent / json_path
        if not json_path.is_file():
            raise InputError(f"{where}: json_path {str(json_path)!r} not found")
        fmt = detect_format(json_path, None)
        if fmt not in ("json", "jsonl"):
            raise InputError(f"{where}: json_path must be a .json or .jsonl file, got {json_path.name!r}")
        records = _llava_file(json_path, fmt, files)
        strategy = str(entry.get("sampling_strategy", "all"))
        # A seed per dataset entry, so equal-sized datasets do not get the same selection.
        rng = random.Random(f"{seed}/{i}")
        try:
            chosen = select(len(records), strategy, rng)
        except ValueError as err:
            raise InputError(f"{where}: {err}") from err
        items += [records[k] for k in chosen]
    return items


def select(n: int, strategy: str, rng: random.Random) -> list[int]:
    """Indices (ascending) that a LLaVA-NeXT sampling_strategy keeps out of n records.

    `first:N%` / `end:N%` / `random:N%` keep ceil(N% of n) records, like LLaVA-NeXT;
    `first:N` etc. (no %) keep N records; `all` keeps everything.
    """
    if strategy == "all":
        return list(range(n))
    how, _, amount = strategy.partition(":")
    if how not in ("first", "end", "random") or not amount:
        raise ValueError(f"sampling_strategy {strategy!r}; expected all, first:N%, end:N% or random:N%")
    try:
        count = math.ceil(float(amount[:-1]) * n / 100) if amount.endswith("%") else int(amount)
    except ValueError:
        raise ValueError(f"sampling_strategy {strategy!r}: {amount!r} is not a number or percentage") from None
    count = max(0, min(count, n))
    if how == "first":
        return list(range(count))
    if how == "end":
        return list(range(n - count, n))
    return sorted(rng.sample(range(n), count))


# ---------------------------------------------------------------- parquet (LLaVA-OneVision-Data style)


def _parquet(path: Path) -> Input:
    import pyarrow.parquet as pq

    files = [fingerprint(path)]
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for files it cannot read
        raise InputError(f"{path}: not readable as parquet ({err})") from err
    missing = parquet_missing_columns(parquet)
    if missing:
        raise InputError(f"{path}: parquet lacks column(s) {missing}")
    return Input(parquet.metadata.num_rows, (item for _, item in parquet_items(parquet, path.name)), files)


def parquet_missing_columns(parquet) -> list[str]:
    """Columns a parquet file lacks: `conversations` (the OneVision layout), or `chosen` and `rejected` once it has
    either (Hugging Face's preference layout)."""
    names = set(parquet.schema_arrow.names)
    return sorted(set(PREFERENCE_KEYS if names & set(PREFERENCE_KEYS) else ("conversations",)) - names)


def parquet_items(parquet, name: str, first: int = 0) -> Iterator[tuple[int, Item]]:
    """(row, Item) of a parquet file from row `first` on; whole row groups before it are not read."""
    known = ("id", "conversations", "data_source", "image", "images", "prompt", *PREFERENCE_KEYS)
    columns = [c for c in known if c in parquet.schema_arrow.names]
    groups, row = [], 0
    for g in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(g).num_rows
        if groups or row + size > first:  # from the group holding `first` on, every group
            groups.append(g)
        else:
            row += size
    if not groups:
        return
    # Row batches keep memory bounded: image bytes of a whole release do not fit in RAM.
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
        for values in batch.to_pylist():
            if row >= first:
                yield row, _parquet_item(values, name, row)
            row += 1


def _parquet_item(values: dict, name: str, row: int) -> Item:
    if is_preference(values):
        record = {k: values.get(k) for k in ("id", "prompt", *PREFERENCE_KEYS) if k in values}
    else:
        record = {"id": values.get("id"), "conversations": values.get("conversations")}
    # Hugging Face's preference sets name a list of images `images`; the OneVision layout one image `image`.
    images = _parquet_images(values["images"] if values.get("images") is not None else values.get("image"))
    embedded = [img["bytes"] for img in images if img.get("bytes")]
    if len(embedded) == len(images):
        image_bytes = embedded
    else:
        # Datasets' Image feature may keep only a path: read those from the media root.
        image_bytes = None
        record["image"] = [img.get("path") for img in images]
    source = values.get("data_source") or name
    return Item(str(source), f"{name}#{row}", record, image_bytes=image_bytes)


def _parquet_images(value) -> list[dict]:
    if value is None:
        return []
    images = value if isinstance(value, list) else [value]
    return [img for img in images if img and (img.get("bytes") or img.get("path"))]
