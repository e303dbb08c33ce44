"""Raw shard samples -> examples: truncation rules, bad input skipped and counted by reason."""
import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

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
        return SampleProcessor(tokenizer, geometry, template, strategy, max_frames=32, max_length=max_length)

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
    pretrain = process_factory(template="plain", strategy="single_crop")(_sample("c", "<image>\nQ?", "red", **{"img0.png": _png(32, 64)}))
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
