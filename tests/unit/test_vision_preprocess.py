"""Pixel parity with transformers' LlavaOnevisionImageProcessorPil, plus crop layout and frames."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionImageProcessorPil

from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.preprocess import ImageCrops, preprocess_frames, preprocess_image

TINY = VisionGeometry(image_size=32, patch_size=8, grid_pinpoints=default_pinpoints(32))
REAL = VisionGeometry(image_size=384, patch_size=14, grid_pinpoints=default_pinpoints(384))
SIZES = [(20, 20), (32, 32), (32, 64), (70, 30), (100, 250), (200, 60), (17, 190), (33, 31)]


@pytest.fixture(scope="module")
def stock_processor():
    return LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=[list(p) for p in TINY.grid_pinpoints],
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _noise_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_anyres_pixels_match_stock_processor(stock_processor, height, width):
    image = _noise_image(height, width)
    ours = preprocess_image(image, TINY, anyres=True)
    stock = stock_processor(images=[image], return_tensors="pt")
    assert stock["pixel_values"].shape[1] == ours.pixel_values.shape[0]
    torch.testing.assert_close(ours.pixel_values, stock["pixel_values"][0], atol=1e-5, rtol=0)
    assert ours.size == (height, width) and ours.anyres


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_single_crop_pixels_match_stock_processor(stock_processor, height, width):
    image, other = _noise_image(height, width), _noise_image(40, 90, seed=1)
    ours = preprocess_image(image, TINY, anyres=False)
    # Two images in one sample make the stock processor pad to square instead of tiling.
    stock = stock_processor(images=[[image, other]], return_tensors="pt")
    assert ours.pixel_values.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours.pixel_values, stock["pixel_values"][0, :1], atol=1e-5, rtol=0)
    assert not ours.anyres and ours.num_tokens == 17


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_converted(stock_processor, mode):
    image = _noise_image(50, 120, mode=mode)
    ours = preprocess_image(image, TINY, anyres=True)
    stock = stock_processor(images=[image], return_tensors="pt")
    torch.testing.assert_close(ours.pixel_values, stock["pixel_values"][0], atol=1e-5, rtol=0)


def test_real_geometry_anyres_layout():
    crops = preprocess_image(_noise_image(480, 640), REAL, anyres=True)
    assert isinstance(crops, ImageCrops)
    # 480x640 fits the 768x768 pinpoint: base crop + 2x2 grid.
    assert crops.pixel_values.shape == (5, 3, 384, 384)
    assert crops.pixel_values.dtype == torch.float32
    assert crops.size == (480, 640) and crops.num_tokens == 2929
    # Letterbox rows (zero pixels) normalise to -1 with SigLIP's 0.5/0.5: 768x768 holds a 576-row image,
    # so the top 96 rows of the first grid row are padding.
    assert torch.all(crops.pixel_values[1, :, :96] == -1.0)


def test_real_geometry_single_crop_pads_with_mean():
    crops = preprocess_image(_noise_image(200, 600), REAL, anyres=False)
    assert crops.pixel_values.shape == (1, 3, 384, 384) and crops.num_tokens == 730
    # Mean-colour padding (int(0.5*255) = 127) sits near 0 after normalisation.
    top_rows = crops.pixel_values[0, :, :100]
    assert torch.allclose(top_rows, torch.full_like(top_rows, 127 / 127.5 - 1), atol=1e-6)


def test_preprocess_frames_shape_and_values():
    frames = np.zeros((4, 30, 50, 3), dtype=np.uint8)
    frames[..., 0] = 255  # pure red: channels normalise to +1, -1, -1
    pixels = preprocess_frames(frames, TINY)
    assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[:, 0], torch.ones(4, 32, 32))
    assert torch.allclose(pixels[:, 1:], -torch.ones(4, 2, 32, 32))


def test_preprocess_frames_matches_single_frame_resize():
    frame = np.random.default_rng(3).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(frame).resize((32, 32), Image.BICUBIC), dtype=np.float32)
    expected = torch.from_numpy(resized / 127.5 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(preprocess_frames(frame[None], TINY)[0], expected, atol=1e-5, rtol=0)
