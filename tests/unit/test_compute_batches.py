"""Compute-budget batches: the best fit, every sample once, exact resume from any batch, balance against the token
budget, the batching key's checks and the predicted rank imbalance metric."""
import numpy as np
import pytest
import torch

from ov_train.bench.balance import model_config, simulate
from ov_train.config.options import TokenBudget
from ov_train.data.batching import TrainBatches
from ov_train.data.compute_batches import SampleCost, best_fit, fill_compute_batches
from ov_train.training.metrics import TrainingMetrics, rank_imbalance
from ov_train.utils.flops import TokenCounts
from tests.conftest import compose_config


class ListStream:
    """A deterministic stream over fixed samples whose state() resumes right after the last one drawn."""

    def __init__(self, samples, state=None, **_):
        self.samples, self.pos = samples, (state or {}).get("pos", 0)

    def __iter__(self):
        while self.pos < len(self.samples):
            self.pos += 1
            yield self.samples[self.pos - 1]

    def state(self):
        return {"pos": self.pos}


def _samples(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [{"key": f"s{i}", "cost": float(rng.choice([200, 900, 3000, 7000, 12000]) + rng.integers(0, 500))}
            for i in range(n)]


def _cost(example):
    return example["cost"]


def test_best_fit_takes_the_costliest_that_fits_then_fills():
    assert best_fit([5, 9, 3, 2, 6], 12) == [1, 2]  # 9, then 3 fills to 12
    assert best_fit([5, 9, 3, 2, 6], 14) == [0, 1]  # 9 then 5
    assert best_fit([20, 3], 10) == [0]  # over the budget: alone, first (the costliest)
    assert best_fit([4, 4, 4, 4], 16, max_samples=3) == [0, 1, 2]


def test_every_sample_once_and_batches_within_budget():
    samples = _samples()
    batches = [b for b, _ in fill_compute_batches(iter(ListStream(samples)), TokenBudget(16384), _cost)]
    keys = [e["key"] for b in batches for e in b]
    assert sorted(keys) == sorted(e["key"] for e in samples)
    assert all(sum(e["cost"] for e in b) <= 16384 for b in batches)
    # Full batches: half within 3% of the budget, 90% within 10% (the tail, where the lookahead runs dry, left out).
    fills = [sum(e["cost"] for e in b) / 16384 for b in batches[:-6]]
    assert np.median(fills) > 0.97 and np.percentile(fills, 10) > 0.9


def test_resume_from_any_batch_is_exact():
    samples = _samples(200, seed=1)
    budget = TokenBudget(20000)
    first = list(fill_compute_batches(iter(stream := ListStream(samples)), budget, _cost, stream.state))
    for k in range(len(first) - 1):
        saved = first[k][1]
        resumed = ListStream(samples, saved["stream"])
        rest = list(fill_compute_batches(iter(resumed), budget, _cost, resumed.state, replay=saved))
        assert [[e["key"] for e in b] for b, _ in rest] == [[e["key"] for e in b] for b, _ in first[k + 1:]], k
        assert [s for _, s in rest] == [s for _, s in first[k + 1:]]


def _collate(examples):
    return {"n": len(examples)}


@pytest.mark.parametrize("cost", [_cost, None], ids=["compute", "tokens_after_compute"])
def test_train_batches_resume_compute_state(cost):
    """TrainBatches under data.batching=compute resumes bit-exact from a batch's stream_state; a token-budget run
    resumed from such a state drops the samples already batched."""
    samples = [{**e, "source": "s", "input_ids": range(int(e["cost"] // 100))} for e in _samples(120, seed=2)]
    make = lambda reader, readers, state: ListStream(samples, state)  # noqa: E731
    full = TrainBatches(make, TokenBudget(20000), _collate, cost=_cost)
    batches = list(full)
    saved = batches[4]["stream_state"]["state"]
    again = TrainBatches(make, TokenBudget(20000), _collate, cost=cost)
    again.resume({0: saved}, 5)
    rest = list(again)
    seen = [k for b in batches[:5] for k in b["key"]]
    if cost is not None:
        assert [b["key"] for b in rest] == [b["key"] for b in batches[5:]]
    else:
        keys = [k for b in rest for k in b["key"]]
        assert sorted(seen + keys) == sorted(e["key"] for e in samples)


def test_sample_cost_counts_the_tower():
    """A video frame costs its tower patches on top of its LLM tokens: on the 0.5B geometry a 32-frame video of
    6,273 tokens costs several times a text sample of as many tokens."""
    cost = SampleCost.of_model(model_config("ov_qwen2_0_5b"), {"vision_tower", "projector", "llm"})
    n = 6273
    text = cost.counts_cost(TokenCounts(0, n, n * (n + 1) / 2))
    video = cost.counts_cost(TokenCounts(32, n, n * (n + 1) / 2))
    assert n < text < 1.3 * n  # one unit per token, plus attention (27% at this length on the 0.5B LLM)
    assert video - text == pytest.approx(32 * cost.counts_cost(TokenCounts(1, 0, 0)))
    assert video > 3 * text


def test_compute_budget_balances_ranks_better_than_tokens():
    """8 ranks on the OneVision mix, fixed seed: the compute budget keeps max/mean near 1 and idle under 5%."""
    config = model_config("ov_qwen2_0_5b")
    tokens = simulate(config, 8, 150, 32768, "tokens", seed=3)
    compute = simulate(config, 8, 150, 32768, "compute", seed=3)
    assert tokens["median"] > 1.2 and tokens["idle"] > 0.15
    assert compute["median"] <= 1.05 and compute["idle"] < 0.05
    assert compute["p95"] < tokens["median"]


def test_rank_imbalance_metric():
    flops = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)  # [ranks, steps]
    assert rank_imbalance(flops).tolist() == [1.5, 1.0]


def test_training_metrics_gathers_step_costs_over_ranks():
    """The callback's per-step costs, gathered from two ranks (the second's steps cost 3x then 1x the first's):
    imbalance 1.5 and 1.0, logged as their mean and max, and the idle share 1 - mean / max."""

    class TwoRanks:
        device = torch.device("cpu")

        def all_gather(self, t):
            return torch.stack([t, t * torch.tensor([3.0, 1.0], dtype=t.dtype)])

    metrics = TrainingMetrics()
    metrics._step_flops = [torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)]
    logged = metrics._balance(TwoRanks())
    assert logged["perf/rank_imbalance"] == pytest.approx(1.25)
    assert logged["perf/rank_imbalance_max"] == pytest.approx(1.5)
    assert logged["perf/rank_idle"] == pytest.approx((1 - 1 / 1.5) / 2)
    assert metrics._step_flops == [] and metrics._balance(TwoRanks()) == {}


@pytest.mark.parametrize("overrides, expected", [
    (["data.batching=pages"], "data.batching='pages'; allowed: tokens, compute"),
    (["data.batching=compute", "data.samples_per_step=8"], "data.batching=compute fills each batch"),
])
def test_batching_key_checked(overrides, expected):
    from ov_train.config.run_plan import ConfigError, resolve_plan

    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        resolve_plan(compose_config(overrides))
