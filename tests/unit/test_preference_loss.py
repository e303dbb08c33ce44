"""The preference losses equal TRL's on the same log-probabilities: TRL's own code runs on them (the `prefs` extra,
trl 1.16: DPOTrainer._compute_loss with precomputed reference log-probabilities for sigmoid, ipo, hinge and the
sigmoid + sft mix; for cDPO's label smoothing, which TRL 1.x keeps in its CPO trainer's sigmoid loss only,
CPOTrainer.cpo_loss on the policy-minus-reference log-ratios)."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ov_train.model.preference import PairLogps, PreferenceSettings, preference_loss

trl = pytest.importorskip("trl", reason="the prefs extra (pip install -e .[prefs]) holds TRL, the reference")

N, LENGTH = 6, 12


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


@pytest.fixture
def pairs():
    """Per-token log-probabilities of N pairs (chosen rows first, as TRL lays a batch out) and their reply masks,
    plus reference sums: random, with replies of different lengths."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2 * N, LENGTH, dtype=torch.long)
    for row in range(2 * N):
        start = int(torch.randint(2, 6, (1,), generator=g))
        mask[row, start : start + int(torch.randint(1, LENGTH - start + 1, (1,), generator=g))] = 1
    token_logps = -torch.rand(2 * N, LENGTH - 1, generator=g, dtype=torch.float64) * 3 * mask[:, 1:]
    reference = token_logps.sum(1) + torch.randn(2 * N, generator=g, dtype=torch.float64)
    return token_logps, mask, reference


def _trl_dpo(token_logps, mask, reference, loss_types, loss_weights, beta):
    """TRL's DPOTrainer._compute_loss on these log-probabilities: its loss and its logged reward metrics."""
    from trl import DPOTrainer

    zeros = torch.zeros_like(token_logps)
    outputs = SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights,
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": reference[:N], "ref_rejected_logps": reference[N:]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def _ours(settings, token_logps, mask, reference):
    logps, counts = token_logps.sum(1), mask[:, 1:].sum(1)
    return preference_loss(settings, PairLogps(logps[:N], logps[N:]), PairLogps(reference[:N], reference[N:]),
                           counts[:N], counts[N:])


@pytest.mark.parametrize("loss, beta", [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.1), ("ipo", 0.5),
                                        ("hinge", 0.1), ("hinge", 1.0)])
def test_losses_equal_trl(pairs, loss, beta):
    ours = _ours(PreferenceSettings(loss=loss, beta=beta), *pairs)
    trl_loss, metrics = _trl_dpo(*pairs, [loss], [1.0], beta)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-12, abs=1e-12)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-12)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-12)
    assert ours.margins.mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-12)
    assert ours.accuracies.mean().item() == metrics["rewards/accuracies"]
    assert 0 < ours.accuracies.mean().item() < 1  # the pairs fixture has both outcomes: the comparison is not vacuous


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_dpo_plus_sft_equals_trls_sigmoid_and_sft_mix(pairs, weight):
    ours = _ours(PreferenceSettings(loss="sigmoid_sft", beta=0.1, sft_weight=weight), *pairs)
    trl_loss, _ = _trl_dpo(*pairs, ["sigmoid", "sft"], [1.0, weight], 0.1)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    # The SFT term is the mean NLL over all chosen reply tokens of the batch, pooled (not a mean of sequence means).
    token_logps, mask, _ = pairs
    chosen = mask[:N, 1:].bool()
    assert ours.sft.item() == pytest.approx(-token_logps[:N][chosen].mean().item(), rel=1e-12)
    assert ours.loss.item() == pytest.approx(ours.pair_losses.mean().item() + weight * ours.sft.item(), rel=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_is_cdpo_as_trl_defines_it(pairs, smoothing):
    from trl.experimental.cpo import CPOTrainer

    token_logps, mask, reference = pairs
    logps = token_logps.sum(1)
    ours = _ours(PreferenceSettings(loss="sigmoid", beta=0.2, label_smoothing=smoothing), *pairs)
    cpo = SimpleNamespace(alpha=0.0, accelerator=_Accelerator(), loss_type="sigmoid", beta=0.2, label_smoothing=smoothing)
    losses, _, _ = CPOTrainer.cpo_loss(cpo, logps[:N] - reference[:N], logps[N:] - reference[N:])
    assert torch.allclose(ours.pair_losses, losses, rtol=1e-12, atol=0)
    if smoothing:  # and it differs from plain DPO
        assert not torch.allclose(ours.pair_losses, _ours(PreferenceSettings(beta=0.2), *pairs).pair_losses)
