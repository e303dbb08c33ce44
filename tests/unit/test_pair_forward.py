"""Per-sequence log-probabilities from the training forward equal the stock model's, and a batch of preference
pairs that carries each pair's media once (one tower pass per pair) gives the same numbers and gradients as
encoding the media for both sequences."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ov_train.config.media import MediaSettings
from ov_train.config.schema import ModelConfig
from ov_train.constants import IGNORE_INDEX
from ov_train.data.pairs import PairProcessor, collate_pairs
from ov_train.data.samples import SampleError, SampleProcessor, stock_inputs
from ov_train.data.video import encode_mp4
from ov_train.model.preference import pair_logps, sequence_logps
from ov_train.vision.geometry import VisionGeometry
from tests.helpers import noise_png, raw_sample

OPTIONS = {
    "full": ModelConfig.stock(),
    "chunked": ModelConfig.stock(loss="chunked", loss_chunk=5),
    "packed": ModelConfig.stock(packing=True, max_tokens=64, loss="chunked", loss_chunk=7),
}


def stock_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain computation: the stock forward's full logits, log-softmax, the label's entry, summed per sequence."""
    logits = model(**stock_inputs(batch)).logits
    target = batch["labels"][:, 1:]
    mask = target != IGNORE_INDEX
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)
    return (logps * mask).sum(1), mask.sum(1)


def pair_raw(key, human, chosen, rejected, images=(), video=None) -> dict:
    raw = raw_sample(key, human, chosen, images, video)
    raw["json"] = json.dumps({**json.loads(raw["json"]), "rejected": rejected}).encode()
    return raw


@pytest.fixture(scope="module")
def pairs(tiny_model_and_tokenizer):
    """Processed pairs: an anyres image, three images, a video, text only; replies of different lengths."""
    model, tokenizer = tiny_model_and_tokenizer
    process = SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5", MediaSettings.of("anyres_max_9", 8),
                              max_length=4096)
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    raws = [
        pair_raw("a", "<image>\nWhat colour?", "red", "a deep shade of blue", [noise_png(70, 30, 1)]),
        pair_raw("b", "<image>\n<image>\n<image>\nWhich one?", "the second one", "first",
                 [noise_png(32, 32, 2), noise_png(50, 20, 3), noise_png(16, 64, 4)]),
        pair_raw("c", "<video>\nWhich way?", "left", "right, then up", video=encode_mp4(frames, fps=1)),
        pair_raw("d", "What is the opposite of up?", "down", "sideways"),
    ]
    return model, tokenizer, [PairProcessor(process)(r) for r in raws]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_sequence_logps_equal_the_stock_forward(mixed_batch, name):
    model, _, batch = mixed_batch
    model.eval()
    with torch.no_grad():
        ours, counts = sequence_logps(model, batch, OPTIONS[name])
        stock, stock_counts = stock_logps(model, batch)
    assert torch.equal(counts, stock_counts) and (counts > 0).all()
    assert torch.allclose(ours, stock, rtol=1e-5, atol=1e-4)


def _tower_crops(model, fn) -> tuple[list[int], object]:
    """Crops and frames through the tower per call while fn() runs, and fn's result."""
    tower = model.model.vision_tower
    calls = []
    hook = getattr(tower, "vision_model", tower).embeddings.register_forward_hook(
        lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        return calls, fn()
    finally:
        hook.remove()


@pytest.mark.parametrize("name", ["full", "packed"])
def test_pairs_encode_their_media_once_and_equal_encoding_twice(pairs, name):
    model, tokenizer, examples = pairs
    shared, twice = (collate_pairs(examples, tokenizer.pad_token_id, share_media=s) for s in (True, False))
    once_crops = sum(img.pixel_values.shape[0] for e in examples for img in e["images"])
    once_crops += sum(e["frames"].shape[0] for e in examples if e["frames"] is not None)
    model.eval()
    with torch.no_grad():
        calls_shared, (logps, chosen_n, rejected_n) = _tower_crops(model, lambda: pair_logps(model, shared, OPTIONS[name]))
        calls_twice, (logps2, chosen_n2, rejected_n2) = _tower_crops(model, lambda: pair_logps(model, twice, OPTIONS[name]))
        stock, stock_counts = stock_logps(model, twice)
    # One tower call over every pair's crops and frames once; encoding twice sends each through it twice.
    assert calls_shared == [once_crops] and calls_twice == [2 * once_crops]
    for ours, other in ((logps.chosen, logps2.chosen), (logps.rejected, logps2.rejected)):
        assert torch.allclose(ours, other, rtol=1e-6, atol=1e-5)
    assert torch.allclose(torch.cat([logps.chosen, logps.rejected]), stock, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.cat([chosen_n, rejected_n]), stock_counts)
    assert torch.equal(chosen_n, chosen_n2) and torch.equal(rejected_n, rejected_n2)
    assert not torch.equal(chosen_n, rejected_n)  # the replies differ: the two halves are not one sequence twice


def test_pair_gradients_equal_encoding_twice(pairs):
    model, tokenizer, examples = pairs
    model.train()
    grads = []
    for share in (True, False):
        model.zero_grad()
        logps, _, _ = pair_logps(model, collate_pairs(examples, tokenizer.pad_token_id, share), OPTIONS["packed"])
        (logps.chosen - 0.5 * logps.rejected).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    shared, twice = grads
    assert shared.keys() == twice.keys()
    assert any(n.startswith("model.vision_tower") and shared[n].any() for n in shared)  # the tower gets gradients
    for name in shared:
        assert torch.allclose(shared[name], twice[name], rtol=1e-4, atol=1e-6), name


def test_a_sample_without_a_rejected_reply_is_skipped_by_reason(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    process = SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5", MediaSettings.of("anyres_max_9", 8),
                              max_length=4096)
    with pytest.raises(SampleError) as err:
        PairProcessor(process)(raw_sample("sft", "Say hi.", "hi"))
    assert err.value.reason == "not_a_pair" and "sample sft" in str(err.value)
