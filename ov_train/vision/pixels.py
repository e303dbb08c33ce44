"""The pixel operations behind data.decode, and the one place that picks whose they are.

`exact` decodes and resizes with PIL: the pixels of transformers' LlavaOnevisionImageProcessorPil, bit for bit.
`fast` decodes a JPEG at a reduced DCT scale where the crops need fewer pixels (PIL's `draft`), and, where
torchvision is installed, decodes full-size JPEGs with torchvision.io.decode_jpeg and resizes uint8 tensors with
torchvision's bicubic (antialiased) kernel, 4-7x as fast as PIL's on this project's media. Its resizes are not PIL's
bit for bit (within 2 pixel levels of 255 on photos, more on hard edges: docs/PERFORMANCE.md), so `exact` never uses
them. Without torchvision, `fast` resizes with PIL.

An image is a PIL image (PIL path) or a uint8 [3, H, W] tensor (torchvision path); the helpers take either.
"""
from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

try:  # optional: not a core dependency (it would pull a CUDA torch onto a CPU install); PIL does everything without it
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2.functional import InterpolationMode
    from torchvision.transforms.v2.functional import resize as tensor_resize
except ImportError:
    decode_jpeg = None

TORCHVISION = decode_jpeg is not None


def dims(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(height, width)."""
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else image.size[::-1]


def resized(image: Image.Image | torch.Tensor, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3], bicubic: PIL's on a PIL image, torchvision's (antialiased) on a tensor; a tensor of
    several images [N, 3, H, W] gives [N, height, width, 3]."""
    if isinstance(image, torch.Tensor):
        out = tensor_resize(image, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return out.movedim(-3, -1).numpy()
    return np.asarray(image.resize((width, height), Image.BICUBIC))


def padded_square(image: Image.Image | torch.Tensor, fill: tuple[int, int, int]) -> Image.Image | torch.Tensor:
    """The image centred on a square of colour `fill`, its longer side; the odd remainder goes bottom/right."""
    height, width = dims(image)
    if width == height:
        return image
    side = max(width, height)
    top, left = (side - height) // 2, (side - width) // 2
    if isinstance(image, torch.Tensor):
        square = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1).repeat(1, side, side)
        square[:, top:top + height, left:left + width] = image
        return square
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, (left, top))
    return square


def open_pixels(data: bytes, needed: Callable[[int, int], tuple[int, int]],
                fast: bool) -> tuple[Image.Image | torch.Tensor, tuple[int, int]]:
    """An image file's pixels and its full (height, width). `needed(height, width)`: the (width, height) the crops
    are resized from at most (preprocess.needed_size). Exact: a lazily decoded PIL image. Fast: a JPEG decoded at
    the smallest DCT scale (1/2, 1/4, 1/8) at or above `needed`; with torchvision, as a uint8 tensor (by
    decode_jpeg when no scale applies)."""
    image = Image.open(io.BytesIO(data))
    size = image.size[::-1]
    if not fast:
        return image, size
    if image.format == "JPEG":
        image.draft("RGB", needed(*size))
    if not TORCHVISION:
        return image, size
    if image.format == "JPEG" and image.size[::-1] == size:  # no reduced scale: torchvision's decoder, no PIL copy
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB), size
        except RuntimeError:  # a JPEG flavour libjpeg under torchvision refuses: PIL's decoder below
            pass
    with image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1), size
