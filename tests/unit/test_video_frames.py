"""Sampled-frame decoding: the frames equal a full decode's at those indices (and decord's), while only the packets
from each sampled frame's key frame on are decoded; decode threads follow the worker's CPU share."""
import io

import av
import decord
import numpy as np
import pytest

from ov_train.bench.media import clip
from ov_train.data.video import decode_video
from ov_train.data.video_frames import Clip, decode_threads, sampled_frames
from ov_train.vision.tokens import video_frame_indices


@pytest.fixture(scope="module")
def h264():
    """6 s at 30 fps, 96x128, B-frames, a key frame every 25 frames: small, with the structure of a real clip."""
    return clip(6.0, height=96, width=128, fps=30, gop=25, seed=3)


def _full_decode(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_clip_has_key_frames_and_b_frames(h264):
    c = Clip(h264)
    assert len(c) == 180 and c.fps == pytest.approx(30)
    assert len(c.keys) == 180 // 25 + 1
    # B-frames: decode order differs from presentation order.
    assert [p.pts for p in c.packets] != sorted(p.pts for p in c.packets)
    c.close()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("indices", [[0, 30, 60, 90, 120, 150], [7, 8, 49, 50, 51, 179], [179, 3, 100], [24, 25, 26]])
def test_sampled_frames_equal_the_full_decode(h264, indices, threads):
    """Key-frame starts and the codec's skip of unreferenced frames change nothing in the frames kept, with frame
    threading too."""
    full = _full_decode(h264)
    frames, duration, got = sampled_frames(h264, lambda total, fps: indices, threads=threads)
    assert got == indices and duration == pytest.approx(6.0)
    for frame, i in zip(frames, indices):
        assert np.array_equal(frame, full[i]), i


def test_only_the_needed_packets_are_decoded(h264):
    c = Clip(h264)
    c.frames([5, 105])  # GOPs 0 and 4: from their key frames to a little past each frame
    assert c.fed < 2 * 25 + 10
    c.frames(list(range(0, 180, 30)))  # 1 fps on a 30 fps clip: still far fewer than all 180
    assert c.fed < 180 * 0.8
    c.close()


def test_decode_video_picks_what_decord_picks(h264):
    """The training entry point samples 1 frame/s as before; frames equal decord's frame-by-frame decode."""
    frames, duration = decode_video(h264, max_frames=32, threads=2)
    reader = decord.VideoReader(io.BytesIO(h264))
    indices = video_frame_indices(len(reader), float(reader.get_avg_fps()), 32, 1.0, "fps")
    assert frames.shape[0] == len(indices) == 6
    reference = np.stack([reader[i].asnumpy() for i in indices])
    assert np.abs(frames.astype(int) - reference).max() <= 2  # colour conversion rounding at most


def test_decode_threads_follow_the_cpu_share(monkeypatch):
    import ov_train.data.video_frames as vf

    monkeypatch.setattr(vf, "cpus_per_process", lambda n: max(1, 16 // n))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert decode_threads() == 2  # 16 CPUs over 8 ranks with one (main-process) loader



def _every_third(n, fps):
    return list(range(0, n, 3))


def _decode_in_child(data, frame_size, queue):
    frames, _, _ = sampled_frames(data, _every_third, frame_size, threads=1)
    queue.put(frames.shape)


@pytest.mark.parametrize("frame_size", [None, 64])
def test_a_worker_forked_after_the_parent_decoded_still_decodes(h264, frame_size):
    """Loader workers are forked from a process that may have decoded video already (validation, checks): FFmpeg's
    scaler pool cached in the parent once left forked workers waiting forever."""
    import multiprocessing

    parent, _, _ = sampled_frames(h264, _every_third, frame_size, threads=1)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_decode_in_child, args=(h264, frame_size, queue), daemon=True) for _ in range(2)]
    for child in children:
        child.start()
    try:
        shapes = [queue.get(timeout=60) for _ in children]
    finally:
        for child in children:
            child.kill()
            child.join()
    assert shapes == [parent.shape, parent.shape] and parent.shape[0] == 60
