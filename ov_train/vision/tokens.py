"""Visual token counts, computed without running the model.

Each formula mirrors what LlavaOnevisionModel does to the vision features, so the
text side can reserve exactly as many placeholder tokens as the model will fill.
"""

import math

from ov_train.vision.geometry import VisionGeometry


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


def single_crop_tokens(geom: VisionGeometry) -> int:
    """One padded-square crop plus its newline."""
    return geom.side * geom.side + 1


def video_tokens(num_frames: int, geom: VisionGeometry) -> int:
    """Each frame is 2x2-pooled (ceil on odd sides); one newline closes the whole video."""
    pooled_side = math.ceil(geom.side / 2)
    return num_frames * pooled_side**2 + 1


def video_frame_indices(total_frames: int, fps: float, max_frames: int) -> list[int]:
    """Sample 1 frame per second (at least one), then resample uniformly to at most max_frames."""
    if total_frames < 1 or fps <= 0 or max_frames < 1:
        raise ValueError(f"need total_frames >= 1, fps > 0, max_frames >= 1; got {total_frames}, {fps}, {max_frames}")
    step = max(1, round(fps))
    indices = list(range(0, total_frames, step))
    if len(indices) <= max_frames:
        return indices
    if max_frames == 1:
        return [0]
    # Evenly spread over the whole clip, first and last frame included; integer maths avoids float drift.
    last = total_frames - 1
    return [i * last // (max_frames - 1) for i in range(max_frames)]


def image_tokens(height: int, width: int, geom: VisionGeometry, anyres: bool) -> int:
    """Tokens for one image under either the anyres or the single padded-crop strategy."""
    return anyres_tokens(height, width, geom) if anyres else single_crop_tokens(geom)
