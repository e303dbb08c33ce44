"""`ov-data convert` of preference data: LLaVA-NeXT's DPO JSON and Hugging Face's conversational preference layout
(JSONL, and parquet with the image bytes) become pair samples in shards (the chosen conversation plus the rejected
reply) that read back into pairs for training; bad pairs are rejected by reason; --holdout and `ov-data inspect`
work as for SFT data."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ov_train.cli.data import main
from ov_train.config.media import MediaSettings
from ov_train.data.convert import convert
from ov_train.data.formats import parquet_items
from ov_train.data.pairs import PairProcessor
from ov_train.data.parquet_source import build_index, row_sample
from ov_train.data.samples import SampleError, SampleProcessor
from ov_train.data.stream import read_tar
from ov_train.text.tokenizer import build_tiny_tokenizer
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from tests.fixtures_data import SPEC_SINGLE_IMAGE_TOKENS, image_bytes, write_image, write_jsonl, write_video


def _samples(out: Path, split: str = "train") -> dict:
    return {s["__key__"]: s for shard in sorted(out.glob(f"{split}-*.tar")) for s in read_tar(str(shard))}


def _by_id(out: Path, split: str = "train") -> dict:
    return {json.loads(s["json"])["id"]: s for s in _samples(out, split).values()}


def _rejects(out: Path) -> dict:
    return {(r := json.loads(line))["id"]: r["reason"] for line in (out / "rejects.jsonl").read_text().splitlines()}


def _pair(out_samples: dict, tokenizer) -> dict:
    """Each converted sample read back as training reads a pair: {id: (chosen text, rejected text, example)}."""
    process = PairProcessor(SampleProcessor(tokenizer, VisionGeometry(32, 8, default_pinpoints(32)), "qwen_1_5",
                                            MediaSettings.of("anyres_max_9", 8), max_length=8192))
    pairs = {}
    for key, raw in out_samples.items():
        example = process(raw)
        chosen = tokenizer.decode(example["input_ids"][example["labels"] != -100])
        rejected = tokenizer.decode(example["rejected_input_ids"][example["rejected_labels"] != -100])
        pairs[key] = (chosen, rejected, example)
    return pairs


@pytest.fixture(scope="module")
def tokenizer(_offline_cache):
    return build_tiny_tokenizer(Path(_offline_cache) / "tokenizer")


def _llava_next_dpo(root: Path) -> Path:
    """LLaVA-NeXT's DPO records (id, image or video, prompt, chosen, rejected), good and bad."""
    media = root / "media"
    write_image(media / "images/a.jpg", 480, 640)
    write_image(media / "images/b.png", 64, 64, "PNG")
    write_video(media / "videos/v.mp4", 10)
    write_image(root / "outside.jpg", 32, 32)
    records = [
        # No placeholder: one goes in front, as LLaVA-NeXT's DPO dataset does.
        {"id": "img", "image": "images/a.jpg", "prompt": "What is shown?", "chosen": "A bright block.", "rejected": "A cat."},
        {"id": "multi", "image": ["images/a.jpg", "images/b.png"], "prompt": "<image>\n<image>\nWhich is square?",
         "chosen": "The second.", "rejected": "The first one, clearly."},
        {"id": "vid", "video": "videos/v.mp4", "prompt": "<image>\nWhich way?", "chosen": "Right.", "rejected": "Left."},
        {"id": "text", "prompt": "Opposite of up?", "chosen": "Down.", "rejected": "Sideways."},
        # A conversational record in the same file: the prompt is the turn both conversations share.
        {"id": "conv", "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
         "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "No."}]},
        {"id": "bad_same", "prompt": "Q?", "chosen": "Yes.", "rejected": " Yes. "},
        {"id": "bad_no_rejected", "image": "images/a.jpg", "prompt": "Q?", "chosen": "Yes."},
        {"id": "bad_empty_chosen", "prompt": "Q?", "chosen": "  ", "rejected": "No."},
        {"id": "bad_no_prompt", "chosen": "Yes.", "rejected": "No."},
        {"id": "bad_media_in_reply", "image": "images/a.jpg", "prompt": "<image>\nQ?", "chosen": "Yes.",
         "rejected": "<image> no"},
        {"id": "bad_missing_image", "image": "images/nope.jpg", "prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"id": "bad_outside", "image": "../outside.jpg", "prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"id": "bad_count", "image": "images/a.jpg", "prompt": "<image>\n<image>\nQ?", "chosen": "Yes.", "rejected": "No."},
        {"id": "bad_two_replies", "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"},
                                             {"role": "assistant", "content": "B"}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "C"}]},
    ]
    return write_jsonl(root / "dpo.jsonl", records)


LLAVA_NEXT_REJECTS = {
    "bad_same": "identical_replies", "bad_no_rejected": "missing_reply", "bad_empty_chosen": "missing_reply",
    "bad_no_prompt": "missing_prompt", "bad_media_in_reply": "placeholder_in_reply", "bad_missing_image": "missing_image",
    "bad_outside": "outside_media_root", "bad_count": "placeholder_mismatch", "bad_two_replies": "malformed_reply",
}


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    path = _llava_next_dpo(root)
    out = root / "out"
    totals = convert(path, out, root / "media", samples_per_shard=4, workers=1)
    return out, totals


def test_llava_next_dpo_json_converts_into_pairs(llava_next, tokenizer):
    out, totals = llava_next
    assert totals["samples"] == totals["pairs"] == 5
    assert totals["by_modality"] == {"single_image": 1, "multi_image": 1, "video": 1, "text": 2}
    index = json.loads((out / "index.json").read_text())
    assert all(entry["pair"] for entry in index["samples"])
    entry = {e["id"]: e for e in index["samples"]}["img"]
    assert entry["visual_tokens"] == SPEC_SINGLE_IMAGE_TOKENS[(480, 640)]
    by_id = _by_id(out)
    metas = {i: json.loads(s["json"]) for i, s in by_id.items()}
    assert metas["img"]["conversations"] == [{"from": "human", "value": "<image>\nWhat is shown?"},
                                             {"from": "gpt", "value": "A bright block."}]
    assert metas["img"]["rejected"] == "A cat." and by_id["img"]["img0.jpg"] == (out.parent / "media/images/a.jpg").read_bytes()
    assert metas["vid"]["conversations"][0]["value"] == "<video>\nWhich way?"  # LLaVA-Video's <image> marker
    assert metas["conv"]["conversations"] == [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]
    assert metas["conv"]["rejected"] == "No."
    # Read back as training reads a pair: both replies supervised, the media once.
    pairs = {json.loads(_samples(out)[k]["json"])["id"]: v for k, v in _pair(_samples(out), tokenizer).items()}
    for pid, (chosen, rejected, _) in pairs.items():
        assert chosen.startswith(metas[pid]["conversations"][-1]["value"]), pid
        assert rejected.startswith(metas[pid]["rejected"]), pid
    assert len(pairs["multi"][2]["images"]) == 2 and pairs["vid"][2]["frames"] is not None


def test_bad_pairs_are_rejected_by_reason(llava_next):
    out, totals = llava_next
    assert _rejects(out) == LLAVA_NEXT_REJECTS
    assert totals["rejects"] == {r: list(LLAVA_NEXT_REJECTS.values()).count(r) for r in sorted(set(LLAVA_NEXT_REJECTS.values()))}


def test_text_tokens_count_the_prompt_and_both_replies(llava_next, tokenizer):
    out, _ = llava_next
    entry = {e["id"]: e for e in json.loads((out / "index.json").read_text())["samples"]}["text"]
    assert entry["text_tokens"] == sum(len(tokenizer.encode(t, add_special_tokens=False))
                                       for t in ("Opposite of up?", "Down.", "Sideways."))


def _messages_type():
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))


def _msg(role, *parts):
    return {"role": role, "content": [{"type": "image", "text": None} if p is None else {"type": "text", "text": p}
                                      for p in parts]}


def _write_hf_parquet(path: Path) -> Path:
    """Hugging Face's conversational preference layout with embedded images (as rlaif-v_formatted holds it)."""
    png, jpg = image_bytes(480, 640, "PNG"), image_bytes(64, 64)
    image = {"bytes": png, "path": "a.png"}
    rows = [
        {"id": "h_img", "prompt": [_msg("user", None, "Describe it.")], "chosen": [_msg("assistant", "A block.")],
         "rejected": [_msg("assistant", "A dog.")], "images": [image]},
        {"id": "h_two", "prompt": [_msg("user", None, None, "Same?")], "chosen": [_msg("assistant", "No.")],
         "rejected": [_msg("assistant", "Yes.")], "images": [image, {"bytes": jpg, "path": "b.jpg"}]},
        {"id": "h_implicit", "prompt": None, "chosen": [_msg("user", "Hi?"), _msg("assistant", "Hello.")],
         "rejected": [_msg("user", "Hi?"), _msg("assistant", "Go away.")], "images": []},
        {"id": "h_same", "prompt": [_msg("user", "Q?")], "chosen": [_msg("assistant", "A.")],
         "rejected": [_msg("assistant", "A.")], "images": []},
        {"id": "h_no_rejected", "prompt": [_msg("user", "Q?")], "chosen": [_msg("assistant", "A.")], "rejected": None,
         "images": []},
        {"id": "h_count", "prompt": [_msg("user", None, "Q?")], "chosen": [_msg("assistant", "A.")],
         "rejected": [_msg("assistant", "B.")], "images": [image, image]},
        {"id": "h_corrupt", "prompt": [_msg("user", None, "Q?")], "chosen": [_msg("assistant", "A.")],
         "rejected": [_msg("assistant", "B.")], "images": [{"bytes": b"not an image", "path": "c.png"}]},
    ]
    schema = pa.schema([("id", pa.string()), ("prompt", _messages_type()), ("chosen", _messages_type()),
                        ("rejected", _messages_type()),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=3)
    return path


def test_hugging_face_preference_parquet_converts_with_holdout(tmp_path, tokenizer, capsys):
    path = _write_hf_parquet(tmp_path / "prefs.parquet")
    out = tmp_path / "out"
    assert main(["convert", str(path), "--out", str(out), "--workers", "1", "--holdout", "1", "--seed", "3"]) == 0
    assert "held out: 1 in val-*.tar, 2 for training in train-*.tar" in capsys.readouterr().out
    assert _rejects(out) == {"h_same": "identical_replies", "h_no_rejected": "missing_reply",
                             "h_count": "placeholder_mismatch", "h_corrupt": "corrupt_image"}
    train, held = _by_id(out, "train"), _by_id(out, "val")
    assert len(held) == 1 and len(train) == 2 and set(train) | set(held) == {"h_img", "h_two", "h_implicit"}
    metas = {i: json.loads(s["json"]) for i, s in {**train, **held}.items()}
    assert metas["h_img"]["conversations"] == [{"from": "human", "value": "<image>\nDescribe it."},
                                               {"from": "gpt", "value": "A block."}]
    assert metas["h_img"]["rejected"] == "A dog." and metas["h_img"]["modality"] == "single_image"
    assert metas["h_two"]["modality"] == "multi_image" and metas["h_two"]["conversations"][0]["value"] == "<image>\n<image>\nSame?"
    assert metas["h_implicit"]["conversations"][0] == {"from": "human", "value": "Hi?"}
    assert metas["h_implicit"]["rejected"] == "Go away."
    pairs = _pair({**_samples(out, "train"), **_samples(out, "val")}, tokenizer)
    assert {(c.split("<")[0], r.split("<")[0]) for c, r, _ in pairs.values()} == {
        ("A block.", "A dog."), ("No.", "Yes."), ("Hello.", "Go away.")}
    # inspect shows them: pairs counted, text tokens of the prompt and both replies
    assert main(["inspect", str(out)]) == 0
    assert "held out: 1 in val-*.tar, 2 for training in train-*.tar" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["held_out"] == 1
    assert stats["samples"] == stats["pairs"] == 3 and stats["rejects"]["identical_replies"] == 1
    assert main(["inspect", str(out)]) == 0
    assert "of which 3 preference pairs" in capsys.readouterr().out


def test_a_preference_parquet_needs_both_reply_columns(tmp_path, capsys):
    path = tmp_path / "half.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q?", "chosen": "A."}]), path)
    assert main(["convert", str(path), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    assert "lacks column(s) ['rejected']" in capsys.readouterr().err


def test_training_reads_a_preference_parquet_directly(tmp_path, tokenizer):
    """A recipe's parquet source (no conversion): `ov-data index` accounts for the pairs, and each row becomes the
    pair sample convert would write, or a skip by convert's reason."""
    path = _write_hf_parquet(tmp_path / "prefs.parquet")
    index = build_index([str(path)], tokenizer)
    assert index["totals"]["pairs"] == index["totals"]["samples"] == 3
    assert sorted(index["files"][str(path)]["rejected"].values()) == [
        "corrupt_image", "identical_replies", "missing_reply", "placeholder_mismatch"]
    process = PairProcessor(SampleProcessor(tokenizer, VisionGeometry(32, 8, default_pinpoints(32)), "qwen_1_5",
                                            MediaSettings.of("anyres_max_9", 8), max_length=8192))
    read, skipped = {}, {}
    for row, item in parquet_items(pq.ParquetFile(path), path.name):
        try:
            example = process(row_sample(item, str(path), row))
            read[item.record["id"]] = len(example["rejected_input_ids"])
        except SampleError as err:
            skipped[item.record["id"]] = err.reason
    assert set(read) == {"h_img", "h_two", "h_implicit"} and all(n > 0 for n in read.values())
    assert skipped == {"h_same": "identical_replies", "h_no_rejected": "missing_reply", "h_count": "placeholder_mismatch",
                       "h_corrupt": "corrupt_image"}
