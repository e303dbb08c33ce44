"""Raw shard samples -> examples: truncation rules, bad input skipped and counted by reason, huge samples skipped
before they cost their size."""
import io
import itertools
import json
import time

import numpy as np
import pytest
from PIL import Image

from ov_train.config.media import MediaSettings
from ov_train.data.recipe import Source
from ov_train.data.samples import SampleError, SampleProcessor, collate, stock_inputs
from ov_train.data.shard_writer import ShardWriter
from ov_train.data.stream import MixedStream, ValStream, read_tar
from ov_train.data.video import encode_mp4
from ov_train.text.template import IGNORE_INDEX
from ov_train.vision.geometry import VisionGeometry


@pytest.fixture(scope="module")
def process_factory(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    geometry = VisionGeometry.from_model_config(model.config)

    def make(max_length=4096, template="qwen_1_5", strategy="anyres_max_9"):
        return SampleProcessor(tokenizer, geometry, template, MediaSettings.of(strategy, 32), max_length=max_length)

    return make


def _png(h=32, w=32):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key, human, reply, **media):
    conv = [{"from": "human", "value": human}, {"from": "gpt", "value": reply}]
    return {"__key__": key, "json": json.dumps({"modality": "single_image", "conversations": conv}).encode(), **media}


def test_single_image_is_anyres_and_multi_image_single_crop(process_factory):
    process = process_factory()
    one = process(_sample("a", "<image>\nQ?", "red", **{"img0.png": _png(32, 64)}))
    two = process(_sample("b", "<image>\n<image>\nQ?", "red", **{"img0.png": _png(), "img1.png": _png(64, 32)}))
    assert [img.anyres for img in one["images"]] == [True]
    assert one["images"][0].pixel_values.shape[0] == 3  # base crop + a 1x2 grid
    assert [img.anyres for img in two["images"]] == [False, False]
    assert [img.pixel_values.shape[0] for img in two["images"]] == [1, 1]
    pretrain = process_factory(template="plain", strategy="pad")(_sample("c", "<image>\nQ?", "red", **{"img0.png": _png(32, 64)}))
    assert [img.anyres for img in pretrain["images"]] == [False]


def test_visual_token_count_matches_ids(process_factory, tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    example = process_factory()(_sample("a", "<image>\nQ?", "red", **{"img0.png": _png(40, 90)}))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert int((example["input_ids"] == image_id).sum()) == example["images"][0].num_tokens


def test_truncation_keeps_answers_or_drops(process_factory):
    raw = _sample("t", "What is the opposite of up? " * 20, "down")
    full = process_factory()(raw)
    n = len(full["input_ids"])
    with pytest.raises(SampleError) as err:
        process_factory(max_length=n - 5)(raw)  # cuts the whole reply away
    assert err.value.reason == "no_supervised_tokens"
    kept = process_factory(max_length=n - 1)(raw)  # cuts only the trailing newline
    assert (kept["labels"] != IGNORE_INDEX).sum() == (full["labels"] != IGNORE_INDEX).sum()


def test_truncation_through_visual_tokens_drops(process_factory):
    with pytest.raises(SampleError) as err:
        process_factory(max_length=20)(_sample("v", "<image>\nQ?", "red", **{"img0.png": _png(64, 64)}))
    assert err.value.reason == "too_long"


@pytest.mark.parametrize(
    "raw, reason",
    [
        (_sample("i", "<image>\nQ?", "red", **{"img0.png": b"not a png"}), "corrupt_image"),
        (_sample("v", "<video>\nQ?", "left", mp4=encode_mp4(np.zeros((4, 32, 32, 3), np.uint8), 1)[:200]), "corrupt_video"),
        ({"__key__": "j", "json": b"{broken"}, "malformed_json"),
        (_sample("p", "<image>\n<image>\nQ?", "red", **{"img0.png": _png()}), "bad_conversation"),
    ],
)
def test_bad_input_names_sample_and_reason(process_factory, raw, reason):
    with pytest.raises(SampleError) as err:
        process_factory()(raw)
    assert err.value.reason == reason and raw["__key__"] in str(err.value)


def test_stream_skips_and_counts_bad_samples(tmp_path, process_factory, tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    with ShardWriter(tmp_path, "train") as writer:
        for i in range(6):
            writer.write(_sample(f"good{i}", "<image>\nQ?", "red", **{"img0.png": _png()}))
            if i % 2:
                writer.write(_sample(f"bad{i}", "<image>\nQ?", "red", **{"img0.png": b"garbage"}))
    shards = tuple(str(tmp_path / s) for s in writer.shards)
    assert len(list(read_tar(shards[0]))) == 9
    source = Source("s", "single_image", 1.0, shards, shards)
    stream = MixedStream([source], process_factory(), seed=0, shuffle_buffer=4)
    examples = list(itertools.islice(iter(stream), 12))
    assert all(e["key"].startswith("good") for e in examples)
    batch = collate(examples, tokenizer.pad_token_id)
    # 12 good samples span two passes over the shard, which holds 3 bad ones per pass.
    assert 3 <= batch["skipped"]["corrupt_image"] <= 6
    held_out = list(ValStream([source], process_factory()))
    assert len(held_out) == 6


def test_stock_inputs_refuse_videos_of_different_lengths():
    """The stock forward takes one (videos, frames, ...) tensor; splitting unequal videos evenly would mix them."""
    batch = {"video_frames": np.zeros((5, 3, 8, 8)), "frames_per_video": [2, 3]}
    with pytest.raises(ValueError, match="one frame count"):
        stock_inputs(batch)


@pytest.mark.parametrize("field", ["imgx.png", "img.png"])
def test_a_badly_named_image_member_is_skipped_and_counted(tmp_path, process_factory, field):
    """A shard holding f1.json and f1.imgx.png (or f1.img.png) ended the run with `invalid literal for int()` from
    the image order: that sample is now skipped and counted (bad_media_name), and the others are used."""
    with ShardWriter(tmp_path, "train") as writer:
        for key in ("f0", "f1", "f2"):
            writer.write(_sample(key, "<image>\nQ?", "red", **{"imgx.png" if key == "f1" else "img0.png": _png()}))
    shard = str(tmp_path / writer.shards[0])
    assert [sorted(s) for s in read_tar(shard)][1] == ["__key__", "imgx.png", "json"]
    if field != "imgx.png":  # the other spelling, written as a member of its own
        import tarfile

        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                member.name = member.name.replace(".imgx.png", f".{field}")
                tar.addfile(member, io.BytesIO(data))
    source = Source("s", "single_image", 1.0, (shard,), (shard,))
    examples = list(itertools.islice(iter(MixedStream([source], process_factory(), seed=0, shuffle_buffer=3)), 4))
    assert {e["key"] for e in examples} == {"f0", "f2"}
    assert sum(e["skipped"].get("bad_media_name", 0) for e in examples) >= 1
    assert [e["key"] for e in ValStream([source], process_factory())] == ["f0", "f2"]


def test_huge_samples_are_skipped_before_the_work_they_would_cost(tmp_path, process_factory):
    """A 20 MB conversation was tokenized whole before stage.max_length cut it, and a json member with a 60 MB
    unused field was read and parsed whole: a json member over what a max_length sample can hold is passed over
    unread (oversized_json), and a conversation with more characters than max_length tokens can stand for is
    skipped untokenized (too_long_text); both counted, in far less time than tokenizing took (~15 s here)."""
    process = process_factory(max_length=256)
    assert process.max_text_chars == 256 * process.token_chars
    short = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "red"}]
    with ShardWriter(tmp_path, "train") as writer:
        writer.write(_sample("good0", "Q?", "red"))
        writer.write(_sample("long", "word " * 4_000_000, "red"))  # 20 MB of text
        writer.write({"__key__": "fat", "json": {"conversations": short, "unused": "x" * 60_000_000}})
        writer.write(_sample("wordy", "word " * 20_000, "red"))  # a 100 kB json, within the member limit
        writer.write(_sample("good1", "Q?", "red"))
    source = Source("s", "text", 1.0, tuple(str(tmp_path / s) for s in writer.shards), ())
    start = time.monotonic()
    examples = list(itertools.islice(iter(MixedStream([source], process, seed=0, shuffle_buffer=1)), 2))  # in order
    assert time.monotonic() - start < 5
    assert {e["key"] for e in examples} == {"good0", "good1"}
    skipped = collate(examples, 0)["skipped"]
    assert skipped == {"oversized_json": 2, "too_long_text": 1}
    # A json read whole (a parquet row) is refused by its length before parsing.
    raw = {"__key__": "row", "json": b"{" + b" " * process.member_limits["json"] + b"}"}
    with pytest.raises(SampleError, match="sample row: json of .* bytes is over the") as err:
        process(raw)
    assert err.value.reason == "oversized_json"


def test_the_character_bound_holds_for_the_densest_text_and_skips_nothing_shorter(process_factory, tiny_model_and_tokenizer):
    """max_text_chars skips only conversations that have more than max_length tokens whatever they say: no text
    puts more characters in a token than token_chars / 2 (the factor 2 is NFC's room), checked on the densest
    texts there are, the vocabulary's longest entries back to back (special ones included) and composing
    accents. At the bound a conversation is still tokenized (then cut); one character more is not."""
    _, tokenizer = tiny_model_and_tokenizer
    process = process_factory(max_length=64)
    vocab = sorted(tokenizer.get_vocab(), key=len, reverse=True)
    rng = np.random.default_rng(0)
    texts = [tokenizer.convert_tokens_to_string(vocab[:40]), tokenizer.convert_tokens_to_string(vocab[:1] * 40),
             "u\u0308\u0304" * 50, *(tokenizer.convert_tokens_to_string(list(rng.choice(vocab, 30))) for _ in range(50))]
    for text in texts:
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert len(text) <= tokens * process.token_chars // 2, text
    human = "a" * (process.max_text_chars - len("red"))
    with pytest.raises(SampleError) as err:
        process(_sample("edge", human, "red"))
    assert err.value.reason == "no_supervised_tokens"  # tokenized, then cut to max_length
    with pytest.raises(SampleError) as err:
        process(_sample("over", human + "a", "red"))
    assert err.value.reason == "too_long_text"
