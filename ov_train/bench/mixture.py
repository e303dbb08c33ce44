"""The benchmark's workload: the OneVision mixture as raw LLaVA samples, what each feeds the model, and shards
of it laid out as the onevision recipe expects."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ov_train.data.shard_writer import ShardWriter
from ov_train.data.video import encode_mp4
from ov_train.planner.workload import IMAGE_SIZES as EXAMPLE_SIZES
from ov_train.planner.workload import ONEVISION_MIX
from ov_train.utils.flops import TokenCounts

IMAGE_SIZES = sorted(EXAMPLE_SIZES)  # smallest first
WORDS = ("the", "shape", "is", "red", "blue", "circle", "square", "left", "right", "one", "two", "image", "video")


def _png(height: int, width: int) -> bytes:
    pixels = np.linspace(0, 255, height * width * 3).reshape(height, width, 3).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_mixture(count: int, image_size: int, seed: int) -> list[dict]:
    """Raw LLaVA samples of the OneVision mixture; image sizes scaled from 384 px crops to `image_size`."""
    rng = np.random.default_rng(seed)
    scale = image_size / 384
    kinds = list(ONEVISION_MIX)
    weights = np.array(list(ONEVISION_MIX.values()))
    raws = []
    for i in range(count):
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        raw = {"__key__": f"bench{i}"}
        if kind == "video":
            frames = np.full((int(rng.integers(8, 33)), image_size, image_size, 3), 128, dtype=np.uint8)
            raw["mp4"], prompt = encode_mp4(frames, fps=1), "<video>\nDescribe the video."
        else:
            n = 1 if kind == "single_image" else int(rng.integers(2, 9))
            for k in range(n):
                h, w = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
                raw[f"img{k}.png"] = _png(max(1, round(h * scale)), max(1, round(w * scale)))
            prompt = "<image>\n" * n + "Describe the images."
        reply = " ".join(rng.choice(WORDS, size=int(rng.integers(40, 200))))
        conversations = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
        raw["json"] = json.dumps({"conversations": conversations, "modality": kind}).encode()
        raws.append(raw)
    return raws


def token_counts(example: dict) -> TokenCounts:
    """What one sample feeds the model: crops and frames through the tower, tokens, causal pairs."""
    images = sum(img.pixel_values.shape[0] for img in example["images"])
    images += 0 if example["frames"] is None else example["frames"].shape[0]
    n = len(example["input_ids"])
    return TokenCounts(images=images, tokens=n, pairs=n * (n + 1) / 2)


def write_mixture_shards(raws: list[dict], root: Path, shards_per_source: int) -> int:
    """The raw samples as the onevision recipe's sources, ROOT/onevision/<modality>/train-*.tar, in at
    least `shards_per_source` shards each, so that every loader worker reads whole shards of its own.
    Returns the number of shards written."""
    shards = 0
    by_modality: dict[str, list[dict]] = {m: [] for m in ONEVISION_MIX}
    for raw in raws:
        by_modality[json.loads(raw["json"])["modality"]].append(raw)
    for modality, group in by_modality.items():
        per_shard = max(1, len(group) // shards_per_source)
        with ShardWriter(root / "onevision" / modality, "train", samples_per_shard=per_shard) as writer:
            for raw in group:
                writer.write(raw)
        shards += len(writer.shards)
    return shards
