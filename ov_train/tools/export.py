"""Write a Hugging Face directory (model, tokenizer, processor settings) that stock transformers loads."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import LlavaOnevisionImageProcessorPil

from ov_train.vision.geometry import VisionGeometry


def processor_settings(geometry: VisionGeometry) -> dict:
    size = {"height": geometry.image_size, "width": geometry.image_size}
    return {
        "size": size,
        "image_grid_pinpoints": [list(p) for p in geometry.grid_pinpoints],
        "image_mean": list(geometry.image_mean),
        "image_std": list(geometry.image_std),
    }


def export_pretrained(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained of model and tokenizer, plus image, video and processor settings of the same geometry."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    geometry = VisionGeometry.from_model_config(model.config)
    settings = processor_settings(geometry)
    LlavaOnevisionImageProcessorPil(**settings).save_pretrained(out)
    # The video processor needs torchvision to be built; its settings are plain data, written as such.
    video = {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "size": settings["size"],
        "image_mean": settings["image_mean"],
        "image_std": settings["image_std"],
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    processor = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": geometry.side * geometry.side,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "vision_aspect_ratio": model.config.vision_aspect_ratio,
        "image_token": "<image>",
        "video_token": "<video>",
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out
