"""Held-out batches in equal numbers on every rank.

Each rank reads its own share of the held-out shards (ov_train.data.stream.ValStream), so ranks can hold different
numbers of batches. Sharded engines (FSDP2, ZeRO-3) gather weights in every forward and need every rank in each of
those collectives: a rank that ran out while another still validated left that one waiting forever (the hang
"after the last step" of a run whose final validation was uneven). Here the ranks agree before each batch whether
any of them still has one; a rank that has run out repeats its last batch as padding, which runs the forward but
counts no sample (OneVisionModule.validation_step). A rank that had none at all borrows the first batch of a rank
that has one.
"""
from __future__ import annotations

import torch.distributed as dist


def padding(batch: dict) -> dict:
    """`batch` run again for the collectives only: no sample of it is counted or shown."""
    return {**batch, "padding": True}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class EvenHeldOut:
    """Iterates `loader` (the held-out DataLoader), padded so that every rank yields as many batches as the rank
    with the most. Iterating it is a collective: every rank must iterate it together, as validation loops do."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        if _world() == 1:
            yield from self.loader
            return
        batches, last = iter(self.loader), None
        while True:
            batch = next(batches, None)
            states = [None] * _world()
            # One small collective per held-out batch: (has a batch now, has anything to repeat).
            dist.all_gather_object(states, (batch is not None, batch is not None or last is not None))
            if not any(has for has, _ in states):
                return
            if not all(anything for _, anything in states):
                lender = next(rank for rank, (has, _) in enumerate(states) if has)
                lent = [batch]
                dist.broadcast_object_list(lent, src=lender)
                last = last if last is not None else lent[0]
            if batch is None:
                yield padding(last)
            else:
                last = batch
                yield batch
