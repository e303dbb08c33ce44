"""Offline, learnable multimodal dataset in the LLaVA sample format, written as WebDataset shards.

Every answer is a simple function of the pixels (large solid shapes, saturated colours, big motion)
so that a tiny randomly initialised model can beat chance after minutes of CPU training.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image
from tqdm import tqdm

from ov_train.constants import MODALITIES
from ov_train.data.shard_writer import ShardWriter
from ov_train.data.video import encode_mp4
from ov_train.utils.paths import cache_dir

SUBSETS = ("caption",) + MODALITIES
SPLITS = ("train", "val")

# Bump when the generated content changes: each version gets its own cache directory.
FORMAT_VERSION = 2
SAMPLES_PER_SHARD = 500
VIDEO_FRAMES = 8

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four")
ORDINALS = ("first", "second", "third")
DIRECTIONS = ("left", "right", "up", "down")
OPPOSITES = (
    ("up", "down"), ("left", "right"), ("black", "white"), ("hot", "cold"),
    ("big", "small"), ("open", "closed"), ("day", "night"), ("fast", "slow"),
)
BACKGROUND = 45  # dark grey, far from every palette colour
VIDEO_BACKGROUND = 20
NOISE = 6


def _rng(seed: int, split: str, subset: str, *extra: int) -> np.random.Generator:
    # One independent stream per (seed, split, subset, ...): val never shares draws with train.
    return np.random.default_rng([seed, SPLITS.index(split), SUBSETS.index(subset), *extra])


def _balanced(options, j: int, seed: int, split: str, subset: str, salt: int = 0):
    """Option for the j-th question: each block of len(options) questions covers every option once,
    in a shuffled order, so answers are balanced without a visible period."""
    n = len(options)
    perm = _rng(seed, split, subset, 1_000_000 + salt, j // n).permutation(n)
    return options[perm[j % n]]


# ---------------------------------------------------------------- drawing


def _background(rng, h: int, w: int, level: int = BACKGROUND) -> np.ndarray:
    noise = rng.integers(-NOISE, NOISE + 1, size=(h, w, 1))
    return np.clip(level + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)


def _shape_mask(shape: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    if shape == "triangle":  # apex up, base 2r wide at the bottom
        top = cy - r
        return (yy >= top) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - top) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _draw_big_shape(rng, h: int, w: int, shape: str, colour: str) -> np.ndarray:
    img = _background(rng, h, w)
    r = rng.uniform(0.28, 0.38) * min(h, w)
    cy = rng.uniform(r + 1, h - r - 1)
    cx = rng.uniform(r + 1, w - r - 1)
    img[_shape_mask(shape, h, w, cy, cx, r)] = COLOURS[colour]
    return img


def _draw_count(rng, h: int, w: int, count: int, colour: str) -> np.ndarray:
    # One square per distinct quadrant, with a gap to the quadrant border so squares never merge.
    img = _background(rng, h, w)
    side = int(0.3 * min(h, w))
    ch, cw = h // 2, w // 2
    for cell in rng.permutation(4)[:count]:
        y0 = (cell // 2) * ch + rng.integers(1, ch - side)
        x0 = (cell % 2) * cw + rng.integers(1, cw - side)
        img[y0:y0 + side, x0:x0 + side] = COLOURS[colour]
    return img


def _draw_motion(rng, px: int, direction: str) -> np.ndarray:
    # The square runs through the middle and shifts from blue to red over time, so each frame also
    # shows *when* it is: a tiny model can then read the direction from where the red square ends up.
    side = int(round(0.4 * px))
    travel = np.linspace(0, px - side, VIDEO_FRAMES).round().astype(int)
    if direction in ("left", "up"):
        travel = travel[::-1]
    across = (px - side) // 2 + rng.integers(-1, 2)
    start, end = np.array(COLOURS["blue"]), np.array(COLOURS["red"])
    frames = []
    for k, t in enumerate(travel):
        frame = _background(rng, px, px, VIDEO_BACKGROUND)
        y, x = (across, t) if direction in ("left", "right") else (t, across)
        frame[y:y + side, x:x + side] = (start + (end - start) * k / (VIDEO_FRAMES - 1)).round()
        frames.append(frame)
    return np.stack(frames)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- samples


def _record(key, modality, task, options, answer, prompt, images=(), video=None) -> dict:
    if video is not None:
        prompt = "<video>\n" + prompt
    else:
        prompt = "<image>\n" * len(images) + prompt
    meta = {
        "id": key, "modality": modality, "task": task, "options": list(options), "answer": answer,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    }
    sample = {"__key__": key, "json": meta}
    for i, img in enumerate(images):
        sample[f"img{i}.png"] = _png(img)
    if video is not None:
        sample["mp4"] = encode_mp4(video, fps=1)
    return sample


def _caption(key, i, rng, px, seed, split):
    options = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    answer = _balanced(options, i, seed, split, "caption")
    _, colour, shape = answer.split()
    img = _draw_big_shape(rng, px, px, shape, colour)
    return _record(key, "single_image", "caption", options, answer, "Describe the image.", [img])


def _single_image(key, i, rng, px, seed, split):
    # Non-square sizes exercise anyres tiling; shapes scale with the image so they stay big.
    sizes = [px, int(1.5 * px), 2 * px, 3 * px]
    h, w = int(rng.choice(sizes)), int(rng.choice(sizes))
    task, j = ("colour", "shape", "count")[i % 3], i // 3
    if task == "colour":
        answer = _balanced(list(COLOURS), j, seed, split, "single_image", salt=0)
        img = _draw_big_shape(rng, h, w, SHAPES[rng.integers(len(SHAPES))], answer)
        return _record(key, "single_image", task, list(COLOURS), answer, "What colour is the shape?", [img])
    if task == "shape":
        answer = _balanced(SHAPES, j, seed, split, "single_image", salt=1)
        img = _draw_big_shape(rng, h, w, answer, rng.choice(list(COLOURS)))
        return _record(key, "single_image", task, SHAPES, answer, "What shape is it?", [img])
    answer = _balanced(COUNT_WORDS, j, seed, split, "single_image", salt=2)
    img = _draw_count(rng, h, w, COUNT_WORDS.index(answer) + 1, rng.choice(list(COLOURS)))
    return _record(key, "single_image", task, COUNT_WORDS, answer, "How many shapes are there?", [img])


def _multi_image(key, i, rng, px, seed, split):
    if i % 2:
        return _shared_colour(key, i // 2, rng, px, seed, split)
    n = 2 + (i // 2) % 2
    options = ORDINALS[:n]
    answer = _balanced(options, i // 4, seed, split, "multi_image", salt=n)
    colours = [list(COLOURS)[c] for c in rng.permutation(len(COLOURS))[:n]]
    images = [_draw_big_shape(rng, px, px, SHAPES[rng.integers(len(SHAPES))], c) for c in colours]
    target = colours[options.index(answer)]
    prompt = f"Which image shows the {target} shape?"
    return _record(key, "multi_image", "which_image", options, answer, prompt, images)


def _shared_colour(key, j, rng, px, seed, split):
    """Three images, two of one colour: the answer needs every image, not just one."""
    answer = _balanced(list(COLOURS), j, seed, split, "multi_image", salt=7)
    other = rng.choice([c for c in COLOURS if c != answer])
    colours = [answer, answer, other]
    rng.shuffle(colours)
    images = [_draw_big_shape(rng, px, px, SHAPES[rng.integers(len(SHAPES))], c) for c in colours]
    return _record(key, "multi_image", "shared_colour", list(COLOURS), answer, "Which colour appears twice?", images)


def _video(key, i, rng, px, seed, split):
    answer = _balanced(DIRECTIONS, i, seed, split, "video")
    frames = _draw_motion(rng, px, answer)
    return _record(key, "video", "direction", DIRECTIONS, answer,
                   "Which way does the square move?", video=frames)


def _text(key, i, rng, px, seed, split):
    questions = [(a, b) for pair in OPPOSITES for a, b in (pair, pair[::-1])]
    word, answer = _balanced(questions, i, seed, split, "text")
    options = sorted({w for pair in OPPOSITES for w in pair})
    return _record(key, "text", "opposite", options, answer, f"What is the opposite of {word}?")


def synthetic_rejected(meta: dict) -> str | None:
    """A plausible wrong reply to a synthetic sample: another of its task's options (a colour for a colour, an
    ordinal for an ordinal), picked by a hash of the sample's key, so every read of the sample gets the same one.
    What makes the synthetic samples preference pairs (stage.preference); None when the task has no other option."""
    wrong = [o for o in meta.get("options") or () if o != meta.get("answer")]
    return wrong[zlib.crc32(str(meta.get("id")).encode()) % len(wrong)] if wrong else None


_GENERATORS = {
    "caption": _caption,
    "single_image": _single_image,
    "multi_image": _multi_image,
    "video": _video,
    "text": _text,
}


def make_sample(subset: str, split: str, index: int, image_px: int = 32, seed: int = 0) -> dict:
    """Build one sample; a pure function of its arguments."""
    key = f"{subset}_{split}_{index:06d}"
    rng = _rng(seed, split, subset, index)
    return _GENERATORS[subset](key, index, rng, image_px, seed, split)


# ---------------------------------------------------------------- dataset on disk


def _settings(train_per_subset, val_per_subset, image_px, seed) -> dict:
    return {
        "format_version": FORMAT_VERSION, "train_per_subset": train_per_subset,
        "val_per_subset": val_per_subset, "image_px": image_px, "seed": seed,
    }


def synthetic_root(root, train_per_subset: int, val_per_subset: int, image_px: int, seed: int) -> Path:
    """Where the data set of these settings lives: `root` when one is given (data.root), else a cache directory
    of its own, named for the format version and a hash of the settings, so runs that differ never share one."""
    if root:
        return Path(root)
    settings = _settings(train_per_subset, val_per_subset, image_px, seed)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "synthetic" / f"v{FORMAT_VERSION}-{digest}"


def _manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, settings: dict) -> bool:
    manifest = _manifest(root)
    if manifest is None or manifest.get("settings") != settings or set(manifest.get("subsets", {})) != set(SUBSETS):
        return False
    return all(
        (root / shard).is_file()
        for splits in manifest["subsets"].values()
        for split in splits.values()
        for shard in split["shards"]
    )


def occupied(root, train_per_subset: int, val_per_subset: int, image_px: int, seed: int) -> str | None:
    """Why the data set of these settings cannot be made at `root`: the directory holds something else.
    Nothing there is ever deleted, since another run may be reading it. None when it is usable."""
    root = Path(root)
    settings = _settings(train_per_subset, val_per_subset, image_px, seed)
    if root.exists() and not root.is_dir():
        return f"{root} is a file, not a directory"
    if not root.exists() or not any(root.iterdir()) or _is_complete(root, settings):
        return None
    held = (_manifest(root) or {}).get("settings")
    what = f"synthetic data of other settings {held}" if held else "files that are no complete synthetic data set"
    return f"{root} holds {what}, not {settings}; runs may read it, so it is never overwritten"


def _generate(out: Path, settings: dict) -> None:
    counts = {"train": settings["train_per_subset"], "val": settings["val_per_subset"]}
    px, seed = settings["image_px"], settings["seed"]
    subsets: dict = {}
    with tqdm(total=len(SUBSETS) * sum(counts.values()), desc="synthetic data", unit="sample",
              disable=not sys.stderr.isatty()) as bar:
        for subset in SUBSETS:
            subsets[subset] = {}
            for split, n in counts.items():
                with ShardWriter(out / subset, split, samples_per_shard=SAMPLES_PER_SHARD) as writer:
                    for index in range(n):
                        writer.write(make_sample(subset, split, index, px, seed))
                        bar.update()
                subsets[subset][split] = {
                    "samples": n, "shards": [f"{subset}/{name}" for name in writer.shards],
                }
    (out / "manifest.json").write_text(json.dumps({"settings": settings, "subsets": subsets}, indent=2))


def ensure_synthetic(root, train_per_subset: int = 2000, val_per_subset: int = 200,
                     image_px: int = 32, seed: int = 0) -> Path:
    """The synthetic data set of these settings at `root`, generated unless it is there complete.

    Concurrent callers (ranks, runs of a sweep) queue on a file lock beside `root`; the first generates into
    a hidden sibling directory and renames it into place, so `root` is either absent, empty or complete.
    A `root` holding anything else raises FileExistsError (see `occupied`)."""
    root = Path(root)
    settings = _settings(train_per_subset, val_per_subset, image_px, seed)
    if _is_complete(root, settings):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if _is_complete(root, settings):  # made by whoever held the lock before
            return root
        problem = occupied(root, train_per_subset, val_per_subset, image_px, seed)
        if problem:
            raise FileExistsError(problem)
        # What a killed generation left; only the lock holder writes these.
        for stale in glob.glob(str(root.parent / f".{glob.escape(root.name)}.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        try:
            _generate(tmp, settings)
            os.replace(tmp, root)  # onto nothing or an empty directory
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root
