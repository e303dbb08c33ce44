"""The stage's media settings (config/media.py) in the model: its anyres N and grid in the model config, which the
forward packs features by and exports carry, and whether the stock processor can feed an export as it was trained."""
from __future__ import annotations

from ov_train.config.media import MediaSettings
from ov_train.constants import SINGLE_CROP
from ov_train.vision.pooling import DEFAULT_NEWLINE, DEFAULT_POOL

# Key written into the model config (and so into exports and checkpoints): the media settings it trained with.
CONFIG_KEY = "ov_train_media"


def apply_to_model_config(config, media: MediaSettings, placement: str | None = None) -> None:
    """Set the model config to the stage's anyres N and grid (the forward packs features by them, and exports
    carry them), and record the stage's media settings under CONFIG_KEY, with `placement` (stage.media_placement)
    when given, so ov-eval places a turn's <image> as training did."""
    if media.image.anyres:  # a model the plan built has it already (ModelPlan); a loaded one gets the stage's
        config.vision_aspect_ratio = media.image.vision_aspect_ratio(config.vision_aspect_ratio)
        pinpoints = media.image.pinpoints(config.vision_config.image_size)
        if pinpoints is not None:
            config.image_grid_pinpoints = [list(p) for p in pinpoints]
    setattr(config, CONFIG_KEY, {**media.to_dict(), **({"media_placement": placement} if placement else {})})


def recorded_media(config) -> dict:
    """The stage's media settings a model config records (apply_to_model_config), from a config object or a
    config.json dict; {} for one that records none."""
    media = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    return media or {}


def inference_refusal(config) -> str | None:
    """Why the stock LlavaOnevisionProcessor could not feed this model as it was trained (None: it can).

    Stock transformers cuts every single image as anyres (by the config's vision_aspect_ratio and
    image_grid_pinpoints, which exports carry) and always adds the newline; a stage that cut single images
    into one crop (pad, square) has no equivalent there, so its export gets no processor files."""
    media = recorded_media(config)
    strategy = media.get("image_strategy")
    video = media.get("video") or {}
    pool, newline = video.get("pool", DEFAULT_POOL), video.get("newline", DEFAULT_NEWLINE)
    if strategy not in SINGLE_CROP and (pool, newline) != (DEFAULT_POOL, DEFAULT_NEWLINE):
        return (
            f"stage.video_pool={pool} / stage.video_newline={newline}: the stock LlavaOnevision model pools video"
            f" frames by {DEFAULT_POOL} with one newline per video ({DEFAULT_NEWLINE}), so it would lay the trained"
            " video features out otherwise. The export holds the weights, config and tokenizer (model.init_from for"
            " the next stage) but no processor files"
        )
    if strategy not in SINGLE_CROP:
        return None
    what = "a squashed crop without newline" if strategy == "square" else "a padded crop plus newline"
    return (
        f"stage.image_strategy={strategy} ({what} per image) has no equivalent in LlavaOnevisionConfig: the stock"
        f" processor would cut a single image as {config.vision_aspect_ratio} and count other tokens. The export"
        " holds the weights, config and tokenizer (model.init_from for the next stage) but no processor files"
    )
