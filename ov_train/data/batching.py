"""Token-budget batching: consecutive samples join a batch while its padded cost fits the budget.

Padded cost = samples x tokens of the longest one (visual + text: len(input_ids)). Batches are
built inside the dataset, in the loader workers, so loaders run with batch_size=None.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import IterableDataset

from ov_train.config.options import TokenBudget
from ov_train.data.compute_batches import fill_compute_batches
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
    each item is one optimizer step's bundle of micro-batches instead (ov_train.data.step_batches). With `cost`
    (data.batching=compute), batches fill to a compute budget (ov_train.data.compute_batches), and a reader's
    state also names the samples its lookahead held back.
    """

    def __init__(self, make_stream: Callable, budget: TokenBudget, collate: Callable[[list[dict]], dict],
                 samples_per_rank: int | None = None, cost: Callable[[dict], float] | None = None,
                 replicas: int = 1):
        self.make_stream, self.budget, self.collate = make_stream, budget, collate
        self.samples_per_rank, self.cost = samples_per_rank, cost
        self.replicas = replicas  # consecutive ranks reading the same batches (stream.reader_slot)
        self.states: dict[int, dict] = {}
        self.consumed = 0

    def resume(self, states: dict[int, dict], consumed: int) -> None:
        self.states, self.consumed = dict(states), consumed

    def __iter__(self):
        reader, readers = reader_slot(self.consumed, self.replicas)
        saved = self.states.get(reader)
        # A compute-budget state holds the stream's state from before its held-back samples, and which draws since
        # then were batched; read under either batching, those are drawn again and dropped.
        replay = saved if isinstance(saved, dict) and "taken" in saved else None
        stream = self.make_stream(reader=reader, readers=readers, state=replay["stream"] if replay else saved)
        if self.cost is not None:
            batches = fill_compute_batches(iter(stream), self.budget, self.cost, stream.state, replay)
        else:
            examples = _dropping(iter(stream), replay["taken"] if replay else [])
            if self.samples_per_rank:
                for bundle, state in step_bundles(examples, self.samples_per_rank, self.budget, self.collate, stream.state):
                    yield {**bundle, "stream_state": {"reader": reader, "readers": readers, "state": state}}
                return
            batches = fill_batches(examples, self.budget, stream.state)
        for examples, state in batches:
            batch = self.collate(examples)
            batch["source"] = [e["source"] for e in examples]
            batch["key"] = [e["key"] for e in examples]
            batch["stream_state"] = {"reader": reader, "readers": readers, "state": state}
            yield batch


def _dropping(examples: Iterator[dict], taken: list[int]) -> Iterator[dict]:
    """The stream less the draws (0-based) in `taken`."""
    taken = set(taken)
    for i, example in enumerate(examples):
        if i not in taken:
            yield example


class HeldOutBatches(IterableDataset):
    """A finite sample stream (ValStream) packed to the same budget."""

    def __init__(self, examples: IterableDataset, budget: TokenBudget, collate: Callable[[list[dict]], dict]):
        self.examples, self.budget, self.collate = examples, budget, collate

    def __iter__(self):
        for examples, _ in fill_batches(iter(self.examples), self.budget):
            yield {**self.collate(examples), "source": [e["source"] for e in examples], "key": [e["key"] for e in examples]}
