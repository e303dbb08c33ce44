"""stage.video_pool, stage.video_newline and stage.max_frames (config/media.py) from the config to the model: read per
stage and per recipe source, refused by key, and counted the same by convert's index, the sample processor (the text's
placeholders) and the model's features (vision/tokens.py's video_tokens, one function for all three)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ov_train.config.media import VideoSettings, read_media
from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.data.convert import TokenGeometry, _add_video
from ov_train.data.samples import SampleProcessor, collate
from ov_train.data.video import encode_mp4
from ov_train.model.forward import embed_inputs
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.pooling import arrange_video, pool_frames
from ov_train.vision.settings import inference_refusal
from ov_train.vision.tokens import video_tokens
from tests.conftest import compose_config, plan_of
from tests.helpers import raw_sample

REAL = VisionGeometry(image_size=384, patch_size=14, grid_pinpoints=default_pinpoints(384))


def test_stage_keys_reach_the_plan():
    media = plan_of(["stage=onevision", "stage.video_pool=3", "stage.video_newline=grid", "stage.max_frames=128"]
                    ).data.samples.media
    assert (media.video.pool, media.video.newline, media.video.max_frames) == (3, "grid", 128)
    default = plan_of(["stage=onevision"]).data.samples.media.video
    assert (default.pool, default.newline) == (2, "one_token")  # transformers' layout stays the default


def test_bad_video_knobs_are_refused_naming_the_key():
    cfg = compose_config(["stage.video_pool=0", "stage.video_newline=row", "stage.max_frames=0"])
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    text = str(err.value)
    assert "stage.video_pool=0 must be an integer >= 1" in text
    assert "stage.video_newline='row'; allowed: ['one_token', 'grid', 'frame', 'no_token']" in text
    assert "stage.max_frames=0 must be an integer >= 1" in text
    with pytest.raises(ValueError, match=r"source 'v': video.pool='x' must be an integer >= 1"):
        VideoSettings.from_values({"pool": "x"}, "source 'v': video")  # a recipe source's (config/recipe.py)


@pytest.mark.parametrize(("pool", "per_frame"), [(2, 196), (3, 81), (4, 49)])
def test_real_geometry_counts_of_128_frames(pool, per_frame):
    assert video_tokens(128, REAL, True, pool, "one_token") == 128 * per_frame + 1
    rows = int(per_frame ** 0.5)
    assert video_tokens(128, REAL, True, pool, "grid") == 128 * (per_frame + rows)


def _clip(frames: int, seed: int) -> bytes:
    return encode_mp4(np.random.default_rng(seed).integers(0, 255, (frames, 32, 32, 3), np.uint8), fps=1)


def test_convert_processor_and_model_count_the_same_per_stage_and_per_source(tiny_model_and_tokenizer):
    """A stage pooling by 3 with grid newlines and a source of its own (pool 1, one_token, 4 frames): the index's
    count, the placeholders and the features the model scatters agree, and the features equal the reference pooling
    (bilinear, ceil of side / stride) laid out by the public layout."""
    model, tokenizer = tiny_model_and_tokenizer
    geom = VisionGeometry.from_model_config(model.config)
    stage = {"image_strategy": "anyres_max_9", "max_frames": 128, "video_pool": 3, "video_newline": "grid"}
    source = SimpleNamespace(name="short", video=(("pool", 1), ("newline", "one_token"), ("max_frames", 4)))
    media, problems = read_media(stage, [source])
    assert not problems
    process = SampleProcessor(tokenizer, geom, "qwen_1_5", media, 8192)
    clips = [_clip(7, 0), _clip(9, 1)]
    raws = [raw_sample("a", "<video>\nWhat happens?", "a lot", video=clips[0]),
            {**raw_sample("b", "<video>\nAnd here?", "less", video=clips[1]), "__source__": "short"}]
    samples = [process(r) for r in raws]
    side = geom.side
    assert [s["frames"].shape[0] for s in samples] == [7, 4]
    expected = [video_tokens(7, geom, True, 3, "grid"), video_tokens(4, geom, True, 1, "one_token")]
    rows = -(-side // 3)
    assert expected == [7 * rows * rows + 7 * rows, 4 * side * side + 1]
    video_id = model.config.video_token_id
    assert [int((s["input_ids"] == video_id).sum()) for s in samples] == expected
    # convert's index, at the same settings
    for clip, settings, count in zip(clips, [(128, 3, "grid"), (4, 1, "one_token")], expected):
        entry = _add_video({}, clip, "clip.mp4", TokenGeometry(geom, *settings))
        assert entry["visual_tokens"] == count
    # the model: the features it scatters are the reference pooling and layout, one video each
    batch = collate(samples, tokenizer.pad_token_id)
    assert batch["video_pool"] == [3, 1] and batch["video_layout"] == ["grid", "one_token"]
    captured = []
    from ov_train.model.forward import _tower_features

    def encode(m, pixels):
        captured.append(_tower_features(m, pixels))
        return captured[-1]

    with torch.no_grad():
        embeds = embed_inputs(model, batch, encode=encode)
        feats = captured[0].split([7, 4])
        newline = model.model.image_newline
        want = [arrange_video(pool_frames(feats[0], side, 3), newline, "grid"),
                arrange_video(pool_frames(feats[1], side, 1), newline, "one_token")]
    placed = embeds[batch["input_ids"] == video_id]
    assert torch.equal(placed, torch.cat(want).to(placed.dtype))


def test_an_export_pooled_otherwise_than_transformers_gets_no_processor_files():
    def config(pool, newline):
        media = {"image_strategy": "anyres_max_9", "video": {"pool": pool, "newline": newline}}
        return SimpleNamespace(ov_train_media=media, vision_aspect_ratio="anyres_max_9")

    assert inference_refusal(config(2, "one_token")) is None
    assert "stage.video_pool=3" in inference_refusal(config(3, "one_token"))
    assert "stage.video_newline=grid" in inference_refusal(config(2, "grid"))
