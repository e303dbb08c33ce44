"""The samples of one shard, wherever it lives: WebDataset tars through webdataset's tar iterators, or rows of a
parquet file in the released OneVision layout, from entry `first` on, with failed reads retried.

A read that fails is retried (data.io.retries times in a row without progress, backing off data.io.backoff_s,
doubled each time): the shard is opened again and read past the entries already delivered. A shard that stays
unreadable raises ShardUnreadable, which the streams count as `shard_unreadable` and go on from.
"""
from __future__ import annotations

import re
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping

from webdataset.tariterators import base_plus_ext, group_by_keys

from ov_train.config.options import IOSettings
from ov_train.constants import PARQUET
from ov_train.data.remote import open_stream, parquet_file
from ov_train.utils.logging import get_logger
from ov_train.utils.redact import redact, redact_text

log = get_logger(__name__)

UNREADABLE = "shard_unreadable"  # the skip reason (data/skipped_shard_unreadable)

Wanted = Callable[[int], bool] | None  # which entries this reader takes (None: all)


# Members webdataset leaves out of samples (its tar_file_iterator's skip_meta default).
_META = re.compile(r"__[^/]*__($|/)")


class ShardUnreadable(RuntimeError):
    """A shard that could not be read after every retry; the message names it (redacted) and the last error.
    `entry`: the first entry not delivered (the shard's entries before it were)."""

    def __init__(self, message: str, entry: int = 0):
        super().__init__(message)
        self.entry = entry


class _Unread:
    """The data of a member passed over for its size."""

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit


class _Pick:
    """webdataset select_files predicate: numbers the samples of a tar as their members go by and lets through
    only the members of wanted entries, so passed-over samples cost their tar headers, not their bytes."""

    def __init__(self, first: int, wanted: Wanted, end: int | None = None):
        self.first, self.wanted, self.end = first, wanted, end
        self.entry, self.key, self.keep = -1, None, False
        self.done = False  # entry `end` began: nothing more is read
        self.kept: deque[int] = deque()  # entry numbers of kept samples, in the order group_by_keys yields them

    def __call__(self, fname: str) -> bool:
        key, _ = base_plus_ext(fname)
        if key is None or self.done:
            return False
        if key != self.key:
            self.key, self.entry = key, self.entry + 1
            self.done = self.end is not None and self.entry >= self.end
            self.keep = not self.done and self.entry >= self.first and (self.wanted is None or self.wanted(self.entry))
            if self.keep:
                self.kept.append(self.entry)
        return self.keep


def _members(stream, url: str, pick: _Pick, limits: Mapping[str, int]) -> Iterator[dict]:
    """The tar's regular members as webdataset's tar_file_iterator yields them ({fname, data, __url__}), except
    that a member larger than its field's limit (`limits`: field -> bytes) is passed over unread (data: _Unread).
    webdataset reads every member it selects whole: its select_files sees names, not sizes."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            # Regular files only: links and devices never reach a sample (nor do webdataset's meta members).
            if not info.isreg() or _META.match(info.name) or not pick(info.name):
                if pick.done:
                    return
                continue
            limit = limits.get(base_plus_ext(info.name)[1])
            data = _Unread(info.size, limit) if limit is not None and info.size > limit else tar.extractfile(info).read()
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # a stream's list of members seen would grow with every one


def _unread_skip(sample: dict) -> dict:
    """A sample with a member passed over for its size, as a skip the stream counts (oversized_<field>)."""
    field, unread = next((f, v) for f, v in sample.items() if isinstance(v, _Unread))
    return {"__key__": sample["__key__"], "__skip__": f"oversized_{field}",
            "__detail__": f"{field} member of {unread.size:,} bytes is over the {unread.limit:,} a sample of this"
                          " stage.max_length may hold; passed over unread"}


def tar_samples(location: str, first: int = 0, wanted: Wanted = None, io: IOSettings = IOSettings(),
                limits: Mapping[str, int] | None = None, end: int | None = None) -> Iterator[tuple[int, dict]]:
    """(entry, sample) of a WebDataset tar for entries `first` to `end` (None: the last): members `key.field`
    grouped by key; a sample with a member over its field's byte limit comes as {"__skip__": "oversized_<field>"},
    that member unread."""
    pick = _Pick(first, wanted, end)
    stream = open_stream(location, io)
    try:
        # lcase=False: field names stay as written (img0.JPG is what the shard says).
        for sample in group_by_keys(_members(stream, redact(location), pick, limits or {}), lcase=False):
            sample.pop("__url__", None)
            if any(isinstance(v, _Unread) for v in sample.values()):
                sample = _unread_skip(sample)
            yield pick.kept.popleft(), sample
    finally:
        stream.close()


def parquet_samples(location: str, first: int = 0, wanted: Wanted = None, io: IOSettings = IOSettings(),
                    rejects: dict | None = None, end: int | None = None) -> Iterator[tuple[int, dict]]:
    """(row, sample) of a parquet file in the released OneVision layout (rows `first` to `end`), each row checked
    like `ov-data convert` checks it and laid out as the shard sample it would write; rows the index (or the
    checks) reject come as {"__skip__": reason} for the stream to skip and count."""
    from ov_train.data.formats import parquet_items
    from ov_train.data.parquet_source import row_sample

    parquet = parquet_file(location, io)
    rejects = rejects or {}
    for row, item in parquet_items(parquet, location.rsplit("/", 1)[-1], first):
        if end is not None and row >= end:
            return
        if wanted is not None and not wanted(row):
            continue
        yield row, row_sample(item, location, row, rejects.get(row))


def samples(fmt: str, location: str, first: int = 0, wanted: Wanted = None, io: IOSettings = IOSettings(),
            rejects: dict | None = None, limits: Mapping[str, int] | None = None,
            end: int | None = None) -> Iterator[tuple[int, dict]]:
    """(entry, sample) of one shard for entries `first` to `end` (None: all), retrying failed reads;
    ShardUnreadable when they keep failing. `limits`: bytes a tar member may have, by field
    (SampleProcessor.member_limits)."""
    failures, progress = 0, first
    while True:
        try:
            if fmt == PARQUET:
                entries = parquet_samples(location, progress, wanted, io, rejects, end)
            else:
                entries = tar_samples(location, progress, wanted, io, limits, end)
            for entry, sample in entries:
                progress, failures = entry + 1, 0
                yield entry, sample
            return
        except Exception as err:  # OSError, timeouts, truncated tars, aiohttp / botocore errors...
            failures += 1
            why = f"{type(err).__name__}: {redact_text(err)}"
            if failures > io.retries:
                raise ShardUnreadable(f"{redact(location)}: unreadable after {failures} attempt(s): {why}",
                                      progress) from None
            delay = io.backoff_s * 2 ** (failures - 1)
            log.warning("reading %s failed at entry %d (%s); retry %d of %d in %.1f s", redact(location), progress,
                        why, failures, io.retries, delay)
            time.sleep(delay)
