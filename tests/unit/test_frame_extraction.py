"""`ov-data convert --video-frames`: videos stored as their sampled frames, read by training as the video was."""
import json
from pathlib import Path

import numpy as np
import pytest

from ov_train.cli.data import main
from ov_train.config.media import MediaSettings
from ov_train.data.frame_extraction import FrameExtraction, frame_fields, read_frames
from ov_train.data.samples import SampleProcessor
from ov_train.data.stream import read_tar
from ov_train.data.video import decode_video
from ov_train.text.tokenizer import build_tiny_tokenizer
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.tokens import video_tokens
from tests.fixtures_data import make_llava_dataset


def test_parse():
    assert FrameExtraction.parse("fps=1,max=32,size=384") == FrameExtraction(1.0, 32, 384)
    assert FrameExtraction.parse("max=8") == FrameExtraction(1.0, 8, 384)
    assert FrameExtraction.parse("fps=2,size=0").size is None
    for bad in ("fps=0", "frames=3", "max=x", "size=-1"):
        with pytest.raises(ValueError, match="--video-frames"):
            FrameExtraction.parse(bad)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    dataset = make_llava_dataset(tmp_path_factory.mktemp("llava"))
    out = tmp_path_factory.mktemp("frames")
    assert main(["convert", str(dataset["input"]), "--media-root", str(dataset["media_root"]), "--out", str(out),
                 "--workers", "1", "--video-frames", "fps=1,max=8,size=32"]) == 0
    samples = {json.loads(s["json"])["id"]: s for shard in sorted(Path(out).glob("train-*.tar"))
               for s in read_tar(str(shard))}
    return dataset, out, samples


def test_videos_become_their_sampled_frames(extracted):
    dataset, out, samples = extracted
    clip = samples["video_40s"]
    fields = frame_fields(clip)
    assert "video" not in clip and len(fields) == 8 and fields[0] == "frm000.jpg"
    meta = json.loads(clip["json"])
    assert meta["video_frames"] == {"frames": 8, "fps": pytest.approx(8 / 40), "duration": 40.0}
    frames = read_frames(clip, fields)
    assert frames.shape == (8, 32, 32, 3)
    # The frames a training decode at that size would take, up to JPEG's loss.
    reference, _ = decode_video((dataset["media_root"] / "videos/clip40.mp4").read_bytes(), 8, frame_size=32)
    assert np.abs(frames.astype(int) - reference).mean() < 4
    index = json.loads((out / "index.json").read_text())
    entry = next(e for e in index["samples"] if e["id"] == "video_40s")
    assert entry["video"]["sampled_frames"] == 8 and entry["visual_tokens"] > 0


def test_training_reads_the_frames_as_the_video(extracted, _offline_cache):
    _, _, samples = extracted
    tokenizer = build_tiny_tokenizer(Path(_offline_cache) / "tokenizer")
    geometry = VisionGeometry(32, 8, default_pinpoints(32))
    for max_frames, expected in ((32, 8), (4, 4)):  # the stage's cap samples the stored frames again
        process = SampleProcessor(tokenizer, geometry, "qwen_1_5", MediaSettings.of("anyres_max_9", max_frames),
                                  max_length=8192)
        example = process(samples["video_40s"])
        assert example["frames"].shape[0] == expected
        assert example["visual_tokens"] == [video_tokens(expected, geometry)]
