"""Streams of processed samples from WebDataset shards: weighted mixing for training, one pass for validation.

A training stream belongs to one logical reader (one per rank x loader worker) and is a pure
function of (seed, reader id, state): every random choice comes from a generator seeded by counters
that the state holds, so a stream rebuilt from `state()` continues with exactly the same samples.

Unusable samples are skipped and counted, but not without end: `max_skips_in_a_row` skips with no usable
sample between them (from the whole stream or from one source) stop it with a StreamError that names the
reasons, since no setting of a run makes such a stream useful (e.g. stage.max_length below every sample).
"""
from __future__ import annotations

import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ov_train.config.recipe import normalised
from ov_train.data.recipe import Source
from ov_train.data.samples import SampleError
from ov_train.utils.logging import get_logger

log = get_logger(__name__)

# Mixing draws come in shuffled decks of about this many: each deck holds every source in its share
# (rounding carried from deck to deck), so the realized mix tracks the recipe within a deck.
DECK = 1000
# Leading tags keep the seed sequences of shard orders, blocks and decks apart.
_SHARDS, _BLOCK, _DECK = 0, 1, 2
MAX_SKIPS_IN_A_ROW = 1000
# Skips logged one by one before they are only summarised, and the summary's period.
SKIPS_LOGGED, SKIP_SUMMARY_EVERY = 5, 1000
# The config key behind a skip reason, where one setting causes it.
REASON_KEYS = {"too_long": "max_length", "no_supervised_tokens": "max_length"}


class StreamError(RuntimeError):
    """A stream that cannot deliver: every sample in a long run of them was skipped."""


class Skips:
    """Skipped samples of one stream: counted by reason, logged without flooding (the first few one by one,
    then a summary every SKIP_SUMMARY_EVERY), and stopped after `limit` in a row from the stream or a source."""

    def __init__(self, what: str, process, limit: int = MAX_SKIPS_IN_A_ROW):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"data.max_skips_in_a_row={limit!r} must be a positive integer")
        self.what, self.process, self.limit = what, process, limit
        self.total: Counter = Counter()
        self.in_a_row: Counter = Counter()  # since the stream's last usable sample
        self.by_source: dict[str, Counter] = {}  # since each source's last usable sample

    def used(self, source: str) -> None:
        self.in_a_row.clear()
        self.by_source.pop(source, None)

    def skipped(self, source: str, err: SampleError) -> None:
        self.total[err.reason] += 1
        self.in_a_row[err.reason] += 1
        mine = self.by_source.setdefault(source, Counter())
        mine[err.reason] += 1
        n = sum(self.total.values())
        if n <= SKIPS_LOGGED:
            more = f" (further skips are summarised every {SKIP_SUMMARY_EVERY})" if n == SKIPS_LOGGED else ""
            log.warning("skipping %s from %s: %s%s", self.what, source, err, more)
        elif n % SKIP_SUMMARY_EVERY == 0:
            log.warning("%d %ss skipped so far: %s", n, self.what, self.explain(self.total))
        for reasons, where in ((mine, f" from source {source!r}"), (self.in_a_row, "")):
            if sum(reasons.values()) >= self.limit:
                raise StreamError(
                    f"{sum(reasons.values())} {self.what}s in a row skipped{where}: {self.explain(reasons)};"
                    f" last: {err}. The stream stops at data.max_skips_in_a_row={self.limit}"
                )

    def explain(self, reasons: Counter) -> str:
        """Reason counts, each with the setting behind it where one is (too_long: stage.max_length=8)."""
        parts = []
        for reason, n in reasons.most_common():
            key = REASON_KEYS.get(reason)
            value = getattr(self.process, key, None) if key else None
            parts.append(f"{reason} {n}" + (f" (stage.{key}={value})" if value is not None else ""))
        return ", ".join(parts)


def _load(tar: tarfile.TarFile, key: str, members: list) -> dict:
    return {"__key__": key, **{field: tar.extractfile(m).read() for field, m in members}}


def tar_entries(path: str) -> Iterator[tuple[str, Callable[[], dict]]]:
    """(key, load) per sample of a shard, in file order; load() reads the sample's fields.
    Samples passed over without load() cost only their tar headers."""
    with tarfile.open(path) as tar:
        key, members = None, []
        for member in tar:
            if not member.isfile():
                continue
            name, _, field = member.name.partition(".")
            if members and name != key:
                yield key, partial(_load, tar, key, members)
                members = []
            key = name
            members.append((field, member))
        if members:
            yield key, partial(_load, tar, key, members)


def read_tar(path: str) -> Iterator[dict]:
    """Samples of one WebDataset shard: members `key.field` grouped by key, in file order."""
    for _, load in tar_entries(path):
        yield load()


def reader_slot(offset: int = 0) -> tuple[int, int]:
    """This process's logical reader id among all ranks x loader workers, and their count.

    Loader worker w serves the logical reader (w + offset) % workers of its rank: after `offset`
    batches were consumed the next batch comes from worker 0, and must continue reader offset % workers.
    """
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + (worker + offset) % workers, world * workers


def _rng(seed: int, *counters: int) -> np.random.Generator:
    return np.random.default_rng([seed, *counters])


def _share(shards: tuple[str, ...], order: np.ndarray, reader: int, readers: int, start: tuple[int, int]):
    """This reader's disjoint share of one epoch, from `start` = (shard position, entry in that shard):
    yields ((position, entry), load). Whole shards when there are enough, else every readers-th sample."""
    striding = len(shards) < readers
    mine = order if striding else order[reader::readers]
    for position in range(start[0], len(mine)):
        first = start[1] if position == start[0] else 0
        for entry, (_, load) in enumerate(tar_entries(shards[mine[position]])):
            if entry >= first and (not striding or (position + entry) % readers == reader):
                yield (position, entry), load


class _SourceCursor:
    """One source's raw samples for one reader, epoch after epoch, shuffled in blocks.

    Per epoch the shard order is a permutation seeded by (seed, source, epoch); the reader reads its
    share sequentially in blocks of `block` raw samples and emits each block in an order seeded by
    (seed, source, epoch, reader, block index). `position` = [epoch, block index, offset in block,
    shard position and entry where the block starts]: enough to reopen the block without reading
    anything before it.
    """

    def __init__(self, source: Source, seed: int, reader: int, readers: int, block: int, position=None):
        self.source, self.seed, self.reader, self.readers, self.block = source, seed, reader, readers, block
        self.tag = zlib.crc32(source.name.encode())
        self.position = list(position or [0, 0, 0, 0, 0])

    def __iter__(self) -> Iterator[dict]:
        epoch, index, offset, *start = self.position
        while True:
            order = _rng(self.seed, _SHARDS, self.tag, epoch).permutation(len(self.source.train_shards))
            entries = _share(self.source.train_shards, order, self.reader, self.readers, tuple(start))
            while True:
                raws, after = [], start
                for (shard, entry), load in entries:
                    raws.append(load())
                    after = [shard, entry + 1]
                    if len(raws) == self.block:
                        break
                if not raws:
                    break
                perm = _rng(self.seed, _BLOCK, self.tag, epoch, self.reader, index).permutation(len(raws))
                for j in range(offset, len(raws)):
                    self.position = [epoch, index, j + 1, *start]
                    yield raws[perm[j]]
                index, offset, start = index + 1, 0, after
                self.position = [epoch, index, 0, *start]
            if index == 0:
                raise RuntimeError(
                    f"source {self.source.name!r} has no training samples for reader {self.reader} of {self.readers}"
                    " (fewer samples than loader workers x ranks?)"
                )
            epoch, index, offset, start = epoch + 1, 0, 0, [0, 0]
            self.position = [epoch, index, offset, *start]


class MixedStream:
    """One logical reader's endless training samples: each next sample comes from a source drawn by
    recipe weight (shuffled decks). `state()` after any sample restores the stream right after it."""

    def __init__(self, sources: list[Source], process, seed: int = 0, shuffle_buffer: int = 256,
                 reader: int = 0, readers: int = 1, state: dict | None = None,
                 max_skips_in_a_row: int = MAX_SKIPS_IN_A_ROW):
        state = state or {}
        positions = state.get("sources", {})
        self.sources, self.process, self.seed, self.reader = list(sources), process, seed, reader
        self.max_skips_in_a_row = max_skips_in_a_row
        self.cursors = [
            _SourceCursor(s, seed, reader, readers, shuffle_buffer, positions.get(s.name)) for s in self.sources
        ]
        # Finite positive weights, or every deck could come out empty and the draw never end.
        self.shares = normalised([s.weight for s in self.sources])
        self.deck, self.dealt = state.get("deck", [0, 0])
        self._hand = self._cards(self.deck)

    def state(self) -> dict:
        return {"deck": [self.deck, self.dealt], "sources": {c.source.name: list(c.position) for c in self.cursors}}

    def _cards(self, deck: int) -> np.ndarray:
        """Source indices of one deck, shuffled: floor((d + 1) * DECK * share) - floor(d * DECK * share) of each."""
        counts = [int(np.floor((deck + 1) * DECK * p)) - int(np.floor(deck * DECK * p)) for p in self.shares]
        cards = np.repeat(np.arange(len(counts)), counts)
        return cards[_rng(self.seed, _DECK, self.reader, deck).permutation(len(cards))]

    def _next_source(self) -> int:
        while self.dealt >= len(self._hand):
            self.deck, self.dealt = self.deck + 1, 0
            self._hand = self._cards(self.deck)
        self.dealt += 1
        return int(self._hand[self.dealt - 1])

    def __iter__(self) -> Iterator[dict]:
        streams = [iter(c) for c in self.cursors]
        skips = Skips("training sample", self.process, self.max_skips_in_a_row)
        skipped: Counter = Counter()  # since the last example, which carries them to the batch
        while True:
            i = self._next_source()
            name = self.sources[i].name
            try:
                example = self.process(next(streams[i]))
            except SampleError as err:
                skipped[err.reason] += 1
                skips.skipped(name, err)
                continue
            skips.used(name)
            example["source"] = name
            example["skipped"], skipped = dict(skipped), Counter()
            yield example


class ValStream(IterableDataset):
    """One pass over every source's held-out shards (optionally the first `limit` of each).

    A source whose held-out share has samples but none usable is a StreamError, not an empty report."""

    def __init__(self, sources: list[Source], process, limit: int | None = None,
                 max_skips_in_a_row: int = MAX_SKIPS_IN_A_ROW):
        self.sources, self.process, self.limit = sources, process, limit
        self.max_skips_in_a_row = max_skips_in_a_row

    def __iter__(self):
        reader, readers = reader_slot()
        skips = Skips("held-out sample", self.process, self.max_skips_in_a_row)
        for source in self.sources:
            order = np.arange(len(source.val_shards))
            used = 0
            for seen, (_, load) in enumerate(_share(source.val_shards, order, reader, readers, (0, 0))):
                if self.limit is not None and seen >= self.limit:
                    break
                try:
                    example = self.process(load())
                except SampleError as err:
                    skips.skipped(source.name, err)
                    continue
                used += 1
                skips.used(source.name)
                example["source"] = source.name
                yield example
            skipped = skips.by_source.get(source.name)  # all of this source's samples, when none was used
            if skipped and not used:
                raise StreamError(
                    f"no usable held-out sample in source {source.name!r} (reader {reader} of {readers}):"
                    f" all {sum(skipped.values())} skipped: {skips.explain(skipped)}"
                )
