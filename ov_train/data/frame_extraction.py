"""Video frames extracted at convert time (`ov-data convert --video-frames fps=1,max=32,size=384`).

For clips trained on many times, decoding them once is cheaper than every epoch: convert samples the frames as
training would (vision/tokens.py video_frame_indices at `fps`, at most `max`), resizes them to size x size (the
crop training squashes every frame to) and stores them as JPEG members frm000.jpg, frm001.jpg... in place of the
video, with their rate in the sample's json (`video_frames`). Training reads them as the video's frames
(SampleProcessor), sampling them again by the stage's fps and max_frames over the stored rate.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ov_train.data.video import decode_video

FRAME_FIELD = re.compile(r"frm(\d+)\.jpg")
JPEG_QUALITY = 95  # near-lossless at 384 px: a 384x384 frame is ~40 KB


@dataclass(frozen=True)
class FrameExtraction:
    fps: float = 1.0
    max: int = 32
    size: int | None = 384

    @classmethod
    def parse(cls, text: str) -> FrameExtraction:
        """From "fps=1,max=32,size=384" (any subset; size=0 keeps the video's own size)."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in ("fps", "max", "size") or not value:
                raise ValueError(f"--video-frames {text!r}: {part!r} is not fps=N, max=N or size=N")
            try:
                values[key] = float(value) if key == "fps" else int(value)
            except ValueError as err:
                raise ValueError(f"--video-frames {text!r}: {key} needs a number, got {value!r}") from err
        extraction = cls(**{**values, "size": values.get("size", 384) or None})
        if extraction.fps <= 0 or extraction.max < 1 or (extraction.size is not None and extraction.size < 1):
            raise ValueError(f"--video-frames {text!r}: fps > 0, max >= 1 and size >= 0 needed")
        return extraction

    def extract(self, data: bytes, name: str) -> tuple[dict[str, bytes], dict]:
        """(shard members frm<i>.jpg, the json's `video_frames` record) of a video's sampled frames."""
        frames, duration = decode_video(data, self.max, name, self.fps, "fps", self.size)
        members = {}
        for i, frame in enumerate(frames):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=JPEG_QUALITY)
            members[f"frm{i:03d}.jpg"] = buf.getvalue()
        rate = len(frames) / duration if duration > 0 else self.fps
        return members, {"frames": len(frames), "fps": round(rate, 6), "duration": round(duration, 3)}


def frame_fields(raw: dict) -> list[str]:
    """A raw sample's extracted frame members, in frame order."""
    found = [(int(m.group(1)), f) for f in raw if (m := FRAME_FIELD.fullmatch(f))]
    return [f for _, f in sorted(found)]


def read_frames(raw: dict, fields: list[str]) -> np.ndarray:
    """uint8 [F, H, W, 3] of the extracted frames."""
    return np.stack([np.asarray(Image.open(io.BytesIO(raw[f])).convert("RGB")) for f in fields])
