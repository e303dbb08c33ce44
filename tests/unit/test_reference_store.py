"""Precomputed reference log-probabilities: the pass stores what the model gives for every pair, a pass that was
stopped continues where its last write stopped (the pairs it stored are not computed again), a complete store is
read without a forward, and a store of another run is computed anew."""
from __future__ import annotations

import json

import pytest
import torch

import ov_train.training.reference_store as store_module
from ov_train.config.media import MediaSettings
from ov_train.config.schema import ModelConfig
from ov_train.data.pairs import PairProcessor, collate_pairs
from ov_train.data.samples import SampleProcessor
from ov_train.data.synthetic import make_sample, synthetic_rejected
from ov_train.model.preference import pair_logps
from ov_train.training.reference_store import ReferenceStore
from ov_train.vision.geometry import VisionGeometry

OPTIONS = ModelConfig.stock(packing=True, max_tokens=256, loss="chunked", loss_chunk=64)


@pytest.fixture(scope="module")
def batches(tiny_model_and_tokenizer):
    """Three train batches of two synthetic pairs each, one held-out batch."""
    model, tokenizer = tiny_model_and_tokenizer
    process = PairProcessor(SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5",
                                            MediaSettings.of("anyres_max_9", 8), max_length=4096), synthetic_rejected)

    def batch(subset, split, indices):
        examples = [process({**make_sample(subset, split, i), "json": json.dumps(make_sample(subset, split, i)["json"])})
                    for i in indices]
        return {**collate_pairs(examples, tokenizer.pad_token_id), "source": [subset] * len(examples),
                "key": [e["key"] for e in examples]}

    train = [batch("single_image", "train", [0, 1]), batch("video", "train", [0, 1]), batch("multi_image", "train", [2, 3])]
    return model.eval(), train, [batch("single_image", "val", [0, 1])]


class Counted:
    """Iterates `items`, counting how many were drawn; raises after `stop` of them (a killed pass)."""

    def __init__(self, items, stop=None):
        self.items, self.stop, self.drawn = items, stop, 0

    def __iter__(self):
        for item in self.items:
            if self.stop is not None and self.drawn == self.stop:
                raise KeyboardInterrupt("stopped")
            self.drawn += 1
            yield item


def test_a_stopped_pass_continues_and_a_complete_one_is_read(batches, tmp_path, monkeypatch):
    model, train, val = batches
    monkeypatch.setattr(store_module, "SAVE_EVERY", 1)
    forwards = []
    monkeypatch.setattr(store_module, "pair_logps", lambda *a: forwards.append(1) or pair_logps(*a))
    identity = {"stage": "dpo", "init": "x"}
    with pytest.raises(KeyboardInterrupt):
        ReferenceStore(tmp_path, identity).fill(model, OPTIONS, Counted(train, stop=2), val, 3, 0, "cpu")
    assert len(forwards) == 2  # two batches computed and written before the stop
    resumed = ReferenceStore(tmp_path, identity)
    resumed.fill(model, OPTIONS, train, val, 3, 0, "cpu")
    assert len(forwards) == 2 + 1 + 1  # only the third train batch, then the held-out one
    with torch.no_grad():
        for batch in [*train, *val]:
            expected = pair_logps(model, batch, OPTIONS)[0]
            got = resumed.lookup(batch, "cpu")
            assert torch.equal(got.chosen, expected.chosen) and torch.equal(got.rejected, expected.rejected)
            assert not torch.equal(got.chosen, got.rejected)
    forwards.clear()
    ReferenceStore(tmp_path, identity).fill(model, OPTIONS, Counted(train), val, 3, 0, "cpu")
    assert forwards == []  # complete: read back, no forward, no data drawn
    ReferenceStore(tmp_path, {**identity, "init": "another export"}).fill(model, OPTIONS, train, val, 3, 0, "cpu")
    assert len(forwards) == 4  # another run's store is computed anew


def test_a_pair_the_pass_never_saw_is_named(batches, tmp_path):
    model, train, val = batches
    store = ReferenceStore(tmp_path, {})
    store.fill(model, OPTIONS, train[:1], [], 1, 0, "cpu")
    with pytest.raises(RuntimeError, match="no precomputed reference log-probability for \\['video/video_train_000000'"):
        store.lookup(train[1], "cpu")
