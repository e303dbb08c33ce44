"""Our training forward (per-image features, scattered) equals the stock transformers forward."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ov_train.data.samples import SampleProcessor, collate
from ov_train.data.video import encode_mp4
from ov_train.model.forward import forward_logits, token_losses
from ov_train.vision.geometry import VisionGeometry


def _png(h, w, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _raw(key, human, reply, images=(), video=None):
    raw = {"__key__": key, "json": json.dumps({"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": reply}]}).encode()}
    for i, img in enumerate(images):
        raw[f"img{i}.png"] = img
    if video is not None:
        raw["mp4"] = video
    return raw


@pytest.fixture(scope="module")
def mixed_batch(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    geom = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geom, "qwen_1_5", "anyres_max_9", max_frames=8, max_length=4096)
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    raws = [
        _raw("a", "<image>\nWhat colour?", "red", [_png(70, 30, 1)]),
        _raw("b", "<image>\n<image>\n<image>\nWhich one?", "second", [_png(32, 32, 2), _png(50, 20, 3), _png(16, 64, 4)]),
        _raw("c", "<video>\nWhich way?", "left", video=encode_mp4(frames, fps=1)),
        _raw("d", "What is the opposite of up?", "down"),
        _raw("e", "<image>\nHow many?", "three", [_png(100, 250, 5)]),
    ]
    examples = [process(r) for r in raws]
    return model, examples, collate(examples, tokenizer.pad_token_id)


def test_forward_matches_stock_model(mixed_batch):
    model, examples, batch = mixed_batch
    model.eval()
    with torch.no_grad():
        ours = forward_logits(model, batch)
        losses, mask = token_losses(ours, batch["labels"])
        stock = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"],
            batch_num_images=torch.tensor(batch["images_per_sample"]),
            pixel_values_videos=batch["video_frames"][None],
            labels=batch["labels"],
        )
    valid = batch["attention_mask"].bool()
    assert torch.allclose(ours[valid], stock.logits[valid], atol=1e-5, rtol=1e-4)
    assert torch.allclose(losses.sum() / mask.sum(), stock.loss, atol=1e-6)


def test_gradients_match_stock_model(mixed_batch):
    model, examples, batch = mixed_batch
    model.train()
    model.zero_grad()
    losses, mask = token_losses(forward_logits(model, batch), batch["labels"])
    (losses.sum() / mask.sum()).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_sizes=batch["image_sizes"],
        batch_num_images=torch.tensor(batch["images_per_sample"]),
        pixel_values_videos=batch["video_frames"][None],
        labels=batch["labels"],
    ).loss.backward()
    stock = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert ours.keys() == stock.keys() and len(ours) > 0
    for name in ours:
        assert torch.allclose(ours[name], stock[name], atol=1e-6, rtol=1e-4), name


def test_mismatched_placeholders_raise(mixed_batch):
    model, _, batch = mixed_batch
    broken = dict(batch, input_ids=batch["input_ids"].clone())
    image_id = model.config.image_token_id
    broken["input_ids"][broken["input_ids"] == image_id] = 0
    with pytest.raises(ValueError, match="placeholder tokens"):
        forward_logits(model, broken)
