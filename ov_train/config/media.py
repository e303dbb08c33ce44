"""What a stage asks of its images and videos, parsed once by the run plan from `stage.*` (and a recipe source's
`video:`); ov_train/vision/settings.py applies them to the model config.

Images (`stage.image_strategy`, `stage.image_grid`):
- `anyres_max_N`: a single image becomes a base crop plus a grid of crops picked from `image_grid`, its grid
  features bilinearly shrunk when they hold clearly more than N crops' worth (LLaVA-NeXT's `anyres_max_N`);
  images of a multi-image sample get one padded square crop and a newline each.
- `pad`: every image is padded to a square (mean colour) and resized to one crop, plus a newline.
- `square`: every image is resized (squashed) to one crop, with no newline: the public code's stage 1
  (`image_aspect_ratio=square`, `mm_patch_merge_type=flat`); images of a multi-image sample are padded first,
  as the public code does with several images.

`image_grid` lists crop grids as "RxC" (rows x columns, i.e. height x width in crops): the public scripts'
range notation "(1x1),...,(6x6)", an explicit list "(2x2),(1x2),(1x3)" or a YAML list of "RxC" / [R, C].
The canvases are R*S x C*S pixels (S: the tower's crop size); their order breaks ties, as in transformers.
Under `stage.reproduce=public_code` (config/reproduce.py) `stage.public_image_grid`, the same grids in the public
script's order, replaces it, and `stage.token_rounding` says how unpadding rounds (`round` or `truncate`).

Videos (`stage.video_fps`, `stage.max_frames`, `stage.frame_sampling`, `stage.frame_size`): `fps` sampling takes
one frame every round(video fps / video_fps) frames and, when that gives more than max_frames, max_frames
frames spread evenly over the clip; `uniform` always takes max_frames frames spread evenly (the public code's
`force_sample`). Frames are decoded at their own size (`frame_size: null`) or at frame_size x frame_size
(cheaper for large videos), then squashed to the crop size. `stage.video_pool` (the public code's
`mm_spatial_pool_stride`) pools each frame's feature map bilinearly by that stride (27 x 27 patches at 384 px: 2 gives
196 tokens a frame, 3 gives 81, 4 gives 49, 1 none), and `stage.video_newline` places the newline embeddings: one
after the video (`one_token`, transformers' layout), one per pooled row (`grid`, the public training script's), one
per frame (`frame`) or none (`no_token`); vision/pooling.py builds and counts both. A recipe source may set any of
these for its own videos (`video: {max_frames: 128, pool: 3}`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ov_train.config.reproduce import Reproduction
from ov_train.constants import FRAME_SAMPLINGS, SINGLE_CROP, VIDEO_NEWLINES

ANYRES = re.compile(r"anyres_max_(\d+)")
_CELL = re.compile(r"(\d+)\s*x\s*(\d+)")
_RANGE = re.compile(r"\(?\s*(\d+)\s*x\s*(\d+)\s*\)?\s*,\s*\.\.\.\s*,\s*\(?\s*(\d+)\s*x\s*(\d+)\s*\)?")


def anyres_max(strategy) -> int | None:
    """The N of `anyres_max_N` (N >= 1); None for any other image strategy or vision_aspect_ratio."""
    match = ANYRES.fullmatch(str(strategy))
    return int(match[1]) if match and int(match[1]) >= 1 else None


class MediaSettingError(ValueError):
    """A media setting that cannot be used; the message names the key and what is allowed."""


def _pair(cell) -> tuple[int, int] | None:
    """One grid cell: "RxC", "(RxC)" or a pair of integers."""
    if isinstance(cell, str):
        match = re.fullmatch(r"\(?\s*" + _CELL.pattern + r"\s*\)?", cell.strip())
        return (int(match[1]), int(match[2])) if match else None
    values = list(cell) if isinstance(cell, (list, tuple)) or hasattr(cell, "__len__") else []
    return tuple(values) if len(values) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in values) else None


def parse_grid(spec, key: str = "stage.image_grid") -> tuple[tuple[int, int], ...]:
    """Crop grids (rows, cols) from the range notation, an explicit "(RxC),..." string or a list."""
    grid = None
    if isinstance(spec, str):
        ranged = _RANGE.fullmatch(spec.strip())
        if ranged:
            r0, c0, r1, c1 = (int(g) for g in ranged.groups())
            grid = [(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
        elif re.fullmatch(r"[\s(),]*", _CELL.sub("", spec)):  # nothing but cells and separators
            grid = [(int(r), int(c)) for r, c in _CELL.findall(spec)]
    elif spec is not None and not isinstance(spec, (int, float)):
        grid = [_pair(cell) for cell in spec]
    if not grid or any(pair is None or min(pair) < 1 for pair in grid):
        raise MediaSettingError(
            f"{key}={spec!r}: expected crop grids as RxC (rows x columns, each >= 1): '(1x1),...,(6x6)',"
            " '(2x2),(1x2),(1x3),(2x1),(3x1)' or a list like [2x2, 1x3]"
        )
    return tuple(grid)


@dataclass(frozen=True)
class ImageSettings:
    strategy: str = "anyres_max_9"  # anyres_max_N, pad or square
    grid: tuple[tuple[int, int], ...] | None = None  # crop grids (rows, cols); None: the model config's
    rounding: str = "round"  # how anyres unpadding rounds: round (transformers) or truncate (the public code)

    @property
    def anyres(self) -> bool:
        return self.strategy not in SINGLE_CROP

    @property
    def max_crops(self) -> int | None:
        return anyres_max(self.strategy) if self.anyres else None

    def vision_aspect_ratio(self, model_default: str) -> str:
        """The model config's vision_aspect_ratio under this stage: its anyres_max_N, else the model's own."""
        return self.strategy if self.anyres else model_default

    @property
    def newline(self) -> bool:
        """Whether image (and video) features end rows with the newline embedding."""
        return self.strategy != "square"

    def crop_mode(self, images_in_sample: int) -> str:
        """How one image of a sample with `images_in_sample` images is cut: anyres, pad or square."""
        if self.anyres:
            return "anyres" if images_in_sample == 1 else "pad"
        return "square" if self.strategy == "square" and images_in_sample == 1 else "pad"

    def pinpoints(self, crop: int) -> tuple[tuple[int, int], ...] | None:
        return None if self.grid is None else tuple((r * crop, c * crop) for r, c in self.grid)

    @classmethod
    def from_stage(cls, stage) -> ImageSettings:
        strategy = str(stage.get("image_strategy"))
        if strategy not in SINGLE_CROP and anyres_max(strategy) is None:
            raise MediaSettingError(
                f"stage.image_strategy={stage.get('image_strategy')!r}; allowed: anyres_max_N (N >= 1, e.g."
                " anyres_max_9), pad (padded square crop + newline), square (squashed crop, no newline)"
            )
        reproduction = Reproduction.from_stage(stage)
        spec, public = stage.get("image_grid"), stage.get("public_image_grid")
        grid = parse_grid(spec) if spec is not None and strategy not in SINGLE_CROP else None
        if public is not None and strategy not in SINGLE_CROP:
            ordered = parse_grid(public, "stage.public_image_grid")
            if grid is None or sorted(ordered) != sorted(grid):
                raise MediaSettingError(
                    f"stage.public_image_grid={public!r} must list the grids of stage.image_grid={spec!r}, only in"
                    " another order (the public script's, whose ties go to the first)")
            grid = ordered if reproduction.public_grid else grid
        return cls(strategy, grid, reproduction.token_rounding)


@dataclass(frozen=True)
class VideoSettings:
    fps: float = 1.0  # frames per second of video sampled by `fps` sampling
    max_frames: int = 32
    sampling: str = "fps"  # fps or uniform
    frame_size: int | None = None  # decode frames at this square size; None: their own size
    pool: int = 2  # each frame's feature map pooled by this stride (the public mm_spatial_pool_stride; 1: none)
    newline: str = "one_token"  # where the newline embeddings go (constants.VIDEO_NEWLINES)

    # The stage's key for each field (a recipe source's `video:` mapping uses the field names).
    STAGE_KEYS = {"fps": "video_fps", "max_frames": "max_frames", "sampling": "frame_sampling", "frame_size": "frame_size",
                  "pool": "video_pool", "newline": "video_newline"}

    @classmethod
    def from_values(cls, values: dict, where: str, base: VideoSettings | None = None,
                    names: dict | None = None) -> VideoSettings:
        """`values` (field -> value) laid over `base`; every bad value is reported as `where.<name>`."""
        names = names or {}
        out, problems = {}, []
        for field, value in values.items():
            key = f"{where}.{names.get(field, field)}"
            if field not in cls.STAGE_KEYS:
                problems.append(f"{key}: no such video setting; allowed: {sorted(cls.STAGE_KEYS)}")
            elif field == "fps" and not (_number(value) and value > 0):
                problems.append(f"{key}={value!r} must be a number > 0 (frames sampled per second of video)")
            elif field == "max_frames" and not (_integer(value) and value >= 1):
                problems.append(f"{key}={value!r} must be an integer >= 1")
            elif field == "frame_size" and not (value is None or (_integer(value) and value >= 1)):
                problems.append(f"{key}={value!r} must be an integer >= 1 (decoded frame side) or null (their own size)")
            elif field == "sampling" and value not in FRAME_SAMPLINGS:
                problems.append(f"{key}={value!r}; allowed: {list(FRAME_SAMPLINGS)}")
            elif field == "pool" and not (_integer(value) and value >= 1):
                problems.append(f"{key}={value!r} must be an integer >= 1 (the pooling stride of each frame's feature"
                                " map: 2 gives 196 tokens a 384 px frame, 3 gives 81, 4 gives 49, 1 no pooling)")
            elif field == "newline" and value not in VIDEO_NEWLINES:
                problems.append(f"{key}={value!r}; allowed: {list(VIDEO_NEWLINES)}")
            else:
                out[field] = value
        if problems:
            raise MediaSettingError("\n".join(problems))
        return dataclasses.replace(base or cls(), **out)

    @classmethod
    def from_stage(cls, stage) -> VideoSettings:
        values = {field: stage.get(key) for field, key in cls.STAGE_KEYS.items() if key in stage}
        return cls.from_values(values, "stage", names=cls.STAGE_KEYS)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class MediaSettings:
    image: ImageSettings = ImageSettings()
    video: VideoSettings = VideoSettings()
    per_source: tuple[tuple[str, VideoSettings], ...] = ()  # a recipe source's own video settings

    @classmethod
    def of(cls, image_strategy: str, max_frames: int = VideoSettings.max_frames) -> MediaSettings:
        """The settings of a stage that sets only its image strategy and its videos' frame cap."""
        return cls(ImageSettings.from_stage({"image_strategy": image_strategy}), VideoSettings(max_frames=max_frames))

    def video_for(self, source: str | None) -> VideoSettings:
        return dict(self.per_source).get(source, self.video)

    def to_dict(self) -> dict:
        """Plain data for the model config (config.json of exports): what training fed the model."""
        return {
            "image_strategy": self.image.strategy,
            "image_grid": None if self.image.grid is None else [list(g) for g in self.image.grid],
            "token_rounding": self.image.rounding,
            "video": dataclasses.asdict(self.video),
        }


def read_media(stage, sources=()) -> tuple[MediaSettings | None, list[str]]:
    """The stage's media settings, each recipe source's `video:` (checked by config/recipe.py) laid over the stage's
    video settings; or None and every problem of the stage's media keys, one line each."""
    problems, image, video = [], None, None
    try:
        image = ImageSettings.from_stage(stage)
    except MediaSettingError as err:
        problems += str(err).splitlines()
    try:
        video = VideoSettings.from_stage(stage)
    except MediaSettingError as err:
        problems += str(err).splitlines()
    if problems:
        return None, problems
    per_source = tuple((s.name, dataclasses.replace(video, **dict(s.video))) for s in sources if s.video)
    return MediaSettings(image, video, per_source), []
