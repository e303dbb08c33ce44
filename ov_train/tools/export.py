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


def model_from_checkpoint(ckpt_path: str | Path):
    """Rebuild the trained model from a Lightning checkpoint written by ov_train; returns (model, tokenizer_dir)."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    meta = ckpt.get("ov_train")
    if meta is None:
        raise ValueError(f"{ckpt_path}: not an ov_train checkpoint (no 'ov_train' metadata)")
    model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig.from_dict(meta["model_config"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    return model, meta.get("tokenizer_dir")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ov_train.model.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="ov-export", description=__doc__)
    parser.add_argument("ckpt", help="a Lightning checkpoint written by ov_train (e.g. RUN/checkpoints/last.ckpt)")
    parser.add_argument("out", help="output directory for the Hugging Face export")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded in the checkpoint)")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint not found: {args.ckpt}")
    model, tokenizer_dir = model_from_checkpoint(args.ckpt)
    tokenizer_dir = args.tokenizer or tokenizer_dir
    if not tokenizer_dir or not Path(tokenizer_dir).exists():
        parser.error(f"tokenizer directory not found: {tokenizer_dir!r}; pass --tokenizer DIR")
    export_pretrained(model, load_tokenizer(tokenizer_dir), args.out)
    print(f"exported {args.ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
