"""Small builders shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image


def noise_png(h: int, w: int, seed: int) -> bytes:
    """A PNG of random pixels: distinct crops give distinct features, so mix-ups show in the outputs."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def raw_sample(key: str, human: str, reply: str, images=(), video: bytes | None = None) -> dict:
    """A one-turn raw shard sample as SampleProcessor reads it: json, img<i>.png, optional mp4."""
    turns = [{"from": "human", "value": human}, {"from": "gpt", "value": reply}]
    raw = {"__key__": key, "json": json.dumps({"conversations": turns}).encode()}
    for i, img in enumerate(images):
        raw[f"img{i}.png"] = img
    if video is not None:
        raw["mp4"] = video
    return raw
