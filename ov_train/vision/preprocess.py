"""Pixels for the vision tower: anyres crops, padded or squashed single crops and video frames.

Matches transformers' LlavaOnevisionImageProcessorPil: every resize is PIL BICUBIC on
uint8 pixels, then rescale by 1/255 and normalise with the geometry's mean/std.

data.decode=fast (`open_image(..., fast=True)`) decodes a JPEG at a reduced size where its crops need fewer pixels
than the file has: libjpeg scales by 1/2, 1/4 or 1/8 inside the DCT (PIL's `draft`), to the smallest size at or
above what the crops are resized to, so the resize that follows starts from fewer pixels; with torchvision
installed, full-size JPEGs decode with its decoder and every resize is its bicubic on uint8 tensors
(vision/pixels.py). Token counts and image sizes stay those of the full image; pixels differ from the exact decode
(docs/PERFORMANCE.md gives the measured difference and its accuracy effect).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ov_train.vision import pixels
from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.pixels import dims, open_pixels, padded_square, resized
from ov_train.vision.tokens import anyres_tokens, best_resolution, single_crop_tokens


@dataclass
class ImageCrops:
    pixel_values: torch.Tensor  # float32 [n_crops, 3, S, S]
    size: tuple[int, int]  # original (height, width)
    anyres: bool  # True: base crop + grid crops; False: one square crop
    num_tokens: int  # visual tokens this image becomes in the model
    newline: bool = True  # single crops: whether the newline embedding follows the crop's features


def _normalize(pixels: np.ndarray, geom: VisionGeometry) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], rescaled to [0, 1] then standardised."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(geom.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(geom.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def _fit_size(height: int, width: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
    """Largest aspect-preserving size inside the canvas, rounding the short side up like transformers."""
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


def _anyres_crops(image: Image.Image | torch.Tensor, geom: VisionGeometry,
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """Base crop (whole image squashed to S x S) followed by the grid crops, row-major. `size`: the full image's
    (height, width) when `image` was decoded smaller; the canvas and fit are the full image's."""
    s = geom.image_size
    height, width = size or dims(image)
    canvas_h, canvas_w = best_resolution(height, width, geom)
    fit_h, fit_w = _fit_size(height, width, canvas_h, canvas_w)
    # Centre the resized image on a black canvas; an odd remainder goes to the bottom/right.
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    top, left = (canvas_h - fit_h) // 2, (canvas_w - fit_w) // 2
    canvas[top : top + fit_h, left : left + fit_w] = resized(image, fit_w, fit_h)
    base = _squashed_crop(image, geom)[0]
    grid = [canvas[r : r + s, c : c + s] for r in range(0, canvas_h, s) for c in range(0, canvas_w, s)]
    return np.stack([base, *grid])


def _square_crop(image: Image.Image | torch.Tensor, geom: VisionGeometry) -> np.ndarray:
    """Pad to a square with the mean colour (so padding normalises to ~0), then resize to S x S."""
    s = geom.image_size
    square = padded_square(image, tuple(int(m * 255) for m in geom.image_mean))
    return np.stack([resized(square, s, s)])


def _squashed_crop(image: Image.Image | torch.Tensor, geom: VisionGeometry) -> np.ndarray:
    """The whole image resized to S x S, aspect ratio not kept (the public code's stage-1 `square`)."""
    s = geom.image_size
    return np.stack([resized(image, s, s)])


def needed_size(height: int, width: int, geom: VisionGeometry, mode: str) -> tuple[int, int]:
    """(width, height) of pixels an image's crops are resized from, at most: below it a smaller decode would lose
    detail the crops keep."""
    s = geom.image_size
    if mode == "anyres":
        fit_h, fit_w = _fit_size(height, width, *best_resolution(height, width, geom))
        return max(fit_w, s), max(fit_h, s)  # the grid's fit, and the base crop squashed to S x S
    if mode == "pad":
        side = max(height, width)  # padded to a square, then resized to S x S
        return math.ceil(width * s / side), math.ceil(height * s / side)
    return s, s  # square: squashed to S x S


def open_image(data: bytes, geom: VisionGeometry, mode: str,
               fast: bool = False) -> tuple[Image.Image | torch.Tensor, tuple[int, int]]:
    """An image file's pixels for crops cut as `mode`, and the full image's (height, width). With `fast`, a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers needed_size, other formats in full, and
    with torchvision installed the pixels come as a uint8 [3, H, W] tensor that its resizes take
    (vision/pixels.py)."""
    return open_pixels(data, lambda height, width: needed_size(height, width, geom, mode), fast)


def preprocess_image(image: Image.Image | torch.Tensor, geom: VisionGeometry, anyres: bool = False,
                     mode: str | None = None, size: tuple[int, int] | None = None) -> ImageCrops:
    """Crops for one image, cut as `mode` (ov_train.config.media.ImageSettings.crop_mode): anyres,
    pad (one padded square crop + newline) or square (one squashed crop, no newline); `anyres` picks
    between the first two. `size`: the full image's (height, width) when `image` is a reduced decode of it
    (open_image): tokens and the anyres layout are the full image's."""
    mode = mode or ("anyres" if anyres else "pad")
    if not isinstance(image, torch.Tensor):
        image = image.convert("RGB")
    height, width = size or dims(image)
    if mode == "anyres":
        crops, num_tokens = _anyres_crops(image, geom, (height, width)), anyres_tokens(height, width, geom)
    elif mode in ("pad", "square"):
        crops = _square_crop(image, geom) if mode == "pad" else _squashed_crop(image, geom)
        num_tokens = single_crop_tokens(geom, newline=mode == "pad")
    else:
        raise ValueError(f"crop mode {mode!r}; allowed: anyres, pad, square")
    return ImageCrops(
        pixel_values=_normalize(crops, geom), size=(height, width), anyres=mode == "anyres",
        num_tokens=num_tokens, newline=mode != "square",
    )


def resize_frames(frames: np.ndarray, geom: VisionGeometry, fast: bool = False) -> np.ndarray:
    """uint8 [F, H, W, 3] video frames -> uint8 [F, S, S, 3], each squashed to S x S without padding: PIL's bicubic,
    or with `fast` and torchvision installed its bicubic on all frames at once (vision/pixels.py)."""
    s = geom.image_size
    if fast and pixels.TORCHVISION:
        return resized(torch.from_numpy(frames).permute(0, 3, 1, 2), s, s)
    return np.stack([resized(Image.fromarray(frame), s, s) for frame in frames])


def preprocess_frames(frames: np.ndarray, geom: VisionGeometry, fast: bool = False) -> torch.Tensor:
    """uint8 [F, H, W, 3] video frames -> float32 [F, 3, S, S], each squashed to S x S without padding."""
    return _normalize(resize_frames(frames, geom, fast), geom)
