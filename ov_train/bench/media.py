"""Realistic media for the loader benchmark: JPEG photos at camera sizes, document scans, H.264 clips.

Synthetic pixels that compress like real ones matter here: JPEG decode time grows with the file's detail and a
video decoder's with its motion and key-frame spacing. Photos are smooth gradients and blobs with sensor-like
noise (1.5 MB on average over 640x480 to 4000x3000 at quality 90); scans are A4 at 300 dpi (2480x3508) with lines
of dark "text" on white; clips are H.264 (libx264, B-frames, a key frame every 250 frames as x264's default),
1280x720 at 30 fps, a textured scene panning and a shape moving.
"""
from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ov_train.data.shard_writer import ShardWriter
from ov_train.planner.workload import ONEVISION_MIX

PHOTO_SIZES = ((480, 640), (768, 1024), (1080, 1440), (1536, 2048), (2448, 3264), (3000, 4000))
SCAN_SIZE = (3508, 2480)  # A4 at 300 dpi, portrait
WORDS = ("the", "shape", "is", "red", "blue", "circle", "square", "left", "right", "one", "two", "image", "video")


def photo(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields, a few hard-edged blobs and noise: what a camera photo looks like to a JPEG coder."""
    small = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    for _ in range(6):
        y, x = rng.integers(0, height), rng.integers(0, width)
        r = int(rng.integers(min(height, width) // 20, min(height, width) // 5))
        base[max(0, y - r):y + r, max(0, x - r):x + r] = rng.integers(0, 256, 3)
    base += rng.normal(0, 6, base.shape).astype(np.int16)
    return base.clip(0, 255).astype(np.uint8)


def scan(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A white page with lines of dark word-sized bars and a little paper noise."""
    page = np.full((height, width), 245, dtype=np.int16)
    margin, line = width // 10, height // 60
    for top in range(margin, height - margin, line):
        x = margin
        while x < width - margin:
            w = int(rng.integers(line, 5 * line))
            page[top:top + line * 2 // 3, x:min(x + w, width - margin)] = int(rng.integers(10, 60))
            x += w + line // 2
    page += rng.normal(0, 3, page.shape).astype(np.int16)
    return np.repeat(page.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def clip(seconds: float, height: int = 720, width: int = 1280, fps: int = 30, gop: int = 250, seed: int = 0) -> bytes:
    """An H.264 MP4: a textured background panning, a square crossing it; key frame every `gop` frames."""
    rng = np.random.default_rng(seed)
    texture = photo(height, width + int(seconds * fps) * 2, rng)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # veryfast keeps B-frames and a real GOP structure; crf 23 is x264's default quality.
        stream.options = {"crf": "23", "preset": "veryfast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        for i in range(int(seconds * fps)):
            frame = texture[:, 2 * i:2 * i + width].copy()
            x = (i * 7) % (width - 80)
            frame[height // 3:height // 3 + 80, x:x + 80] = (220, 30, 30)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _conversation(prompt: str, modality: str, rng: np.random.Generator) -> bytes:
    reply = " ".join(rng.choice(WORDS, size=int(rng.integers(40, 200))))
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
    return json.dumps({"conversations": turns, "modality": modality}).encode()


def write_media_shards(root: Path, photos: int = 150, scans_share: float = 0.1, clips: int = 12,
                       clip_seconds: float = 30.0, clip_size: tuple[int, int] = (720, 1280), seed: int = 0,
                       per_shard: int = 8, image_scale: float = 1.0) -> dict:
    """The onevision recipe's sources under ROOT/onevision/<modality>/ from realistic media: single images (one
    photo or scan each), multi-image samples (2 to 6 of them) and videos, in the 31/43/26 mix by sample. Each image
    and clip is encoded once and reused across samples, so generation stays quick; `image_scale` shrinks every image
    (tests). Returns counts and sizes."""
    rng = np.random.default_rng(seed)

    def scaled(size):
        return tuple(max(16, round(side * image_scale)) for side in size)

    images = []
    for _ in range(photos):
        if rng.random() < scans_share:
            images.append(jpeg(scan(*scaled(SCAN_SIZE), rng)))
        else:
            images.append(jpeg(photo(*scaled(PHOTO_SIZES[rng.integers(len(PHOTO_SIZES))]), rng)))
    videos = [clip(clip_seconds, *clip_size, seed=seed + k) for k in range(clips)]
    # Samples in the mix: videos limit the count (each clip once), images fill their shares.
    n_video = clips
    total = round(n_video / ONEVISION_MIX["video"])
    n_single = round(total * ONEVISION_MIX["single_image"])
    n_multi = total - n_video - n_single
    order = iter(rng.permutation(len(images)).tolist() * 8)
    samples = {"single_image": [], "multi_image": [], "video": []}
    for _ in range(n_single):
        prompt = _conversation("<image>\nDescribe.", "single_image", rng)
        samples["single_image"].append({"img0.jpg": images[next(order)], "json": prompt})
    for _ in range(n_multi):
        n = int(rng.integers(2, 7))
        sample = {f"img{j}.jpg": images[next(order)] for j in range(n)}
        sample["json"] = _conversation("<image>\n" * n + "Compare the images.", "multi_image", rng)
        samples["multi_image"].append(sample)
    for data in videos:
        samples["video"].append({"mp4": data, "json": _conversation("<video>\nDescribe the video.", "video", rng)})
    for modality, group in samples.items():
        with ShardWriter(root / "onevision" / modality, "train", samples_per_shard=per_shard) as writer:
            for k, sample in enumerate(group):
                writer.write({"__key__": f"{modality}{k}", **sample})
    return {"images": len(images), "image_mb": sum(map(len, images)) / len(images) / 1e6, "clips": len(videos),
            "samples": {m: len(g) for m, g in samples.items()}}
