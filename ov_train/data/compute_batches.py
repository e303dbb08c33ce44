"""Compute-budget batching (data.batching=compute): batches filled to a FLOPs budget, best-fit from a lookahead.

A token budget counts LLM tokens, but a video frame is 729 tower patches for 196 LLM tokens: a video batch costs
several times an image batch of the same token count, and data-parallel ranks wait for the slowest each step.
Here a sample's cost is its training FLOPs (ov_train.utils.flops: tower, projector, LLM weights and attention,
as the parts train), expressed in LLM-token equivalents so that the budget reads like a token budget: the
budget is `data.max_tokens_per_batch` tokens' worth of compute (a text sample of n tokens costs about n; a
video costs its tokens plus its frames' tower work). Real tokens count, never padding (the model packs rows).

Every rank fills its batches as close to the same budget as the samples allow, so ranks' step costs match
without talking to each other: from the next LOOKAHEAD samples of the stream, each batch takes the costliest
that still fits, then the costliest that fits what is left, and so on (best fit). A sample over the budget
goes alone. The samples held back stay in order in the lookahead buffer.

Resume is exact: a batch's state is the stream's state from before its oldest held-back sample was drawn and
the draws since then already batched; a stream resumed there redraws the same samples, drops those, and refills
the buffer as it was (ComputeBatcher.resume_state / the `replay` argument).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ov_train.config.options import TokenBudget
from ov_train.utils.flops import ModelFlops, TokenCounts

LOOKAHEAD = 16  # samples the best fit chooses from: enough to fill the budget to ~1%, few enough to keep order


def example_counts(example: dict) -> TokenCounts:
    """What one processed sample feeds the model: crops and frames through the tower, tokens, causal pairs."""
    images = sum(img.pixel_values.shape[0] for img in example["images"])
    images += 0 if example.get("frames") is None else example["frames"].shape[0]
    n = len(example["input_ids"])
    return TokenCounts(images=images, tokens=n, pairs=n * (n + 1) / 2)


@dataclass(frozen=True)
class SampleCost:
    """A sample's training FLOPs in LLM-token equivalents (one unit: one LLM token's weight matmuls, forward and
    backward as the parts train)."""

    flops: ModelFlops
    trainable: frozenset[str]

    @classmethod
    def of_model(cls, config, trainable) -> SampleCost:
        return cls(ModelFlops.from_config(config), frozenset(trainable))

    @property
    def unit(self) -> float:
        return self.flops.train_step(TokenCounts(images=0, tokens=1, pairs=0), set(self.trainable))

    def counts_cost(self, counts: TokenCounts) -> float:
        return self.flops.train_step(counts, set(self.trainable)) / self.unit

    def __call__(self, example: dict) -> float:
        return self.counts_cost(example_counts(example))


def best_fit(costs: list[float], budget: float, max_samples: int | None = None) -> list[int]:
    """Indices (into `costs`, in draw order) of one batch: the costliest that fits what remains of the budget, again
    and again (the earliest of equals); an empty batch takes the costliest, alone if it is over the budget."""
    chosen: list[int] = []
    left = budget
    while max_samples is None or len(chosen) < max_samples:
        fits = [i for i in range(len(costs)) if i not in chosen and (not chosen or costs[i] <= left)]
        if not fits:
            break
        pick = max(fits, key=lambda i: (costs[i], -i))
        chosen.append(pick)
        left -= costs[pick]
        if left <= 0:
            break
    return sorted(chosen)


def fill_compute_batches(examples: Iterator[dict], budget: TokenBudget, cost: Callable[[dict], float],
                         state: Callable[[], object] = lambda: None, replay: dict | None = None,
                         lookahead: int = LOOKAHEAD) -> Iterator[tuple[list[dict], dict]]:
    """Yield (batch of examples, resume state right after it) filled to `budget.max_tokens` cost units.

    The resume state is {"stream": the stream's state before the oldest held-back sample was drawn, "taken": the
    draws since then (0-based) already batched}; `replay` is such a state, with `examples` and `state` a stream
    restarted from replay["stream"].
    """
    limit = budget.max_tokens if budget.max_tokens is not None else float("inf")
    # The buffer: [draw number, stream state before the draw, example, cost], in draw order.
    buffer: list[list] = []
    drawn = 0
    taken: set[int] = set()  # draw numbers batched, at or after the oldest buffered draw
    skip = set(replay["taken"]) if replay else set()
    ended = False
    while True:
        while not ended and len(buffer) < lookahead:
            before = state()
            example = next(examples, None)
            if example is None:
                ended = True
                break
            if drawn in skip:  # batched before the checkpoint: only redrawn to reach the held-back samples
                taken.add(drawn)
            else:
                buffer.append([drawn, before, example, cost(example)])
            drawn += 1
            if drawn > max(skip, default=-1):
                skip = set()
        if not buffer:
            return
        picks = best_fit([entry[3] for entry in buffer], limit, budget.max_samples)
        batch = [buffer[i] for i in picks]
        buffer = [entry for i, entry in enumerate(buffer) if i not in picks]
        taken.update(entry[0] for entry in batch)
        if buffer:
            first = buffer[0][0]
            taken = {n for n in taken if n > first}
            after = {"stream": buffer[0][1], "taken": sorted(n - first for n in taken)}
        else:
            # Every draw so far is batched: the stream continues from here.
            taken = set()
            after = {"stream": state(), "taken": []}
        yield [entry[2] for entry in batch], after
