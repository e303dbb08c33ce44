"""Video token compression (vision/pooling.py): the pooling equals the public LLaVA-OneVision code's bilinear get_2dPool
and, at stride 2, transformers' LlavaOnevision apply_pooling; newlines sit where the public code's mm_newline_position
puts them; and the token count the text reserves equals the length of the features the model builds."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionModel

from ov_train.constants import VIDEO_NEWLINES
from ov_train.model.forward import video_features
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.pooling import arrange_video, pool_frames, video_token_count
from ov_train.vision.tokens import video_tokens

REAL = VisionGeometry(image_size=384, patch_size=14, grid_pinpoints=default_pinpoints(384))


# ---- the public code's functions, ported here as the reference ----------------------------------------------------


def reference_2d_pool(features: torch.Tensor, side: int, stride: int) -> torch.Tensor:
    """LLaVA-NeXT llava_arch.py get_2dPool, mm_spatial_pool_mode="bilinear"."""
    frames, _, dim = features.shape
    grid = features.view(frames, side, side, -1).permute(0, 3, 1, 2).contiguous()
    height, width = grid.shape[2:]
    grid = F.interpolate(grid, size=[math.ceil(height / stride), math.ceil(width / stride)], mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(frames, -1, dim)


def reference_layout(pooled: torch.Tensor, newline: torch.Tensor, position: str) -> torch.Tensor:
    """LLaVA-NeXT prepare_inputs_labels_for_multimodal, video branch of mm_patch_merge_type spatial_unpad:
    add_token_per_grid / add_token_per_frame / one newline / none, per mm_newline_position."""
    frames, tokens, dim = pooled.shape
    if position == "grid":
        rows = int(math.sqrt(tokens))
        x = pooled.view(frames, 1, rows, rows, -1).permute(4, 0, 2, 1, 3).contiguous()
        x = x.flatten(1, 2).flatten(2, 3)  # [dim, frames * rows, rows]
        x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1)), dim=-1)
        return x.flatten(1, 2).transpose(0, 1)
    if position == "frame":
        x = pooled.permute(2, 0, 1).contiguous()
        x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1)), dim=-1)
        return x.permute(1, 2, 0).contiguous().flatten(0, 1)
    if position == "one_token":
        return torch.cat((pooled.flatten(0, 1), newline[None]), dim=0)
    return pooled.flatten(0, 1)


# ---- pooling ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [27, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_pooling_equals_public_get_2d_pool(side, stride):
    features = torch.randn(3, side * side, 16, generator=torch.Generator().manual_seed(side * 10 + stride))
    ours = pool_frames(features, side, stride)
    # The public code pools only for strides above 1 (encode_multimodals: `mm_spatial_pool_stride > 1`).
    expected = features if stride == 1 else reference_2d_pool(features, side, stride)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(("stride", "per_frame"), [(2, 196), (3, 81), (4, 49)])
def test_real_frame_token_counts(stride, per_frame):
    features = torch.randn(2, 27 * 27, 8)
    assert pool_frames(features, 27, stride).shape == (2, per_frame, 8)
    assert video_tokens(32, REAL, pool=stride) == 32 * per_frame + 1
    assert video_tokens(32, REAL, pool=stride, layout="grid") == 32 * per_frame + 32 * math.isqrt(per_frame)


@pytest.mark.parametrize("side", [27, 4, 5])
def test_stride_two_equals_transformers_apply_pooling(side):
    """Our default must not change what transformers' LlavaOnevision does (its apply_pooling is fixed at 2)."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=side * 14, patch_size=14))
    features = torch.randn(4, side * side, 32)
    assert torch.equal(pool_frames(features, side, 2), LlavaOnevisionModel.apply_pooling(SimpleNamespace(config=config), features))
    assert video_tokens(5, VisionGeometry(side * 14, 14, ())) == video_token_count(5, side) == 5 * math.ceil(side / 2) ** 2 + 1


def test_bad_knobs_are_refused_naming_what_is_allowed():
    with pytest.raises(ValueError, match="integer >= 1"):
        video_token_count(4, 27, pool=0)
    with pytest.raises(ValueError, match="allowed: \\['one_token', 'grid', 'frame', 'no_token'\\]"):
        video_token_count(4, 27, newline="row")


# ---- newline layout and counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", VIDEO_NEWLINES)
@pytest.mark.parametrize(("side", "stride"), [(27, 2), (27, 3), (5, 2), (4, 1)])
def test_newlines_sit_where_the_public_code_puts_them(layout, side, stride):
    rows = math.ceil(side / stride) if stride > 1 else side
    pooled = torch.randn(3, rows * rows, 8)
    newline = torch.randn(8)
    assert torch.equal(arrange_video(pooled, newline, layout), reference_layout(pooled, newline, layout))


def _model_of(side: int, dim: int = 8):
    """What video_features reads of a model: the tower geometry and the newline embedding."""
    vision = SimpleNamespace(image_size=side * 14, patch_size=14)
    return SimpleNamespace(config=SimpleNamespace(vision_config=vision), model=SimpleNamespace(image_newline=torch.randn(dim)))


@pytest.mark.parametrize("layout", VIDEO_NEWLINES)
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("side", [27, 4])
def test_counted_tokens_equal_the_features_the_model_builds(side, stride, layout):
    model, geometry = _model_of(side), VisionGeometry(side * 14, 14, ())
    frames = [1, 3, 8]
    feats = torch.randn(sum(frames), side * side, 8)
    for ends in (True, False):  # False: a stage without newlines (image_strategy=square)
        videos = video_features(model, feats, frames, [ends] * len(frames), pool=stride, newline_layout=layout)
        assert [v.shape[0] for v in videos] == [
            video_tokens(n, geometry, newline=ends, pool=stride, layout=layout) for n in frames
        ]


def test_default_video_features_equal_the_stock_model(tiny_model_and_tokenizer):
    """The tiny model's stock get_video_features (apply_pooling) plus its one newline, against ours by default."""
    model, _ = tiny_model_and_tokenizer
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    feats = torch.randn(5, side * side, model.config.text_config.hidden_size)
    with torch.no_grad():
        stock = model.model.apply_pooling(feats)
        ours = video_features(model, feats, [2, 3])
    newline = model.model.image_newline[None]
    assert torch.equal(ours[0], torch.cat([stock[:2].flatten(0, 1), newline]))
    assert torch.equal(ours[1], torch.cat([stock[2:].flatten(0, 1), newline]))
