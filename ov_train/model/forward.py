"""The training forward pass: visual features scattered into the token embeddings, then per-token loss.

It runs the stock modules of LlavaOnevisionForConditionalGeneration (tower, projector, anyres packing,
Qwen2; the video pooling is vision/pooling.py's, the stock one at stride 2) in one tower call per batch,
then packs each image's features on its own, so a batch can mix anyres single images, single-crop images
and videos of different lengths. tests/unit/test_forward.py proves it equal to the stock forward wherever
the stock forward accepts the same batch.

`sample_losses` is the training entry point: per-sample loss sums, optionally on a packed batch
(ov_train.model.packing) and with a linear cross-entropy that never holds full logits
(ov_train.model.loss), as the model config's performance keys say (the plan's `forward`).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ov_train.config.schema import ModelConfig
from ov_train.constants import CHECKPOINTABLE, IGNORE_INDEX
from ov_train.model import layout
from ov_train.model.activation_checkpointing import apply_activation_checkpointing
from ov_train.model.loss import (
    chunked_cross_entropy,
    fused_available,
    fused_cross_entropy_sums,
)
from ov_train.model.packing import (
    PackedBatch,
    language_model_hidden,
    pack_into_rows,
    set_attention,
)
from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.pooling import DEFAULT_NEWLINE, DEFAULT_POOL, arrange_video, pool_frames
from ov_train.vision.tokens import anyres_layout


def tower_hidden(model, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """The vision tower's hidden_states[layer], running only the layers up to it.

    The stock call runs every layer and the post-layernorm, keeps all hidden states and returns the
    one asked for; whatever comes after `layer` is thrown away, so it is not computed here.
    """
    blocks = layout.layers(model, "vision")
    needed = layer % (len(blocks) + 1)  # hidden_states[0] is the embedding output
    hidden = layout.vision_transformer(model).embeddings(pixel_values)
    for block in blocks[:needed]:
        hidden = block(hidden, None)
    return hidden


def _tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected patch features [n, side*side, d] of crops or frames [n, 3, S, S]."""
    hidden = tower_hidden(model, pixel_values, model.config.vision_feature_layer)
    if model.config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return layout.projector(model)(hidden)


def image_features(model, feats, crops_per_image, image_sizes, anyres, ends_row=None) -> list[torch.Tensor]:
    """One [tokens, d] tensor per image, in batch order, from its crops' projected features; a single crop
    ends with the newline embedding unless its `ends_row` flag says not (the `square` strategy)."""
    newline = layout.image_newline(model)
    out = []
    ends_row = [True] * len(anyres) if ends_row is None else ends_row
    geom = VisionGeometry.from_model_config(model.config)
    for crops, size, is_anyres, ends in zip(feats.split(list(crops_per_image)), image_sizes, anyres, ends_row):
        if is_anyres and geom.rounding != "round":
            out.append(_pack_anyres(crops, [int(v) for v in size], newline, geom))
        elif is_anyres:
            packed, _ = layout.core(model).pack_image_features(
                [crops], size[None], image_newline=newline, vision_aspect_ratio=model.config.vision_aspect_ratio
            )
            out.append(packed[0])
        elif ends:
            out.append(torch.cat([crops[0], newline[None].to(crops)], dim=0))
        else:
            out.append(crops[0] + 0 * newline.sum().to(crops))  # newline kept in the graph (DDP)
    return out


def _pack_anyres(crops: torch.Tensor, size: list[int], newline: torch.Tensor, geom: VisionGeometry) -> torch.Tensor:
    """The stock anyres packing (grid map, unpad, shrink, newline per row, base crop first) at vision/tokens.py's
    layout, for a rounding transformers lacks (stage.token_rounding=truncate, the public code's)."""
    side, plan = geom.side, anyres_layout(size[0], size[1], geom)
    grid = crops[1:].view(plan.rows, plan.cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    grid = grid[:, plan.top: plan.top + plan.kept_h, plan.left: plan.left + plan.kept_w]
    if (plan.out_h, plan.out_w) != (plan.kept_h, plan.kept_w):
        grid = F.interpolate(grid[None], [plan.out_h, plan.out_w], mode="bilinear")[0]
    grid = torch.cat((grid, newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)), dim=-1)
    return torch.cat((crops[0], grid.flatten(1, 2).transpose(0, 1)), dim=0)


def video_features(model, feats, frames_per_video, ends_row=None, pool=DEFAULT_POOL,
                   newline_layout=DEFAULT_NEWLINE) -> list[torch.Tensor]:
    """One [tokens, d] tensor per video from its frames' projected features: pooled by `pool`, newlines placed as
    `newline_layout` (vision/pooling.py, which vision/tokens.py counts by), none where its `ends_row` flag says not.
    `pool` and `newline_layout` are one value for all videos or one per video (a recipe source's own settings)."""
    count = len(frames_per_video)
    pools = list(pool) if isinstance(pool, (list, tuple)) else [pool] * count
    layouts = list(newline_layout) if isinstance(newline_layout, (list, tuple)) else [newline_layout] * count
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    per_video = feats.split(list(frames_per_video))
    if len(set(pools)) <= 1:  # one call for the whole batch when the videos share a stride
        pooled = pool_frames(feats, side, pools[0]).split(list(frames_per_video)) if count else []
    else:
        pooled = [pool_frames(v, side, p) for v, p in zip(per_video, pools)]
    newline = layout.image_newline(model)
    ends_row = [True] * count if ends_row is None else ends_row
    return [arrange_video(v, newline, kind if ends else "no_token") for v, ends, kind in zip(pooled, ends_row, layouts)]


def _for_sequences(feats: list[torch.Tensor], batch: dict, per_owner: str) -> list[torch.Tensor]:
    """The features each sequence places, in batch order. A batch whose `media_owner` says which sample's media each
    sequence reads (a preference pair's chosen and rejected share their prompt's) carries those media once:
    their features are computed once and placed in every sequence that reads them."""
    owners = batch.get("media_owner")
    if owners is None:
        return feats
    counts = batch[per_owner]  # media per owning sample
    starts = [0, *itertools.accumulate(counts)]
    return [feats[starts[o] + k] for o in owners for k in range(counts[o])]


def _scatter(embeds, batch: dict, packed: PackedBatch | None, token_id: int, feats: list[torch.Tensor], what: str):
    if not feats:
        return embeds
    values = torch.cat(feats).to(embeds.dtype)
    mask = batch["input_ids"] == token_id
    slots = int(mask.sum())
    if slots != values.shape[0]:
        raise ValueError(f"{what}: {slots} placeholder tokens in the batch but {values.shape[0]} visual features")
    if packed is not None:
        # Features come in padded-batch order: the k-th placeholder there takes row k. Reorder them
        # to the packed placeholders' order, which is the order masked_scatter fills.
        rank = mask.flatten().cumsum(0) - 1
        mask = packed.gather(mask, False)
        values = values[rank[packed.source[mask]]]
    return embeds.masked_scatter(mask[..., None], values)


def embed_inputs(model, batch: dict, packed: PackedBatch | None = None, encode=_tower_features) -> torch.Tensor:
    """Token embeddings with the visual features in place, in the padded or (given `packed`) packed layout.

    The tower and projector run exactly once per call, over every crop and frame of the batch (one dummy
    crop when it has none): ZeRO-3 and FSDP gather their weights per call and need every rank to make
    the same calls, and data-parallel gradients then always cover the same parameters. `encode(model, pixels)`:
    the tower and projector (frame-parallel under sequence parallelism, parallel/frames.py).
    """
    embeds = model.get_input_embeddings()(batch["input_ids"] if packed is None else packed.input_ids)
    images, frames = batch.get("pixel_values"), batch.get("video_frames")
    media = [x for x in (images, frames) if x is not None]
    if not media:
        side = model.config.vision_config.image_size
        dummy = _tower_features(model, torch.zeros(1, 3, side, side, device=embeds.device))
        # Zero contribution, but the tower, projector and newline stay in the graph.
        return embeds + 0 * (dummy.sum() + layout.image_newline(model).sum()).to(embeds.dtype)
    feats = encode(model, torch.cat(media))
    if images is not None:
        image_feats, feats = feats[: images.shape[0]], feats[images.shape[0] :]
        per_image = image_features(model, image_feats, batch["crops_per_image"], batch["image_sizes"],
                                   batch["image_anyres"], batch.get("image_newline"))
        per_image = _for_sequences(per_image, batch, "images_per_sample")
        embeds = _scatter(embeds, batch, packed, model.config.image_token_id, per_image, "images")
    if frames is not None:
        per_video = video_features(model, feats, batch["frames_per_video"], batch.get("video_newline"),
                                   batch.get("video_pool", DEFAULT_POOL), batch.get("video_layout", DEFAULT_NEWLINE))
        per_video = _for_sequences(per_video, batch, "videos_per_sample")
        embeds = _scatter(embeds, batch, packed, model.config.video_token_id, per_video, "videos")
    return embeds


def padded_hidden(model, batch: dict) -> torch.Tensor:
    """The LLM's final hidden states [B, L, d] of a padded batch."""
    return layout.language_model(model)(
        inputs_embeds=embed_inputs(model, batch), attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state


def forward_logits(model, batch: dict) -> torch.Tensor:
    return layout.lm_head(model)(padded_hidden(model, batch))


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position [B, L-1] (0 where unsupervised) and the supervision mask."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.clamp_min(0).flatten(), reduction="none"
    ).view_as(target)
    return loss * mask, mask


def prepare_model(model, options: ModelConfig) -> None:
    """Set the model up once, before any strategy wraps it: attention implementation, activation
    checkpointing, then compilation (each layer compiled with its checkpointing switch in place)."""
    set_attention(model, options.attention())
    apply_activation_checkpointing(model, options.activation_checkpointing, options.checkpoint_every)
    if options.compile:
        for module in CHECKPOINTABLE:
            for layer in layout.layers(model, module):
                layer.compile(dynamic=True)  # packed rows change length every step


def _supervised_hidden(model, batch: dict, options: ModelConfig, parallel=None):
    """Final hidden states [N, d] of the supervised positions, their targets [N] and where each sits in the
    padded batch [N] (flat index b * L + t), in that order: grouped by sample in batch order. Under sequence
    parallelism (`parallel`, parallel/sequence.py) only those of this rank's shard of the row."""
    if options.packing or parallel is not None:
        packed = pack_into_rows(batch, options.max_tokens) if parallel is None else parallel.pack(batch)
        encode = _tower_features if parallel is None else parallel.encoder(_tower_features)
        hidden = language_model_hidden(model, embed_inputs(model, batch, packed, encode), packed)
        targets, source = packed.targets, packed.source
    else:
        hidden = padded_hidden(model, batch)
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        source = torch.arange(targets.numel(), device=targets.device)
    targets, source = targets.flatten(), source.flatten()
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = rows[torch.argsort(source[rows])]  # packed rows hold samples out of batch order
    return hidden.flatten(0, 1)[rows], targets[rows], source[rows]


def _through_head(model, fn, *args):
    """fn(head weight, *args), run as the LM head's forward: sharding wrappers (ZeRO-3, FSDP) gather the
    weight around a module's forward (and its backward), not around a bare read of the parameter."""
    head = layout.lm_head(model)
    head.forward = lambda *a: fn(head.weight, *a)
    try:
        return head(*args)
    finally:
        del head.forward  # back to the class's forward


def sample_losses(model, batch: dict, options: ModelConfig, predict: bool = False, parallel=None):
    """Per sample: loss sum [B], supervised tokens [B] and, with `predict`, the greedy prediction of each
    next token [B, L-1] (IGNORE_INDEX where unsupervised, so it compares equal to labels[:, 1:]), else None.
    `parallel`: this rank's sequence-parallel group (parallel/sequence.py); what is returned is then the whole
    group's, as one process would compute it on the batch."""
    size, length = batch["input_ids"].shape
    if parallel is None and not options.packing and options.loss == "full":
        logits = forward_logits(model, batch)
        losses, mask = token_losses(logits, batch["labels"])
        preds = logits[:, :-1].argmax(-1).masked_fill(~mask, IGNORE_INDEX) if predict else None
        return losses.sum(1), mask.sum(1), preds
    hidden, targets, source = _supervised_hidden(model, batch, options, parallel)
    sample = source // length
    counts = torch.bincount(sample, minlength=size)
    if options.loss == "chunked" and not predict and fused_available(hidden.device):
        sums = _through_head(model, lambda w, h, t: fused_cross_entropy_sums(h, w, t, counts.tolist()), hidden, targets)
        preds = None
    else:
        chunk = options.loss_chunk if options.loss == "chunked" else None
        losses, preds = _through_head(model, lambda w, h, t: chunked_cross_entropy(h, w, t, chunk, predict), hidden, targets)
        sums = losses.new_zeros(size).index_add(0, sample, losses)
    if predict:
        # Position t of sample b predicts label t + 1: grid cell (b, t) of the padded layout, last column dropped.
        preds = targets.new_full((size * length,), IGNORE_INDEX).index_copy(0, source, preds).view(size, length)[:, :-1]
    if parallel is not None:
        sums, counts = parallel.reduce(sums, counts)
        preds = None if preds is None else parallel.reduce_predictions(preds)
    return sums, counts, preds
