"""The samples of one shard, wherever it lives: WebDataset tars through webdataset's tar iterators, or rows of a
parquet file in the released OneVision layout, from entry `first` on, with failed reads retried.

A read that fails is retried (data.io.retries times in a row without progress, backing off data.io.backoff_s,
doubled each time): the shard is opened again and read past the entries already delivered. A shard that stays
unreadable raises ShardUnreadable, which the streams count as `shard_unreadable` and go on from.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ov_train.config.options import IOSettings
from ov_train.constants import PARQUET
from ov_train.data.remote import open_stream, parquet_file
from ov_train.utils.logging import get_logger
from ov_train.utils.redact import redact, redact_text

log = get_logger(__name__)

UNREADABLE = "shard_unreadable"  # the skip reason (data/skipped_shard_unreadable)

Wanted = Callable[[int], bool] | None  # which entries this reader takes (None: all)


class ShardUnreadable(RuntimeError):
    """A shard that could not be read after every retry; the message names it (redacted) and the last error."""


class _Pick:
    """webdataset select_files predicate: numbers the samples of a tar as their members go by and lets through
    only the members of wanted entries, so passed-over samples cost their tar headers, not their bytes."""

    def __init__(self, first: int, wanted: Wanted):
        self.first, self.wanted = first, wanted
        self.entry, self.key, self.keep = -1, None, False
        self.kept: deque[int] = deque()  # entry numbers of kept samples, in the order group_by_keys yields them

    def __call__(self, fname: str) -> bool:
        key, _ = base_plus_ext(fname)
        if key is None:
            return False
        if key != self.key:
            self.key, self.entry = key, self.entry + 1
            self.keep = self.entry >= self.first and (self.wanted is None or self.wanted(self.entry))
            if self.keep:
                self.kept.append(self.entry)
        return self.keep


def tar_samples(location: str, first: int = 0, wanted: Wanted = None,
                io: IOSettings = IOSettings()) -> Iterator[tuple[int, dict]]:
    """(entry, sample) of a WebDataset tar from entry `first` on: members `key.field` grouped by key."""
    pick = _Pick(first, wanted)
    stream = open_stream(location, io)
    try:
        files = tar_file_expander([{"url": redact(location), "stream": stream}], select_files=pick)
        # lcase=False: field names stay as written (img0.JPG is what the shard says).
        for sample in group_by_keys(files, lcase=False):
            sample.pop("__url__", None)
            yield pick.kept.popleft(), sample
    finally:
        stream.close()


def parquet_samples(location: str, first: int = 0, wanted: Wanted = None, io: IOSettings = IOSettings(),
                    rejects: dict | None = None) -> Iterator[tuple[int, dict]]:
    """(row, sample) of a parquet file in the released OneVision layout, each row checked like `ov-data convert`
    checks it and laid out as the shard sample it would write; rows the index (or the checks) reject come as
    {"__skip__": reason} for the stream to skip and count."""
    from ov_train.data.formats import parquet_items
    from ov_train.data.parquet_source import row_sample

    parquet = parquet_file(location, io)
    rejects = rejects or {}
    for row, item in parquet_items(parquet, location.rsplit("/", 1)[-1], first):
        if wanted is not None and not wanted(row):
            continue
        yield row, row_sample(item, location, row, rejects.get(row))


def samples(fmt: str, location: str, first: int = 0, wanted: Wanted = None, io: IOSettings = IOSettings(),
            rejects: dict | None = None) -> Iterator[tuple[int, dict]]:
    """(entry, sample) of one shard from entry `first`, retrying failed reads; ShardUnreadable when they keep failing."""
    failures, progress = 0, first
    while True:
        try:
            if fmt == PARQUET:
                entries = parquet_samples(location, progress, wanted, io, rejects)
            else:
                entries = tar_samples(location, progress, wanted, io)
            for entry, sample in entries:
                progress, failures = entry + 1, 0
                yield entry, sample
            return
        except Exception as err:  # OSError, timeouts, truncated tars, aiohttp / botocore errors...
            failures += 1
            why = f"{type(err).__name__}: {redact_text(err)}"
            if failures > io.retries:
                raise ShardUnreadable(f"{redact(location)}: unreadable after {failures} attempt(s): {why}") from None
            delay = io.backoff_s * 2 ** (failures - 1)
            log.warning("reading %s failed at entry %d (%s); retry %d of %d in %.1f s", redact(location), progress,
                        why, failures, io.retries, delay)
            time.sleep(delay)
