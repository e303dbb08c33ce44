"""Streams of processed samples from WebDataset shards: weighted mixing for training, one pass for validation."""
from __future__ import annotations

import logging
import random
import tarfile
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ov_train.data.recipe import Source
from ov_train.data.samples import SampleError

log = logging.getLogger(__name__)


def read_tar(path: str) -> Iterator[dict]:
    """Samples of one WebDataset shard: members `key.field` grouped by key, in file order."""
    sample: dict = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, field = member.name.partition(".")
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[field] = tar.extractfile(member).read()
    if sample:
        yield sample


def _reader_slot() -> tuple[int, int]:
    """This reader's index among all ranks x loader workers, and their count."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + worker, world * workers


def _my_samples(shards: tuple[str, ...], order: list[int]) -> Iterator[dict]:
    """Disjoint share of the samples for this reader: whole shards when there are enough, else every k-th sample."""
    slot, slots = _reader_slot()
    if len(shards) >= slots:
        for i in order[slot::slots]:
            yield from read_tar(shards[i])
    else:
        index = 0
        for i in order:
            for sample in read_tar(shards[i]):
                if index % slots == slot:
                    yield sample
                index += 1


class MixedStream(IterableDataset):
    """Endless training stream: each next sample comes from a source drawn by recipe weight."""

    def __init__(self, sources: list[Source], process, seed: int = 0, shuffle_buffer: int = 256):
        self.sources, self.process, self.seed, self.shuffle_buffer = sources, process, seed, shuffle_buffer

    def _endless(self, source: Source, rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        while True:
            order = list(range(len(source.train_shards)))
            rng.shuffle(order)
            for sample in _my_samples(source.train_shards, order):
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            buffer.clear()

    def __iter__(self):
        slot, _ = _reader_slot()
        rng = random.Random(self.seed * 100_003 + slot)
        streams = [self._endless(s, random.Random(rng.random())) for s in self.sources]
        weights = [s.weight for s in self.sources]
        skipped: Counter = Counter()
        while True:
            i = rng.choices(range(len(streams)), weights)[0]
            raw = next(streams[i])
            try:
                example = self.process(raw)
            except SampleError as err:
                skipped[err.reason] += 1
                log.warning("skipping sample from %s: %s", self.sources[i].name, err)
                continue
            example["source"] = self.sources[i].name
            example["skipped"], skipped = dict(skipped), Counter()
            yield example


class ValStream(IterableDataset):
    """One pass over every source's held-out shards (optionally the first `limit` of each)."""

    def __init__(self, sources: list[Source], process, limit: int | None = None):
        self.sources, self.process, self.limit = sources, process, limit

    def __iter__(self):
        for source in self.sources:
            seen = 0
            for raw in _my_samples(source.val_shards, list(range(len(source.val_shards)))):
                if self.limit is not None and seen >= self.limit:
                    break
                seen += 1
                try:
                    example = self.process(raw)
                except SampleError as err:
                    log.warning("skipping held-out sample from %s: %s", source.name, err)
                    continue
                example["source"] = source.name
                yield example
