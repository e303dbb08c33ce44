"""Global batches counted in samples (data.samples_per_step): one item per optimizer step.

Each rank takes exactly samples_per_step / world_size samples per step from its stream and splits them into
token-budget micro-batches (first fit, longest first: the fewest, fullest micro-batches); the item carries them
all, with the stream's state right after the step's last sample, so a checkpoint always falls between steps and
resumes exactly. ov_train.training.step runs the micro-batches and steps once.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice

from ov_train.config.options import TokenBudget


def example_cost(example: dict) -> int:
    """Tokens an example adds to a batch's rows: its own, or a preference pair's two rows (data/pairs.py)."""
    return example.get("cost") or len(example["input_ids"])


def split_step(lengths: list[int], budget: TokenBudget) -> list[list[int]]:
    """Indices of the step's samples grouped into micro-batches that each fit the budget (a sample over the
    budget alone); every sample lands in exactly one."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        # Longest first, so a group's first member is its longest.
        slot = next((g for g in groups if budget.admits(len(g), lengths[g[0]], lengths[i])), None)
        if slot is None:
            groups.append([i])
        else:
            slot.append(i)
    return groups


def step_bundles(examples: Iterator[dict], per_rank: int, budget: TokenBudget, collate: Callable,
                 state: Callable[[], object]) -> Iterator[tuple[dict, object]]:
    """Yield (bundle, state() right after its last sample): `per_rank` examples in collated micro-batches."""
    while True:
        step = list(islice(examples, per_rank))
        if len(step) < per_rank:
            return
        groups = split_step([example_cost(e) for e in step], budget)
        skipped: Counter = Counter()
        for e in step:
            skipped.update(e.get("skipped", {}))
        ordered = [step[i] for g in groups for i in g]
        bundle = {
            "micro_batches": [{**collate([step[i] for i in g]), "source": [step[i]["source"] for i in g],
                               "key": [step[i]["key"] for i in g]} for g in groups],
            "source": [e["source"] for e in ordered],
            "key": [e["key"] for e in ordered],
            "modality": [e["modality"] for e in ordered],
            "skipped": dict(skipped),
        }
        yield bundle, state()
