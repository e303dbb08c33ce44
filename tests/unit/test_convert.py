"""`ov-data convert`: real media in, training shards + index + rejects out; resumable and atomic."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ov_train.cli.data import main
from ov_train.config.media import MediaSettings
from ov_train.data import convert as convert_module
from ov_train.data.convert import convert
from ov_train.data.formats import open_input, select
from ov_train.data.samples import SampleProcessor
from ov_train.data.stream import read_tar
from ov_train.text.tokenizer import build_tiny_tokenizer
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.tokens import anyres_tokens, single_crop_tokens, video_tokens
from tests.fixtures_data import (
    conversation,
    image_bytes,
    make_llava_dataset,
    write_data_yaml,
    write_jsonl,
    write_llava_json,
    write_parquet,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_llava_dataset(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def converted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    totals = convert(dataset["input"], out, dataset["media_root"], samples_per_shard=4, workers=2)
    return out, totals


def _cli_args(dataset, out, *extra):
    return ["convert", str(dataset["input"]), "--media-root", str(dataset["media_root"]), "--out", str(out),
            "--samples-per-shard", "4", "--workers", "1", *extra]


def _index(out):
    return json.loads((Path(out) / "index.json").read_text())


def _rejects(out):
    return [json.loads(line) for line in (Path(out) / "rejects.jsonl").read_text().splitlines()]


def _shard_samples(out):
    return {s["__key__"]: s for shard in sorted(Path(out).glob("train-*.tar")) for s in read_tar(str(shard))}


def test_counts_and_visual_tokens_match_the_spec(dataset, converted):
    out, totals = converted
    by_id = {s["id"]: s for s in _index(out)["samples"]}
    assert {i: s["visual_tokens"] for i, s in by_id.items()} == dataset["tokens"]
    assert {i: s["modality"] for i, s in by_id.items()} == dataset["modality"]
    assert totals["samples"] == 9
    assert totals["by_modality"] == {"single_image": 5, "multi_image": 1, "video": 2, "text": 1}
    assert totals["visual_tokens"] == 1485 + 2929 + 4744 + 7269 + 8019 + 2190 + 6273 + 1961
    assert by_id["single_3000x800"]["images"] == [[3000, 800]]
    assert by_id["video_40s"]["video"] == {"frames": 40, "fps": 1.0, "duration": 40.0, "sampled_frames": 32,
                                         "container": "mp4"}
    assert _index(out)["totals"] == {k: v for k, v in totals.items() if k not in ("chunks", "resumed_chunks", "restarted")}


def test_every_bad_input_is_rejected_by_reason(dataset, converted):
    out, totals = converted
    rejects = _rejects(out)
    assert {r["id"]: r["reason"] for r in rejects} == dataset["rejects"]
    assert all(r["detail"] for r in rejects)
    assert totals["rejects"] == {"corrupt_image": 2, "corrupt_video": 1, "empty_conversation": 1, "malformed_line": 2,
                                 "missing_image": 1, "missing_video": 1, "one_sided_conversation": 1,
                                 "placeholder_mismatch": 2}


def test_shards_hold_the_original_bytes_in_the_training_format(dataset, converted):
    out, _ = converted
    index = _index(out)
    samples = _shard_samples(out)
    assert sorted(samples) == sorted(s["key"] for s in index["samples"])
    for entry in index["samples"]:
        assert entry["key"] in {s["__key__"] for s in read_tar(str(out / entry["shard"]))}
    fields = {json.loads(s["json"])["id"]: s for s in samples.values()}
    media = dataset["media_root"]
    assert fields["single_480x640"]["img0.png"] == (media / "images/480x640.png").read_bytes()
    assert fields["single_384x384"]["img0.jpg"] == (media / "images/384x384.jpg").read_bytes()
    assert sorted(f for f in fields["multi_3"] if f.startswith("img")) == ["img0.jpg", "img1.png", "img2.jpg"]
    # Every video under one field, whatever its container; the container is noted in the json.
    assert set(fields["video_40s"]) == set(fields["video_10s"]) == {"__key__", "json", "video"}
    assert fields["video_40s"]["video"] == (media / "videos/clip40.mp4").read_bytes()
    assert fields["video_10s"]["video"] == (media / "videos/clip10.mkv").read_bytes()
    assert json.loads(fields["video_10s"]["json"])["video_container"] == "mkv"
    meta = json.loads(fields["video_40s"]["json"])
    assert meta["modality"] == "video" and meta["source"] == "train.jsonl" and meta["video_container"] == "mp4"
    assert meta["conversations"][0]["value"].startswith("<video>\n")  # LLaVA-Video's <image> marker normalised
    assert set(fields["text_1"]) == {"__key__", "json"}


def test_sample_processor_accepts_converted_samples(converted, _offline_cache):
    out, _ = converted
    tokenizer = build_tiny_tokenizer(Path(_offline_cache) / "tokenizer")
    geometry = VisionGeometry(32, 8, default_pinpoints(32))
    process = SampleProcessor(tokenizer, geometry, "qwen_1_5", MediaSettings.of("anyres_max_9", 32), max_length=8192)
    media_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>")]
    seen = set()
    for raw in _shard_samples(out).values():
        meta = json.loads(raw["json"])
        example = process(raw)
        one = len(example["images"]) == 1  # a single image is cut anyres, each of several is one crop
        expected = [anyres_tokens(*img.size, geometry) if one else single_crop_tokens(geometry) for img in example["images"]]
        if example["frames"] is not None:
            expected.append(video_tokens(example["frames"].shape[0], geometry))
        assert sum(int((example["input_ids"] == i).sum()) for i in media_ids) == sum(expected)
        assert (example["frames"] is not None) == (meta["modality"] == "video")
        seen.add(meta["modality"])
    assert seen == {"single_image", "multi_image", "video", "text"}


def test_text_tokens_leave_out_placeholders(converted, _offline_cache):
    out, _ = converted
    tokenizer = build_tiny_tokenizer(Path(_offline_cache) / "tokenizer")
    by_id = {s["id"]: s for s in _index(out)["samples"]}

    def count(*texts):
        return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)

    assert by_id["text_1"]["text_tokens"] == count("What is the opposite of up?", "down")
    assert by_id["single_384x384"]["text_tokens"] == count("\nDescribe the image.", "It is fine.")


def test_rerun_rewrites_only_the_missing_shard(dataset, converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted[0], out)
    assert main(_cli_args(dataset, out)) == 0  # everything already done
    shards = sorted(out.glob("train-*.tar"))
    assert len(shards) == 3
    before = {p.name: p.stat().st_mtime_ns for p in shards + sorted((out / "parts").glob("part-*.json"))}
    lost = out / "train-000001-000000.tar"
    lost.unlink()
    assert main(_cli_args(dataset, out)) == 0
    assert lost.is_file()
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("train-*.tar")) + sorted((out / "parts").glob("part-*.json"))}
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == ["part-000001.json", "train-000001-000000.tar"]
    assert _index(out)["samples"] == _index(converted[0])["samples"]


def test_crash_mid_shard_leaves_no_partial_shard(dataset, converted, tmp_path, monkeypatch):
    real, calls = convert_module.build_sample, []

    def crash_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C hit while the first shard is half written
        return real(*args)

    monkeypatch.setattr(convert_module, "build_sample", crash_on_third)
    out = tmp_path / "out"
    assert main(_cli_args(dataset, out)) == 130
    assert not list(out.glob("train-*.tar")) and not list(out.glob("parts/part-*"))
    assert not (out / "index.json").exists() and not list(out.glob("**/.*tmp*"))
    monkeypatch.undo()
    assert main(_cli_args(dataset, out)) == 0
    assert _index(out)["samples"] == _index(converted[0])["samples"]


def test_crash_while_writing_the_index_keeps_no_partial_index(dataset, converted, tmp_path, monkeypatch):
    real = Path.write_text

    def half_then_crash(self, text, *args, **kwargs):
        if self.name.startswith(".index.json"):
            real(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_crash)
    out = tmp_path / "out"
    assert main(_cli_args(dataset, out)) == 130
    assert not (out / "index.json").exists() and len(list(out.glob("train-*.tar"))) == 3
    monkeypatch.undo()
    totals = convert(dataset["input"], out, dataset["media_root"], samples_per_shard=4)
    assert totals["resumed_chunks"] == totals["chunks"] == 5
    assert _index(out)["samples"] == _index(converted[0])["samples"] and not list(out.glob(".*tmp*"))


def test_missing_input_or_media_root_is_a_clear_error(dataset, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["convert", str(missing), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"INPUT {missing} does not exist" in err and "Traceback" not in err
    assert main(["convert", str(dataset["input"]), "--media-root", str(tmp_path / "media"), "--out", str(tmp_path / "o")]) == 1
    assert f"--media-root {tmp_path / 'media'} does not exist" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "ov_train.cli.data", "convert", str(missing), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1 and "does not exist" in run.stderr and "Traceback" not in run.stderr


def test_other_settings_in_the_same_out_are_refused(dataset, converted, capsys):
    assert main(_cli_args(dataset, converted[0], "--samples-per-shard", "5")) == 1
    assert "samples_per_shard" in capsys.readouterr().err


def test_format_from_extension_or_forced(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.txt", [{"id": "t", "conversations": conversation("Hi?", "Hello.")}])
    assert main(["convert", str(path), "--out", str(tmp_path / "a")]) == 1
    assert "--format" in capsys.readouterr().err
    assert main(["convert", str(path), "--format", "jsonl", "--out", str(tmp_path / "b"), "--workers", "1"]) == 0
    assert [s["id"] for s in _index(tmp_path / "b")["samples"]] == ["t"]


def test_parquet_is_read_in_row_batches_and_split_by_bytes(tmp_path, monkeypatch):
    png = image_bytes(480, 640, "PNG")
    rows = [
        {"id": "p0", "conversations": conversation("<image>\nWhat is it?"), "data_source": "charts",
         "image": {"bytes": png, "path": "a.png"}},
        {"id": "p1", "conversations": conversation("Say hi."), "data_source": "text_src", "image": None},
        {"id": "p2", "conversations": conversation("<image>\nQ?"), "data_source": "charts",
         "image": {"bytes": b"not an image", "path": "b.png"}},
        {"id": "p3", "conversations": [{"from": "gpt", "value": "Only me."}], "data_source": "charts", "image": None},
        {"id": "p4", "conversations": conversation("<image>\nAgain?"), "data_source": "charts", "image": {"bytes": png, "path": "c.png"}},
    ]
    path = write_parquet(tmp_path / "ov.parquet", rows)
    monkeypatch.setattr("ov_train.data.formats.PARQUET_BATCH_ROWS", 2)
    out = tmp_path / "out"
    totals = convert(path, out, max_shard_bytes=1, workers=1)  # every sample overflows: one shard each
    assert totals["by_modality"] == {"single_image": 2, "multi_image": 0, "video": 0, "text": 1}
    assert totals["visual_tokens"] == 2 * 2929
    assert {r["id"]: r["reason"] for r in _rejects(out)} == {"p2": "corrupt_image", "p3": "one_sided_conversation"}
    index = _index(out)
    assert index["shards"] == [f"train-000000-{i:06d}.tar" for i in range(3)]
    samples = _shard_samples(out)
    for entry in index["samples"]:
        raw = next(read_tar(str(out / entry["shard"])))
        assert raw["__key__"] == entry["key"] and json.loads(raw["json"])["source"] == entry["source"]
    assert [e["source"] for e in index["samples"]] == ["charts", "text_src", "charts"]
    assert samples[index["samples"][0]["key"]]["img0.png"] == png


def test_data_yaml_sampling_strategies(tmp_path):
    def texts(prefix):
        return [{"id": f"{prefix}{i}", "conversations": conversation(f"Question {i}?", "Yes.")} for i in range(10)]

    write_llava_json(tmp_path / "data/a.json", texts("a"))
    write_jsonl(tmp_path / "data/b.jsonl", texts("b"))
    write_llava_json(tmp_path / "data/c.json", texts("c"))
    path = write_data_yaml(tmp_path / "recipes/mix.yaml", [
        {"json_path": "../data/a.json", "sampling_strategy": "first:50%"},
        {"json_path": str(tmp_path / "data/b.jsonl"), "sampling_strategy": "end:30%"},
        {"json_path": "../data/c.json", "sampling_strategy": "random:40%"},
    ])

    def ids(seed):
        return [item.record["id"] for item in open_input(path, seed=seed).items]

    chosen = ids(0)
    assert chosen[:8] == ["a0", "a1", "a2", "a3", "a4", "b7", "b8", "b9"]
    randoms = chosen[8:]
    assert len(randoms) == 4 and all(i.startswith("c") for i in randoms)
    assert ids(0) == chosen and ids(1)[8:] != randoms
    out = tmp_path / "out"
    totals = convert(path, out, seed=0, workers=1)
    assert totals["samples"] == 12 and totals["by_modality"]["text"] == 12
    assert [s["id"] for s in _index(out)["samples"]] == chosen
    assert {s["source"] for s in _index(out)["samples"]} == {"a.json", "b.jsonl", "c.json"}


def test_select_counts_like_llava_next():
    rng = random.Random(0)
    assert select(15, "first:10%", rng) == [0, 1]  # ceil(1.5)
    assert select(15, "end:3", rng) == [12, 13, 14]
    assert select(4, "all", rng) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="sampling_strategy"):
        select(4, "middle:10%", rng)


def test_stale_temp_files_of_a_killed_run_are_removed(dataset, converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted[0], out)
    stale = out / f".train-000009-000000.tar.tmp{os.getpid() + 1}"
    stale.write_bytes(b"half a shard")
    assert main(_cli_args(dataset, out)) == 0
    assert not stale.exists()
