"""Names and values every layer agrees on, defined once (the ground floor: imports nothing of ov_train)."""
from __future__ import annotations

# Label of a position that carries no loss (torch's cross_entropy default ignore_index).
IGNORE_INDEX = -100

# Sample modalities, as recipes, shards and metrics name them.
MODALITIES = ("single_image", "multi_image", "video", "text")

# Trainable parts of the model, in forward order (what model.layout maps onto parameter names).
PARTS = ("vision_tower", "projector", "llm")

# Placeholders in conversation text, each expanded to the visual tokens of one image or one video.
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
MEDIA_TOKENS = (IMAGE_TOKEN, VIDEO_TOKEN)

# Chat templates (text/template.py renders them).
TEMPLATES = ("plain", "qwen_1_5")

# data.name of the embedded synthetic data, and the smallest image side its drawings fit in.
SYNTHETIC, SYNTHETIC_MIN_PX = "synthetic", 16

# Formats a recipe source's files are read in (data/sources.py): WebDataset tars, or parquet in the OneVision layout.
WEBDATASET, PARQUET = "webdataset", "parquet"
FORMATS = (WEBDATASET, PARQUET)

# What a non-finite training loss does: skip the update, or stop the run.
NONFINITE = ("skip", "stop")

# Loss implementations: full logits, or chunked / fused linear cross-entropy (model/loss.py).
LOSSES = ("full", "chunked")

# The attention implementation ov_train registers with transformers (torch varlen over packed rows).
VARLEN = "ov_varlen"
ATTENTION = ("auto", "sdpa", "eager", "flex_attention", VARLEN)
# The attention ov_train registers under sequence parallelism (parallel/sequence.py): Ulysses all-to-all around the
# packed rows' per-sample attention.
ULYSSES = "ov_ulysses"

# Modules whose layers activation checkpointing may wrap (model/layout.py names their layer lists).
CHECKPOINTABLE = ("vision", "llm")

# Where a turn's media placeholder goes (stage.media_placement): `front`, a turn holding exactly one placeholder gets
# it moved to its start followed by "\n" (the public LLaVA-NeXT code's preprocess_multimodal); `as_is`, where it is.
PLACEMENTS = ("front", "as_is")

# How per-sample losses combine into a step's loss (stage.loss_weighting, model/loss.py): over all supervised
# tokens, or each sample's own mean weighted equally (what the public recipe's batch 1 with accumulation gives).
LOSS_WEIGHTINGS = ("token", "sample")

# Single-crop image strategies besides anyres_max_N: a padded square crop + newline, or a squashed crop, no newline.
SINGLE_CROP = ("pad", "square")

# Where a video's newline embeddings go (vision/pooling.py; the public code's mm_newline_position): one after the
# video, one after every pooled row of every frame, one after every frame, none.
VIDEO_NEWLINES = ("one_token", "grid", "frame", "no_token")

# Video frame sampling (stage.frame_sampling): one frame every round(fps / video_fps), or always max_frames, evenly.
FRAME_SAMPLINGS = ("fps", "uniform")

# Adapters (adapter=...; config/adapter.py checks them, model/adapters.py places them through PEFT).
ADAPTERS = ("none", "lora", "dora", "qlora")
# A part's adapter.targets value besides a module list: trained whole as the stage says, or frozen whatever it says.
FULL, FROZEN = "full", "frozen"
# A part's mode once resolved against the stage: adapters on listed modules, a whole trained copy beside them, frozen.
ADAPTED, COPY = "adapters", "copy"
# The linear modules of each part that can carry adapters, as transformers names them (SigLIP, projector, Qwen2).
ADAPTER_TARGETS: dict[str, tuple[str, ...]] = {
    "vision_tower": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "projector": ("linear_1", "linear_2"),
    "llm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# Parts a PEFT copy (modules_to_save) can train whole beside adapters; the LLM trains through adapters or not at all.
COPYABLE = ("vision_tower", "projector")
# 4-bit data types of adapter=qlora (bitsandbytes).
QUANT_TYPES = ("nf4", "fp4")

# What fills a training batch (data.batching, data/batching.py): padded LLM tokens up to the token budget, or training
# FLOPs up to that many tokens' worth (data/compute_batches.py), so that ranks' steps cost the same.
BATCHINGS = ("tokens", "compute")

# How images are decoded (data.decode, vision/pixels.py): in full with PIL's resizes (pixels equal the reference
# processors), or a JPEG at the reduced size its crops need and torchvision's resizes where installed (faster; pixels
# differ).
DECODES = ("exact", "fast")
