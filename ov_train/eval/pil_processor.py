"""The stock LLaVA-OneVision processor without torchvision: `pip install .` leaves it out (it would pull a CUDA
torch beside a CPU one), and transformers builds its video processor (and its Auto classes) only with it.

The processor is LlavaOnevisionProcessor itself, from the export's own files (either layout: ov-export's
preprocessor_config.json / video_preprocessor_config.json, or transformers 5's processor_config.json), with
transformers' PIL image processor and PilVideoProcessor below: the stock video processor's resize, rescale and
normalisation done with PIL and numpy. Its output equals the stock processor's (tests/unit/test_pil_processor.py).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    BaseVideoProcessor,
    BatchFeature,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)

# What the processor takes from the export's processor settings (processor_config.json, chat template files).
PROCESSOR_KEYS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token",
                  "video_token", "chat_template")
VIDEO_KEYS = ("size", "image_mean", "image_std", "rescale_factor", "do_resize", "do_rescale", "do_normalize")


class PilVideoProcessor(BaseVideoProcessor):
    """Video frames -> `pixel_values_videos` [videos, frames, 3, H, W], as LlavaOnevisionVideoProcessor computes them
    (squash each frame to `size` with a bicubic resize, rescale, normalise), with PIL instead of torchvision."""

    model_input_names = ["pixel_values_videos"]

    def __init__(self, size: dict, image_mean, image_std, rescale_factor: float = 1 / 255, do_resize: bool = True,
                 do_rescale: bool = True, do_normalize: bool = True):
        # Without torchvision, transformers' top-level BaseVideoProcessor is a placeholder whose __init__ refuses, and the
        # processor checks its video processor against that name: so this subclasses whichever class it is.
        with contextlib.suppress(ImportError):
            super().__init__()
        self.size, self.image_mean, self.image_std = dict(size), list(image_mean), list(image_std)
        self.rescale_factor, self.do_resize = rescale_factor, do_resize
        self.do_rescale, self.do_normalize = do_rescale, do_normalize

    def _frames(self, video) -> np.ndarray:
        frames = [np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in video]
        if self.do_resize:
            height, width = self.size["height"], self.size["width"]
            frames = [f if f.shape[:2] == (height, width) else
                      np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames]
        pixels = np.stack(frames).astype(np.float32)
        if self.do_rescale:
            pixels = pixels * np.float32(self.rescale_factor)
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

    def __call__(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        single = isinstance(videos, np.ndarray) and videos.ndim == 4
        processed = [self._frames(v) for v in ([videos] if single else videos)]
        same = len({tuple(p.shape) for p in processed}) == 1
        values = torch.stack(processed) if same else processed
        return BatchFeature({"pixel_values_videos": values}, tensor_type=return_tensors if same else None)


def video_settings(path: Path, settings: dict) -> dict:
    """The export's video processor settings: video_preprocessor_config.json, else processor_config.json's."""
    file = path / "video_preprocessor_config.json"
    found = json.loads(file.read_text()) if file.is_file() else settings.get("video_processor") or {}
    return {k: found[k] for k in VIDEO_KEYS if k in found}


def pil_processor(path: str | Path) -> LlavaOnevisionProcessor:
    """The export's LlavaOnevisionProcessor, on PIL alone."""
    path = Path(path)
    settings, _ = LlavaOnevisionProcessor.get_processor_dict(str(path))
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(str(path)),
        tokenizer=AutoTokenizer.from_pretrained(str(path)),
        video_processor=PilVideoProcessor(**video_settings(path, settings)),
        **{k: settings[k] for k in PROCESSOR_KEYS if k in settings},
    )
