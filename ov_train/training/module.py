"""LightningModule: the model, the loss, per-part optimizer groups, warmup + cosine, metrics per modality."""
from __future__ import annotations

from collections import defaultdict

import lightning as L
import torch

from ov_train.config.adapter import AdapterPlan
from ov_train.config.run_plan import OptimPlan
from ov_train.config.schema import ModelConfig
from ov_train.constants import MODALITIES
from ov_train.model.adapters import dropout_seed
from ov_train.model.forward import prepare_model, sample_losses
from ov_train.model.loss import weighted_loss
from ov_train.model.parts import apply_stage, format_table
from ov_train.training import step
from ov_train.training.optim import build_adamw
from ov_train.training.schedule import lr_schedule
from ov_train.utils.logging import get_logger

log = get_logger(__name__)

# This many non-finite batches in a row means the weights themselves are broken: skipping on would train nothing.
MAX_NONFINITE_IN_A_ROW = 10


class OneVisionModule(L.LightningModule):
    def __init__(
        self, model, optim: OptimPlan, forward_options: ModelConfig | None = None, tokenizer_dir: str | None = None,
        nonfinite: str = "skip", identity: dict | None = None, template: str | None = None,
        adapter: AdapterPlan | None = None, seed: int = 0,
    ):
        super().__init__()
        self.tokenizer_dir = tokenizer_dir
        # What a resume must match (the plan's identity: stage, model, geometry, max_steps), kept in checkpoints,
        # and the chat template the export renders.
        self.identity, self.template = identity, template
        self.model = model.train()  # from_pretrained hands models back in eval mode
        self.optim = optim
        # stage.loss_weighting: token or sample (model/loss.py: weighted_loss). Every step is taken by hand
        # (training/step.py): a token-budget batch, or with data.samples_per_step a bundle of micro-batches.
        self.loss_weighting = optim.step.loss_weighting
        self.automatic_optimization = False
        # Packing, loss, attention and activation checkpointing: the model config's performance keys.
        self.forward_options = forward_options or ModelConfig.stock()
        prepare_model(model, self.forward_options)
        # With adapters (placed before, checkpoints/adapters.py): in adapted parts only PEFT's tensors train, and
        # checkpoints hold the trainable tensors only (the base comes from the record), so loading them is not strict
        # (on_load_checkpoint checks them).
        self.adapter, self.seed = adapter, seed
        self.strict_loading = adapter is None
        # Freezing happens here, once, before any strategy wraps the model.
        _, self.part_rows = apply_stage(model, optim.part_lrs, optim.weight_decay, optim.adapted)
        self.parameter_table = format_table(self.part_rows)
        log.info("trainable and frozen parameters:\n%s", self.parameter_table)
        # Per modality: loss sum, supervised tokens, correct answers, chance, samples.
        self._val = defaultdict(lambda: torch.zeros(5, dtype=torch.float64))
        # What a non-finite training loss does (see _skip_nonfinite); skipped batches are counted.
        self.nonfinite = nonfinite
        self.nonfinite_batches = 0
        self._nonfinite_in_a_row = 0
        self._drop_gradients = False
        # This rank's sequence-parallel group (parallel/sequence.py), set by strategies.SequenceParallelSetup; None
        # without sequence parallelism. The group's losses come back reduced (the group's sums and counts).
        self.sequence_parallel = None

    # The method FSDP2 gathers the root's weights around (ov_train.strategies): every forward of a step goes through it.
    fsdp_forward = "losses"

    def losses(self, batch, predict: bool = False):
        """Per sample: loss sum, supervised tokens and (with `predict`) the greedy next-token predictions [B, L-1].

        The module's forward: FSDP2 gathers the root's weights around each call (ov_train.strategies)."""
        return sample_losses(self.model, batch, self.forward_options, predict, parallel=self.sequence_parallel)

    def on_train_batch_start(self, batch, batch_idx):
        if self.adapter and self.adapter.dropout > 0:
            # Adapter dropout draws from the global generator: seeding it per step and rank makes a resumed run draw
            # the masks an uninterrupted one draws.
            torch.manual_seed(dropout_seed(self.seed, self.global_step, self.global_rank))

    def batch_loss(self, batch, denominator=None):
        """(the loss to backpropagate, per-sample losses for the log, their modalities) of one batch; `denominator`:
        the whole step's (training/step.py). The hook the preference stage's module replaces
        (training/preference.py)."""
        sums, counts, _ = self.losses(batch)
        return weighted_loss(sums, counts, self.loss_weighting, denominator), sums / counts.clamp_min(1), batch["modality"]

    def training_step(self, batch, batch_idx):
        return step.training_step(self, batch, batch_idx)

    def log_training(self, loss, per_sample, modalities: list[str], batch_idx: int) -> None:
        bs = len(modalities)
        by_modality = {}
        for modality in sorted(set(modalities)):
            sel = torch.tensor([m == modality for m in modalities], device=per_sample.device)
            by_modality[modality] = (per_sample[sel].mean(), int(sel.sum()))
        # A skipped batch's backward still runs, so data-parallel ranks stay in step; on_before_optimizer_step drops
        # its gradients. Its losses are logged as they are, non-finite: Lightning re-sends a key's last value on
        # steps that do not log it, so logging nothing would show the previous step's loss.
        self._skip_nonfinite(loss, by_modality, batch_idx)
        # Dashboards plot this optimizer step's number, as the console counts it (`step 10/750`): Lightning's own
        # x-axis is the count of steps before it (9).
        self.log("step", float(self.global_step + 1), batch_size=bs)
        self.log("train/nonfinite_batches", float(self.nonfinite_batches), batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for modality, (value, n) in by_modality.items():
            self.log(f"train/loss_{modality}", value, batch_size=n)
        for group in self.trainer.optimizers[0].param_groups:
            self.log(f"lr/{group['name']}", group["lr"], batch_size=bs)

    def _skip_nonfinite(self, loss, by_modality: dict, batch_idx: int) -> bool:
        """Whether this batch is skipped for a non-finite loss (on any rank), its update dropped; raises when
        nonfinite=stop."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:
            # Every rank must take the same branch, or the ranks that step would wait forever for the others.
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bad:  # one scalar read per step: the price of never training on a NaN
            self._nonfinite_in_a_row = 0
            return False
        culprits = [
            f"train/loss_{m}={v.item()} ({n} samples)" for m, (v, n) in by_modality.items() if not torch.isfinite(v)
        ]
        what = ", ".join(culprits) or f"train/loss={loss.item()} on this rank"
        where = f"step {self.global_step} (batch {batch_idx}), on {int(bad)} of {self.trainer.world_size} rank(s)"
        self._nonfinite_in_a_row += 1
        if self.nonfinite == "stop":
            raise FloatingPointError(f"non-finite training loss at {where}: {what}; nonfinite=skip skips such batches")
        if self._nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise FloatingPointError(
                f"non-finite training loss at {where}: {what}; {self._nonfinite_in_a_row} batches in a row, so the "
                "weights themselves are likely broken: stopping"
            )
        self.nonfinite_batches += 1
        self._drop_gradients = True
        log.warning("no update at %s: non-finite loss %s (%d batches skipped so far)", where, what, self.nonfinite_batches)
        return True

    def on_before_optimizer_step(self, optimizer):
        if self._drop_gradients:
            # No update from a step that saw a non-finite loss: AdamW leaves parameters without gradients untouched.
            optimizer.zero_grad(set_to_none=True)
            self._drop_gradients = False
        elif self.optim.step.clip_val:
            # The one clipping call (DeepSpeed's precision leaves it to the engine, which clips by its config: see
            # ov_train.strategies); after the callbacks' hooks, so the logged gradient norms are before clipping.
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.step.clip_val, gradient_clip_algorithm="norm")

    def validation_step(self, batch, batch_idx):
        # A sample counts as answered when greedy decoding would reproduce its whole reply.
        sums, counts, predictions = self.losses(batch, predict=True)
        if batch.get("padding"):  # a rank that ran out of held-out batches keeps the others company (held_out.py)
            return None
        correct = (predictions == batch["labels"][:, 1:]).all(1)  # both IGNORE_INDEX where unsupervised
        hits = correct.double()
        # A sequence-parallel group's ranks hold the same batch and the same (reduced) results: its first counts them.
        counted = self.sequence_parallel is None or self.sequence_parallel.rank == 0
        for i, modality in enumerate(batch["modality"] if counted else []):
            self._val[modality] += torch.stack(
                [sums[i].double(), counts[i].double(), hits[i], hits.new_tensor(batch["chance"][i]), hits.new_ones(())]
            ).cpu()
        # For the sample table (training/metrics.py: ValidationPredictions).
        return {"correct": correct, "predictions": predictions}

    def on_validation_epoch_start(self):
        self._val.clear()

    def summed_over_ranks(self, per_modality: dict) -> torch.Tensor:
        """The held-out statistics of each modality (rows in MODALITIES order), summed over the ranks."""
        stats = torch.stack([per_modality[m] for m in MODALITIES])
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats.to(self.device), reduce_op="sum").cpu()
        return stats

    def on_validation_epoch_end(self):
        stats = self.summed_over_ranks(self._val)
        total = stats.sum(0)
        if total[4] == 0:
            return
        self.val_metrics = {
            "val/loss": float(total[0] / total[1].clamp_min(1)),
            "val/accuracy": float(total[2] / total[4]),
            "val/samples": int(total[4]),
        }
        if total[3] > 0:  # some sample has answer options; without any, chance is not 0 but unknown (n/a)
            self.val_metrics["val/chance_accuracy"] = float(total[3] / total[4])
        for m, s in zip(MODALITIES, stats):
            if s[4] > 0:
                self.val_metrics[f"val/loss_{m}"] = float(s[0] / s[1].clamp_min(1))
                self.val_metrics[f"val/accuracy_{m}"] = float(s[2] / s[4])
        # Every rank holds the same summed totals: sync_dist averages equal values (and is what Lightning
        # expects of epoch-level metrics under several processes).
        self.log_dict({k: float(v) for k, v in self.val_metrics.items()}, sync_dist=True)
        self.log("step", float(self.global_step), sync_dist=True)  # validation follows the step it is counted at

    def on_save_checkpoint(self, checkpoint):
        # Enough to rebuild the model without the run's config, check a resume against (run), and describe it (chat
        # template, model card): ov-export reads it.
        recipe = getattr(getattr(attached_trainer(self), "datamodule", None), "recipe", None)
        checkpoint["ov_train"] = {
            "model_config": self.model.config.to_dict(), "tokenizer_dir": self.tokenizer_dir, "run": self.identity,
            "stage": (self.identity or {}).get("stage"), "template": self.template,
            "recipe": getattr(recipe, "name", None), "data_mix": recipe.shares("name") if recipe else {},
            "val_metrics": dict(getattr(self, "val_metrics", {})),
        }
        if self.adapter:
            # The adapter settings and what the base was: resumes and ov-export rebuild the frozen base from it.
            checkpoint["ov_train"]["adapter"] = self.adapter.to_dict()
            keep = self._trainable_keys()
            if "state_dict" in checkpoint:  # DeepSpeed writes weights itself (exclude_frozen_parameters)
                checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
            weights = sum(_nbytes(v) for v in checkpoint.get("state_dict", {}).values())
            optimizer = sum(_nbytes(v) for v in checkpoint.get("optimizer_states", []))
            log.info("checkpoint at step %d: %d trainable tensors, %.2f MiB of weights and %.2f MiB of optimizer state"
                     " (this rank's share under sharded engines); the base is not saved", self.global_step, len(keep),
                     weights / 2**20, optimizer / 2**20)

    def on_load_checkpoint(self, checkpoint):
        self.resumed_step = checkpoint.get("global_step", 0)  # train() tells a resume with nothing left to train
        if not self.adapter or "state_dict" not in checkpoint:  # sharded engines load (and check) the weights themselves
            return
        stored, wanted = set(checkpoint["state_dict"]), self._trainable_keys()
        if stored != wanted:
            missing, unexpected = sorted(wanted - stored)[:5], sorted(stored - wanted)[:5]
            raise RuntimeError(f"the checkpoint's trainable tensors do not fit this run's adapters: missing {missing},"
                               f" unexpected {unexpected}")

    def _trainable_keys(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def configure_model(self):
        # FSDP2 (ov_train.strategies.FSDP2Strategy) shards here: after the process group exists, before the optimizer.
        parallelize = getattr(self.trainer.strategy, "parallelize", None)
        if parallelize is not None:
            parallelize(self)

    def configure_optimizers(self):
        # Groups from the parameters as the strategy left them: fully_shard swaps each one for its sharded version.
        groups, _ = apply_stage(self.model, self.optim.part_lrs, self.optim.weight_decay, self.optim.adapted)
        # The strategy decides who keeps fp32 masters (None when called outside a Trainer, as the DeepSpeed tests do).
        optimizer = build_adamw(groups, getattr(attached_trainer(self), "strategy", None))
        log.info("optimizer: %s", type(optimizer).__name__)
        scheduler = lr_schedule(optimizer, self.optim.total_steps, self.optim.warmup_ratio, self.optim.warmup_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's Trainer, or None outside one (where LightningModule.trainer raises)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def _nbytes(tree) -> int:
    """Bytes of the tensors in a nested structure (a state dict, an optimizer state)."""
    if isinstance(tree, torch.Tensor):
        return tree.nelement() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0
