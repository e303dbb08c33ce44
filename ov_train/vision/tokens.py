"""Visual token counts, computed without running the model.

Each formula mirrors what LlavaOnevisionModel does to the vision features, so the
text side can reserve exactly as many placeholder tokens as the model will fill.
"""

import math

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


def _unpadded_size(feat_h: int, feat_w: int, height: int, width: int) -> tuple[int, int]:
    """Feature-map size left after cutting away the letterbox padding of the anyres canvas.

    The same float expressions as the model are used so rounding matches; an odd
    padding total keeps one extra row/column, as the model's symmetric slice does.
    """
    if width / height > feat_w / feat_h:
        kept_h = int(round(height * (feat_w / width), 7))
        return feat_h - 2 * ((feat_h - kept_h) // 2), feat_w
    kept_w = int(round(width * (feat_h / height), 7))
    return feat_h, feat_w - 2 * ((feat_w - kept_w) // 2)


def anyres_tokens(height: int, width: int, geom: VisionGeometry) -> int:
    """Tokens for one anyres image: base crop + unpadded (maybe shrunk) grid with a newline per row."""
    side = geom.side
    canvas_h, canvas_w = best_resolution(height, width, geom)
    feat_h = canvas_h // geom.image_size * side
    feat_w = canvas_w // geom.image_size * side
    feat_h, feat_w = _unpadded_size(feat_h, feat_w, height, width)
    # The model bilinearly shrinks grids holding clearly more than max_crops crops' worth of features.
    ratio = math.sqrt(feat_h * feat_w / (geom.max_crops * side**2))
    if ratio > 1.1:
        feat_h, feat_w = int(feat_h // ratio), int(feat_w // ratio)
    return side * side + feat_h * (feat_w + 1)


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
