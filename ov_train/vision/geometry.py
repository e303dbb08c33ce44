"""Vision-tower geometry: crop size, patch size, anyres grid and normalisation constants."""

from dataclasses import dataclass

from ov_train.config.media import anyres_max
from ov_train.vision.settings import recorded_media


@dataclass(frozen=True)
class VisionGeometry:
    image_size: int  # crop side in pixels
    patch_size: int
    grid_pinpoints: tuple[tuple[int, int], ...]  # candidate anyres canvases, (height, width)
    max_crops: int = 9  # the N of anyres_max_N
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # How anyres unpadding rounds the kept side (stage.token_rounding): round as transformers, or truncate as the
    # public LLaVA-NeXT code; counts (vision/tokens.py) and the model's packing (model/forward.py) both follow it.
    rounding: str = "round"

    @property
    def side(self) -> int:
        """Patches per crop side, i.e. a crop becomes side * side tokens."""
        return self.image_size // self.patch_size

    @classmethod
    def from_model_config(cls, config) -> "VisionGeometry":
        """Read the geometry the model itself uses from a LlavaOnevisionConfig (with the rounding its recorded
        stage media settings name, vision/settings.py; transformers' otherwise)."""
        return cls(
            image_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size,
            grid_pinpoints=tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints),
            max_crops=max_crops(config.vision_aspect_ratio),
            rounding=recorded_media(config).get("token_rounding") or "round",
        )

    @classmethod
    def of(cls, image_size: int, patch_size: int, vision_aspect_ratio: str, rounding: str = "round") -> "VisionGeometry":
        """The geometry a model config's keys describe (model.vision, model.vision_aspect_ratio), with the
        default anyres grid model/build.py gives the model."""
        return cls(image_size, patch_size, default_pinpoints(image_size), max_crops(vision_aspect_ratio),
                   rounding=rounding)


def max_crops(vision_aspect_ratio: str) -> int:
    """The N of anyres_max_N."""
    crops = anyres_max(vision_aspect_ratio)
    if crops is None:
        raise ValueError(f"unsupported vision_aspect_ratio {vision_aspect_ratio!r}; expected 'anyres_max_N'")
    return crops


def default_pinpoints(image_size: int, max_grid: int = 6) -> tuple[tuple[int, int], ...]:
    """(i*size, j*size) for i, j in 1..max_grid, height-major like transformers' default list.

    The order matters: best-resolution selection keeps the first candidate on ties.
    """
    steps = range(1, max_grid + 1)
    return tuple((i * image_size, j * image_size) for i in steps for j in steps)
