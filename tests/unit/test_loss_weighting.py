"""stage.loss_weighting: `sample` on a packed batch equals the samples run one by one (batch 1) and averaged, in
loss and gradients; split into micro-batches with the step's denominator, either weighting equals one batch."""
import numpy as np
import pytest
import torch

from ov_train.config.media import MediaSettings
from ov_train.config.schema import ModelConfig
from ov_train.data.samples import SampleProcessor, collate
from ov_train.data.video import encode_mp4
from ov_train.model.forward import sample_losses
from ov_train.model.loss import weighted_loss
from ov_train.vision.geometry import VisionGeometry
from tests.helpers import noise_png, raw_sample

PACKED = ModelConfig.stock(packing=True, max_tokens=4096, loss="chunked", loss_chunk=64)
STOCK = ModelConfig.stock()  # padded batch, full logits: what batch 1 runs


def _loss_and_grads(model, batch, options, weighting, denominator=None):
    model.zero_grad(set_to_none=True)
    sums, counts, _ = sample_losses(model, batch, options)
    loss = weighted_loss(sums, counts, weighting, denominator)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_grads_close(ours: dict, reference: dict):
    assert ours.keys() == reference.keys()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, reference[name], atol=2e-6, rtol=2e-4, msg=name)


@pytest.fixture(scope="module")
def setting(tiny_model_and_tokenizer):
    """Four samples whose answers differ in length: an anyres image, two images, a video, text only."""
    model, tokenizer = tiny_model_and_tokenizer
    process = SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5", MediaSettings.of("anyres_max_9", 8),
                              max_length=4096)
    frames = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    raws = [
        raw_sample("a", "<image>\nDescribe it.", "a red circle, left", [noise_png(70, 30, 1)]),
        raw_sample("b", "<image>\n<image>\nWhich one?", "second", [noise_png(32, 32, 2), noise_png(50, 20, 3)]),
        raw_sample("c", "<video>\nWhich way?", "to the left", video=encode_mp4(frames, fps=1)),
        raw_sample("d", "What is the opposite of up?", "down"),
    ]
    examples = [process(r) for r in raws]
    return model.train(), examples, collate(examples, tokenizer.pad_token_id), tokenizer.pad_token_id


def test_sample_weighting_equals_batch_one_and_averaging(setting):
    model, examples, batch, pad = setting
    counts = [(e["labels"][1:] != -100).sum().item() for e in examples]
    assert len(set(counts)) > 1, "answers of different lengths are what tells the weightings apart"
    packed_loss, packed_grads = _loss_and_grads(model, batch, PACKED, "sample")
    # One sample per step, each its own mean loss, accumulated with weight 1/n: the public recipe's batch 1.
    model.zero_grad(set_to_none=True)
    total = 0.0
    for example in examples:
        sums, n, _ = sample_losses(model, collate([example], pad), STOCK)
        loss = sums.sum() / n.sum() / len(examples)
        loss.backward()
        total += loss.item()
    one_by_one = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert packed_loss.item() == pytest.approx(total, rel=1e-5)
    _assert_grads_close(packed_grads, one_by_one)
    # Token weighting differs on this batch: long answers weigh more.
    token_loss, _ = _loss_and_grads(model, batch, PACKED, "token")
    assert abs(token_loss.item() - packed_loss.item()) > 1e-3


@pytest.mark.parametrize("weighting", ["token", "sample"])
def test_micro_batches_with_the_step_denominator_equal_one_batch(setting, weighting):
    model, examples, batch, pad = setting
    whole_loss, whole_grads = _loss_and_grads(model, batch, PACKED, weighting)
    parts = [collate(examples[:2], pad), collate(examples[2:], pad)]
    tokens = sum(int((p["labels"][:, 1:] != -100).sum()) for p in parts)
    denominator = tokens if weighting == "token" else len(examples)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for part in parts:
        sums, counts, _ = sample_losses(model, part, PACKED)
        loss = weighted_loss(sums, counts, weighting, denominator)
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert whole_loss.item() == pytest.approx(total, rel=1e-5)
    _assert_grads_close(grads, whole_grads)


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="stage.loss_weighting='mean'"):
        weighted_loss(torch.ones(2), torch.ones(2), "mean")
