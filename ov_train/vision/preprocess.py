"""Pixels for the vision tower: anyres crops, padded single crops and video frames.

Matches transformers' LlavaOnevisionImageProcessorPil: every resize is PIL BICUBIC on
uint8 pixels, then rescale by 1/255 and normalise with the geometry's mean/std.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.tokens import anyres_tokens, best_resolution, single_crop_tokens


@dataclass
class ImageCrops:
    pixel_values: torch.Tensor  # float32 [n_crops, 3, S, S]
    size: tuple[int, int]  # original (height, width)
    anyres: bool  # True: base crop + grid crops; False: one padded square crop
    num_tokens: int  # visual tokens this image becomes in the model


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


def _anyres_crops(image: Image.Image, geom: VisionGeometry) -> np.ndarray:
    """Base crop (whole image squashed to S x S) followed by the grid crops, row-major."""
    s = geom.image_size
    width, height = image.size
    canvas_h, canvas_w = best_resolution(height, width, geom)
    fit_h, fit_w = _fit_size(height, width, canvas_h, canvas_w)
    # Centre the resized image on a black canvas; an odd remainder goes to the bottom/right.
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    top, left = (canvas_h - fit_h) // 2, (canvas_w - fit_w) // 2
    canvas[top : top + fit_h, left : left + fit_w] = np.asarray(image.resize((fit_w, fit_h), Image.BICUBIC))
    base = np.asarray(image.resize((s, s), Image.BICUBIC))
    grid = [canvas[r : r + s, c : c + s] for r in range(0, canvas_h, s) for c in range(0, canvas_w, s)]
    return np.stack([base, *grid])


def _square_crop(image: Image.Image, geom: VisionGeometry) -> np.ndarray:
    """Pad to a square with the mean colour (so padding normalises to ~0), then resize to S x S."""
    s = geom.image_size
    width, height = image.size
    if width != height:
        side = max(width, height)
        fill = tuple(int(m * 255) for m in geom.image_mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    return np.stack([np.asarray(image.resize((s, s), Image.BICUBIC))])


def preprocess_image(image: Image.Image, geom: VisionGeometry, anyres: bool) -> ImageCrops:
    """Crops for one image: anyres (single-image samples) or one padded square crop."""
    image = image.convert("RGB")
    width, height = image.size
    if anyres:
        crops, num_tokens = _anyres_crops(image, geom), anyres_tokens(height, width, geom)
    else:
        crops, num_tokens = _square_crop(image, geom), single_crop_tokens(geom)
    return ImageCrops(
        pixel_values=_normalize(crops, geom), size=(height, width), anyres=anyres, num_tokens=num_tokens
    )


def resize_frames(frames: np.ndarray, geom: VisionGeometry) -> np.ndarray:
    """uint8 [F, H, W, 3] video frames -> uint8 [F, S, S, 3], each squashed to S x S without padding."""
    s = geom.image_size
    return np.stack([np.asarray(Image.fromarray(frame).resize((s, s), Image.BICUBIC)) for frame in frames])


def preprocess_frames(frames: np.ndarray, geom: VisionGeometry) -> torch.Tensor:
    """uint8 [F, H, W, 3] video frames -> float32 [F, 3, S, S], each squashed to S x S without padding."""
    return _normalize(resize_frames(frames, geom), geom)
