"""What `ov-data convert` refuses: media outside --media-root, stale chunks of a changed input, bad UTF-8
aborting a run, workers outliving a killed convert; and videos of any container reach training."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ov_train.cli.data import main
from ov_train.config.media import MediaSettings
from ov_train.data.convert import convert
from ov_train.data.samples import SampleProcessor
from ov_train.data.stream import read_tar
from ov_train.text.tokenizer import build_tiny_tokenizer
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from tests.fixtures_data import (
    conversation,
    video_bytes,
    write_data_yaml,
    write_image,
    write_jsonl,
    write_llava_json,
    write_video,
)

REPO = Path(__file__).resolve().parents[2]


def _index(out):
    return json.loads((Path(out) / "index.json").read_text())


def _rejects(out):
    return {r["id"]: r["reason"] for r in map(json.loads, (Path(out) / "rejects.jsonl").read_text().splitlines())}


def _shard_bytes(out) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(Path(out).glob("train-*.tar")))


def _image_record(rid, ref):
    return {"id": rid, "image": ref, "conversations": conversation("<image>\nQ?")}


# ---------------------------------------------------------------- containment


@pytest.fixture
def escape(tmp_path):
    """A media root, a secret image beside it, and references that reach the secret in every way."""
    media, secret_dir = tmp_path / "media", tmp_path / "private"
    write_image(media / "images/ok.jpg", 40, 60)
    secret = write_image(secret_dir / "secret.png", 48, 48, "PNG")
    write_video(secret_dir / "secret.mp4", 3)
    (media / "link.png").symlink_to(secret)
    (media / "linkdir").symlink_to(secret_dir, target_is_directory=True)
    (media / "inside_link.jpg").symlink_to(media / "images/ok.jpg")
    records = [
        _image_record("ok", "images/ok.jpg"),
        _image_record("ok_dotdot_inside", "images/../images/ok.jpg"),
        _image_record("ok_symlink_inside", "inside_link.jpg"),
        _image_record("dotdot", "../private/secret.png"),
        _image_record("absolute", str(secret)),
        _image_record("passwd", "/etc/passwd"),
        _image_record("symlink", "link.png"),
        _image_record("symlinked_dir", "linkdir/secret.png"),
        {"id": "video_dotdot", "video": "../private/secret.mp4", "conversations": conversation("<video>\nQ?")},
        _image_record("a_folder", "images"),  # inside, but not a file
        _image_record("nul_byte", "ok\x00.jpg"),
    ]
    return {"input": write_jsonl(tmp_path / "data.jsonl", records), "media": media, "secret_path": secret,
            "secret": secret.read_bytes()}


OUTSIDE = ["dotdot", "absolute", "passwd", "symlink", "symlinked_dir", "video_dotdot"]


def test_media_outside_the_root_is_rejected_and_never_read(escape, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(escape["input"]), "--media-root", str(escape["media"]), "--out", str(out),
                 "--workers", "1"]) == 0
    assert _rejects(out) == {**dict.fromkeys(OUTSIDE, "outside_media_root"), "a_folder": "missing_image",
                             "nul_byte": "missing_image"}
    assert [s["id"] for s in _index(out)["samples"]] == ["ok", "ok_dotdot_inside", "ok_symlink_inside"]
    assert escape["secret"] not in _shard_bytes(out) and b"root:" not in _shard_bytes(out)
    assert "outside_media_root" in capsys.readouterr().out  # the report counts them
    reject = next(json.loads(r) for r in (out / "rejects.jsonl").read_text().splitlines() if '"symlink"' in r)
    assert str(escape["secret_path"]) in reject["detail"] and "--allow-outside-root" in reject["detail"]


def test_allow_outside_root_reads_them(escape, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", str(escape["input"]), "--media-root", str(escape["media"]), "--out", str(out),
                 "--workers", "1", "--allow-outside-root"]) == 0
    # Read, and /etc/passwd found not to be an image.
    assert _rejects(out) == {"passwd": "corrupt_image", "a_folder": "missing_image", "nul_byte": "missing_image"}
    assert len(_index(out)["samples"]) == 8 and escape["secret"] in _shard_bytes(out)
    # The flag is a setting: the same folder without it is refused rather than mixed.
    assert main(["convert", str(escape["input"]), "--media-root", str(escape["media"]), "--out", str(out)]) == 1


def test_a_data_yaml_may_list_json_anywhere_but_its_media_stay_inside(tmp_path):
    media = tmp_path / "media"
    write_image(media / "a.jpg", 30, 30)
    elsewhere = write_llava_json(tmp_path / "elsewhere/a.json", [
        _image_record("inside", "a.jpg"), _image_record("the_json_itself", str(tmp_path / "elsewhere/a.json"))])
    path = write_data_yaml(tmp_path / "recipes/mix.yaml", [{"json_path": str(elsewhere)}])
    out = tmp_path / "out"
    convert(path, out, media, workers=1)
    assert [s["id"] for s in _index(out)["samples"]] == ["inside"]
    assert _rejects(out) == {"the_json_itself": "outside_media_root"}


# ---------------------------------------------------------------- videos reach training whatever their container


def test_videos_of_any_name_are_trained_on(tmp_path, _offline_cache):
    media = tmp_path / "media"
    names = {"m4v": "clip.m4v", "named_json": "clip.json", "mov": "clip.MOV", "no_extension": "clip"}
    for i, name in enumerate(names.values()):
        write_video(media / name, 4 + i)
    records = [{"id": rid, "video": name, "conversations": conversation("<video>\nWhat moves?", "the bar")}
               for rid, name in names.items()]
    out = tmp_path / "out"
    totals = convert(write_jsonl(tmp_path / "v.jsonl", records), out, media, workers=1)
    assert totals["by_modality"]["video"] == 4 and not _rejects(out)
    tokenizer = build_tiny_tokenizer(Path(_offline_cache) / "tokenizer")
    process = SampleProcessor(tokenizer, VisionGeometry(32, 8, default_pinpoints(32)), "qwen_1_5",
                              MediaSettings.of("anyres_max_9", 32), max_length=8192)
    frames, containers = {}, {}
    for raw in read_tar(str(out / "train-000000-000000.tar")):
        meta = json.loads(raw["json"])  # clip.json did not overwrite the metadata
        assert meta["conversations"][1]["value"] == "the bar"
        frames[meta["id"]] = process(raw)["frames"].shape[0]
        containers[meta["id"]] = meta["video_container"]
    assert frames == {"m4v": 4, "named_json": 5, "mov": 6, "no_extension": 7}
    assert containers == {"m4v": "m4v", "named_json": "json", "mov": "mov", "no_extension": None}
    # Shards written before (container extension as the field, as synthetic shards still do) are read too.
    legacy = {"__key__": "old", "json": json.dumps({"conversations": conversation("<video>\nQ?")}).encode(),
              "m4v": video_bytes(3)}
    assert process(legacy)["frames"].shape[0] == 3


# ---------------------------------------------------------------- a changed input restarts the conversion


def _texts(prefix, n):
    return [{"id": f"{prefix}{i}", "conversations": conversation(f"Question {i}?", "Yes.")} for i in range(n)]


def test_an_edited_input_restarts_instead_of_reusing_chunks(tmp_path, capsys, caplog):
    path = write_jsonl(tmp_path / "t.jsonl", _texts("old", 6))
    out = tmp_path / "out"
    args = ["convert", str(path), "--out", str(out), "--samples-per-shard", "2", "--workers", "1"]
    assert main(args) == 0 and len(list(out.glob("train-*.tar"))) == 3
    write_jsonl(path, _texts("new", 3))  # shorter: the old third chunk must not survive either
    capsys.readouterr()
    assert main(args) == 0
    assert "t.jsonl changed since the earlier run (size, mtime_ns" in caplog.text  # said before converting
    assert "0 already done" in capsys.readouterr().out
    assert [s["id"] for s in _index(out)["samples"]] == ["new0", "new1", "new2"]
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000-000000.tar", "train-000001-000000.tar"]
    totals = convert(path, out, samples_per_shard=2, workers=1)  # unchanged now: everything resumes
    assert totals["restarted"] is None and totals["resumed_chunks"] == totals["chunks"] == 2
    (out / "parts/inputs.json").unlink()  # a folder from before inputs were recorded
    assert convert(path, out, samples_per_shard=2, workers=1)["resumed_chunks"] == 0


def test_a_json_listed_by_a_data_yaml_is_an_input_too(tmp_path):
    listed = write_llava_json(tmp_path / "data/a.json", _texts("a", 4))
    path = write_data_yaml(tmp_path / "mix.yaml", [{"json_path": "data/a.json"}])
    out = tmp_path / "out"
    convert(path, out, samples_per_shard=2, workers=1)
    # Same size and modification time, other content: only the hash of the head tells.
    before = listed.stat()
    listed.write_text(listed.read_text().replace('"a0"', '"b0"'))
    os.utime(listed, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert listed.stat().st_size == before.st_size
    totals = convert(path, out, samples_per_shard=2, workers=1)
    assert "a.json changed since the earlier run (head_sha256)" in totals["restarted"]
    assert totals["resumed_chunks"] == 0 and [s["id"] for s in _index(out)["samples"]] == ["b0", "a1", "a2", "a3"]


# ---------------------------------------------------------------- bad UTF-8 is one malformed line


def test_a_line_of_invalid_utf8_is_a_malformed_line(tmp_path):
    path = tmp_path / "t.jsonl"
    good = [json.dumps(r).encode() for r in _texts("t", 2)]
    path.write_bytes(good[0] + b"\n" + b'{"id": "caf\xe9", "conversations": []}\n' + good[1] + b"\n")
    out = tmp_path / "out"
    totals = convert(path, out, workers=1)
    assert [s["id"] for s in _index(out)["samples"]] == ["t0", "t1"]
    assert totals["rejects"] == {"malformed_line": 1}
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert reject["where"] == "t.jsonl:2" and "UTF-8" in reject["detail"]


# ---------------------------------------------------------------- workers die with a killed convert


@pytest.mark.slow
def test_workers_exit_when_convert_is_killed(tmp_path):
    write_image(tmp_path / "media/big.jpg", 600, 800)  # a few ms to decode: the job lasts seconds
    path = write_jsonl(tmp_path / "t.jsonl", [_image_record(f"i{i}", "big.jpg") for i in range(300)])
    out = tmp_path / "out"
    parent = subprocess.Popen([sys.executable, "-m", "ov_train.cli.data", "convert", str(path), "--out", str(out),
                               "--media-root", str(tmp_path / "media"), "--samples-per-shard", "4", "--workers", "2"],
                              cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    try:
        deadline = time.monotonic() + 60
        # Kill mid-job: once both workers have finished a chunk and the parent is still going.
        while len(list(out.glob("parts/part-*.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        children = psutil.Process(parent.pid).children()
        assert parent.poll() is None, "the conversion ended before it could be killed: give it more input"
        kinds = sorted("resource_tracker" if "resource_tracker" in " ".join(c.cmdline()) else "worker" for c in children)
        assert kinds == ["resource_tracker", "worker", "worker"]
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"still running after the parent was killed: {[(p.pid, p.cmdline()[-1]) for p in alive]}"
    finally:
        for proc in children:  # the processes this test started, if the assertion above failed
            if proc.is_running():
                proc.kill()
        parent.kill()
