"""Build LlavaOnevisionForConditionalGeneration and its tokenizer from the `model` config group.

Routes, checked in this order: an earlier stage's export or checkpoint (`init_from`), a OneVision checkpoint
(`pretrained`), a SigLIP tower + a Qwen2 LLM joined by a fresh projector (`vision_tower` + `llm`),
or random weights of the configured geometry (`random_init`, the tiny default).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ov_train.model.tokenizer import build_tiny_tokenizer, ensure_special_tokens, load_tokenizer
from ov_train.vision.geometry import default_pinpoints

log = logging.getLogger(__name__)


def onevision_config(vision: SiglipVisionConfig, text: Qwen2Config, tokenizer, aspect_ratio: str) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        # Features come from the tower's last kept layer; the checkpoint's unused last layer is dropped.
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect_ratio,
        image_grid_pinpoints=[list(p) for p in default_pinpoints(vision.image_size)],
        tie_word_embeddings=text.tie_word_embeddings,
    )


def _random(cfg, tokenizer) -> LlavaOnevisionForConditionalGeneration:
    vision = SiglipVisionConfig(vision_use_head=False, **cfg.vision)
    text_kwargs = dict(cfg.text)
    text_kwargs["vocab_size"] = max(int(text_kwargs.get("vocab_size") or 0), len(tokenizer))
    text = Qwen2Config(**text_kwargs)
    return LlavaOnevisionForConditionalGeneration(onevision_config(vision, text, tokenizer, cfg.vision_aspect_ratio))


def _tower_state_dict(siglip: SiglipVisionModel, tower: torch.nn.Module, kept: int) -> dict[str, torch.Tensor]:
    """The checkpoint tower's weights for `tower`: no pooling head, no encoder layers from `kept` on.

    Keys are matched relative to the vision transformer: older transformers nest it as
    `vision_model.*` inside SiglipVisionModel, newer ones do not.
    """
    prefix = "vision_model." if hasattr(tower, "vision_model") else ""
    out = {}
    for key, value in siglip.state_dict().items():
        key = key.removeprefix("vision_model.")
        if key.startswith("head."):
            continue
        if key.startswith("encoder.layers.") and int(key.split(".")[2]) >= kept:
            continue
        out[prefix + key] = value
    return out


def _compose(cfg, tokenizer) -> LlavaOnevisionForConditionalGeneration:
    siglip = SiglipVisionModel.from_pretrained(cfg.vision_tower, dtype=torch.float32)
    qwen = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype=torch.float32)
    vision = siglip.config
    kept = vision.num_hidden_layers - 1  # OneVision reads the second-to-last layer; the last one never runs
    vision_cfg = SiglipVisionConfig(**{**vision.to_dict(), "num_hidden_layers": kept, "vision_use_head": False})
    config = onevision_config(vision_cfg, qwen.config, tokenizer, cfg.vision_aspect_ratio)
    model = LlavaOnevisionForConditionalGeneration(config)
    tower = model.model.vision_tower
    tower.load_state_dict(_tower_state_dict(siglip, tower, kept), strict=True)
    model.model.language_model.load_state_dict(qwen.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(qwen.lm_head.state_dict(), strict=True)
    log.info("composed %s (%d of %d vision layers) + %s with a fresh projector", cfg.vision_tower, kept, kept + 1, cfg.llm)
    return model


def _fit_vocab(model, tokenizer) -> None:
    """Grow the embeddings for tokens the tokenizer gained, and point the config at its media ids."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
        log.info("resized token embeddings %d -> %d for the added special tokens", rows, len(tokenizer))
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model.config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")


def build_model(cfg, cache_dir: str | Path, trust_checkpoint: bool = False, seed: int | None = None):
    """Return (model, tokenizer) for a `model` config node; weights in fp32 (precision is the trainer's job).
    An `init_from` checkpoint is unpickled beyond tensors and plain data only with `trust_checkpoint`.

    With `seed`, torch's generator is seeded first: random weights, and the embedding rows added for new tokens,
    are then the same on every build, so an adapter run's frozen base can be rebuilt from its record."""
    if seed is not None:
        torch.manual_seed(seed)
    if cfg.init_from and (Path(cfg.init_from) / "config.json").is_file():
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
        log.info("initialised from earlier stage export %s", cfg.init_from)
    elif cfg.init_from:
        from ov_train.tools.export import model_from_checkpoint  # checkpoint reading lives with ov-export

        model, tokenizer_dir = model_from_checkpoint(cfg.init_from, trust=trust_checkpoint)
        if not cfg.tokenizer and not (tokenizer_dir and Path(tokenizer_dir).exists()):
            raise ValueError(f"model.init_from={cfg.init_from}: its tokenizer {tokenizer_dir!r} is gone; set model.tokenizer")
        tokenizer = load_tokenizer(cfg.tokenizer or tokenizer_dir)
        log.info("initialised from checkpoint %s", cfg.init_from)
    elif cfg.pretrained:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(cfg.pretrained, dtype=torch.float32)
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.pretrained)
        log.info("loaded OneVision checkpoint %s", cfg.pretrained)
    elif cfg.vision_tower and cfg.llm:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.llm)
        model = _compose(cfg, tokenizer)
    elif cfg.vision_tower or cfg.llm:
        # Never fall back to random weights when half of the SigLIP + Qwen2 route was given.
        raise ValueError("model.vision_tower and model.llm: give both (SigLIP + Qwen2 route) or neither")
    elif not cfg.get("random_init"):
        raise ValueError(
            f"model={cfg.name}: needs weights: model.pretrained=DIR, or model.vision_tower=DIR model.llm=DIR,"
            " or model.init_from=DIR (model.random_init=true trains the geometry from scratch)"
        )
    else:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else build_tiny_tokenizer(Path(cache_dir) / "tokenizer")
        model = _random(cfg, tokenizer)
        log.info("random-initialised %s geometry", cfg.name)
    ensure_special_tokens(tokenizer)
    _fit_vocab(model, tokenizer)
    return model, tokenizer
