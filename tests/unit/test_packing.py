"""Padding-free packing equals running each sample alone: layout, losses, gradients, predictions."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import ov_train.model.packing as packing
from ov_train.config.run_plan import ConfigError
from ov_train.config.schema import ModelConfig
from ov_train.constants import IGNORE_INDEX, VARLEN
from ov_train.data.samples import collate
from ov_train.model.forward import (
    embed_inputs,
    forward_logits,
    sample_losses,
    token_losses,
)
from ov_train.model.packing import language_model_hidden, pack_into_rows, set_attention
from tests.conftest import CONF, compose_config, plan_of

# One row for the whole batch; rows of at most 100 tokens (the 175-token sample gets its own row).
ROWS = {"one_row": 100_000, "several_rows": 100}


def _alone(model, examples):
    """Loss sum of each sample run on its own through the plain forward [B]."""
    sums = []
    for e in examples:
        batch = collate([e], pad_id=0)
        losses, _ = token_losses(forward_logits(model, batch), batch["labels"])
        sums.append(losses.sum())
    return torch.stack(sums)


def _supervised(examples):
    return sum(int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in examples)


@pytest.mark.parametrize("max_tokens", ROWS.values(), ids=ROWS.keys())
def test_layout(mixed_batch, max_tokens):
    _, examples, batch = mixed_batch
    packed = pack_into_rows(batch, max_tokens)
    lengths = [len(e["input_ids"]) for e in examples]
    flat = lambda t: t.flatten().tolist()  # noqa: E731
    ids, pos, tgt, smp = flat(packed.input_ids), flat(packed.position_ids), flat(packed.targets), flat(packed.sample)
    row_len = packed.input_ids.shape[1]
    for i, e in enumerate(examples):
        at = [k for k, s in enumerate(smp) if s == i]
        n = lengths[i]
        # Every sample appears once, contiguous, in one row, with positions restarting at 0.
        assert at == list(range(at[0], at[0] + n)) and at[0] // row_len == at[-1] // row_len
        assert ids[at[0] : at[0] + n] == e["input_ids"].tolist()
        assert pos[at[0] : at[0] + n] == list(range(n))
        # Targets are the sample's next labels; nothing is predicted across a sample boundary.
        assert tgt[at[0] : at[0] + n] == e["labels"][1:].tolist() + [IGNORE_INDEX]
    for r in range(packed.input_ids.shape[0]):
        members = set(smp[r * row_len : (r + 1) * row_len]) - {-1}
        assert sum(lengths[i] for i in members) <= max_tokens or len(members) == 1
    padding = [k for k, s in enumerate(smp) if s == -1]
    assert all(tgt[k] == IGNORE_INDEX for k in padding)
    assert (max_tokens == ROWS["one_row"]) == (not padding)
    # Sequence boundaries for varlen are exactly where positions restart.
    starts = [k for k in range(len(pos)) if pos[k] == 0]
    assert packed.cu_seqlens.tolist() == starts + [len(pos)]
    assert packed.max_seqlen == max(b - a for a, b in zip(starts, starts[1:] + [len(pos)]))


@pytest.fixture(scope="module")
def alone(mixed_batch):
    """Each sample on its own: loss sums, and the gradients of their sum over all supervised tokens."""
    model, examples, _ = mixed_batch
    model.train()
    model.zero_grad()
    sums = _alone(model, examples)
    (sums.sum() / _supervised(examples)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return sums.detach(), grads


@pytest.mark.parametrize("loss, chunk", [("full", 1024), ("chunked", 3)])
@pytest.mark.parametrize("max_tokens", ROWS.values(), ids=ROWS.keys())
def test_packed_equals_each_sample_alone(mixed_batch, alone, max_tokens, loss, chunk):
    model, examples, batch = mixed_batch
    reference_sums, reference = alone
    model.train()
    model.zero_grad()
    options = ModelConfig.stock(packing=True, max_tokens=max_tokens, loss=loss, loss_chunk=chunk)
    sums, counts, _ = sample_losses(model, batch, options)
    (sums.sum() / counts.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    assert counts.sum() == _supervised(examples)
    assert torch.allclose(sums, reference_sums, atol=1e-5, rtol=1e-5)
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], reference[name], atol=1e-6, rtol=1e-4), name


def test_equality_needs_the_isolation(mixed_batch, alone):
    # Control: with positions running on through the row (no restarts), samples see each other and
    # the losses of all but each row's first sample change, so the test above can tell.
    model, examples, batch = mixed_batch
    alone_sums = alone[0]
    model.eval()
    packed = pack_into_rows(batch, ROWS["one_row"])
    leaky = dataclasses.replace(packed, position_ids=torch.arange(packed.input_ids.shape[1])[None])
    with torch.no_grad():
        hidden = language_model_hidden(model, embed_inputs(model, batch, packed), leaky)[0]
        logits = model.lm_head(hidden)
    losses = F.cross_entropy(logits, packed.targets[0].clamp_min(0), reduction="none") * (packed.targets[0] != IGNORE_INDEX)
    leaked = torch.zeros(len(examples)).index_add(0, packed.sample[0], losses)
    first = int(packed.sample[0, 0])
    assert torch.allclose(leaked[first], alone_sums[first], atol=1e-5)
    others = [i for i in range(len(examples)) if i != first]
    assert not torch.allclose(leaked[others], alone_sums[others], atol=1e-3)


@pytest.mark.parametrize("options", [ModelConfig.stock(), ModelConfig.stock(packing=True, max_tokens=100, loss="chunked", loss_chunk=3)])
def test_validation_predictions_without_full_logits(mixed_batch, tiny_model_and_tokenizer, options):
    model, _, batch = mixed_batch
    tokenizer = tiny_model_and_tokenizer[1]
    model.eval()
    with torch.no_grad():
        greedy = forward_logits(model, batch)[:, :-1].argmax(-1)
    # Relabel samples 0, 2 and 3 with the model's own greedy tokens: exactly those count as correct.
    labels = batch["labels"].clone()
    supervised = labels[:, 1:] != IGNORE_INDEX
    for i in (0, 2, 3):
        labels[i, 1:][supervised[i]] = greedy[i][supervised[i]]
    with torch.no_grad():
        _, _, predictions = sample_losses(model, dict(batch, labels=labels), options, predict=True)
    assert torch.equal(predictions, greedy.masked_fill(~supervised, IGNORE_INDEX))
    correct = (predictions == labels[:, 1:]).all(1)  # as validation_step derives it
    assert correct.tolist() == [True, False, True, True, False]
    for i, right in enumerate(correct.tolist()):
        reference = tokenizer.decode(labels[i, 1:][supervised[i]])
        assert (tokenizer.decode(predictions[i][supervised[i]]) == reference) == right


class ReferenceVarlen:
    """CPU stand-in for torch's flash varlen kernel: causal sdpa per sequence; counts its calls."""

    calls = 0

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, **options):
        assert options.get("window_size") == (-1, 0) or options.get("is_causal") is True
        assert k.shape[1] == q.shape[1] or options.get("enable_gqa")
        self.calls += 1
        bounds = cu_q.tolist()
        out = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=True, scale=options.get("scale"), enable_gqa=options.get("enable_gqa", False),
            ).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(out)


@pytest.mark.slow
@pytest.mark.parametrize("signature", [
    {"window_size", "scale", "enable_gqa"},  # torch >= 2.12
    {"window_size", "scale"},  # 2.10 / 2.11: no grouped-query attention, k/v heads repeated
    {"is_causal"},  # 2.9
])
def test_varlen_attention_plumbing(mixed_batch, monkeypatch, signature):
    # The flash kernel needs CUDA; a reference kernel checks everything around it: the transformers
    # attention interface, the skipped mask, cu_seqlens, the layout and the torch-version arguments.
    model = copy.deepcopy(mixed_batch[0]).to(torch.bfloat16).eval()
    batch = mixed_batch[2]
    kernel = ReferenceVarlen()
    monkeypatch.setattr(packing, "varlen_attn", kernel)
    monkeypatch.setattr(packing, "_VARLEN_PARAMS", frozenset(signature))
    options = ModelConfig.stock(packing=True, max_tokens=ROWS["several_rows"])
    with torch.no_grad():
        sdpa, _, _ = sample_losses(model, batch, options)
        set_attention(model, VARLEN)
        varlen, _, _ = sample_losses(model, batch, options)
    assert kernel.calls == model.config.text_config.num_hidden_layers
    assert torch.allclose(varlen, sdpa, rtol=2e-2)


def test_varlen_attention_under_autocast(mixed_batch, monkeypatch):
    # bf16-mixed (DDP's default on several GPUs): fp32 weights under autocast hand the kernel fp32 queries after
    # the rotary embedding; they are cast to the autocast dtype, as autocast casts sdpa's, instead of refused.
    model = copy.deepcopy(mixed_batch[0]).eval()
    batch = mixed_batch[2]
    kernel = ReferenceVarlen()
    monkeypatch.setattr(packing, "varlen_attn", kernel)
    monkeypatch.setattr(packing, "_VARLEN_PARAMS", frozenset({"window_size", "scale", "enable_gqa"}))
    options = ModelConfig.stock(packing=True, max_tokens=ROWS["several_rows"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa, _, _ = sample_losses(model, batch, options)
        set_attention(model, VARLEN)
        varlen, _, _ = sample_losses(model, batch, options)
    assert kernel.calls == model.config.text_config.num_hidden_layers
    assert torch.allclose(varlen, sdpa, rtol=2e-2)


def test_options_from_config_and_yaml():
    for path in sorted((CONF / "model").glob("*.yaml")):
        options = OmegaConf.to_object(compose_config([f"model={path.stem}"]).model)
        assert options.problems() == [] and options.packing, path.name
    bad = ["model.loss=fused", f"model.attn_implementation={VARLEN}", "model.activation_checkpointing=[projector]",
           "model.loss_chunk=0", "trainer.precision=32-true"]
    with pytest.raises(ConfigError) as err:
        plan_of(bad)
    for key in ("model.loss", "model.attn_implementation", "model.activation_checkpointing", "model.loss_chunk"):
        assert key in str(err.value)
