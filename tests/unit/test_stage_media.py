"""Stage media settings mean what they say: anyres_max_N on any grid against transformers' own counting and
cropping, stage 1.5 and stage 1 as the paper and the public code run them, frame sampling against the public
formula, per-source video settings, <image> placement, and exports that carry (or refuse) the setting."""
import copy
import json
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionModel,
    LlavaOnevisionProcessor,
    SiglipImageProcessorPil,
)
from transformers.image_processing_utils import select_best_resolution

from ov_train.checkpoints.export import export_pretrained
from ov_train.config.media import ImageSettings, MediaSettings, VideoSettings, parse_grid, read_media
from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.data.samples import SampleProcessor
from ov_train.data.video import encode_mp4
from ov_train.text.template import encode_conversation
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.preprocess import preprocess_image
from ov_train.vision.settings import apply_to_model_config
from ov_train.vision.tokens import anyres_tokens, video_frame_indices
from tests.conftest import compose_config, plan_of
from tests.helpers import noise_png, raw_sample

REAL = VisionGeometry(image_size=384, patch_size=14, grid_pinpoints=default_pinpoints(384))
TINY = VisionGeometry(image_size=32, patch_size=8, grid_pinpoints=default_pinpoints(32))
MID_GRID = "(2x2),(1x2),(1x3),(2x1),(3x1)"
GRIDS = ["(1x1),...,(6x6)", MID_GRID, "(1x1),...,(3x3)", [[1, 2], [2, 1], [4, 4]]]
SIZES = [(h, w) for h in (90, 384, 700, 1080, 2500) for w in (120, 384, 768, 1920, 3300)]


def _geometry(image: ImageSettings, base: VisionGeometry) -> VisionGeometry:
    """The geometry a model of `base`'s geometry has once training applied the stage's image settings."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=base.image_size, patch_size=base.patch_size),
                             vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=[list(p) for p in base.grid_pinpoints])
    apply_to_model_config(config, MediaSettings(image))
    return VisionGeometry.from_model_config(config)


def _noise(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _stock_counts(geom: VisionGeometry, strategy: str, height: int, width: int) -> tuple[int, int]:
    """Tokens of one image by the stock model's packing and by the stock processor's count."""
    pinpoints = [list(p) for p in geom.grid_pinpoints]
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=geom.image_size, patch_size=geom.patch_size),
                             image_grid_pinpoints=pinpoints)
    side = geom.side
    rows, cols = (d // geom.image_size for d in select_best_resolution((height, width), pinpoints))
    feats = [torch.zeros(1 + rows * cols, side * side, 2)]
    _, lens = LlavaOnevisionModel.pack_image_features(
        SimpleNamespace(config=config), feats, torch.tensor([[height, width]]), torch.zeros(2), strategy)
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
                                num_image_tokens=side * side, vision_aspect_ratio=strategy)
    processor._get_unpadded_features = partial(LlavaOnevisionProcessor._get_unpadded_features, processor)
    counted = LlavaOnevisionProcessor._get_number_of_features(processor, height, width, geom.image_size, geom.image_size)
    return int(lens.item()), counted


@pytest.mark.parametrize("grid", GRIDS, ids=["6x6", "mid", "3x3", "list"])
@pytest.mark.parametrize("n", [1, 4, 9, 20])
def test_anyres_max_n_on_any_grid_counts_as_transformers(n, grid):
    settings = ImageSettings.from_stage({"image_strategy": f"anyres_max_{n}", "image_grid": grid})
    geom = _geometry(settings, REAL)
    assert geom.max_crops == n and geom.grid_pinpoints == settings.pinpoints(384)
    for height, width in SIZES:
        packed, counted = _stock_counts(geom, settings.strategy, height, width)
        assert anyres_tokens(height, width, geom) == packed == counted, (n, grid, height, width)


def test_grid_notations():
    assert parse_grid("(1x1),...,(6x6)") == tuple((r, c) for r in range(1, 7) for c in range(1, 7))
    assert parse_grid(MID_GRID) == ((2, 2), (1, 2), (1, 3), (2, 1), (3, 1))
    assert parse_grid(["2x2", [1, 3]]) == ((2, 2), (1, 3))
    for bad in ("(0x1)", "6x", [], [[1, 2, 3]], 7):
        with pytest.raises(ValueError, match="stage.image_grid"):
            parse_grid(bad)


@pytest.mark.parametrize(("height", "width"), [(20, 20), (32, 90), (70, 30), (100, 250), (17, 190)])
def test_anyres_crops_on_the_stage_grid_are_the_stock_processors(height, width):
    geom = _geometry(ImageSettings.from_stage({"image_strategy": "anyres_max_4", "image_grid": MID_GRID}), TINY)
    stock = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                            image_grid_pinpoints=[list(p) for p in geom.grid_pinpoints])
    image = _noise(height, width)
    ours = preprocess_image(image, geom, mode="anyres")
    expected = stock(images=[image], return_tensors="pt")["pixel_values"][0]
    assert ours.pixel_values.shape[0] == expected.shape[0] >= 3  # base + 2 or more grid crops: no 1x1 in the grid
    torch.testing.assert_close(ours.pixel_values, expected, atol=1e-5, rtol=0)


def test_mid_stage_follows_the_papers_stage_1_5_grid_and_limit():
    media = plan_of(["stage=mid"]).data.samples.media
    geom = _geometry(media.image, REAL)
    assert [tuple(p) for p in geom.grid_pinpoints] == [(768, 768), (384, 768), (384, 1152), (768, 384), (1152, 384)]
    counts = {(h, w): anyres_tokens(h, w, geom) for h in range(100, 4000, 97) for w in range(100, 4000, 89)}
    # At most the base crop and 4 crops' worth of features (729 x 5), plus a newline per grid row (54 at 2x2).
    assert max(counts.values()) == anyres_tokens(768, 768, geom) == 729 * 5 + 54
    assert anyres_tokens(1080, 1920, geom) < anyres_tokens(1080, 1920, REAL)  # 7,269 under anyres_max_9 on 6x6


def test_the_plan_builds_the_model_with_the_stages_anyres_n(tmp_path):
    """The plan decides the model's vision_aspect_ratio once: the stage's anyres_max_N (mid: 4, under the model's 9),
    the model's own under a single-crop stage; the model is built with it, so the stage settings change nothing."""
    from ov_train.model.build import build_model

    mid = plan_of(["stage=mid"])
    assert mid.model.vision_aspect_ratio == "anyres_max_4" and compose_config([]).model.vision_aspect_ratio == "anyres_max_9"
    assert plan_of(["stage=pretrain", "model.vision_aspect_ratio=anyres_max_2"]).model.vision_aspect_ratio == "anyres_max_2"
    model, _ = build_model(mid.model, tmp_path)
    assert model.config.vision_aspect_ratio == "anyres_max_4"
    before = model.config.to_dict()
    apply_to_model_config(model.config, mid.data.samples.media)
    assert model.config.vision_aspect_ratio == before["vision_aspect_ratio"]
    with pytest.raises(ConfigError, match="model.vision_aspect_ratio='anyres_9'"):
        plan_of(["model.vision_aspect_ratio=anyres_9"])


def test_pretrain_is_the_public_squashed_crop_and_pad_one_override_away():
    image = _noise(70, 30)
    stage = compose_config(["stage=pretrain"]).stage
    square = ImageSettings.from_stage(stage)
    assert square.crop_mode(1) == "square" and not square.newline
    ours = preprocess_image(image, REAL, mode=square.crop_mode(1))
    assert ours.num_tokens == 729 and not ours.newline
    # The public stage 1 feeds SigLIP's own processor: a bicubic squash to 384 x 384, no padding.
    stock = SiglipImageProcessorPil(size={"height": 384, "width": 384})(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours.pixel_values, stock, atol=1e-5, rtol=0)
    pad = ImageSettings.from_stage(compose_config(["stage=pretrain", "stage.image_strategy=pad"]).stage)
    padded = preprocess_image(image, REAL, mode=pad.crop_mode(1))
    assert padded.num_tokens == 730 and padded.newline and not torch.equal(padded.pixel_values, ours.pixel_values)


def test_square_features_have_no_newline_in_the_forward(tiny_model_and_tokenizer):
    from ov_train.data.samples import collate
    from ov_train.model.forward import embed_inputs

    model, tokenizer = tiny_model_and_tokenizer
    geom = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geom, "plain", MediaSettings.of("square", 4), max_length=512)
    example = process(raw_sample("s", "<image>\nDescribe.", "a red circle", [noise_png(40, 70, 1)]))
    assert int((example["input_ids"] == model.config.image_token_id).sum()) == geom.side**2  # 16, no newline
    batch = collate([example], tokenizer.pad_token_id)
    with torch.no_grad():
        embeds = embed_inputs(model, batch)
    slots = batch["input_ids"][0] == model.config.image_token_id
    assert not torch.isclose(embeds[0, slots], model.model.image_newline[None]).all(-1).any()


def _public_frame_indices(total, avg_fps, video_fps, frames_upbound, force_sample):
    """The public code's formula (LLaVA-NeXT llava/utils.py, process_video_with_decord), restated."""
    step = round(avg_fps / video_fps)
    indices = list(range(0, total, step))
    if frames_upbound > 0 and (len(indices) > frames_upbound or force_sample):
        indices = np.linspace(0, total - 1, frames_upbound, dtype=int).tolist()
    return indices


@pytest.mark.parametrize("sampling", ["fps", "uniform"])
def test_frame_sampling_is_the_public_formula(sampling):
    for total in (1, 7, 30, 31, 299, 1000, 7201):
        for fps in (1.0, 2.5, 23.976, 25.0, 29.97, 60.0):
            for video_fps in (0.5, 1.0, 2.0):
                if round(fps / video_fps) < 1:
                    continue  # the public code divides by zero there; ov_train takes every frame
                for cap in (1, 8, 32):
                    ours = video_frame_indices(total, fps, cap, video_fps, sampling)
                    assert ours == _public_frame_indices(total, fps, video_fps, cap, sampling == "uniform")


def test_video_settings_per_stage_and_per_source(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    geom = VisionGeometry.from_model_config(model.config)
    stage = {"image_strategy": "anyres_max_9", "video_fps": 1, "max_frames": 32, "frame_sampling": "fps", "frame_size": None}
    source = SimpleNamespace(name="clips", video=(("max_frames", 4), ("sampling", "uniform"), ("frame_size", 16)))
    media, problems = read_media(stage, [source])
    assert not problems
    process = SampleProcessor(tokenizer, geom, "qwen_1_5", media, 4096)
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 48, 3), dtype=np.uint8)
    raw = raw_sample("v", "<video>\nWhich way?", "left", video=encode_mp4(frames, fps=2))
    # The stage's: 2 fps video sampled at 1 frame per second -> frames 0, 2, 4.
    assert process(raw)["frames"].shape[0] == 3
    # The source's own: 4 frames spread uniformly, decoded at 16 x 16, then squashed to the 32 px crop.
    clip = process({**raw, "__source__": "clips"})
    assert clip["frames"].shape == (4, 3, 32, 32)
    assert int((clip["input_ids"] == model.config.video_token_id).sum()) == 4 * 4 + 1


def test_bad_media_settings_name_their_keys():
    cfg = compose_config(["stage.image_strategy=anyres_max_0", "stage.image_grid=[0x2]", "stage.frame_sampling=random",
                          "stage.video_fps=0", "stage.media_placement=end", "stage.loss_weighting=mean"])
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    for key in ("stage.image_strategy=", "stage.frame_sampling=", "stage.video_fps=", "stage.media_placement=",
                "stage.loss_weighting="):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="stage.image_grid"):
        ImageSettings.from_stage({"image_strategy": "anyres_max_4", "image_grid": "(0x2)"})
    with pytest.raises(ValueError, match=r"source 'v': video.fps"):
        VideoSettings.from_values({"fps": -1}, "source 'v': video")


def test_placement_moves_a_single_placeholder_to_the_front_as_the_public_code(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    turns = [{"from": "human", "value": "What is shown here? <image>"}, {"from": "gpt", "value": "a cat"}]
    normalised = [{"from": "human", "value": "<image>\nWhat is shown here?"}, turns[1]]
    front = encode_conversation(tokenizer, turns, "qwen_1_5", [5], placement="front")
    reference = encode_conversation(tokenizer, normalised, "qwen_1_5", [5], placement="as_is")
    assert front.input_ids == reference.input_ids and front.labels == reference.labels
    as_is = encode_conversation(tokenizer, turns, "qwen_1_5", [5], placement="as_is")
    assert as_is.input_ids != front.input_ids
    # Labels stay assistant-only: the reply and its <|im_end|>, nothing of the template.
    labelled = [t for t in front.labels if t != -100]
    assert tokenizer.decode(labelled) == "a cat<|im_end|>"
    two = [{"from": "human", "value": "Compare <image> and <image>"}, turns[1]]
    assert encode_conversation(tokenizer, two, "qwen_1_5", [5, 5], placement="front").input_ids == \
        encode_conversation(tokenizer, two, "qwen_1_5", [5, 5], placement="as_is").input_ids


def _exported(tiny_model_and_tokenizer, tmp_path, overrides):
    model, tokenizer = tiny_model_and_tokenizer
    config = copy.deepcopy(model.config)
    apply_to_model_config(config, plan_of(overrides).data.samples.media)
    return export_pretrained(LlavaOnevisionForConditionalGeneration(config), tokenizer, tmp_path / "export")


def test_export_carries_the_stage_setting_so_the_stock_processor_counts_the_same(tiny_model_and_tokenizer, tmp_path):
    out = _exported(tiny_model_and_tokenizer, tmp_path, ["stage=mid"])
    config = json.loads((out / "config.json").read_text())
    assert config["vision_aspect_ratio"] == "anyres_max_4"
    assert config["image_grid_pinpoints"] == [[64, 64], [32, 64], [32, 96], [64, 32], [96, 32]]
    assert config["ov_train_media"]["image_grid"] == [[2, 2], [1, 2], [1, 3], [2, 1], [3, 1]]
    processor = LlavaOnevisionProcessor.from_pretrained(out)
    geom = VisionGeometry.from_model_config(LlavaOnevisionForConditionalGeneration.config_class.from_pretrained(out))
    sizes = [(20, 20), (32, 90), (200, 60), (500, 480)]
    stock = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert stock == [anyres_tokens(h, w, geom) for h, w in sizes]


def test_export_of_a_single_crop_stage_refuses_processor_files(tiny_model_and_tokenizer, tmp_path, caplog):
    out = _exported(tiny_model_and_tokenizer, tmp_path, ["stage=pretrain"])
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "preprocessor_config.json").exists() and not (out / "processor_config.json").exists()
    assert "stage.image_strategy=square" in caplog.text and "no processor files" in caplog.text
    # Its model card still says what it is, and how it is used: as the next stage's start, not for chat.
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "stage.image_strategy=square" in card
    assert f"model.init_from={out}" in card and "AutoProcessor" not in card and "ov-chat" not in card
