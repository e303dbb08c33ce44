"""Write a Hugging Face export: a directory (model, tokenizer, processor settings) that stock transformers loads,
from a model in memory (export_pretrained) or from any checkpoint ov_train writes (export_checkpoint: sharded ones
consolidated, adapter ones merged into their base). Used at the end of a run (run.py) and by `ov-export`.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from transformers import LlavaOnevisionImageProcessorPil

from ov_train.checkpoints.adapters import adapted_from_checkpoint
from ov_train.checkpoints.reading import checkpoint_metadata, model_from_checkpoint, ov_train_metadata
from ov_train.checkpoints.safe_load import CheckpointError
from ov_train.constants import IMAGE_TOKEN, VIDEO_TOKEN
from ov_train.model.adapters import merged
from ov_train.model.model_card import card_facts, model_card
from ov_train.text.chat_template import chat_template, stop_token_ids
from ov_train.text.tokenizer import load_tokenizer
from ov_train.utils.logging import get_logger, settle_deepspeed_accelerator
from ov_train.utils.paths import permissions_as_umask_allows
from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.settings import inference_refusal

log = get_logger(__name__)


def processor_settings(geometry: VisionGeometry) -> dict:
    size = {"height": geometry.image_size, "width": geometry.image_size}
    return {
        "size": size,
        "image_grid_pinpoints": [list(p) for p in geometry.grid_pinpoints],
        "image_mean": list(geometry.image_mean),
        "image_std": list(geometry.image_std),
    }


def export_pretrained(model, tokenizer, out_dir: str | Path, template: str = "qwen_1_5", card: dict | None = None) -> Path:
    """save_pretrained of model and tokenizer, plus image, video and processor settings of the same geometry.

    `template` is the stage's chat template: the export's chat template renders it for the stock processor,
    and its config and generation config stop generation where training's replies end. `card` holds the
    facts of the model card (README.md; model/model_card.py: card_facts).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settle_deepspeed_accelerator()  # save_pretrained imports DeepSpeed (through accelerate)
    with _generation_ids(model, tokenizer, template):
        model.save_pretrained(out)
    _save_tokenizer(tokenizer, chat_template(template), out)
    refusal = inference_refusal(model.config)  # the last stage's image setting, recorded in the model config
    if refusal:  # no processor files; the card says what the export is for
        log.warning("%s: %s", out, refusal)
        (out / "README.md").write_text(model_card(out.name, template, card or {}, path=out, refusal=refusal))
        permissions_as_umask_allows(out)
        return out
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
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "README.md").write_text(model_card(out.name, template, card or {}, path=out))
    permissions_as_umask_allows(out)
    return out


@contextmanager
def _generation_ids(model, tokenizer, template: str):
    """End-of-reply and padding ids in the model config and the generation config while the model is saved, so
    that `generate` stops where training's replies stop and pads batches with the tokenizer's pad token; the
    caller's model keeps its own."""
    stop = stop_token_ids(tokenizer, template)
    eos = stop[0] if len(stop) == 1 else stop
    configs = (model.config, model.config.text_config, model.generation_config)  # tools read any of them
    keys = ("eos_token_id", "pad_token_id")
    own = [{k: getattr(c, k) for k in keys if hasattr(c, k)} for c in configs]
    for config in configs:
        config.eos_token_id, config.pad_token_id = eos, tokenizer.pad_token_id
    try:
        yield
    finally:
        for config, values in zip(configs, own):
            for key in keys:
                if key in values:
                    setattr(config, key, values[key])
                else:
                    delattr(config, key)


def _save_tokenizer(tokenizer, template_text: str, out: Path) -> None:
    """save_pretrained with the export's chat template (written as chat_template.jinja, which the processor
    reads too); the caller's tokenizer keeps its own."""
    own = tokenizer.chat_template
    tokenizer.chat_template = template_text
    try:
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.chat_template = own


def export_checkpoint(ckpt_path, out_dir, tokenizer=None, trust: bool = False, base_dir=None,
                      adapter_only: bool = False, template: str | None = None) -> Path:
    """Write a checkpoint's export: a stock Hugging Face directory; for an adapter checkpoint merged, with the
    adapters in PEFT's format in OUT/adapter/ (`adapter_only`: OUT holds just those). `tokenizer` (a tokenizer or
    its directory, which then also builds a base from `base_dir`) defaults to the one the checkpoint records,
    `template` to the chat template it records (else qwen_1_5)."""
    path, out = Path(ckpt_path), Path(out_dir)
    meta = ov_train_metadata(path, trust)
    given_dir = str(tokenizer) if isinstance(tokenizer, (str, Path)) else None
    if given_dir:
        tokenizer = load_tokenizer(given_dir)
    if meta.get("adapter"):
        peft_model, tokenizer_dir, _ = adapted_from_checkpoint(path, trust, base_dir, tokenizer_dir=given_dir)
        if adapter_only:
            peft_model.save_pretrained(out)
            permissions_as_umask_allows(out)
            return out
        peft_model.save_pretrained(out / "adapter")
        model = merged(peft_model)
    elif adapter_only:
        raise CheckpointError(f"{path}: a full checkpoint, without adapters; drop --adapter-only")
    else:
        model, tokenizer_dir = model_from_checkpoint(path, trust)
    if tokenizer is None:
        if not tokenizer_dir or not Path(tokenizer_dir).exists():
            raise CheckpointError(f"tokenizer directory not found: {tokenizer_dir!r}; pass --tokenizer DIR")
        tokenizer = load_tokenizer(tokenizer_dir)
    facts = card_facts(checkpoint_metadata(path, trust=trust))
    return export_pretrained(model, tokenizer, out, template=template or facts["template"] or "qwen_1_5", card=facts)


