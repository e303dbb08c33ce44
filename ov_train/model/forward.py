"""The training forward pass: visual features scattered into the token embeddings, then per-token loss.

It runs the stock modules of LlavaOnevisionForConditionalGeneration (tower, projector, anyres packing,
video pooling, Qwen2) but takes images one by one, so a batch can mix anyres single images,
single-crop images and videos of different lengths. tests/unit/test_forward.py proves it equal to
the stock forward wherever the stock forward accepts the same batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected patch features [n, side*side, d] of crops or frames [n, 3, S, S]."""
    inner = model.model
    layer = model.config.vision_feature_layer
    hidden = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    if model.config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return inner.multi_modal_projector(hidden)


def image_features(model, pixel_values, crops_per_image, image_sizes, anyres) -> list[torch.Tensor]:
    """One [tokens, d] tensor per image, in batch order."""
    inner = model.model
    per_image = _tower_features(model, pixel_values).split(list(crops_per_image))
    out = []
    for feats, size, is_anyres in zip(per_image, image_sizes, anyres):
        if is_anyres:
            packed, _ = inner.pack_image_features(
                [feats], size[None], image_newline=inner.image_newline, vision_aspect_ratio=model.config.vision_aspect_ratio
            )
            out.append(packed[0])
        else:
            out.append(torch.cat([feats[0], inner.image_newline[None].to(feats)], dim=0))
    return out


def video_features(model, frames, frames_per_video) -> list[torch.Tensor]:
    """One [frames * pooled + 1, d] tensor per video: 2x2-pooled frame features and one newline."""
    inner = model.model
    pooled = inner.apply_pooling(_tower_features(model, frames))
    return [
        torch.cat([v.flatten(0, 1), inner.image_newline[None].to(v)], dim=0)
        for v in pooled.split(list(frames_per_video))
    ]


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, feats: list[torch.Tensor], what: str) -> torch.Tensor:
    if not feats:
        return embeds
    values = torch.cat(feats).to(embeds.dtype)
    slots = int(mask.sum())
    if slots != values.shape[0]:
        raise ValueError(f"{what}: {slots} placeholder tokens in the batch but {values.shape[0]} visual features")
    return embeds.masked_scatter(mask[..., None], values)


def embed_inputs(model, batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if batch.get("pixel_values") is not None:
        feats = image_features(model, batch["pixel_values"], batch["crops_per_image"], batch["image_sizes"], batch["image_anyres"])
        embeds = _scatter(embeds, ids == model.config.image_token_id, feats, "images")
    if batch.get("video_frames") is not None:
        feats = video_features(model, batch["video_frames"], batch["frames_per_video"])
        embeds = _scatter(embeds, ids == model.config.video_token_id, feats, "videos")
    return embeds


def forward_logits(model, batch: dict) -> torch.Tensor:
    hidden = model.model.language_model(
        inputs_embeds=embed_inputs(model, batch), attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    return model.lm_head(hidden)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position [B, L-1] (0 where unsupervised) and the supervision mask."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.clamp_min(0).flatten(), reduction="none"
    ).view_as(target)
    return loss * mask, mask
