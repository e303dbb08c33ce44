"""MP4 encoding (PyAV) for the synthetic data and frame-sampled decoding (PyAV, data/video_frames.py) for training."""

from __future__ import annotations

import io
import math
import re
from fractions import Fraction

import av
import numpy as np

from ov_train.data.video_frames import sampled_frames
from ov_train.vision.tokens import video_frame_indices

# The shard field `ov-data convert` stores every video under, whatever its container (mp4, m4v, mkv...):
# FFmpeg (PyAV) probes the bytes regardless of the name, and one fixed name cannot collide with `json` or `img<i>`.
VIDEO_FIELD = "video"


class VideoDecodeError(ValueError):
    """A video payload could not be decoded; the message names the sample and the reason."""


def _pick_codec() -> str:
    # libx264 compresses far better, but not every ffmpeg build ships it; mpeg4 always exists.
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except av.codec.codec.UnknownCodecError:
        return "mpeg4"


_CODEC = _pick_codec()


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """Encode uint8 RGB frames [F, H, W, 3] as an in-memory MP4 (yuv420p)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F,H,W,3], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("cannot encode a video with no frames")
    # yuv420p subsamples chroma 2x2, so the encoder needs even dimensions: crop the odd row/column.
    height, width = frames.shape[1] & ~1, frames.shape[2] & ~1
    frames = np.ascontiguousarray(frames[:, :height, :width])

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(_CODEC, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1  # short clips: spinning up encoder threads costs more than it saves
        if _CODEC == "libx264":
            # Near-lossless: the clips are tiny and their pixels carry the labels.
            stream.options = {"crf": "10", "preset": "ultrafast"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush delayed packets
    return buf.getvalue()


def _reason(error: Exception) -> str:
    # Keep the first line; strip a "[hh:mm:ss] /src/file.cc:line: " prefix (decord's style) where one appears.
    lines = str(error).strip().splitlines()
    return re.sub(r"^\[[\d:]+\] \S+: ", "", lines[0]) if lines else type(error).__name__


def decode_video(data: bytes, max_frames: int, name: str = "video", video_fps: float = 1.0, sampling: str = "fps",
                 frame_size: int | None = None, threads: int | None = None) -> tuple[np.ndarray, float]:
    """Decode video bytes, sampling frames as ov_train.vision.tokens.video_frame_indices says (by default
    ~1 frame/s capped at `max_frames`); `frame_size`: decode at frame_size x frame_size, else at the
    video's own size. Only the sampled frames are decoded, each from the key frame before it
    (data/video_frames.py), with `threads` decoder threads (default: the loader worker's CPU share).

    Returns (uint8 frames [F, H, W, 3], duration in seconds).
    """
    frames, duration, _, _ = decode_video_info(data, max_frames, name, video_fps, sampling, frame_size, threads)
    return frames, duration


def decode_video_info(data: bytes, max_frames: int, name: str = "video", video_fps: float = 1.0, sampling: str = "fps",
                      frame_size: int | None = None,
                      threads: int | None = None) -> tuple[np.ndarray, float, int, float]:
    """decode_video's (frames, duration), then the video's frame count and frame rate (what `ov-data convert`
    records): one demux, by the loader's own decoder."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if not data:
        raise VideoDecodeError(f"{name}: empty video data")
    seen = {}

    def pick(total: int, fps: float) -> list[int]:
        if not math.isfinite(fps) or fps <= 0:
            raise VideoDecodeError(f"{name}: invalid frame rate {fps}")
        seen.update(total=total, fps=fps)
        return video_frame_indices(total, fps, max_frames, video_fps, sampling)

    try:
        frames, duration, _ = sampled_frames(data, pick, frame_size, threads)
    except VideoDecodeError:
        raise
    except Exception as e:  # PyAV raises FFmpegError subclasses, or ValueError for a stream without frames
        raise VideoDecodeError(f"{name}: corrupt or truncated video ({_reason(e)})") from e
    return frames, duration, seen["total"], seen["fps"]
