"""Training streams: disjoint reader shares, recipe mix, token-budget batches, exact restore from a state;
limits on skipped samples, safe weights, rate-limited skip logs."""
import itertools
import json
import logging
import pickle
import re
from collections import Counter

import pytest

from ov_train.config.media import MediaSettings
from ov_train.config.options import IOSettings, TokenBudget
from ov_train.data import stream as stream_module
from ov_train.data.batching import TrainBatches, fill_batches
from ov_train.data.recipe import Source, load_recipe
from ov_train.data.samples import SampleError, SampleProcessor
from ov_train.data.shard_writer import ShardWriter
from ov_train.data.stream import DECK, MixedStream, StreamError, ValStream
from ov_train.vision.geometry import VisionGeometry


def stub_process(raw: dict) -> dict:
    """No media decoding: the json says how many tokens the sample has, or that it is broken."""
    meta = json.loads(raw["json"])
    if meta.get("bad"):
        raise SampleError("corrupt_image", f"sample {raw['__key__']}: broken on purpose")
    return {"key": raw["__key__"], "input_ids": [0] * meta.get("tokens", 1)}


def stub_collate(examples: list[dict]) -> dict:
    skipped = Counter()
    for e in examples:
        skipped.update(e["skipped"])
    return {"tokens": [len(e["input_ids"]) for e in examples], "skipped": dict(skipped)}


def write_source(directory, name, samples=15, per_shard=5, bad_every=0, weight=1.0):
    with ShardWriter(directory / name, "train", samples_per_shard=per_shard) as writer:
        for i in range(samples):
            meta = {"tokens": 10 + (7 * i) % 50, "bad": bool(bad_every) and i % bad_every == bad_every - 1}
            writer.write({"__key__": f"{name}{i:03d}", "json": meta})
    shards = tuple(str(directory / name / s) for s in writer.shards)
    return Source(name, "single_image", weight, shards, ())


@pytest.fixture
def two_sources(tmp_path):
    # Tiny shards and blocks, so a few dozen draws cross blocks, shards and epochs; a quarter of `a` is broken.
    return [write_source(tmp_path, "a", bad_every=4), write_source(tmp_path, "b", samples=12, per_shard=4, weight=2.0)]


def stream(sources, **kwargs):
    return MixedStream(sources, stub_process, seed=3, shuffle_buffer=4, **kwargs)


def keys(examples):
    return [e["key"] for e in examples]


@pytest.mark.parametrize("reader, readers", [(0, 1), (1, 2), (2, 5)])
def test_state_restores_the_sample_stream_exactly(two_sources, reader, readers):
    straight = stream(two_sources, reader=reader, readers=readers)
    run = iter(straight)
    for gap in (1, 4, 17, 30):  # restore points mid-block, at block ends, epochs later
        list(itertools.islice(run, gap))
        saved = straight.state()
        assert len(pickle.dumps(saved)) < 300  # counters only: cheap to carry on every batch
        restored = list(itertools.islice(iter(stream(two_sources, reader=reader, readers=readers, state=saved)), 12))
        continued = list(itertools.islice(run, 12))
        assert keys(restored) == keys(continued)
        assert [e["skipped"] for e in restored] == [e["skipped"] for e in continued]
    assert min(pos[0] for pos in straight.state()["sources"].values()) >= 2, "restores should span epochs"


def test_broken_samples_are_skipped_and_counted(two_sources):
    examples = list(itertools.islice(iter(stream(two_sources)), 60))
    assert all(int(e["key"][1:]) % 4 != 3 for e in examples if e["key"].startswith("a"))
    skipped = sum(e["skipped"].get("corrupt_image", 0) for e in examples)
    drawn_from_a = sum(k.startswith("a") for k in keys(examples))
    # Samples 3, 7 and 11 of `a`'s 15 are broken: one skip per four good draws, give or take an epoch edge.
    assert skipped > 0 and abs(skipped - drawn_from_a / 4) <= 3


def epoch_keys(sources, reader, readers):
    """The keys a reader emits during its first epoch of a single source."""
    s = stream(sources, reader=reader, readers=readers)
    out = []
    for example in iter(s):
        if s.state()["sources"][sources[0].name][0] > 0:
            return out
        out.append(example["key"])


@pytest.mark.parametrize("readers", [1, 2, 3, 7])  # whole shards per reader, then every k-th sample
def test_readers_split_an_epoch_disjointly(tmp_path, readers):
    source = write_source(tmp_path, "s", samples=20, per_shard=4)
    shares = [epoch_keys([source], r, readers) for r in range(readers)]
    flat = [k for share in shares for k in share]
    assert len(flat) == len(set(flat)) == 20
    assert flat != sorted(flat), "an epoch should be shuffled"


def test_a_reader_without_samples_is_an_error(tmp_path):
    source = write_source(tmp_path, "tiny", samples=2, per_shard=2)
    with pytest.raises(RuntimeError, match="'tiny' has no training samples for reader 3 of 4"):
        next(iter(stream([source], reader=3, readers=4)))


def test_a_source_of_unreadable_shards_is_an_error_naming_them(tmp_path):
    junk = tmp_path / "junk" / "train-000000.tar"
    junk.parent.mkdir()
    junk.write_bytes(bytes(range(256)) * 1000)  # not a tar
    source = Source("junk", "single_image", 1.0, (str(junk),), ())
    with pytest.raises(RuntimeError, match=r"'junk' has no training samples .*1 of its 1 shard\(s\) unreadable"
                                           r" and set aside: " + re.escape(str(junk))):
        next(iter(stream([source], io=IOSettings(retries=0))))


def test_realized_mix_tracks_the_onevision_recipe(small_data_root):
    recipe = load_recipe("synthetic_onevision", small_data_root)
    modality = {s.name: s.modality for s in recipe}
    mixed = MixedStream(recipe.sources, lambda raw: {"key": raw["__key__"]}, seed=0, shuffle_buffer=32)
    drawn = Counter(modality[e["source"]] for e in itertools.islice(iter(mixed), 3000))
    for name, share in recipe.shares("modality").items():
        assert abs(drawn[name] / 3000 - share) < 0.02, (name, drawn)
    assert {k: round(100 * v, 1) for k, v in recipe.shares("modality").items()} == {
        "single_image": 31.2, "multi_image": 43.0, "video": 25.9
    }


def test_budget_counts_padded_tokens_and_samples():
    budget = TokenBudget(max_tokens=100, max_samples=3)
    assert budget.admits(0, 0, 500)  # an empty batch takes anything
    assert budget.admits(1, 40, 50) and not budget.admits(1, 40, 51)  # 2 x 51 > 100
    assert not budget.admits(3, 10, 10)  # a fourth sample
    assert budget.full(2, 34) and not budget.full(2, 33)


def test_fill_batches_fills_to_the_budget_and_resumes_before_the_sample_that_did_not_fit():
    lengths = [30, 20, 60, 10, 250, 10, 10, 10, 10, 45, 45]
    draws = iter({"input_ids": [0] * n, "i": i} for i, n in enumerate(lengths))
    position = {"next": 0}

    def examples():
        for e in draws:
            position["next"] = e["i"] + 1
            yield e

    batches = list(fill_batches(examples(), TokenBudget(max_tokens=120, max_samples=4), lambda: position["next"]))
    assert [[e["i"] for e in b] for b, _ in batches] == [[0, 1], [2, 3], [4], [5, 6, 7, 8], [9, 10]]
    for batch, _ in batches:
        assert len(batch) == 1 or len(batch) * max(len(e["input_ids"]) for e in batch) <= 120
    # A batch closed by a sample that did not fit resumes at that sample; a full one right after itself.
    assert [state for _, state in batches] == [2, 4, 5, 9, 11]


def test_train_batches_resume_at_any_batch(two_sources):
    def make(states=None, consumed=0):
        dataset = TrainBatches(lambda **kw: stream(two_sources, **kw), TokenBudget(max_tokens=150, max_samples=5), stub_collate)
        dataset.resume(states or {}, consumed)
        return iter(dataset)

    straight = list(itertools.islice(make(), 30))
    assert all(b["stream_state"]["reader"] == 0 and b["stream_state"]["readers"] == 1 for b in straight)
    assert any(sum(b["skipped"].values()) for b in straight)
    for k in (1, 4, 13):
        resumed = list(itertools.islice(make({0: straight[k - 1]["stream_state"]["state"]}, k), 30 - k))
        assert [b["key"] for b in resumed] == [b["key"] for b in straight[k:]]
        assert [b["skipped"] for b in resumed] == [b["skipped"] for b in straight[k:]]
        assert [b["tokens"] for b in resumed] == [b["tokens"] for b in straight[k:]]


# ---------------------------------------------------------------- bad data: limits, weights, logs


class TooLong:
    """A processor whose every sample is over its max_length, as SampleProcessor says it."""

    max_length = 8

    def __call__(self, raw):
        raise SampleError("too_long", f"sample {raw['__key__']}: 40 tokens, visual tokens beyond max_length 8")


def test_a_stream_of_unusable_samples_stops_at_the_default_limit_naming_the_reasons(tmp_path):
    source = write_source(tmp_path, "a")
    # It used to skip forever (logging every skip) and never hand out a sample.
    with pytest.raises(StreamError) as err:
        next(iter(MixedStream([source], TooLong(), seed=0, shuffle_buffer=4)))
    message = str(err.value)
    assert message.startswith("1000 training samples in a row skipped from source 'a': too_long 1000 (stage.max_length=8)")
    assert "visual tokens beyond max_length 8" in message and "data.max_skips_in_a_row=1000" in message


def test_one_broken_source_stops_the_stream_though_others_are_fine(tmp_path):
    good = write_source(tmp_path, "good")
    broken = write_source(tmp_path, "broken", bad_every=1)
    mixed = stream([good, broken], max_skips_in_a_row=20)
    with pytest.raises(StreamError, match="20 training samples in a row skipped from source 'broken': corrupt_image 20;"):
        list(itertools.islice(iter(mixed), 1000))


def test_skips_in_a_row_restart_after_a_usable_sample(two_sources):
    # A quarter of `a` is broken, never 3 in a row: a limit of 3 is never reached.
    examples = list(itertools.islice(iter(stream(two_sources, max_skips_in_a_row=3)), 200))
    assert len(examples) == 200 and sum(sum(e["skipped"].values()) for e in examples) > 10


def test_the_real_processor_with_max_length_8_stops_the_synthetic_stream(small_data_root, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    process = SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5", MediaSettings.of("anyres_max_9", 8),
                              max_length=8)
    recipe = load_recipe("synthetic_onevision", small_data_root)
    with pytest.raises(StreamError, match=r"^30 training samples in a row skipped: too_long 30 \(stage.max_length=8\); last: "):
        next(iter(MixedStream(recipe.sources, process, seed=0, shuffle_buffer=8, max_skips_in_a_row=30)))
    # The held-out split: every sample skipped is an error naming the source, not an empty validation.
    with pytest.raises(StreamError, match=r"no usable held-out sample in source 'single_image' \(reader 0 of 1\): all 16"
                                          r" skipped: too_long 16 \(stage.max_length=8\)"):
        list(ValStream(recipe.sources, process))
    with pytest.raises(StreamError, match="^5 held-out samples in a row skipped from source 'single_image': too_long 5"):
        list(ValStream(recipe.sources, process, max_skips_in_a_row=5))


def test_held_out_sources_with_some_usable_samples_pass(tmp_path):
    with ShardWriter(tmp_path / "v", "val") as writer:
        for i in range(6):
            writer.write({"__key__": f"v{i}", "json": {"tokens": 5, "bad": i != 4}})
    source = Source("v", "text", 1.0, (), (str(tmp_path / "v" / writer.shards[0]),))
    assert keys(ValStream([source], stub_process)) == ["v4"]
    with pytest.raises(StreamError, match="no usable held-out sample in source 'v'.*all 3 skipped: corrupt_image 3"):
        list(ValStream([source], stub_process, limit=3))


def test_weights_whose_sum_overflows_still_mix_evenly(tmp_path):
    sources = [write_source(tmp_path, "a", weight=1e308), write_source(tmp_path, "b", weight=1e308)]
    mixed = stream(sources)
    # The plain sum is inf: every share used to be 0, every deck empty, and the draw looped forever.
    assert mixed.shares == [0.5, 0.5]
    drawn = Counter(e["source"] for e in itertools.islice(iter(mixed), DECK))  # a deck holds each share exactly
    assert drawn == {"a": DECK // 2, "b": DECK // 2}


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), 0.0, -1.0])
def test_weights_must_be_finite_and_positive(tmp_path, weight):
    sources = [write_source(tmp_path, "a"), write_source(tmp_path, "b", weight=weight)]
    with pytest.raises(ValueError, match="mixing weights must be finite positive numbers"):
        stream(sources)


def test_skip_warnings_are_rate_limited_and_counts_kept(two_sources, caplog, monkeypatch):
    monkeypatch.setattr(stream_module, "SKIP_SUMMARY_EVERY", 10)
    with caplog.at_level(logging.WARNING, logger="ov_train.data.stream"):
        examples = list(itertools.islice(iter(stream(two_sources)), 600))
    skipped = sum(e["skipped"].get("corrupt_image", 0) for e in examples)
    assert skipped > 30  # every skip is still counted for data/skipped_<reason>
    lines = [r.getMessage() for r in caplog.records]
    singles = [m for m in lines if m.startswith("skipping training sample from a: sample a")]
    summaries = [m for m in lines if "training samples skipped so far" in m]
    assert len(singles) == 5 and "further skips are summarised every 10" in singles[-1]
    assert len(lines) == 5 + len(summaries) and len(summaries) == skipped // 10
    assert summaries[0] == "10 training samples skipped so far: corrupt_image 10"


def test_a_source_holding_another_modality_is_skipped_and_counted(small_data_root, tiny_model_and_tokenizer):
    """Videos in a source the recipe labels single_image would train under the image share: skipped, counted."""
    from dataclasses import replace

    model, tokenizer = tiny_model_and_tokenizer
    process = SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5",
                              MediaSettings.of("anyres_max_9", 4), max_length=4096)
    sources = {s.name: s for s in load_recipe("synthetic_onevision", small_data_root).sources}
    mislabelled = replace(sources["video"], name="clips", modality="single_image")
    examples = list(itertools.islice(MixedStream([sources["single_image"], mislabelled], process, seed=0,
                                                 shuffle_buffer=4), 8))
    assert {e["source"] for e in examples} == {"single_image"}
    skipped = Counter()
    for e in examples:
        skipped.update(e["skipped"])
    assert set(skipped) == {"modality_mismatch"} and skipped["modality_mismatch"] > 0
    with pytest.raises(StreamError, match="no usable held-out sample in source 'clips'.*modality_mismatch"):
        list(ValStream([mislabelled], process, limit=3))
