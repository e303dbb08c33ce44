"""Build LlavaOnevisionForConditionalGeneration and its tokenizer along the plan's route.

Routes (ov_train.config.run_plan.model_plan picks one, and checks that it has what it needs): an earlier
stage's export or checkpoint (`init_from`), a OneVision checkpoint (`pretrained`), a SigLIP tower + a Qwen2
LLM joined by a fresh projector (`vision_tower` + `llm`), or random weights of the configured geometry
(`random_init`, the tiny default).
"""
from __future__ import annotations

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

from ov_train.checkpoints.reading import model_from_checkpoint
from ov_train.config.run_plan import ModelPlan
from ov_train.constants import IMAGE_TOKEN, VIDEO_TOKEN
from ov_train.model import layout
from ov_train.text.tokenizer import (
    build_tiny_tokenizer,
    ensure_special_tokens,
    load_tokenizer,
)
from ov_train.utils.logging import get_logger
from ov_train.vision.geometry import default_pinpoints

log = get_logger(__name__)


def onevision_config(vision: SiglipVisionConfig, text: Qwen2Config, tokenizer, aspect_ratio: str) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        # Features come from the tower's last kept layer; the checkpoint's unused last layer is dropped.
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect_ratio,
        image_grid_pinpoints=[list(p) for p in default_pinpoints(vision.image_size)],
        tie_word_embeddings=text.tie_word_embeddings,
    )


def _random(plan: ModelPlan, tokenizer) -> LlavaOnevisionForConditionalGeneration:
    vision = SiglipVisionConfig(vision_use_head=False, **plan.vision)
    text_kwargs = dict(plan.text)
    text_kwargs["vocab_size"] = max(int(text_kwargs.get("vocab_size") or 0), len(tokenizer))
    text = Qwen2Config(**text_kwargs)
    return LlavaOnevisionForConditionalGeneration(onevision_config(vision, text, tokenizer, plan.vision_aspect_ratio))


def _tower_state_dict(siglip: SiglipVisionModel, model, kept: int) -> dict[str, torch.Tensor]:
    """The checkpoint tower's weights for `model`'s tower: no pooling head, no encoder layers from `kept` on.

    Keys are matched relative to the vision transformer: older transformers nest it as
    `vision_model.*` inside SiglipVisionModel, newer ones do not.
    """
    prefix = "vision_model." if layout.nests_vision_model(model) else ""
    out = {}
    for key, value in siglip.state_dict().items():
        key = key.removeprefix("vision_model.")
        if key.startswith("head."):
            continue
        if key.startswith("encoder.layers.") and int(key.split(".")[2]) >= kept:
            continue
        out[prefix + key] = value
    return out


def _compose(plan: ModelPlan, tokenizer) -> LlavaOnevisionForConditionalGeneration:
    siglip = SiglipVisionModel.from_pretrained(plan.vision_tower, dtype=torch.float32)
    qwen = AutoModelForCausalLM.from_pretrained(plan.llm, dtype=torch.float32)
    vision = siglip.config
    kept = vision.num_hidden_layers - 1  # OneVision reads the second-to-last layer; the last one never runs
    vision_cfg = SiglipVisionConfig(**{**vision.to_dict(), "num_hidden_layers": kept, "vision_use_head": False})
    config = onevision_config(vision_cfg, qwen.config, tokenizer, plan.vision_aspect_ratio)
    model = LlavaOnevisionForConditionalGeneration(config)
    layout.vision_tower(model).load_state_dict(_tower_state_dict(siglip, model, kept), strict=True)
    layout.language_model(model).load_state_dict(qwen.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        layout.lm_head(model).load_state_dict(qwen.lm_head.state_dict(), strict=True)
    log.info("composed %s (%d of %d vision layers) + %s with a fresh projector", plan.vision_tower, kept, kept + 1, plan.llm)
    return model


def _fit_vocab(model, tokenizer) -> None:
    """Grow the embeddings for tokens the tokenizer gained, and point the config at its media ids."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
        log.info("resized token embeddings %d -> %d for the added special tokens", rows, len(tokenizer))
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model.config.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)


def checkpoint_tokenizer(plan: ModelPlan, tokenizer_dir: str | None):
    """The tokenizer of a model initialised from a checkpoint: model.tokenizer, else the one the checkpoint records."""
    if not plan.tokenizer and not (tokenizer_dir and Path(tokenizer_dir).exists()):
        raise ValueError(f"model.init_from={plan.source}: its tokenizer {tokenizer_dir!r} is gone; set model.tokenizer")
    return load_tokenizer(plan.tokenizer or tokenizer_dir)


def build_model(plan: ModelPlan, cache_dir: str | Path, seed: int | None = None):
    """Return (model, tokenizer) along the plan's route; weights in fp32 (precision is the trainer's job).
    An `init_from` checkpoint is unpickled beyond tensors and plain data only when the plan trusts it.

    With `seed`, torch's generator is seeded first: random weights, and the embedding rows added for new tokens,
    are then the same on every build, so an adapter run's frozen base can be rebuilt from its record."""
    if seed is not None:
        torch.manual_seed(seed)
    if plan.route == "export":
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(plan.source, dtype=torch.float32)
        tokenizer = load_tokenizer(plan.tokenizer or plan.source)
        log.info("initialised from earlier stage export %s", plan.source)
    elif plan.route == "checkpoint":
        model, tokenizer_dir = model_from_checkpoint(plan.source, trust=plan.trust_checkpoint)
        tokenizer = checkpoint_tokenizer(plan, tokenizer_dir)
        log.info("initialised from checkpoint %s", plan.source)
    elif plan.route == "pretrained":
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(plan.source, dtype=torch.float32)
        tokenizer = load_tokenizer(plan.tokenizer or plan.source)
        log.info("loaded OneVision checkpoint %s", plan.source)
    elif plan.route == "compose":
        tokenizer = load_tokenizer(plan.tokenizer or plan.llm)
        model = _compose(plan, tokenizer)
    else:
        tokenizer = load_tokenizer(plan.tokenizer) if plan.tokenizer else build_tiny_tokenizer(Path(cache_dir) / "tokenizer")
        model = _random(plan, tokenizer)
        log.info("random-initialised %s geometry", plan.name)
    ensure_special_tokens(tokenizer)
    _fit_vocab(model, tokenizer)
    return model, tokenizer
