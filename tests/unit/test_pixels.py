"""vision/pixels.py: data.decode=fast takes torchvision's decoder and resizes where installed, PIL's where not.

torchvision's bicubic resize on uint8 is not PIL's bit for bit: within 2 pixel levels on photos (1 level = 1/255,
0.0078 normalised at std 0.5), more on hard edges (docs/PERFORMANCE.md), so only `fast` uses it; `exact` stays PIL's
(tests/unit/test_image_decode.py: equal to the stock processor)."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ov_train.bench.media import jpeg, photo, scan
from ov_train.vision import pixels
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.preprocess import open_image, preprocess_image, resize_frames

GEOM = VisionGeometry(image_size=64, patch_size=8, grid_pinpoints=default_pinpoints(64))
LEVEL = 1 / 255 / 0.5  # one uint8 level after rescale and normalisation (std 0.5)

needs_torchvision = pytest.mark.skipif(not pixels.TORCHVISION, reason="torchvision not installed")


@needs_torchvision
@pytest.mark.parametrize("size", [(384, 384), (120, 90), (1000, 700)])
def test_torchvision_resize_within_one_level_of_pil(size):
    image = Image.fromarray(photo(600, 800, np.random.default_rng(0)))
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    ours, theirs = pixels.resized(tensor, *size), pixels.resized(image, *size)
    assert ours.shape == theirs.shape == (size[1], size[0], 3)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 2  # not bit-equal (hence exact keeps PIL), within two levels on a photo
    assert diff.mean() < 0.02


@needs_torchvision
def test_fast_full_size_jpeg_is_torchvisions_decode_equal_to_pils():
    data = jpeg(photo(100, 90, np.random.default_rng(1)))  # no DCT scale fits under a 64 px crop: decoded whole
    image, size = open_image(data, GEOM, "pad", fast=True)
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and size == (100, 90)
    # Both run libjpeg-turbo's default (islow) IDCT and fancy upsampling: the same pixels.
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))))


@needs_torchvision
@pytest.mark.parametrize("mode", ["anyres", "pad", "square"])
@pytest.mark.parametrize("height, width", [(1200, 1600), (700, 500), (90, 100)])
def test_fast_crops_with_torchvision_within_two_levels_of_fast_pil(mode, height, width, monkeypatch):
    """Same decode (reduced where it applies), resizes torchvision's vs PIL's: crops within two levels on a photo;
    tokens equal."""
    data = jpeg(photo(height, width, np.random.default_rng(2)))
    image, size = open_image(data, GEOM, mode, fast=True)
    assert isinstance(image, torch.Tensor)
    fast = preprocess_image(image, GEOM, mode=mode, size=size)
    monkeypatch.setattr(pixels, "TORCHVISION", False)
    pil_image, pil_size = open_image(data, GEOM, mode, fast=True)
    assert isinstance(pil_image, Image.Image) and pil_image.size[::-1] == tuple(image.shape[1:])
    pil = preprocess_image(pil_image, GEOM, mode=mode, size=pil_size)
    assert fast.num_tokens == pil.num_tokens and fast.pixel_values.shape == pil.pixel_values.shape
    assert (fast.pixel_values - pil.pixel_values).abs().max() <= 2 * LEVEL + 1e-6


@needs_torchvision
def test_fast_pad_crop_of_a_scan_with_torchvision():
    """A portrait A4 scan (hard black-on-white edges), padded crop: the reduced decode and torchvision resize keep
    the crop's geometry; the mean-colour padding is the same colour."""
    pixels_ = scan(700, 496, np.random.default_rng(3))
    data = jpeg(pixels_)
    exact = preprocess_image(*open_image(data, GEOM, "pad")[:1], GEOM, mode="pad")
    image, size = open_image(data, GEOM, "pad", fast=True)
    fast = preprocess_image(image, GEOM, mode="pad", size=size)
    assert tuple(image.shape[1:]) == (math.ceil(700 / 8), math.ceil(496 / 8))  # libjpeg rounds up
    diff = (fast.pixel_values - exact.pixel_values).abs()
    assert diff[..., :, :8].max() < 1e-6  # the left padding band: mean colour in both
    assert diff.mean() < 0.1  # the 1/8 decode averages the text's edges before the resize does


@needs_torchvision
def test_fast_frames_within_two_levels():
    frames = np.stack([photo(72, 128, np.random.default_rng(s)) for s in range(3)])
    exact, fast = resize_frames(frames, GEOM), resize_frames(frames, GEOM, fast=True)
    assert exact.shape == fast.shape == (3, 64, 64, 3)
    assert np.abs(exact.astype(int) - fast.astype(int)).max() <= 2


def test_without_torchvision_fast_is_pils(monkeypatch):
    """The fallback: PIL's reduced decode and PIL's resizes; frames equal the exact ones."""
    monkeypatch.setattr(pixels, "TORCHVISION", False)
    data = jpeg(photo(1200, 1600, np.random.default_rng(4)))
    image, size = open_image(data, GEOM, "pad", fast=True)
    assert isinstance(image, Image.Image) and image.size == (200, 150) and size == (1200, 1600)
    frames = np.stack([photo(72, 128, np.random.default_rng(5))])
    assert np.array_equal(resize_frames(frames, GEOM, fast=True), resize_frames(frames, GEOM))
