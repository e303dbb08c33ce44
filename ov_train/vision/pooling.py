"""Video token compression: each frame's feature map pooled by a stride, then laid out with newline embeddings.

Pooling is the public LLaVA-OneVision code's bilinear `get_2dPool` (`mm_spatial_pool_stride`, mode `bilinear`):
a side of `side` patches becomes ceil(side / stride) by bilinear interpolation (align_corners off). Stride 2 is what
transformers' LlavaOnevision `apply_pooling` does; stride 1 leaves frames unpooled, as the public code does for
a stride of 1. A 384-px SigLIP frame (27 x 27 patches) becomes 196 tokens at stride 2, 81 at 3 and 49 at 4.

Newline layouts (the public `mm_newline_position`, constants.VIDEO_NEWLINES):
- `one_token`: one newline after the whole video (transformers' layout, the default here);
- `grid`: one after every pooled row of every frame (`add_token_per_grid`, the public training script's default);
- `frame`: one after every frame (`add_token_per_frame`);
- `no_token`: none (also what a stage without newlines, image_strategy=square, gives).

`video_token_count` (what the text reserves) and `arrange_video` (what the model fills) share `pooled_side` and
`newline_count`, so the two agree by construction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ov_train.config.media import VideoSettings
from ov_train.constants import VIDEO_NEWLINES

# The defaults of stage.video_pool / stage.video_newline (config/media.py).
DEFAULT_POOL, DEFAULT_NEWLINE = VideoSettings.pool, VideoSettings.newline


def check_video_layout(pool: int, newline: str) -> None:
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
        raise ValueError(f"video pool stride {pool!r}: must be an integer >= 1 (1 = no pooling)")
    if newline not in VIDEO_NEWLINES:
        raise ValueError(f"video newline layout {newline!r}; allowed: {list(VIDEO_NEWLINES)}")


def pooled_side(side: int, pool: int) -> int:
    """Patches per side of a frame after pooling by `pool` (the public code's math.ceil(side / stride))."""
    return side if pool == 1 else math.ceil(side / pool)


def newline_count(frames: int, rows: int, newline: str) -> int:
    """Newline embeddings of a video of `frames` pooled frames of `rows` rows each, laid out as `newline`."""
    return {"one_token": 1, "grid": frames * rows, "frame": frames, "no_token": 0}[newline]


def video_token_count(frames: int, side: int, pool: int = DEFAULT_POOL, newline: str = DEFAULT_NEWLINE) -> int:
    """Visual tokens of a video of `frames` frames whose feature maps are side x side patches."""
    check_video_layout(pool, newline)
    rows = pooled_side(side, pool)
    return frames * rows * rows + newline_count(frames, rows, newline)


def pool_frames(features: torch.Tensor, side: int, pool: int = DEFAULT_POOL) -> torch.Tensor:
    """[frames, side * side, d] projected patch features -> [frames, pooled_side ** 2, d], bilinear."""
    check_video_layout(pool, DEFAULT_NEWLINE)
    if pool == 1:
        return features
    frames, tokens, dim = features.shape
    if tokens != side * side:
        raise ValueError(f"{tokens} features per frame, expected {side} x {side}")
    grid = features.view(frames, side, side, dim).permute(0, 3, 1, 2)
    rows = pooled_side(side, pool)
    pooled = F.interpolate(grid, size=[rows, rows], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(frames, rows * rows, dim)


def arrange_video(pooled: torch.Tensor, newline: torch.Tensor, layout: str = DEFAULT_NEWLINE) -> torch.Tensor:
    """One video's pooled frames [frames, rows * rows, d] and the newline embedding [d] -> [tokens, d] in `layout`.

    `no_token` keeps the newline in the autograd graph with weight 0, so data-parallel engines see the same
    parameters used on every rank whatever its videos' layout."""
    check_video_layout(DEFAULT_POOL, layout)
    frames, tokens, dim = pooled.shape
    rows = math.isqrt(tokens)
    nl = newline.to(pooled)
    if layout == "one_token":
        out = torch.cat([pooled.flatten(0, 1), nl[None]])
    elif layout == "frame":
        out = torch.cat([pooled, nl.expand(frames, 1, dim)], dim=1).flatten(0, 1)
    elif layout == "grid":
        grid = pooled.view(frames, rows, rows, dim)
        out = torch.cat([grid, nl.expand(frames, rows, 1, dim)], dim=2).flatten(0, 2)
    else:
        out = pooled.flatten(0, 1) + 0 * nl.sum()
    assert out.shape[0] == frames * tokens + newline_count(frames, rows, layout)
    return out
