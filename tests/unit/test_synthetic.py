import copy
import io
import json
import tarfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from ov_train.data import synthetic
from ov_train.data.shard_writer import ShardWriter
from ov_train.data.synthetic import COLOURS, MODALITIES, SUBSETS, ensure_synthetic
from ov_train.data.video import decode_video

TRAIN, VAL, PX = 40, 10, 32


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synthetic"), TRAIN, VAL, image_px=PX, seed=0)


def load(root: Path, subset: str, split: str) -> list[dict]:
    shards = sorted(str(p) for p in (root / subset).glob(f"{split}-*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False).decode())


def images(sample: dict) -> list[np.ndarray]:
    names = sorted(k for k in sample if k.startswith("img"))
    assert names == [f"img{i}.png" for i in range(len(names))]
    out = []
    for name in names:
        img = Image.open(io.BytesIO(sample[name]))
        assert img.format == "PNG" and img.mode == "RGB"
        out.append(np.asarray(img))
    return out


def foreground(img: np.ndarray) -> np.ndarray:
    return np.abs(img.astype(int) - synthetic.BACKGROUND).max(axis=-1) > 40


def dominant_colour(img: np.ndarray) -> str:
    mean = np.median(img[foreground(img)], axis=0)
    return min(COLOURS, key=lambda c: np.sum((mean - np.array(COLOURS[c])) ** 2))


def shape_of(img: np.ndarray) -> str:
    ys, xs = np.nonzero(foreground(img))
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.9 else "circle" if fill > 0.62 else "triangle"


def count_blobs(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    blobs = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        blobs += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return blobs


@pytest.mark.parametrize("split,count", [("train", TRAIN), ("val", VAL)])
@pytest.mark.parametrize("subset", SUBSETS)
def test_counts_and_format(root, subset, split, count):
    samples = load(root, subset, split)
    assert len(samples) == count
    assert len({s["__key__"] for s in samples}) == count
    for sample in samples:
        meta = sample["json"]
        assert meta["id"] == sample["__key__"]
        assert meta["modality"] in MODALITIES
        assert meta["answer"] in meta["options"]
        human, gpt = meta["conversations"]
        assert human["from"] == "human" and gpt == {"from": "gpt", "value": meta["answer"]}
        imgs = images(sample)
        assert human["value"].count("<image>") == len(imgs)
        assert human["value"].startswith("<image>\n" * len(imgs))
        assert ("<video>\n" in human["value"]) == ("mp4" in sample) == (meta["modality"] == "video")
        if meta["modality"] == "text":
            assert not imgs and "<" not in human["value"]
        if subset in ("caption", "multi_image"):
            assert all(img.shape == (PX, PX, 3) for img in imgs)
        if subset == "multi_image":
            assert len(imgs) in (2, 3)
            if meta["task"] == "which_image":
                assert meta["options"] == ["first", "second", "third"][: len(imgs)]
        if subset in ("caption", "single_image"):
            assert len(imgs) == 1


def test_single_images_vary_in_size(root):
    sizes = [images(s)[0].shape[:2] for s in load(root, "single_image", "train")]
    allowed = {PX, int(1.5 * PX), 2 * PX, 3 * PX}
    assert all(h in allowed and w in allowed for h, w in sizes)
    assert any(h != w for h, w in sizes) and len(set(sizes)) > 3


def test_video_decodes_to_eight_frames(root):
    for sample in load(root, "video", "val"):
        frames, duration = decode_video(sample["mp4"], max_frames=32, name=sample["__key__"])
        assert frames.shape == (8, PX, PX, 3) and duration == pytest.approx(8.0)


@pytest.mark.parametrize("subset", SUBSETS)
def test_answers_are_balanced(root, subset):
    by_question = defaultdict(Counter)
    options_of = {}
    for sample in load(root, subset, "train"):
        meta = sample["json"]
        group = (meta["task"], tuple(meta["options"]))
        by_question[group][meta["answer"]] += 1
        options_of[group] = meta["options"]
    for group, counts in by_question.items():
        expected = sum(counts.values()) / len(options_of[group])
        for option in options_of[group]:
            if expected >= 1:
                assert abs(counts[option] - expected) <= 1, (group, counts)


def test_val_differs_from_train(root):
    train = {s["img0.png"] for s in load(root, "caption", "train")}
    assert not train & {s["img0.png"] for s in load(root, "caption", "val")}


def test_caption_and_single_image_answers_match_pixels(root):
    for sample in load(root, "caption", "train"):
        _, colour, shape = sample["json"]["answer"].split()
        img = images(sample)[0]
        assert (dominant_colour(img), shape_of(img)) == (colour, shape), sample["__key__"]
    tasks = Counter()
    for sample in load(root, "single_image", "train"):
        meta, img = sample["json"], images(sample)[0]
        tasks[meta["task"]] += 1
        if meta["task"] == "colour":
            assert dominant_colour(img) == meta["answer"], sample["__key__"]
        elif meta["task"] == "shape":
            assert shape_of(img) == meta["answer"], sample["__key__"]
        else:
            blobs = count_blobs(foreground(img))
            assert ["one", "two", "three", "four"][blobs - 1] == meta["answer"], sample["__key__"]
    assert set(tasks) == {"colour", "shape", "count"}


def test_multi_image_answers_match_pixels(root):
    tasks = Counter()
    for sample in load(root, "multi_image", "train"):
        meta = sample["json"]
        tasks[meta["task"]] += 1
        found = [dominant_colour(img) for img in images(sample)]
        if meta["task"] == "which_image":
            colour = meta["conversations"][0]["value"].split("the ")[1].split()[0]
            assert len(set(found)) == len(found)
            assert found.index(colour) == meta["options"].index(meta["answer"]), sample["__key__"]
        else:
            assert len(found) == 3 and Counter(found).most_common(1)[0] == (meta["answer"], 2), sample["__key__"]
    assert set(tasks) == {"which_image", "shared_colour"}


def test_video_square_moves_in_answer_direction(root):
    steps = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
    for sample in load(root, "video", "train"):
        frames, _ = decode_video(sample["mp4"], max_frames=8)
        centroids = np.array([np.argwhere(f.max(axis=-1) > 128).mean(axis=0) for f in frames])
        dy, dx = centroids[-1] - centroids[0]
        want_y, want_x = steps[sample["json"]["answer"]]
        moved = dy * want_y + dx * want_x
        assert moved > PX / 3 and abs(dy * want_x + dx * want_y) < 1, sample["__key__"]
        assert np.all(np.diff(centroids @ np.array([want_y, want_x])) > 0)


def test_text_mapping_is_consistent(root):
    answer_of = {}
    for split in ("train", "val"):
        for sample in load(root, "text", split):
            question = sample["json"]["conversations"][0]["value"]
            assert answer_of.setdefault(question, sample["json"]["answer"]) == sample["json"]["answer"]
    assert len(answer_of) > 8


def test_manifest_lists_all_shards(root):
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["settings"]["train_per_subset"] == TRAIN
    for subset in SUBSETS:
        for split, count in (("train", TRAIN), ("val", VAL)):
            entry = manifest["subsets"][subset][split]
            assert entry["samples"] == count
            assert sorted(entry["shards"]) == sorted(
                f"{subset}/{p.name}" for p in (root / subset).glob(f"{split}-*.tar")
            )


def test_second_call_is_a_noop(root):
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_synthetic(root, TRAIN, VAL, image_px=PX, seed=0) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_interrupted_generation_leaves_no_manifest_and_rerun_completes(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(synthetic, "encode_mp4", broken)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_synthetic(tmp_path, 12, 4, image_px=PX)
    assert not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.rglob("*.tmp*"))
    assert not list((tmp_path / "video").glob("*.tar"))
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp-*"))
    # What a SIGKILL during generation leaves (a hidden sibling) is cleared by the next generation.
    (tmp_path.parent / f".{tmp_path.name}.tmp-1").mkdir()

    monkeypatch.undo()
    ensure_synthetic(tmp_path, 12, 4, image_px=PX)
    assert (tmp_path / "manifest.json").exists()
    assert len(load(tmp_path, "video", "train")) == 12
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp-*"))


def test_a_root_of_other_settings_is_refused_not_overwritten(tmp_path):
    ensure_synthetic(tmp_path, 12, 4, image_px=PX, seed=0)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    # It used to delete and regenerate the shards in place, under any run still reading them.
    with pytest.raises(FileExistsError, match="holds synthetic data of other settings .*'seed': 0.*never overwritten"):
        ensure_synthetic(tmp_path, 6, 2, image_px=PX, seed=1)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not shards")
    with pytest.raises(FileExistsError, match="mine holds files that are no complete synthetic data set"):
        ensure_synthetic(tmp_path / "mine", 6, 2, image_px=PX, seed=1)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.fixture
def default_root(tmp_path, monkeypatch):
    """The data root the plan of the shipped data config prepares (root left to the cache), tiny settings."""
    from ov_train.config.run_plan import resolve_plan
    from ov_train.data.prepare import prepare_root
    from tests.conftest import compose_config

    monkeypatch.setenv("OV_TRAIN_CACHE", str(tmp_path))
    base = compose_config(["data.synthetic.train_per_subset=3", "data.synthetic.val_per_subset=1"])

    def prepare(**changes) -> Path:
        cfg = copy.deepcopy(base)
        for key, value in changes.items():
            OmegaConf.update(cfg, key.replace("__", "."), value)
        return Path(prepare_root(resolve_plan(cfg).data))

    return prepare


def test_each_setting_gets_its_own_cache_directory(tmp_path, default_root):
    first = default_root()
    shards = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.rglob("*.tar")}
    assert len(shards) == 2 * len(SUBSETS)
    # A concurrent run of a sweep over seeds, or other synthetic settings: new directories, the first untouched.
    second = default_root(seed=1)
    third = default_root(data__synthetic__image_px=16)
    assert len({first, second, third}) == 3
    assert {p.parent for p in (first, second, third)} == {tmp_path / "synthetic"}
    assert all(p.name.startswith(f"v{synthetic.FORMAT_VERSION}-") for p in (first, second, third))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.rglob("*.tar")} == shards
    assert json.loads((second / "manifest.json").read_text())["settings"]["seed"] == 1
    assert default_root() == first  # the same setting finds its directory again
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.rglob("*.tar")} == shards


def test_concurrent_callers_generate_once_under_the_lock(tmp_path, monkeypatch):
    calls = []
    real = synthetic._generate

    def slow_generate(out, settings):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other caller to arrive while this one generates
        real(out, settings)

    monkeypatch.setattr(synthetic, "_generate", slow_generate)
    root = tmp_path / "shared"
    with ThreadPoolExecutor(3) as pool:
        roots = list(pool.map(lambda _: ensure_synthetic(root, 3, 1, image_px=PX), range(3)))
    assert roots == [root] * 3 and len(calls) == 1
    assert len(load(root, "video", "train")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", "shared"]  # no temp directory left


def test_shard_writer_rolls_over_and_writes_webdataset_layout(tmp_path):
    with ShardWriter(tmp_path, "part", samples_per_shard=3, max_shard_bytes=1 << 20) as writer:
        for i in range(7):
            writer.write({"__key__": f"s{i:03d}", "json": {"i": i}, "txt": b"x" * 10})
    assert writer.shards == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    with tarfile.open(tmp_path / "part-000000.tar") as tar:
        assert tar.getnames() == ["s000.json", "s000.txt", "s001.json", "s001.txt", "s002.json", "s002.txt"]
    samples = list(wds.WebDataset([str(tmp_path / s) for s in writer.shards], shardshuffle=False).decode())
    assert [s["json"]["i"] for s in samples] == list(range(7))

    # Each sample takes 2560 tar bytes (header + padded payload), so two fit under 6000.
    with ShardWriter(tmp_path, "big", max_shard_bytes=6000) as writer:
        for i in range(5):
            writer.write({"__key__": f"b{i}", "bin": bytes(2000)})
    assert writer.shards == ["big-000000.tar", "big-000001.tar", "big-000002.tar"]


def test_shard_writer_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path, "part", samples_per_shard=2) as writer:
        for i in range(3):
            writer.write({"__key__": f"s{i}", "json": {"i": i}})
        raise KeyboardInterrupt
    # The first shard was complete and stays; the partial second one is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.tar"]
