"""Token-budget batching: consecutive samples join a batch while its padded cost fits the budget.

Padded cost = samples x tokens of the longest one (visual + text: len(input_ids)). Batches are
built inside the dataset, in the loader workers, so loaders run with batch_size=None.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import IterableDataset

from ov_train.config.options import TokenBudget
from ov_train.data.step_batches import example_cost, step_bundles
from ov_train.data.stream import reader_slot


def fill_batches(examples: Iterator[dict], budget: TokenBudget, state: Callable[[], object] = lambda: None):
    """Yield (batch of examples, state() to resume right after it).

    A sample that does not fit closes the batch and starts the next one; the closed batch reports the
    state from before that sample was drawn, so a stream resumed there draws it again.
    """
    batch, longest = [], 0
    while True:
        before = state()
        example = next(examples, None)
        if example is None:
            break
        length = example_cost(example)
        if not budget.admits(len(batch), longest, length):
            yield batch, before
            batch, longest = [], 0
        batch.append(example)
        longest = max(longest, length)
        if budget.full(len(batch), longest):
            yield batch, state()
            batch, longest = [], 0
    if batch:
        yield batch, state()


class TrainBatches(IterableDataset):
    """Endless training batches: in each loader worker, one logical reader's stream packed to the budget.

    `make_stream(reader=, readers=, state=)` builds a reader's sample stream (a MixedStream). Every
    batch carries `stream_state` = {reader, readers, state}: the reader's state right after the batch.
    `resume(states, consumed)` restarts each reader from its saved state, with the reader that owes
    batch number `consumed` on loader worker 0 (workers hand out batches in turn). With `samples_per_rank`,
    each item is one optimizer step's bundle of micro-batches instead (ov_train.data.step_batches).
    """

    def __init__(self, make_stream: Callable, budget: TokenBudget, collate: Callable[[list[dict]], dict],
                 samples_per_rank: int | None = None):
        self.make_stream, self.budget, self.collate = make_stream, budget, collate
        self.samples_per_rank = samples_per_rank
        self.states: dict[int, dict] = {}
        self.consumed = 0

    def resume(self, states: dict[int, dict], consumed: int) -> None:
        self.states, self.consumed = dict(states), consumed

    def __iter__(self):
        reader, readers = reader_slot(self.consumed)
        stream = self.make_stream(reader=reader, readers=readers, state=self.states.get(reader))
        if self.samples_per_rank:
            for bundle, state in step_bundles(iter(stream), self.samples_per_rank, self.budget, self.collate, stream.state):
                yield {**bundle, "stream_state": {"reader": reader, "readers": readers, "state": state}}
            return
        for examples, state in fill_batches(iter(stream), self.budget, stream.state):
            batch = self.collate(examples)
            batch["source"] = [e["source"] for e in examples]
            batch["key"] = [e["key"] for e in examples]
            batch["stream_state"] = {"reader": reader, "readers": readers, "state": state}
            yield batch


class HeldOutBatches(IterableDataset):
    """A finite sample stream (ValStream) packed to the same budget."""

    def __init__(self, examples: IterableDataset, budget: TokenBudget, collate: Callable[[list[dict]], dict]):
        self.examples, self.budget, self.collate = examples, budget, collate

    def __iter__(self):
        for examples, _ in fill_batches(iter(self.examples), self.budget):
            yield {**self.collate(examples), "source": [e["source"] for e in examples], "key": [e["key"] for e in examples]}
