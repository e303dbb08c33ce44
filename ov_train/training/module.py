"""LightningModule: the model, the loss, per-part optimizer groups, warmup + cosine, metrics per modality."""
from __future__ import annotations

from collections import defaultdict
from functools import partial

import lightning as L
import torch

from ov_train.data.recipe import MODALITIES
from ov_train.model.forward import forward_logits, token_losses
from ov_train.model.parts import apply_stage, format_table
from ov_train.training.schedule import warmup_cosine
from ov_train.utils.logging import get_logger

log = get_logger(__name__)


class OneVisionModule(L.LightningModule):
    def __init__(self, model, stage, lr_scale: float, total_steps: int, tokenizer_dir: str | None = None):
        super().__init__()
        self.tokenizer_dir = tokenizer_dir
        self.model = model.train()  # from_pretrained hands models back in eval mode
        self.stage = stage
        self.total_steps = total_steps
        # Freezing happens here, once, before any strategy wraps the model.
        self.groups, self.part_rows = apply_stage(model, dict(stage.parts), lr_scale, stage.weight_decay)
        log.info("trainable parts for stage %s:\n%s", stage.name, format_table(self.part_rows))
        # Per modality: loss sum, supervised tokens, correct answers, chance, samples.
        self._val = defaultdict(lambda: torch.zeros(5, dtype=torch.float64))
        self.skipped: dict[str, int] = defaultdict(int)

    def _losses(self, batch):
        logits = forward_logits(self.model, batch)
        losses, mask = token_losses(logits, batch["labels"])
        return logits, losses, mask

    def training_step(self, batch, batch_idx):
        _, losses, mask = self._losses(batch)
        loss = losses.sum() / mask.sum().clamp_min(1)
        bs = len(batch["modality"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        per_sample = losses.sum(1) / mask.sum(1).clamp_min(1)
        for modality in set(batch["modality"]):
            sel = torch.tensor([m == modality for m in batch["modality"]], device=per_sample.device)
            self.log(f"train/loss_{modality}", per_sample[sel].mean(), batch_size=int(sel.sum()))
        for reason, n in batch["skipped"].items():
            self.skipped[reason] += n
        for group in self.trainer.optimizers[0].param_groups:
            self.log(f"lr/{group['name']}", group["lr"], batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        logits, losses, mask = self._losses(batch)
        hits = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) | ~mask
        # A sample counts as answered when greedy decoding would reproduce its whole reply.
        correct = hits.all(1).double()
        for i, modality in enumerate(batch["modality"]):
            self._val[modality] += torch.stack(
                [losses[i].sum().double(), mask[i].sum().double(), correct[i], batch["chance"][i].double(), correct.new_ones(())]
            ).cpu()

    def on_validation_epoch_start(self):
        self._val.clear()

    def on_validation_epoch_end(self):
        stats = torch.stack([self._val[m] for m in MODALITIES])
        if self.trainer.world_size > 1:
            stats = self.all_gather(stats.to(self.device)).reshape(-1, len(MODALITIES), 5).sum(0).cpu()
        total = stats.sum(0)
        if total[4] == 0:
            return
        self.val_metrics = {
            "val/loss": float(total[0] / total[1].clamp_min(1)),
            "val/accuracy": float(total[2] / total[4]),
            "val/chance_accuracy": float(total[3] / total[4]),
            "val/samples": int(total[4]),
        }
        for m, s in zip(MODALITIES, stats):
            if s[4] > 0:
                self.val_metrics[f"val/loss_{m}"] = float(s[0] / s[1].clamp_min(1))
                self.val_metrics[f"val/accuracy_{m}"] = float(s[2] / s[4])
        self.log_dict({k: float(v) for k, v in self.val_metrics.items()}, rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint):
        # Enough to rebuild the model without the run's config: ov-export reads it.
        checkpoint["ov_train"] = {"model_config": self.model.config.to_dict(), "tokenizer_dir": self.tokenizer_dir}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.groups, betas=(0.9, 0.999), eps=1e-8)
        lam = partial(warmup_cosine, total_steps=self.total_steps, warmup_ratio=self.stage.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
