"""Real input files for the `ov-data` tests: images, videos, corrupt media, LLaVA json/jsonl, data YAML, parquet."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from ov_train.data.video import encode_mp4

# (height, width) -> visual tokens at the real OneVision geometry, from the recipe spec.
SPEC_SINGLE_IMAGE_TOKENS = {(384, 384): 1485, (480, 640): 2929, (1024, 768): 4744, (1080, 1920): 7269, (3000, 800): 8019}
SPEC_THREE_IMAGES = 3 * 730
SPEC_VIDEO_40S = 32 * 196 + 1  # 40 frames at 1 fps -> resampled to 32
SPEC_VIDEO_10S = 10 * 196 + 1


def image_bytes(height: int, width: int, fmt: str = "JPEG") -> bytes:
    """A gradient with a bright block, so the encoders produce ordinary (not degenerate) files."""
    yy, xx = np.mgrid[:height, :width]
    pixels = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 250
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, height: int, width: int, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(height, width, fmt))
    return path


def video_bytes(frames: int, fps: float = 1, side: int = 32) -> bytes:
    pixels = np.zeros((frames, side, side, 3), np.uint8)
    for i, frame in enumerate(pixels):
        frame[:, : (i % side) + 1] = (200, 60, 30)
    return encode_mp4(pixels, fps=fps)


def write_video(path: Path, frames: int, fps: float = 1, side: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(video_bytes(frames, fps, side))
    return path


def write_truncated(path: Path, data: bytes) -> Path:
    """The first half of a valid file: the header parses, the payload does not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def write_garbage(path: Path, size: int = 4000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def conversation(human: str, reply: str = "It is fine.") -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": reply}]


def write_llava_json(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records: list, raw_lines: tuple[str, ...] = ()) -> Path:
    """One JSON value per line, then `raw_lines` verbatim (e.g. malformed ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in raw_lines))
    return path


def write_data_yaml(path: Path, datasets: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"datasets": datasets}))
    return path


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> Path:
    """HF LLaVA-OneVision-Data layout: id, conversations, data_source, image {bytes, path} (null for text)."""
    schema = pa.schema([
        ("id", pa.string()),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("data_source", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def make_llava_dataset(root: Path) -> dict:
    """A LLaVA jsonl with every modality and every kind of bad input, media under root/media.

    Returns {"input", "media_root", "tokens": {id: visual tokens}, "modality": {id: modality},
    "rejects": {id: reason}}.
    """
    media = root / "media"
    records, tokens, modality = [], {}, {}
    for (h, w), n in SPEC_SINGLE_IMAGE_TOKENS.items():
        fmt, ext = ("PNG", "png") if (h, w) == (480, 640) else ("JPEG", "jpg")
        write_image(media / f"images/{h}x{w}.{ext}", h, w, fmt)
        rid = f"single_{h}x{w}"
        records.append({"id": rid, "image": f"images/{h}x{w}.{ext}", "conversations": conversation("<image>\nDescribe the image.")})
        tokens[rid], modality[rid] = n, "single_image"
    for name, (h, w), fmt in (("m0.jpg", (100, 200), "JPEG"), ("m1.png", (64, 64), "PNG"), ("m2.jpg", (300, 120), "JPEG")):
        write_image(media / "images" / name, h, w, fmt)
    records.append({"id": "multi_3", "image": ["images/m0.jpg", "images/m1.png", "images/m2.jpg"],
                    "conversations": conversation("<image>\n<image>\n<image>\nWhich image shows the square?", "first")})
    tokens["multi_3"], modality["multi_3"] = SPEC_THREE_IMAGES, "multi_image"
    write_video(media / "videos/clip40.mp4", 40)
    # LLaVA-Video style: the video is marked with <image>.
    records.append({"id": "video_40s", "video": "videos/clip40.mp4",
                    "conversations": conversation("<image>\nWhich way does it move?", "left")})
    # Another container: convert stores every video under one field; decord reads the bytes whatever the name.
    write_video(media / "videos/clip10.mkv", 10)
    records.append({"id": "video_10s", "video": "videos/clip10.mkv", "conversations": conversation("<video>\nWhat happens?", "right")})
    tokens.update(video_40s=SPEC_VIDEO_40S, video_10s=SPEC_VIDEO_10S)
    modality.update(video_40s="video", video_10s="video")
    records.append({"id": "text_1", "conversations": conversation("What is the opposite of up?", "down")})
    tokens["text_1"], modality["text_1"] = 0, "text"

    write_truncated(media / "images/truncated.jpg", image_bytes(200, 300))
    write_garbage(media / "images/garbage.png")
    write_truncated(media / "videos/truncated.mp4", video_bytes(20))
    bad = [
        ({"id": "bad_missing_image", "image": "images/nope.jpg", "conversations": conversation("<image>\nQ?")}, "missing_image"),
        ({"id": "bad_truncated_jpeg", "image": "images/truncated.jpg", "conversations": conversation("<image>\nQ?")}, "corrupt_image"),
        ({"id": "bad_garbage_png", "image": "images/garbage.png", "conversations": conversation("<image>\nQ?")}, "corrupt_image"),
        ({"id": "bad_missing_video", "video": "videos/nope.mp4", "conversations": conversation("<video>\nQ?")}, "missing_video"),
        ({"id": "bad_truncated_video", "video": "videos/truncated.mp4", "conversations": conversation("<video>\nQ?")}, "corrupt_video"),
        ({"id": "bad_image_count", "image": "images/384x384.jpg", "conversations": conversation("<image>\n<image>\nQ?")},
         "placeholder_mismatch"),
        ({"id": "bad_video_count", "video": "videos/clip10.mkv", "conversations": conversation("<video>\n<video>\nQ?")},
         "placeholder_mismatch"),
        ({"id": "bad_empty", "conversations": []}, "empty_conversation"),
        ({"id": "bad_one_sided", "conversations": [{"from": "human", "value": "Hello?"}]}, "one_sided_conversation"),
    ]
    records += [record for record, _ in bad]
    rejects = {record["id"]: reason for record, reason in bad}
    # Lines after the records: one that is not JSON, one that is JSON but not an object.
    path = write_jsonl(root / "train.jsonl", records, raw_lines=('{"id": "broken", "conversations": [', "[1, 2, 3]"))
    n = len(records)
    rejects.update({f"train.jsonl:{n + 1}": "malformed_line", f"train.jsonl:{n + 2}": "malformed_line"})
    return {"input": path, "media_root": media, "tokens": tokens, "modality": modality, "rejects": rejects}
