"""One optimizer step over a global batch counted in samples (data.samples_per_step), under manual optimization.

Each training batch is a step bundle (ov_train.data.step_batches): this rank's samples_per_step / world_size
samples in token-budget micro-batches, whose number varies from step to step and rank to rank. Per step:
- one all_gather of (micro-batches, supervised tokens, samples) over the ranks: every rank then runs the
  largest micro-batch count, the missing ones as a repeat of its last micro-batch weighted 0, since sharded
  engines (FSDP2, ZeRO-3) gather weights in every forward and ranks making different calls would hang;
- the loss of each micro-batch is scaled by the whole step's tokens or samples (stage.loss_weighting), so the
  summed gradients equal one backward over the whole global batch;
- gradients are synchronised in the last backward only (DDP no_sync before it; DeepSpeed is told that only the
  last backward ends the accumulation), then clipped, stepped, and the learning rate schedule advances once.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ov_train.constants import IGNORE_INDEX


def _own_counts(micro_batches: list[dict], device) -> torch.Tensor:
    tokens = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
    samples = sum(mb.get("pairs") or len(mb["modality"]) for mb in micro_batches)  # a preference pair is one
    return torch.tensor([len(micro_batches), tokens, samples], dtype=torch.float64, device=device)


def step_totals(module, micro_batches: list[dict]) -> tuple[int, float]:
    """(micro-batches every rank runs, the loss denominator of this rank): the step's tokens or samples over
    all ranks divided by the world size, because data-parallel engines average the ranks' gradients."""
    own = _own_counts(micro_batches, module.device)
    world = module.trainer.world_size
    counts = module.all_gather(own).reshape(-1, 3) if world > 1 else own[None]
    runs = int(counts[:, 0].max())
    total = counts[:, 1 if module.loss_weighting == "token" else 2].sum()
    return runs, float(total) / world


def accumulated_step(module, bundle: dict, batch_idx: int) -> torch.Tensor:
    """Forward and backward every micro-batch of the bundle, then one optimizer step; returns the step's loss
    on this rank (detached)."""
    micro_batches = bundle["micro_batches"]
    optimizer = module.optimizers()
    runs, denominator = step_totals(module, micro_batches)
    # DeepSpeed accumulates by its own boundary flag (its configured accumulation stays 1); None elsewhere.
    deepspeed = getattr(module.trainer.strategy, "deepspeed_engine", None)
    loss_total = torch.zeros((), device=module.device)
    per_sample, modalities = [], []
    for k in range(runs):
        real = k < len(micro_batches)
        batch = micro_batches[min(k, len(micro_batches) - 1)]
        if deepspeed is not None:  # ZeRO refuses no_sync: the boundary flag alone holds its reduction back
            deepspeed.set_gradient_accumulation_boundary(k == runs - 1)
            if k:
                # What DeepSpeedEngine.forward does before every forward, and only the step's first micro-batch
                # went through it: ZeRO closes the last backward's bookkeeping (ZeRO-3 would otherwise overwrite
                # the accumulated gradient partitions instead of adding to them).
                getattr(deepspeed.optimizer, "clear_backward_seen_flag", lambda: None)()
        with nullcontext() if deepspeed is not None else optimizer.toggle_model(sync_grad=k == runs - 1):
            loss, per, mods = module._batch_loss(batch, denominator)
            module.manual_backward(loss if real else loss * 0)
        if real:
            loss_total += loss.detach()
            per_sample.append(per.detach())
            modalities += mods
    module._log_training(loss_total, torch.cat(per_sample), modalities, batch_idx)
    # Lightning runs the gradient-norm callbacks and the module's on_before_optimizer_step (skips, clipping) here.
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    module.lr_schedulers().step()
    return loss_total
