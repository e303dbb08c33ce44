import io

import decord
import numpy as np
import pytest

from ov_train.bench.media import clip
from ov_train.data.video import VideoDecodeError, decode_video, decode_video_info, encode_mp4

SIDE = 8


def moving_square(num_frames: int, size: int = 32, step: int = 3) -> tuple[np.ndarray, list[int]]:
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    xs = [i * step for i in range(num_frames)]
    for frame, x in zip(frames, xs):
        frame[10:10 + SIDE, x:x + SIDE] = 255
    return frames, xs


def square_x(frame: np.ndarray) -> float:
    cols = np.nonzero(frame.max(axis=-1) > 128)[1]
    return cols.mean() - (SIDE - 1) / 2


def test_round_trip_keeps_frames_and_motion():
    frames, xs = moving_square(8)
    data = encode_mp4(frames, fps=1)
    decoded, duration = decode_video(data, max_frames=16)
    assert decoded.shape == (8, 32, 32, 3) and decoded.dtype == np.uint8
    assert duration == pytest.approx(8.0)
    for frame, x in zip(decoded, xs):
        assert square_x(frame) == pytest.approx(x, abs=0.5)
    assert np.abs(decoded.astype(int) - frames).mean() < 3


@pytest.mark.parametrize("height,width", [(15, 17), (48, 48), (32, 48), (72, 72), (40, 30)])
def test_any_size_decodes_to_the_encoded_pixels(height, width):
    # Odd sizes are cropped to even; narrow widths hit decord's row padding (dmlc/decord#336).
    frames = np.zeros((2, height, width, 3), np.uint8)
    frames[:, :, : width // 2] = (200, 40, 40)
    frames[:, :, width // 2 :] = (40, 40, 200)
    decoded, _ = decode_video(encode_mp4(frames, fps=1), max_frames=4)
    even_h, even_w = height & ~1, width & ~1
    assert decoded.shape == (2, even_h, even_w, 3)
    assert np.abs(decoded.astype(int) - frames[:, :even_h, :even_w]).mean() < 8


def test_max_frames_caps_uniformly():
    frames, xs = moving_square(8)
    decoded, duration = decode_video(encode_mp4(frames, fps=1), max_frames=3)
    assert len(decoded) == 3 and duration == pytest.approx(8.0)
    # Uniform resampling spans the clip: first and last frames are kept.
    assert square_x(decoded[0]) == pytest.approx(xs[0], abs=0.5)
    assert square_x(decoded[-1]) == pytest.approx(xs[-1], abs=0.5)


def test_samples_one_frame_per_second():
    frames, xs = moving_square(8, step=3)
    decoded, duration = decode_video(encode_mp4(frames, fps=4), max_frames=32)
    assert len(decoded) == 2 and duration == pytest.approx(2.0)
    assert square_x(decoded[1]) == pytest.approx(xs[4], abs=0.5)


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda data: data[: len(data) // 2],
        lambda data: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        lambda data: b"",
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_bad_data_raises_named_error(make_bad):
    data = encode_mp4(moving_square(8)[0], fps=1)
    with pytest.raises(VideoDecodeError, match="sample_0042"):
        decode_video(make_bad(data), max_frames=8, name="sample_0042")


@pytest.mark.parametrize("make", [
    lambda: encode_mp4(np.zeros((40, 32, 32, 3), np.uint8), 1.0),
    lambda: encode_mp4(np.zeros((25, 32, 32, 3), np.uint8), 29.97),
    lambda: clip(1.0, 72, 128, fps=30, gop=12),  # H.264 with B-frames: decode order is not presentation order
], ids=["1fps", "29.97fps", "h264_bframes"])
def test_decode_video_info_counts_frames_and_rate_as_decord_does(make):
    """`ov-data convert` records a video's frame count and rate from the loader's decoder (PyAV); decord, which it
    used before and the reference extraction still uses, reads the same numbers."""
    data = make()
    reader = decord.VideoReader(io.BytesIO(data))
    _, duration, total, rate = decode_video_info(data, max_frames=8)
    assert (total, rate) == (len(reader), pytest.approx(float(reader.get_avg_fps())))
    assert duration == pytest.approx(total / rate)
