"""Preference losses (DPO and relatives) from per-sequence log-probabilities, and those log-probabilities
from the training forward.

Inputs are, per pair, the summed log-probabilities of the chosen and rejected replies under the policy and the
reference model, and the replies' token counts. Every formula is TRL's (tests/unit/test_preference_loss.py runs
TRL's own code on the same numbers):

- `sigmoid`: DPO, -log sigmoid(beta * delta) with delta = (policy - reference)[chosen] - (...)[rejected]. With
  `label_smoothing` e > 0 it is the conservative DPO (cDPO) of TRL's DPOTrainer before 1.0 and of LLaVA-NeXT's
  DPO trainer: -(1 - e) log sigmoid(beta * delta) - e log sigmoid(-beta * delta).
- `ipo`: (delta' - 1 / (2 beta))^2, delta' with each log-ratio divided by its reply's token count (as TRL and
  LLaVA-NeXT's IPO do).
- `hinge`: relu(1 - beta * delta).
- `sigmoid_sft`: `sigmoid` plus `sft_weight` times the NLL of the chosen replies, averaged over all chosen reply
  tokens of the batch (pooled, not per sequence): TRL's loss_type=["sigmoid", "sft"] with loss_weights=[1, w], the
  MPO recipe's generation term, and LLaVA-NeXT's `gamma` term.

The batch loss is the mean over pairs of the pair losses (plus the SFT term). Rewards are beta * (policy -
reference) of each reply, summed over its tokens (also under `ipo`), as TRL logs them; accuracy counts pairs whose
chosen reward is strictly greater.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ov_train.config.preference import PREFERENCE_LOSSES, SMOOTHED, PreferenceSettings  # noqa: F401 (re-exported)
from ov_train.config.schema import ModelConfig
from ov_train.model.forward import sample_losses


@dataclass(frozen=True)
class PairLogps:
    """Summed log-probabilities of each pair's chosen and rejected reply [N] under one model."""

    chosen: torch.Tensor
    rejected: torch.Tensor


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # scalar: the batch's loss, TRL's number
    pair_losses: torch.Tensor  # [N] the preference term per pair (the SFT term is not per pair)
    sft: torch.Tensor | None  # scalar: the chosen replies' mean token NLL (sigmoid_sft), unweighted
    chosen_rewards: torch.Tensor  # [N] beta * (policy - reference), detached
    rejected_rewards: torch.Tensor  # [N]
    margins: torch.Tensor  # [N] chosen - rejected reward
    accuracies: torch.Tensor  # [N] 1.0 where the chosen reward is the greater


def preference_loss(settings: PreferenceSettings, policy: PairLogps, reference: PairLogps,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    denominator: float | None = None) -> PreferenceOutput:
    """The loss of a batch of N pairs and its reward metrics; `*_tokens` [N]: the replies' supervised tokens.
    `denominator`: the pairs of the whole optimizer step (its micro-batches, ov_train.training.step), which the
    pair losses are summed over instead of this batch's N; the SFT term then weighs in by N / denominator."""
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    beta, smoothing = settings.beta, settings.label_smoothing
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    if settings.loss == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
        pair_losses = (delta - 1 / (2 * beta)) ** 2
    elif settings.loss == "hinge":
        pair_losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    else:
        logits = beta * (chosen_ratio - rejected_ratio)
        pair_losses = -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)
    share = 1.0 if denominator is None else len(pair_losses) / denominator
    loss = pair_losses.mean() * share
    sft = None
    if settings.loss == "sigmoid_sft":
        sft = -policy.chosen.sum() / chosen_tokens.sum().clamp_min(1)
        loss = loss + settings.sft_weight * sft * share
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return PreferenceOutput(
        loss=loss, pair_losses=pair_losses, sft=sft, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards, accuracies=(chosen_rewards > rejected_rewards).float(),
    )


def sequence_logps(model, batch: dict, options: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of the batch: the summed log-probability of its supervised (reply) tokens [B] and their count
    [B], by the training forward (packing and the chunked or fused cross-entropy as `options` say: no full logits).
    The loss sums of sample_losses are these negated."""
    sums, counts, _ = sample_losses(model, batch, options)
    return -sums, counts


def pair_logps(model, batch: dict, options: ModelConfig) -> tuple[PairLogps, torch.Tensor, torch.Tensor]:
    """Log-probabilities of a pair batch (its first half the chosen sequences, its second the rejected ones, as
    ov_train.data.pairs.collate_pairs lays them out) and the chosen and rejected token counts."""
    logps, counts = sequence_logps(model, batch, options)
    half = logps.shape[0] // 2
    return PairLogps(logps[:half], logps[half:]), counts[:half], counts[half:]
