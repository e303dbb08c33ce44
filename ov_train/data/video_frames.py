"""Decoding only the sampled frames of a video (PyAV): each from the key frame before it, nothing past the last.

Reading `reader[i]` frame by frame decodes every frame of a clip to keep one in 30 (3.8 CPU-s per 30 s 720p
clip). Here the compressed packets are read once (cheap: no decoding), each sampled frame is found by its
presentation time, and decoding starts at the key frame before it, or continues from where the previous sampled
frame left off when no key frame lies between them; packets after the last sampled frame are never decoded, and
between sampled frames the frames no other frame refers to (most B-frames) are skipped by the codec itself.
Frames are numbered in presentation order, as decord numbers them, so the sampled indices
(vision/tokens.py video_frame_indices) pick the same frames.

The decoder runs `threads` threads (FFmpeg's frame and slice threading), sized from the loader worker's share of
the CPUs (decode_threads).
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable

import av
import numpy as np
from torch.utils.data import get_worker_info

from ov_train.utils.cpus import cpus_per_process

# FFmpeg's scaler keeps a thread pool in a context PyAV caches per process: a loader worker forked after the parent
# converted a frame inherits the pool without its threads and waits forever (reproduced: tests/unit/test_video_frames.py).
# One scaler thread has no pool; the conversion is a small part of a frame's cost beside decoding.
SCALER_THREADS = 1


def decode_threads() -> int:
    """Decoder threads for this process: its share of the node's usable CPUs among the run's local ranks
    (LOCAL_WORLD_SIZE) times their loader workers."""
    info = get_worker_info()
    workers = info.num_workers if info else 1
    return cpus_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * workers)


class Clip:
    """A video's packets in decode order, its frame count and rate; `frames(indices)` decodes just those frames."""

    def __init__(self, data: bytes, threads: int = 1):
        self.container = av.open(io.BytesIO(data))
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        stream.thread_count = threads
        self.codec = stream.codec_context
        self.packets = [p for p in self.container.demux(stream) if p.size and p.pts is not None]
        # Presentation order: frame number of each packet's timestamp.
        order = sorted(p.pts for p in self.packets)
        self.index = {pts: i for i, pts in enumerate(order)}
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.keys = [i for i, p in enumerate(self.packets) if p.is_keyframe]
        self.position = {p.pts: i for i, p in enumerate(self.packets)}  # decode-order position of each frame
        self.pts = order

    def __len__(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        return len(self) / self.fps if self.fps else 0.0

    def frames(self, indices: list[int], convert: Callable | None = None) -> list[np.ndarray]:
        """uint8 RGB frames [H, W, 3] at `indices` (presentation order), in the order asked for; `convert` turns a
        decoded av.VideoFrame into the array (default: rgb24 at its own size)."""
        convert = convert or (lambda frame: frame.to_ndarray(format="rgb24", threads=SCALER_THREADS))
        wanted = {self.pts[i]: i for i in indices}
        # Packets of wanted frames decode in full; the others only if later frames refer to them (the codec's own
        # skip of non-reference frames, FFmpeg's skip_frame=NONREF).
        needed = {self.position[pts] for pts in wanted}
        got: dict[int, np.ndarray] = {}
        next_packet = 0
        self.fed = 0  # packets decoded for this call
        for i in sorted(set(indices)):
            if i in got:
                continue
            where = self.position[self.pts[i]]
            key = max((k for k in self.keys if k <= where), default=0)
            if key > next_packet:  # a key frame lies between: skip the packets before it
                self.codec.flush_buffers()
                next_packet = key
            while i not in got:
                if next_packet < len(self.packets):
                    self.codec.skip_frame = "DEFAULT" if next_packet in needed else "NONREF"
                    decoded = self.codec.decode(self.packets[next_packet])
                    next_packet += 1
                    self.fed += 1
                else:
                    decoded = self.codec.decode(None)  # drain the reorder delay at the end of the stream
                    if not decoded:
                        raise ValueError(f"frame {i} of {len(self)} never came out of the decoder")
                for frame in decoded:
                    if frame.pts in wanted:
                        got[wanted[frame.pts]] = convert(frame)
        return [got[i] for i in indices]

    def close(self) -> None:
        self.container.close()


def sampled_frames(data: bytes, pick: Callable[[int, float], list[int]], frame_size: int | None = None,
                   threads: int | None = None) -> tuple[np.ndarray, float, list[int]]:
    """Decode the frames `pick(total frames, fps)` names: (uint8 [F, H, W, 3], duration in seconds, the indices).
    `frame_size`: each frame resized to frame_size x frame_size by the decoder's scaler (bilinear), else its own size."""
    clip = Clip(data, decode_threads() if threads is None else threads)
    try:
        if not len(clip):
            raise ValueError("video has no frames")
        if clip.fps <= 0:
            raise ValueError(f"invalid frame rate {clip.fps}")
        indices = pick(len(clip), clip.fps)
        convert = None
        if frame_size:
            def convert(frame):
                return frame.to_ndarray(format="rgb24", width=frame_size, height=frame_size, interpolation="BILINEAR",
                                        threads=SCALER_THREADS)
        frames = np.stack(clip.frames(list(indices), convert))
        return frames, clip.duration, list(indices)
    finally:
        clip.close()
