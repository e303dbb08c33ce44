"""data.samples_per_step on the data side: every rank's share, token-budget micro-batches holding exactly it, exact
resume at any step; data.epochs deriving trainer.max_steps."""
import json

import pytest

from ov_train.config.options import TokenBudget
from ov_train.config.run_plan import ConfigError
from ov_train.data.batching import TrainBatches
from ov_train.data.recipe import Source
from ov_train.data.shard_writer import ShardWriter
from ov_train.data.step_batches import split_step
from ov_train.data.stream import MixedStream
from tests.conftest import plan_of


@pytest.mark.parametrize(("devices", "nodes", "per_rank"), [(1, 1, 256), (2, 1, 128), (8, 16, 2)])
def test_each_rank_takes_its_share_of_the_global_batch(devices, nodes, per_rank, tmp_path):
    plan = plan_of(["data.samples_per_step=256", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}",
                    "trainer.accelerator=cpu", "strategy=ddp"], tmp_path)
    assert plan.data.samples_per_rank == per_rank
    # Stepped by hand: Lightning's clipping moves into the module, the same value.
    assert plan.optim.step.clip_val == 1.0 and "gradient_clip_val" not in plan.trainer
    assert plan_of([], tmp_path).data.samples_per_rank is None


def test_micro_batches_fit_the_budget_and_hold_every_sample_once():
    lengths = [300, 20, 900, 450, 450, 60, 2000, 10]
    budget = TokenBudget(max_tokens=1000, max_samples=3)
    groups = split_step(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) == 1 or (len(g) * longest <= 1000 and len(g) <= 3)
    assert [6] in groups  # over the budget: alone


def _process(raw):
    meta = json.loads(raw["json"])
    return {"key": raw["__key__"], "modality": "text", "input_ids": [0] * meta["tokens"]}


def _collate(examples):
    return {"tokens": [len(e["input_ids"]) for e in examples], "modality": [e["modality"] for e in examples]}


@pytest.fixture
def source(tmp_path):
    with ShardWriter(tmp_path / "src", "train", samples_per_shard=10) as writer:
        for i in range(40):
            writer.write({"__key__": f"s{i:03d}", "json": {"tokens": 5 + (i * 37) % 90}})
    return Source("src", "text", 1.0, tuple(sorted(map(str, (tmp_path / "src").glob("train-*.tar")))), ())


def _bundles(source, states=None, consumed=0):
    def make(**kw):
        return MixedStream([source], _process, seed=1, shuffle_buffer=8, **kw)

    dataset = TrainBatches(make, TokenBudget(max_tokens=200, max_samples=4), _collate, samples_per_rank=6)
    dataset.resume(states or {}, consumed)
    return iter(dataset)


def test_a_step_bundle_holds_exactly_the_ranks_share_and_resumes_exactly(source):
    stream = _bundles(source)
    steps = [next(stream) for _ in range(5)]
    for bundle in steps:
        assert len(bundle["key"]) == 6 == sum(len(mb["tokens"]) for mb in bundle["micro_batches"])
        assert all(len(mb["tokens"]) * max(mb["tokens"]) <= 200 for mb in bundle["micro_batches"] if len(mb["tokens"]) > 1)
    assert len({len(b["micro_batches"]) for b in steps}) > 1  # micro-batches per step vary with the lengths
    # A checkpoint after step 3 holds its stream state; resuming there gives steps 4 and 5 again.
    where = steps[2]["stream_state"]
    resumed = _bundles(source, {where["reader"]: where["state"]}, consumed=3)
    assert [next(resumed)["key"] for _ in range(2)] == [steps[3]["key"], steps[4]["key"]]


def test_epochs_derive_max_steps_from_the_recipe_sample_counts(tmp_path):
    overrides = ["data=recipe", "stage=mid", f"data.root={tmp_path}", "data.samples_per_step=256", "data.epochs=1"]
    plan = plan_of(overrides, tmp_path)
    steps = -(-4_835_000 // 256)  # Sec. 4.1's 4.835M samples, 256 per step
    assert plan.trainer["max_steps"] == plan.optim.total_steps == plan.identity["max_steps"] == steps == 18_887
    assert plan.optim.step.max_steps_from.endswith("4835000 samples (recipe mid) / 256 samples per step) = 18887")
    plan = plan_of([*overrides[:-2], "data.samples_per_step=512", "data.epochs=2"], tmp_path)
    assert plan.trainer["max_steps"] == 18_887


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.epochs=1"], "data.epochs needs data.samples_per_step"),
    (["data.samples_per_step=8", "data.epochs=1"], "data.epochs needs sample counts: recipe 'synthetic_onevision'"),
    (["data.samples_per_step=7", "trainer.devices=2"], "data.samples_per_step=7 does not divide over 2 processes"),
    (["data.samples_per_step=0"], "data.samples_per_step=0 must be an integer >= 1"),
    (["trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2: must be 1; a larger optimizer step"
                                            " is data.samples_per_step"),
    (["data.epochs=0", "data.samples_per_step=8"], "data.epochs=0.0 must be a number > 0"),
])
def test_bad_step_settings_are_refused_by_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        plan_of(overrides, tmp_path)
