"""Preference pairs for training: a shard sample -> one example holding its media once and two token sequences
(the chosen and the rejected conversation); a batch of pairs that carries each pair's media once.

The shard format (what `ov-data convert` writes for prompt/chosen/rejected data): an SFT sample whose last turn is
the chosen reply, plus `rejected`, the reply that takes that turn's place in the rejected conversation. Both
replies follow the same prompt and its media, so the media are decoded once here and encoded once per pair by the
forward (its `media_owner`, ov_train.model.forward).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ov_train.data.pair_records import REJECTED
from ov_train.data.samples import SampleError, SampleProcessor, collate


@dataclass(frozen=True)
class PairProcessor:
    """A preference shard sample -> an example of SampleProcessor's (media, the chosen conversation's ids and labels)
    with `rejected_input_ids` and `rejected_labels` beside."""

    process: SampleProcessor
    # The rejected reply of a sample that has none (the synthetic data's: ov_train.data.synthetic.synthetic_rejected).
    rejected_of: Callable[[dict], str | None] | None = None

    def __call__(self, raw: dict) -> dict:
        example = self.process(raw)  # skips, media and the chosen conversation, checked as for SFT samples
        meta = json.loads(raw["json"])
        key = example["key"]
        rejected = meta.get(REJECTED)
        if rejected is None and self.rejected_of is not None:
            rejected = self.rejected_of(meta)
        if not isinstance(rejected, str) or not rejected.strip():
            raise SampleError("not_a_pair", f"sample {key}: no rejected reply (a preference stage reads samples that "
                                            "`ov-data convert` made from prompt/chosen/rejected data)")
        turns = meta["conversations"]
        ids, labels = self.process.encode(key, [*turns[:-1], {**turns[-1], "value": rejected}], example["visual_tokens"])
        # A pair costs its two rows in a batch (data/batching.py reads `cost`).
        return {**example, "rejected_input_ids": torch.tensor(ids, dtype=torch.long),
                "rejected_labels": torch.tensor(labels, dtype=torch.long),
                "cost": 2 * max(len(example["input_ids"]), len(ids))}


def collate_pairs(pairs: list[dict], pad_id: int, share_media: bool = True) -> dict:
    """A batch of 2N sequences: the N chosen conversations, then the N rejected ones (model.preference.pair_logps
    splits it so). `share_media`: each pair's media once, `media_owner` naming the pair each sequence reads them from;
    else a plain batch with every pair's media twice (what encoding them twice means)."""
    rejected = [{**p, "input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"], "skipped": {}} for p in pairs]
    if not share_media:
        return {**collate([*pairs, *rejected], pad_id), "pairs": len(pairs)}
    batch = collate([*pairs, *({**r, "images": [], "frames": None} for r in rejected)], pad_id)
    batch["media_owner"] = [*range(len(pairs)), *range(len(pairs))]
    batch["videos_per_sample"] = [int(p["frames"] is not None) for p in pairs] + [0] * len(pairs)
    batch["pairs"] = len(pairs)
    return batch
