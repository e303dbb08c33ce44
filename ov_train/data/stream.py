"""Streams of processed samples from WebDataset shards: weighted mixing for training, one pass for validation.

A training stream belongs to one logical reader (one per rank x loader worker) and is a pure
function of (seed, reader id, state): every random choice comes from a generator seeded by counters
that the state holds, so a stream rebuilt from `state()` continues with exactly the same samples. Shards that
stay unreadable are set aside for the rest of the run (SetAside), and the state holds them too.

Unusable samples are skipped and counted, but not without end: `max_skips_in_a_row` skips with no usable
sample between them (from the whole stream or from one source) stop it with a StreamError that names the
reasons, since no setting of a run makes such a stream useful (e.g. stage.max_length below every sample).
"""
from __future__ import annotations

import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ov_train.config.options import IOSettings
from ov_train.config.recipe import normalised
from ov_train.constants import WEBDATASET
from ov_train.data.recipe import Source
from ov_train.data.samples import SampleError
from ov_train.data.sources import UNREADABLE, ShardUnreadable
from ov_train.data.sources import samples as shard_samples
from ov_train.utils.logging import get_logger
from ov_train.utils.redact import redact

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
REASON_KEYS = {"too_long": "max_length", "no_supervised_tokens": "max_length", "too_long_text": "max_length",
               "oversized_json": "max_length"}


# What each source modality may hold besides text only (image data sets hold some text-only conversations).
MEDIA_OF_MODALITY = {"single_image": "image", "multi_image": "image", "video": "video", "text": "text"}


def check_modality(source: Source, example: dict) -> None:
    """A sample whose media contradict its source's `modality` (videos in a single_image source) would be trained
    under another share of the mix than the recipe says: it is skipped and counted as modality_mismatch."""
    expected = MEDIA_OF_MODALITY.get(source.modality or "")
    held = "video" if example.get("frames") is not None else "image" if example.get("images") else "text"
    if expected and held != "text" and held != expected:
        raise SampleError("modality_mismatch", f"sample {example.get('key', '?')}: holds a {held} but source"
                                               f" {source.name} is labelled {source.modality} in the recipe")


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


def member_limits(process) -> dict | None:
    """Bytes a shard member may have for this sample processor, by field (SampleProcessor.member_limits: what a
    sample of stage.max_length can hold); None for a processor without limits."""
    return getattr(process, "member_limits", None)


def read_tar(path: str, io: IOSettings = IOSettings()) -> Iterator[dict]:
    """Samples of one WebDataset shard (a path, URL or pipe: command): members `key.field` grouped by key."""
    for _, sample in shard_samples(WEBDATASET, path, io=io):
        yield sample


def reader_slot(offset: int = 0, replicas: int = 1) -> tuple[int, int]:
    """This process's logical reader id among all ranks x loader workers, and their count.

    Loader worker w serves the logical reader (w + offset) % workers of its rank: after `offset`
    batches were consumed the next batch comes from worker 0, and must continue reader offset % workers.
    `replicas` consecutive ranks read the same data (a sequence-parallel group, which splits each row between them):
    they are one rank here.
    """
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank() // replicas, torch.distributed.get_world_size() // replicas
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + (worker + offset) % workers, world * workers


def _rng(seed: int, *counters: int) -> np.random.Generator:
    return np.random.default_rng([seed, *counters])


class SetAside:
    """Shards one reader gave up on (still unreadable after data.io's retries), not tried again for the rest of
    the run: {redacted shard: [epoch, entry]}, the epoch it failed in and the first entry it did not deliver.

    After that epoch the shard is skipped unopened. In that epoch it is read no further than that entry, which
    only a stream resumed from a state of that epoch does again: it reads what the first run read. The set is
    part of the stream state, so a resumed stream skips what the first one did. Each logical reader keeps its
    own: readers share no sample, so they need not agree (each one that meets the shard tries it once).
    """

    def __init__(self, given: dict | None = None):
        self.shards: dict[str, list[int]] = {k: list(v) for k, v in (given or {}).items()}

    def end(self, shard: str, epoch: int) -> int | None:
        """Where reading `shard` stops in `epoch`: 0 skips it, None reads it all."""
        mark = self.shards.get(shard)
        return None if mark is None else 0 if epoch > mark[0] else mark[1]

    def add(self, shard: str, epoch: int, entry: int) -> None:
        self.shards[shard] = [epoch, entry]

    def state(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.shards.items()}


def _share(source: Source, shards: tuple[str, ...], order: np.ndarray, reader: int, readers: int,
           start: tuple[int, int], io: IOSettings, unreadable: Callable[[str], None], aside: SetAside,
           epoch: int = 0, limits: dict | None = None):
    """This reader's disjoint share of one epoch, from `start` = (shard position, entry in that shard):
    yields ((position, entry), raw sample). Whole shards when there are enough, else every readers-th sample.
    A shard that stays unreadable after its retries is set aside (SetAside), logged once and reported to
    `unreadable`. `limits`: bytes a tar member may have, by field (SampleProcessor.member_limits)."""
    striding = len(shards) < readers
    mine = order if striding else order[reader::readers]
    for position in range(start[0], len(mine)):
        first = start[1] if position == start[0] else 0
        wanted = partial(_strided, position, reader, readers) if striding else None
        shard = shards[mine[position]]
        name = redact(shard)
        end = aside.end(name, epoch)
        if end is not None and first >= end:
            continue
        try:
            for entry, raw in shard_samples(source.format, shard, first, wanted, io, source.rejects.get(name), limits,
                                            end):
                yield (position, entry), raw
        except ShardUnreadable as err:
            aside.add(name, epoch, err.entry)
            log.warning("setting aside a shard of source %s for the rest of the run: %s", source.name, err)
            unreadable(str(err))


def _strided(position: int, reader: int, readers: int, entry: int) -> bool:
    return (position + entry) % readers == reader


class _SourceCursor:
    """One source's raw samples for one reader, epoch after epoch, shuffled in blocks.

    Per epoch the shard order is a permutation seeded by (seed, source, epoch); the reader reads its
    share sequentially in blocks of `block` raw samples and emits each block in an order seeded by
    (seed, source, epoch, reader, block index). `position` = [epoch, block index, offset in block,
    shard position and entry where the block starts]: enough to reopen the block without reading
    anything before it.
    """

    def __init__(self, source: Source, seed: int, reader: int, readers: int, block: int, position=None,
                 io: IOSettings = IOSettings(), unreadable: Callable[[str], None] = lambda why: None,
                 set_aside: dict | None = None, limits: dict | None = None):
        self.source, self.seed, self.reader, self.readers, self.block = source, seed, reader, readers, block
        self.io, self.unreadable, self.limits = io, unreadable, limits
        self.tag = zlib.crc32(source.name.encode())
        self.position = list(position or [0, 0, 0, 0, 0])
        # Shards set aside (live, in the read-ahead thread), and as they were once the current block was read:
        # the state that goes with a position in that block, since re-reading it must meet the same set.
        self.aside = SetAside(set_aside)
        self.aside_state = self.aside.state()

    def _read_block(self, entries, start: list[int]) -> tuple[list[dict], list[int], dict]:
        """The next `block` raw samples of this epoch, the (shard position, entry) after them, and the shards set
        aside by then."""
        raws, after = [], start
        for (shard, entry), raw in entries:
            raws.append(raw)
            after = [shard, entry + 1]
            if len(raws) == self.block:
                break
        return raws, after, self.aside.state()

    def __iter__(self) -> Iterator[dict]:
        epoch, index, offset, *start = self.position
        # The next block is read in a thread while this one is used: a slow source (a remote one, far away)
        # keeps up without stalling the draws from the others. Which samples a block holds does not change.
        with ThreadPoolExecutor(1, thread_name_prefix=f"read-{self.source.name[:20]}") as pool:
            while True:
                order = _rng(self.seed, _SHARDS, self.tag, epoch).permutation(len(self.source.train_shards))
                entries = _share(self.source, self.source.train_shards, order, self.reader, self.readers,
                                 tuple(start), self.io, self.unreadable, self.aside, epoch, self.limits)
                ahead = pool.submit(self._read_block, entries, start)
                while True:
                    raws, after, self.aside_state = ahead.result()
                    if not raws:
                        break
                    ahead = pool.submit(self._read_block, entries, after)
                    perm = _rng(self.seed, _BLOCK, self.tag, epoch, self.reader, index).permutation(len(raws))
                    for j in range(offset, len(raws)):
                        self.position = [epoch, index, j + 1, *start]
                        yield raws[perm[j]]
                    index, offset, start = index + 1, 0, after
                    self.position = [epoch, index, 0, *start]
                if index == 0:
                    # Name the shards given up on: the worker's log lines that said why may be far above.
                    lost = sorted(self.aside.shards)
                    why = (f"{len(lost)} of its {len(self.source.train_shards)} shard(s) unreadable and set aside:"
                           f" {', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}" if lost
                           else "fewer samples than loader workers x ranks?")
                    raise RuntimeError(
                        f"source {self.source.name!r} has no training samples for reader {self.reader} of"
                        f" {self.readers} ({why})"
                    )
                epoch, index, offset, start = epoch + 1, 0, 0, [0, 0]
                self.position = [epoch, index, offset, *start]


class MixedStream:
    """One logical reader's endless training samples: each next sample comes from a source drawn by
    recipe weight (shuffled decks). `state()` after any sample restores the stream right after it."""

    def __init__(self, sources: list[Source], process, seed: int = 0, shuffle_buffer: int = 256,
                 reader: int = 0, readers: int = 1, state: dict | None = None,
                 max_skips_in_a_row: int = MAX_SKIPS_IN_A_ROW, io: IOSettings = IOSettings()):
        state = state or {}
        positions, aside = state.get("sources", {}), state.get("set_aside", {})
        self.sources, self.process, self.seed, self.reader = list(sources), process, seed, reader
        self.max_skips_in_a_row = max_skips_in_a_row
        self._unreadable: deque = deque()  # shards given up (by read-ahead threads) since the last example
        limits = member_limits(process)
        self.cursors = [
            _SourceCursor(s, seed, reader, readers, shuffle_buffer, positions.get(s.name), io, self._lose,
                          aside.get(s.name), limits)
            for s in self.sources
        ]
        # Finite positive weights, or every deck could come out empty and the draw never end.
        self.shares = normalised([s.weight for s in self.sources])
        self.deck, self.dealt = state.get("deck", [0, 0])
        self._hand = self._cards(self.deck)

    def _lose(self, why: str) -> None:
        self._unreadable.append(why)

    def state(self) -> dict:
        state = {"deck": [self.deck, self.dealt], "sources": {c.source.name: list(c.position) for c in self.cursors}}
        aside = {c.source.name: c.aside_state for c in self.cursors if c.aside_state}
        return {**state, "set_aside": aside} if aside else state

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
                raw = next(streams[i])
                while self._unreadable:
                    self._unreadable.popleft()
                    skipped[UNREADABLE] += 1
                example = self.process({**raw, "__source__": name})  # the source's own settings (samples.py)
                check_modality(self.sources[i], example)
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
                 max_skips_in_a_row: int = MAX_SKIPS_IN_A_ROW, io: IOSettings = IOSettings(), replicas: int = 1):
        self.sources, self.process, self.limit, self.replicas = sources, process, limit, replicas
        self.max_skips_in_a_row, self.io = max_skips_in_a_row, io
        # Held-out shards given up on in one pass are skipped in the later ones (the loader's persistent workers
        # keep their copy of this stream from pass to pass); `passes` counts them, as epochs count training's.
        self.aside, self.passes = SetAside(), 0

    def __iter__(self):
        reader, readers = reader_slot(replicas=self.replicas)
        skips = Skips("held-out sample", self.process, self.max_skips_in_a_row)
        limits, self.passes = member_limits(self.process), self.passes + 1
        for source in self.sources:
            order = np.arange(len(source.val_shards))
            used = 0
            held_out = _share(source, source.val_shards, order, reader, readers, (0, 0), self.io, lambda why: None,
                              self.aside, self.passes, limits)
            for seen, (_, raw) in enumerate(held_out):
                if self.limit is not None and seen >= self.limit:
                    break
                try:
                    example = self.process({**raw, "__source__": source.name})
                    check_modality(source, example)
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
