"""Linear cross-entropy over supervised positions without ever holding [tokens, vocab] logits.

`hidden` holds the final hidden states of the supervised positions only, `weight` is the LM head
([vocab, d], no bias in Qwen2). Two implementations:

- `chunked_cross_entropy`: the head runs on `chunk` rows at a time; each chunk is wrapped in
  activation checkpointing, so its logits are freed after the forward and rebuilt one chunk at a
  time in the backward. Peak extra memory is a few [chunk, vocab] tensors. It can also return the
  argmax per position (validation accuracy) without full logits.
- Liger's fused linear cross-entropy (`fused_available()`): on CUDA, when liger-kernel imports.
  It computes the gradient inside its forward chunk by chunk, so the logits are never rebuilt.
  It is called with reduction="sum" once per sample: per-token losses ("none") had wrong
  gradients in released Liger versions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ov_train.constants import LOSS_WEIGHTINGS


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, predict: bool):
    logits = F.linear(hidden, weight).float()
    losses = F.cross_entropy(logits, targets, reduction="none")
    return losses, (logits.argmax(-1) if predict else None)


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None, predict: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position losses [N] (and argmax predictions [N] when `predict`); `chunk=None`: one piece."""
    if chunk is None or chunk >= hidden.shape[0]:
        return _chunk_loss(hidden, weight, targets, predict)
    differentiable = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    losses, preds = [], []
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        if differentiable:
            loss, pred = checkpoint(_chunk_loss, h, weight, t, predict, use_reentrant=False)
        else:
            loss, pred = _chunk_loss(h, weight, t, predict)
        losses.append(loss)
        preds.append(pred)
    return torch.cat(losses), (torch.cat(preds) if predict else None)


def fused_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def fused_cross_entropy_sums(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Loss sum per sample [len(counts)] with Liger's fused kernel; rows of a sample are contiguous."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if torch.is_autocast_enabled(hidden.device.type):
        # The kernel does not autocast; cast once here so its matmuls run in the autocast dtype.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    sums = [
        loss_fn(weight, h, t) if n else hidden.new_zeros((), dtype=torch.float32)
        for h, t, n in zip(hidden.split(counts), targets.split(counts), counts)
    ]
    return torch.stack([s.float() for s in sums])


def weighted_loss(sums: torch.Tensor, counts: torch.Tensor, weighting: str, denominator=None) -> torch.Tensor:
    """The loss to backpropagate from per-sample loss sums [B] and supervised-token counts [B], combined as
    `weighting` (constants.LOSS_WEIGHTINGS, stage.loss_weighting) says.

    token: sum of all token losses / tokens (long answers weigh more); sample: sum of each sample's mean loss /
    samples (every sample weighs the same, as batch 1 with accumulation gives). `denominator`: the tokens or
    samples the whole optimizer step divides by (its micro-batches on this rank, the DDP average supplying the
    rest); None: this batch's own.
    """
    if weighting == "token":
        numerator, own = sums.sum(), counts.sum()
    elif weighting == "sample":
        supervised = counts > 0
        numerator, own = (sums[supervised] / counts[supervised]).sum(), supervised.sum()
    else:
        raise ValueError(f"stage.loss_weighting={weighting!r}; allowed: {list(LOSS_WEIGHTINGS)}")
    return numerator / (own.clamp_min(1) if denominator is None else denominator)

