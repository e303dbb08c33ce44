"""Token arithmetic: real LLaVA-OneVision numbers, and parity with the stock transformers model."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import select_best_resolution

from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.preprocess import preprocess_frames, preprocess_image
from ov_train.vision.tokens import (
    anyres_tokens,
    best_resolution,
    single_crop_tokens,
    video_frame_indices,
    video_tokens,
)

REAL = VisionGeometry(image_size=384, patch_size=14, grid_pinpoints=default_pinpoints(384))

# (height, width) sizes covering squares, both orientations, extreme aspects and tiny/huge inputs.
TINY_SIZES = [(20, 20), (32, 32), (32, 64), (70, 30), (100, 250), (200, 60), (300, 300), (17, 190), (33, 31), (190, 17)]


# ---- real geometry -----------------------------------------------------------------------------


def test_real_geometry_shape():
    assert REAL.side == 27
    assert single_crop_tokens(REAL) == 730


def test_default_pinpoints_match_transformers_default():
    stock = LlavaOnevisionConfig()
    assert default_pinpoints(384) == tuple(tuple(p) for p in stock.image_grid_pinpoints)
    assert VisionGeometry.from_model_config(stock) == REAL


def test_from_model_config_reads_max_crops():
    config = LlavaOnevisionConfig(vision_aspect_ratio="anyres_max_4")
    assert VisionGeometry.from_model_config(config).max_crops == 4
    with pytest.raises(ValueError):
        VisionGeometry.from_model_config(LlavaOnevisionConfig(vision_aspect_ratio="pad"))


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(384, 384, 1485), (480, 640, 2929), (1024, 768, 4744), (1080, 1920, 7269), (3000, 800, 8019)],
)
def test_anyres_tokens_real(height, width, expected):
    assert anyres_tokens(height, width, REAL) == expected


def test_multi_image_and_video_tokens_real():
    assert 3 * single_crop_tokens(REAL) == 2190  # three images of a multi-image sample: one crop + newline each
    assert video_tokens(32, REAL) == 32 * 196 + 1 == 6273


def test_best_resolution_matches_transformers():
    pinpoints = [list(p) for p in REAL.grid_pinpoints]
    for height in range(50, 4000, 173):
        for width in range(50, 4000, 211):
            assert best_resolution(height, width, REAL) == select_best_resolution((height, width), pinpoints)


def test_anyres_tokens_match_stock_packing_real_geometry():
    """Feed dummy 27x27 crop features through the model's own packing for many real-size images."""
    config = LlavaOnevisionConfig()
    packer = SimpleNamespace(config=config)  # pack_image_features only reads self.config
    newline = torch.zeros(2)
    for height in range(100, 5000, 397):
        for width in range(100, 5000, 431):
            rows, cols = (d // 384 for d in best_resolution(height, width, REAL))
            feats = [torch.zeros(1 + rows * cols, 729, 2)]
            _, lens = LlavaOnevisionModel.pack_image_features(
                packer, feats, torch.tensor([[height, width]]), newline, config.vision_aspect_ratio
            )
            assert lens.item() == anyres_tokens(height, width, REAL), (height, width)


# ---- frame sampling ----------------------------------------------------------------------------


def test_frame_indices_one_per_second():
    assert video_frame_indices(300, 30.0, 32) == list(range(0, 300, 30))


def test_frame_indices_long_video_capped_and_uniform():
    indices = video_frame_indices(120 * 25, 25.0, 32)
    assert len(indices) == 32
    assert indices[0] == 0 and indices[-1] == 120 * 25 - 1
    gaps = np.diff(indices)
    assert gaps.min() >= 96 and gaps.max() <= 97


def test_frame_indices_short_clip_and_validity():
    assert video_frame_indices(15, 30.0, 32) == [0]
    assert video_frame_indices(1, 30.0, 32) == [0]
    for total, fps, cap in [(37, 2.0, 32), (1000, 29.97, 8), (64, 1.0, 32), (33, 1.0, 32), (500, 10.0, 1)]:
        indices = video_frame_indices(total, fps, cap)
        assert 1 <= len(indices) <= cap
        assert indices == sorted(set(indices))
        assert indices[0] >= 0 and indices[-1] < total


# ---- parity with a tiny stock model ------------------------------------------------------------


def _tiny_model(image_size: int, patch_size: int):
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        text_config=Qwen2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=200,
        ),
        image_token_index=198,
        video_token_index=199,
        image_grid_pinpoints=[list(p) for p in default_pinpoints(image_size)],
        vision_aspect_ratio="anyres_max_9",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(config).eval(), VisionGeometry.from_model_config(config)


# Side 4 (even) as specified, plus side 5 (odd, like the real 27) to exercise odd unpadding and pooling.
@pytest.fixture(scope="module", params=[(32, 8), (40, 8)], ids=["side4", "side5"])
def tiny(request):
    return _tiny_model(*request.param)


def _noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@torch.no_grad()
def test_anyres_feature_lengths_match_model(tiny):
    model, geom = tiny
    for height, width in TINY_SIZES:
        crops = preprocess_image(_noise_image(height, width), geom, anyres=True)
        out = model.model.get_image_features(
            crops.pixel_values[None], torch.tensor([[height, width]]), batch_num_images=[1]
        )
        (features,) = out.pooler_output
        assert features.shape[0] == crops.num_tokens == anyres_tokens(height, width, geom), (height, width)


@torch.no_grad()
def test_single_crop_feature_lengths_match_model(tiny):
    model, geom = tiny
    sizes = [(20, 50), (64, 64), (90, 30)]
    crops = [preprocess_image(_noise_image(h, w), geom, anyres=False) for h, w in sizes]
    out = model.model.get_image_features(
        torch.stack([c.pixel_values for c in crops]), torch.tensor(sizes), batch_num_images=[3]
    )
    assert [f.shape[0] for f in out.pooler_output] == [c.num_tokens for c in crops] == [single_crop_tokens(geom)] * 3


@torch.no_grad()
@pytest.mark.parametrize("num_frames", [1, 3])
def test_video_feature_length_matches_model(tiny, num_frames):
    model, geom = tiny
    frames = np.random.default_rng(1).integers(0, 256, (num_frames, 24, 40, 3), dtype=np.uint8)
    pixels = preprocess_frames(frames, geom)
    features = model.model.get_video_features(pixels[None]).pooler_output
    # The model appends the single video newline in forward(), after get_video_features.
    assert features.shape[1] + 1 == video_tokens(num_frames, geom)
