"""The preference stage's LightningModule: OneVisionModule with a pair loss (DPO and relatives, model/preference.py)
in place of the conversation loss, reward metrics per modality, and held-out preference accuracy and margin.

Batches hold N pairs as 2N sequences (data/pairs.py: collate_pairs; each pair's media encoded once). The
reference log-probabilities come from (stage.preference.reference, resolved by the plan):
- `adapters_off`: the policy itself with its PEFT adapters switched off (the adapters are the only trained tensors,
  so that is the starting model), under no_grad;
- `frozen`: a copy of the starting weights made before training, kept out of checkpoints (a resume rebuilds it
  from model.init_from, as it was) and out of the strategies' reach;
- `precomputed`: the starting weights' numbers, looked up by sample key (training/reference_store.py).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import contextmanager

import torch

from ov_train.config.preference import PreferenceSettings
from ov_train.constants import MODALITIES
from ov_train.model.preference import PairLogps, pair_logps, preference_loss
from ov_train.training.module import OneVisionModule

# Columns of the per-pair statistics that batch_loss hands to log_training (and validation sums).
STATS = ("loss", "chosen", "rejected", "margin", "accuracy")


@contextmanager
def adapters_off(model):
    """The model with every PEFT adapter layer switched off (BaseTunerLayer.enable_adapters), on again after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class PreferenceModule(OneVisionModule):
    def __init__(self, model, optim, preference: PreferenceSettings, store=None, **kwargs):
        super().__init__(model, optim, **kwargs)
        self.preference = preference
        self.settings = preference
        # Not a registered submodule: no checkpoint holds it and no strategy wraps or shards it.
        self.__dict__["_frozen"] = None
        if preference.reference == "frozen":
            self.__dict__["_frozen"] = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.__dict__["_store"] = store  # precomputed: a ReferenceStore
        self._val_pairs = defaultdict(lambda: torch.zeros(len(STATS) + 1, dtype=torch.float64))

    def on_fit_start(self):
        if self._frozen is not None:
            # The policy's device and dtype as the strategy left them (DeepSpeed casts the module to bf16).
            self._frozen.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        if self._store is not None:
            data = self.trainer.datamodule
            with self.trainer.precision_plugin.forward_context():
                self._store.fill(self.model, self.forward_options, _Lazy(data.train_dataloader),
                                 _Lazy(data.val_dataloader), self.trainer.max_steps, self.global_rank, self.device)

    def reference_logps(self, batch) -> PairLogps:
        """The reference model's log-probabilities of a pair batch."""
        if self.preference.reference == "precomputed":
            return self._store.lookup(batch, self.device)
        with torch.no_grad():
            if self.preference.reference == "adapters_off":
                with adapters_off(self.model):
                    logps, _, _ = pair_logps(self.model, batch, self.forward_options)
            else:
                logps, _, _ = pair_logps(self._frozen, batch, self.forward_options)
        return PairLogps(logps.chosen.detach(), logps.rejected.detach())

    fsdp_forward = "pair_output"  # the policy's forward of every micro-batch and held-out batch

    def pair_output(self, batch, denominator=None):
        policy, chosen_n, rejected_n = pair_logps(self.model, batch, self.forward_options)
        reference = self.reference_logps(batch)
        return preference_loss(self.settings, policy, reference, chosen_n, rejected_n, denominator)

    def batch_loss(self, batch, denominator=None):
        """The pair loss; per pair, its statistics (STATS) for the log; the pairs' modalities."""
        out = self.pair_output(batch, denominator)
        stats = torch.stack([out.pair_losses.detach(), out.chosen_rewards, out.rejected_rewards, out.margins,
                             out.accuracies], 1)
        return out.loss, stats, batch["modality"][: batch["pairs"]]

    def log_training(self, loss, per_sample, modalities, batch_idx):
        super().log_training(loss, per_sample[:, 0], modalities, batch_idx)
        for name, values in self._reward_means(per_sample, modalities).items():
            self.log(f"train/{name}", values[0], batch_size=values[1])

    @staticmethod
    def _reward_means(stats, modalities) -> dict[str, tuple[torch.Tensor, int]]:
        """rewards/<stat> over the batch and rewards/<stat>_<modality>: (mean, pairs)."""
        out = {}
        groups = {"": torch.ones(len(modalities), dtype=torch.bool, device=stats.device)}
        for m in sorted(set(modalities)):
            groups[f"_{m}"] = torch.tensor([x == m for x in modalities], device=stats.device)
        for suffix, sel in groups.items():
            for col, name in enumerate(STATS[1:], 1):
                out[f"rewards/{name}{suffix}"] = (stats[sel, col].mean(), int(sel.sum()))
        return out

    # ------------------------------------------------------------------ held-out pairs

    def validation_step(self, batch, batch_idx):
        with torch.no_grad():
            out = self.pair_output(batch)
        if batch.get("padding"):  # a repeat that only keeps the ranks in step (training/held_out.py)
            return None
        rows = torch.stack([out.pair_losses, out.chosen_rewards, out.rejected_rewards, out.margins, out.accuracies,
                            torch.ones_like(out.margins)], 1).double().cpu()
        for i, modality in enumerate(batch["modality"][: batch["pairs"]]):
            self._val_pairs[modality] += rows[i]
        return None

    def on_validation_epoch_start(self):
        self._val_pairs.clear()

    def on_validation_epoch_end(self):
        stats = self.summed_over_ranks(self._val_pairs)
        total = stats.sum(0)
        if total[-1] == 0:
            return
        self.val_metrics = {
            "val/loss": float(total[0] / total[-1]),
            "val/preference_accuracy": float(total[4] / total[-1]),
            "val/reward_margin": float(total[3] / total[-1]),
            "val/rewards/chosen": float(total[1] / total[-1]),
            "val/rewards/rejected": float(total[2] / total[-1]),
            "val/samples": int(total[-1]),
        }
        for m, s in zip(MODALITIES, stats):
            if s[-1] > 0:
                for col, name in enumerate(STATS):
                    key = "loss" if name == "loss" else f"rewards/{name}"
                    self.val_metrics[f"val/{key}_{m}"] = float(s[col] / s[-1])
        self.log_dict({k: float(v) for k, v in self.val_metrics.items()}, sync_dist=True)


class _Lazy:
    """An iterable whose loader is made only when iterated (a complete store reads none)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())
