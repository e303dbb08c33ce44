"""data.decode: `exact` gives the stock processor's pixels from JPEG bytes; `fast` decodes a large JPEG at a reduced
DCT scale, keeps the full image's tokens and layout, and stays close to the exact pixels on a photo-like image."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionImageProcessorPil

from ov_train.config.media import ImageSettings, MediaSettings, VideoSettings
from ov_train.data.samples import SampleProcessor
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.pixels import dims
from ov_train.vision.preprocess import needed_size, open_image, preprocess_image

GEOM = VisionGeometry(image_size=64, patch_size=8, grid_pinpoints=default_pinpoints(64))


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients and blobs with mild noise: what camera photos look like to a DCT (not white noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for c in range(3):
        f = rng.uniform(2, 6, 2)
        channels.append(128 + 90 * np.sin(f[0] * 6.28 * x + c) * np.cos(f[1] * 6.28 * y))
    pixels = np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["anyres", "pad", "square"])
def test_exact_decode_equals_the_full_decode(mode):
    data = _jpeg(_photo(600, 900))
    image, size = open_image(data, GEOM, mode, fast=False)
    assert image.size == (900, 600) and size == (600, 900)
    exact = preprocess_image(image, GEOM, mode=mode, size=size)
    assert torch.equal(exact.pixel_values, preprocess_image(Image.open(io.BytesIO(data)), GEOM, mode=mode).pixel_values)


def test_exact_decode_equals_the_stock_processor_on_jpeg_bytes():
    data = _jpeg(_photo(300, 500))
    stock = LlavaOnevisionImageProcessorPil(size={"height": 64, "width": 64},
                                            image_grid_pinpoints=[list(p) for p in GEOM.grid_pinpoints],
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image, size = open_image(data, GEOM, "anyres")
    ours = preprocess_image(image, GEOM, mode="anyres", size=size)
    ref = stock(images=[Image.open(io.BytesIO(data))], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours.pixel_values, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode, scale", [("pad", 8), ("square", 8), ("anyres", 4)])
def test_fast_decode_reduces_keeps_tokens_and_stays_close(mode, scale):
    pixels = _photo(1200, 1600, seed=1)
    data = _jpeg(pixels)
    exact_image, size = open_image(data, GEOM, mode, fast=False)
    fast_image, fast_size = open_image(data, GEOM, mode, fast=True)
    assert fast_size == size == (1200, 1600)
    assert dims(fast_image) == (1200 // scale, 1600 // scale)
    # Never below what the crops are resized to.
    need_w, need_h = needed_size(1200, 1600, GEOM, mode)
    assert dims(fast_image)[1] >= need_w and dims(fast_image)[0] >= need_h
    exact = preprocess_image(exact_image, GEOM, mode=mode, size=size)
    fast = preprocess_image(fast_image, GEOM, mode=mode, size=fast_size)
    assert fast.num_tokens == exact.num_tokens and fast.size == exact.size
    assert fast.pixel_values.shape == exact.pixel_values.shape
    diff = (fast.pixel_values - exact.pixel_values).abs()
    # Normalised units (2 = the full 0..255 range): the reduced decode averages what the bicubic resize would.
    assert diff.mean() < 0.03 and diff.max() < 0.5


def test_fast_decode_leaves_png_and_small_jpeg_whole():
    buf = io.BytesIO()
    Image.fromarray(_photo(800, 800)).save(buf, format="PNG")
    image, _ = open_image(buf.getvalue(), GEOM, "pad", fast=True)
    assert dims(image) == (800, 800)
    image, _ = open_image(_jpeg(_photo(100, 90)), GEOM, "pad", fast=True)
    assert dims(image) == (100, 90)  # 1/2 would fall under the 64 px crop


def test_sample_processor_decode_switch(tiny_model_and_tokenizer):
    """SampleProcessor(decode=fast) takes the reduced decode; exact and fast agree on ids and crop counts."""
    _, tokenizer = tiny_model_and_tokenizer
    media = MediaSettings(ImageSettings.from_stage({"image_strategy": "anyres_max_9"}), VideoSettings(max_frames=4))
    raw = {"__key__": "k", "img0.jpg": _jpeg(_photo(700, 1000)), "img1.jpg": _jpeg(_photo(900, 500, seed=2)),
           "json": json.dumps({"conversations": [{"from": "human", "value": "<image>\n<image>\nWhat?"},
                                                 {"from": "gpt", "value": "Shapes."}]}).encode()}
    out = {}
    for decode in ("exact", "fast"):
        process = SampleProcessor(tokenizer, GEOM, "qwen_1_5", media, 8192, decode=decode)
        out[decode] = process(raw)
    assert torch.equal(out["exact"]["input_ids"], out["fast"]["input_ids"])
    exact = torch.cat([i.pixel_values for i in out["exact"]["images"]])
    fast = torch.cat([i.pixel_values for i in out["fast"]["images"]])
    assert exact.shape == fast.shape and not torch.equal(exact, fast)
    assert (exact - fast).abs().mean() < 0.03
