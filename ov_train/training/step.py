"""One optimizer step: the one training path, under Lightning's manual optimization for every run.

A training batch is either one token-budget batch (one forward and backward) or, with data.samples_per_step, a step
bundle (ov_train.data.step_batches): this rank's samples_per_step / world_size samples in token-budget micro-batches,
whose number varies from step to step and rank to rank. Per step:
- for a bundle, one all_gather of (micro-batches, supervised tokens, samples) over the ranks: every rank then runs
  the largest micro-batch count, the missing ones as a repeat of its last micro-batch weighted 0, since sharded
  engines (FSDP2, ZeRO-3) gather weights in every forward and ranks making different calls would hang;
- the loss of each micro-batch is scaled by the whole step's tokens or samples (stage.loss_weighting), so the summed
  gradients equal one backward over the whole global batch (a single batch: its own, as data-parallel averaging wants);
- gradients are synchronised in the last backward only (DDP no_sync, FSDP2 set_requires_gradient_sync; DeepSpeed is
  told which backward ends its accumulation);
- then optimizer.step(), inside which Lightning runs the gradient-norm callbacks and the module's
  on_before_optimizer_step (non-finite skip, clipping), and the learning rate schedule advances once.
The SIGTERM stop is agreed between steps (checkpoints/saving.py: SaveOnSigterm), so a step is never cut in half.
Under DeepSpeed, Lightning calls training_step through the engine's forward, so the whole step runs inside it: ZeRO-3
then refuses to release weights gathered there (deepspeed.zero.GatheredParameters), so hooks of the step must not.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.distributed.fsdp import FSDPModule

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


def _gradient_sync(module, optimizer, last: bool):
    """The context of one backward that synchronises gradients across ranks only when `last`."""
    deepspeed = getattr(module.trainer.strategy, "deepspeed_engine", None)
    if deepspeed is not None:  # ZeRO refuses no_sync: the boundary flag alone holds its reduction back
        deepspeed.set_gradient_accumulation_boundary(last)
        return nullcontext()
    if isinstance(module, FSDPModule):  # fully_shard made the LightningModule the root (ov_train.strategies)
        module.set_requires_gradient_sync(last)
        return nullcontext()
    return optimizer.toggle_model(sync_grad=last)  # DDP's no_sync before the last backward


def training_step(module, batch: dict, batch_idx: int) -> torch.Tensor:
    """Forward and backward every micro-batch of the batch, then one optimizer step; returns the step's loss on
    this rank (detached)."""
    bundle = "micro_batches" in batch
    micro_batches = batch["micro_batches"] if bundle else [batch]
    runs, denominator = step_totals(module, micro_batches) if bundle else (1, None)
    optimizer = module.optimizers()
    deepspeed = getattr(module.trainer.strategy, "deepspeed_engine", None)
    loss_total = torch.zeros((), device=module.device)
    per_sample, modalities = [], []
    for k in range(runs):
        real = k < len(micro_batches)
        micro_batch = micro_batches[min(k, len(micro_batches) - 1)]
        if deepspeed is not None and k:
            # What DeepSpeedEngine.forward does before every forward, and only the step's first micro-batch went
            # through it: ZeRO closes the last backward's bookkeeping (ZeRO-3 would otherwise overwrite the
            # accumulated gradient partitions instead of adding to them).
            getattr(deepspeed.optimizer, "clear_backward_seen_flag", lambda: None)()
        with _gradient_sync(module, optimizer, last=k == runs - 1):
            loss, per, mods = module.batch_loss(micro_batch, denominator)
            module.manual_backward(loss if real else loss * 0)
        if real:
            loss_total += loss.detach()
            per_sample.append(per.detach())
            modalities += mods
    module.log_training(loss_total, torch.cat(per_sample), modalities, batch_idx)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    module.lr_schedulers().step()
    return loss_total
