"""Chunked linear cross-entropy: equal to the full-logits loss, and no [tokens, vocab] tensor ever exists."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ov_train.config.schema import ModelConfig
from ov_train.constants import IGNORE_INDEX
from ov_train.model.forward import sample_losses
from ov_train.model.loss import chunked_cross_entropy, fused_available

TOKENS, VOCAB, DIM, CHUNK = 300, 4096, 24, 64


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates, backward included."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, DIM, generator=g, requires_grad=True)
    weight = (torch.randn(VOCAB, DIM, generator=g) / DIM**0.5).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    return hidden, weight, targets


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_chunked_equals_full_logits(inputs):
    hidden, weight, targets = inputs
    full = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    chunked, _ = chunked_cross_entropy(hidden, weight, targets, CHUNK)  # 300 is no multiple of 64
    assert torch.allclose(chunked, full, atol=1e-5)
    for ours, ref in zip(_grads(chunked.sum(), hidden, weight), _grads(full.sum(), hidden, weight)):
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_predictions_are_the_full_argmax(inputs):
    hidden, weight, targets = inputs
    with torch.no_grad():
        _, preds = chunked_cross_entropy(hidden, weight, targets, CHUNK, predict=True)
        assert torch.equal(preds, (hidden @ weight.T).argmax(-1))


def test_no_full_logits_tensor_in_forward_or_backward(inputs):
    hidden, weight, targets = inputs
    with LargestTensor() as full_mode:
        F.cross_entropy(hidden @ weight.T, targets).backward()
    # The instrument sees the full [tokens, vocab] logits (and their gradient) when they exist...
    assert full_mode.numel >= TOKENS * VOCAB
    with LargestTensor() as chunked_mode:
        losses, _ = chunked_cross_entropy(hidden, weight, targets, CHUNK)
        losses.sum().backward()
    # ... and the chunked loss creates nothing larger than one chunk's logits, backward included.
    assert "_log_softmax_backward_data" in chunked_mode.ops
    assert chunked_mode.numel <= CHUNK * VOCAB < TOKENS * VOCAB


def test_chunk_none_is_one_piece(inputs):
    hidden, weight, targets = inputs
    with torch.no_grad():
        whole, _ = chunked_cross_entropy(hidden, weight, targets, None)
        assert torch.allclose(whole, F.cross_entropy(hidden @ weight.T, targets, reduction="none"), atol=1e-6)


def test_fused_kernel_is_only_used_on_cuda():
    assert not fused_available(torch.device("cpu"))


def test_head_weight_is_read_inside_the_heads_forward_only(mixed_batch):
    # ZeRO-3 and FSDP hold a sharded weight and gather it around the module's forward; emulate that.
    model, _, batch = mixed_batch
    head = model.lm_head
    full = head.weight.data
    head.weight.data = full.new_empty(0)
    gather = head.register_forward_pre_hook(lambda m, args: setattr(m.weight, "data", full))
    release = head.register_forward_hook(lambda m, args, out: setattr(m.weight, "data", full.new_empty(0)))
    options = ModelConfig.stock(packing=True, loss="chunked", loss_chunk=3)
    try:
        with torch.no_grad():
            sums, _, predictions = sample_losses(model, batch, options, predict=True)
    finally:
        gather.remove(), release.remove()
        head.weight.data = full
    with torch.no_grad():
        assert torch.allclose(sums, sample_losses(model, batch, options)[0])
        # The grid of the chunked head equals the one of full logits.
        full = sample_losses(model, batch, ModelConfig.stock(), predict=True)[2]
    assert torch.equal(predictions, full)
    assert torch.equal(predictions == IGNORE_INDEX, batch["labels"][:, 1:] == IGNORE_INDEX)
