"""Our training forward (per-image features, scattered) equals the stock transformers forward."""
import pytest
import torch

from ov_train.data.samples import collate, stock_inputs
from ov_train.model.forward import forward_logits, token_losses


def test_forward_matches_stock_model(mixed_batch):
    model, examples, batch = mixed_batch
    model.eval()
    with torch.no_grad():
        ours = forward_logits(model, batch)
        losses, mask = token_losses(ours, batch["labels"])
        stock = model(**stock_inputs(batch), labels=batch["labels"])
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
    model(**stock_inputs(batch), labels=batch["labels"]).loss.backward()
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


def _visual_calls(model, batch) -> tuple[list[int], int, dict]:
    """Over one forward and backward of `batch`: crops per tower call, projector calls, gradients by name."""
    tower = model.model.vision_tower
    embeddings = getattr(tower, "vision_model", tower).embeddings
    calls, projected = [], []
    hooks = [
        embeddings.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0])),
        model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: projected.append(1)),
    ]
    model.zero_grad()
    try:
        losses, mask = token_losses(forward_logits(model, batch), batch["labels"])
        (losses.sum() / mask.sum()).backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return calls, len(projected), grads


def test_tower_runs_once_over_all_crops_and_frames(mixed_batch):
    # ZeRO-3 and FSDP need every rank to call the tower the same number of times per step.
    model, _, batch = mixed_batch
    calls, projected, _ = _visual_calls(model, batch)
    assert calls == [batch["pixel_values"].shape[0] + batch["video_frames"].shape[0]] and projected == 1


def test_text_only_batch_runs_the_tower_on_a_dummy_crop_that_changes_nothing(mixed_batch):
    model, examples, batch = mixed_batch
    _, _, media_grads = _visual_calls(model, batch)
    text = collate([examples[3]], pad_id=0)
    assert text["pixel_values"] is None and text["video_frames"] is None
    calls, projected, grads = _visual_calls(model, text)
    assert calls == [1] and projected == 1
    # The same parameters get gradients as with media (zero for the visual ones), so data-parallel ranks
    # reduce the same set whatever their batches hold.
    assert grads.keys() == media_grads.keys()
    visual = [n for n in grads if not n.startswith(("model.language_model", "lm_head"))]
    assert "model.image_newline" in visual and not any(grads[n].any() for n in visual)
    model.eval()
    with torch.no_grad():
        stock = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
        assert torch.allclose(forward_logits(model, text), stock, atol=1e-5, rtol=1e-4)
