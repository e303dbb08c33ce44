"""Visual token counts, computed without running the model.

Each formula mirrors what LlavaOnevisionModel does to the vision features, so the
text side can reserve exactly as many placeholder tokens as the model will fill.
"""

import math
from dataclasses import dataclass

import numpy as np

from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.pooling import DEFAULT_NEWLINE, DEFAULT_POOL, video_token_count


def best_resolution(height: int, width: int, geom: VisionGeometry) -> tuple[int, int]:
    """Anyres canvas (height, width) that keeps the most image pixels, then wastes the least."""

    def fit(pinpoint: tuple[int, int]) -> tuple[int, int]:
        canvas_h, canvas_w = pinpoint
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        return kept, -(canvas_h * canvas_w - kept)

    # max() keeps the first of equal candidates, so pinpoint order breaks ties like the model does.
    return max(geom.grid_pinpoints, key=fit)


@dataclass(frozen=True)
class AnyresLayout:
    """Where an anyres image's grid features go: its crop grid, the rows and columns unpadding keeps, and the size
    the anyres_max_N shrink leaves (out_h x out_w, each row then ending with a newline)."""

    rows: int
    cols: int
    top: int  # first kept feature row of the rows*side x cols*side grid map
    left: int  # first kept feature column
    kept_h: int
    kept_w: int
    out_h: int
    out_w: int


def _kept(value: float, rounding: str) -> int:
    """The unpadded side: transformers rounds (int(round(x, 7))), the public LLaVA-NeXT unpad_image truncates."""
    return int(value) if rounding == "truncate" else int(round(value, 7))


def anyres_layout(height: int, width: int, geom: VisionGeometry) -> AnyresLayout:
    """The layout the model packs one anyres image's grid features by (model/forward.py), computed with the same
    float expressions as the model, so counts match; an odd padding total keeps one extra row/column, as the
    model's symmetric slice does."""
    side = geom.side
    canvas_h, canvas_w = best_resolution(height, width, geom)
    rows, cols = canvas_h // geom.image_size, canvas_w // geom.image_size
    feat_h, feat_w = rows * side, cols * side
    top = left = 0
    if width / height > feat_w / feat_h:
        top = (feat_h - _kept(height * (feat_w / width), geom.rounding)) // 2
    else:
        left = (feat_w - _kept(width * (feat_h / height), geom.rounding)) // 2
    kept_h, kept_w = feat_h - 2 * top, feat_w - 2 * left
    # The model bilinearly shrinks grids holding clearly more than max_crops crops' worth of features.
    ratio = math.sqrt(kept_h * kept_w / (geom.max_crops * side**2))
    out_h, out_w = (int(kept_h // ratio), int(kept_w // ratio)) if ratio > 1.1 else (kept_h, kept_w)
    return AnyresLayout(rows, cols, top, left, kept_h, kept_w, out_h, out_w)


def anyres_tokens(height: int, width: int, geom: VisionGeometry) -> int:
    """Tokens for one anyres image: base crop + unpadded (maybe shrunk) grid with a newline per row."""
    layout = anyres_layout(height, width, geom)
    return geom.side * geom.side + layout.out_h * (layout.out_w + 1)


def single_crop_tokens(geom: VisionGeometry, newline: bool = True) -> int:
    """One square crop (padded or squashed), plus its newline unless the strategy has none (`square`)."""
    return geom.side * geom.side + int(newline)


def video_tokens(num_frames: int, geom: VisionGeometry, newline: bool = True, pool: int = DEFAULT_POOL,
                 layout: str = DEFAULT_NEWLINE) -> int:
    """Each frame pooled by `pool` (2: 2x2, ceil on odd sides), newlines placed as `layout` (vision/pooling.py;
    default one after the whole video); none at all when `newline` is off (image_strategy=square)."""
    return video_token_count(num_frames, geom.side, pool, layout if newline else "no_token")


def video_frame_indices(total_frames: int, fps: float, max_frames: int, video_fps: float = 1.0,
                        sampling: str = "fps") -> list[int]:
    """Frames to decode, as the public LLaVA-NeXT code picks them (llava/utils.py process_video_with_decord).

    `fps`: every round(fps / video_fps)-th frame (at least every one), then, when that is more than
    max_frames, max_frames frames spread evenly from the first to the last. `uniform`: always max_frames
    frames spread evenly (the public `force_sample`; a clip with fewer frames repeats some).
    """
    if total_frames < 1 or fps <= 0 or max_frames < 1 or video_fps <= 0:
        raise ValueError(
            f"need total_frames >= 1, fps > 0, max_frames >= 1, video_fps > 0; got {total_frames}, {fps},"
            f" {max_frames}, {video_fps}"
        )
    if sampling not in ("fps", "uniform"):
        raise ValueError(f"frame sampling {sampling!r}; allowed: fps, uniform")
    indices = list(range(0, total_frames, max(1, round(fps / video_fps))))
    if sampling == "fps" and len(indices) <= max_frames:
        return indices
    # numpy's own float spacing, truncated to int, so indices equal the public code's np.linspace(dtype=int).
    return np.linspace(0, total_frames - 1, max_frames, dtype=int).tolist()
