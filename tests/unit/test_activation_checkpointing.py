"""Activation checkpointing per module (exact, and really applied) and which vision-tower layers run."""
import copy

import pytest
import torch

from ov_train.config.run_plan import ConfigError
from ov_train.config.schema import ModelConfig
from ov_train.model.activation_checkpointing import apply_activation_checkpointing
from ov_train.model.forward import prepare_model, sample_losses, tower_hidden
from ov_train.model.layout import layers as module_layers
from tests.conftest import compose_config, plan_of


def _count_forwards(layer, calls: dict, key: str):
    """Wrap the layer's forward (module hooks do not fire during checkpoint recomputation)."""
    inner = layer.forward

    def forward(*args, **kwargs):
        calls[key] = calls.get(key, 0) + 1
        return inner(*args, **kwargs)

    layer.forward = forward


def _loss_and_calls(model, batch):
    """Mean loss gradients, and how often each tower / LLM layer ran in forward + backward."""
    calls = {}
    for module in ("vision", "llm"):
        for i, layer in enumerate(module_layers(model, module)):
            _count_forwards(layer, calls, f"{module}.{i}")
    model.zero_grad()
    sums, counts, _ = sample_losses(model, batch, ModelConfig.stock(packing=True))
    (sums.sum() / counts.sum()).backward()
    for module in ("vision", "llm"):
        for layer in module_layers(model, module):
            del layer.forward  # back to the class's forward
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.slow
@pytest.mark.parametrize("modules, every", [(("vision", "llm"), 1), (("llm",), 2), (("vision",), 1)])
def test_checkpointing_is_exact_and_recomputes_the_selected_layers(mixed_batch, modules, every):
    base, _, batch = mixed_batch
    model = copy.deepcopy(base).train()
    reference, plain_calls = _loss_and_calls(model, batch)

    names = apply_activation_checkpointing(model, modules, every)
    grads, calls = _loss_and_calls(model, batch)
    expected = {
        f"{m}.{i}" for m in modules for i in range(len(module_layers(model, m))) if i % every == 0
    }
    assert set(names) == expected and expected
    # A checkpointed layer runs again in the backward to rebuild its activations (the tower runs once
    # for the images and once for the video frames); the other layers run as often as without.
    assert calls.keys() == plain_calls.keys()
    assert {k for k in calls if calls[k] == 2 * plain_calls[k]} == expected
    assert {k for k in calls if calls[k] == plain_calls[k]} == set(calls) - expected
    assert grads.keys() == reference.keys()
    for name in grads:
        assert torch.allclose(grads[name], reference[name], atol=1e-6, rtol=1e-5), name


def test_switching_off_and_unknown_modules(mixed_batch):
    model = copy.deepcopy(mixed_batch[0])
    apply_activation_checkpointing(model, ["llm"])
    assert apply_activation_checkpointing(model, []) == []
    assert not any(layer.gradient_checkpointing for layer in module_layers(model, "llm"))
    # Names are the plan's to check, before any model is built.
    with pytest.raises(ConfigError, match=r"model.activation_checkpointing has \['projector'\]; allowed"):
        plan_of(["model.activation_checkpointing=[projector]"])


def _tower_calls(tower, pixel_values, run):
    ran = []
    modules = {f"layer{i}": layer for i, layer in enumerate(tower.encoder.layers)}
    modules["post_layernorm"] = tower.post_layernorm
    hooks = [m.register_forward_hook(lambda *_, key=key: ran.append(key)) for key, m in modules.items()]
    with torch.no_grad():
        out = run(tower, pixel_values)
    for h in hooks:
        h.remove()
    return out, ran


@pytest.mark.parametrize("layer", [-1, -2])
def test_tower_computes_nothing_past_the_feature_layer(mixed_batch, layer):
    model, _, batch = mixed_batch
    tower = model.model.vision_tower
    pixels = batch["pixel_values"][:3]
    stock, stock_ran = _tower_calls(tower, pixels, lambda t, x: t(x, output_hidden_states=True).hidden_states[layer])
    ours, ours_ran = _tower_calls(tower, pixels, lambda t, x: tower_hidden(model, x, layer))
    assert torch.allclose(ours, stock, atol=1e-6)
    layers = len(tower.encoder.layers)
    # The stock call runs every layer and the post-layernorm whatever layer is read; ours stops at it.
    assert stock_ran == [f"layer{i}" for i in range(layers)] + ["post_layernorm"]
    assert ours_ran == [f"layer{i}" for i in range(layers + 1 + layer)]


def test_configs_drop_siglips_unused_last_layer(mixed_batch):
    # The OneVision feature layer is SigLIP's second-to-last (of 27); the configs keep 26 layers and
    # read the last kept one, so with tower_hidden every layer that runs is used.
    assert mixed_batch[0].config.vision_feature_layer == -1
    for name in ("ov_qwen2_0_5b", "ov_qwen2_7b", "ov_qwen2_72b"):
        assert compose_config([f"model={name}"]).model.vision.num_hidden_layers == 26, name


@pytest.mark.slow
def test_compiled_layers_match_eager_under_checkpointing(mixed_batch, tiny_model_and_tokenizer):
    """model.compile=true: every tower and LLM layer goes through torch.compile (inductor), here with the LLM's
    layers checkpointed too; losses and gradients equal eager ones, on two batches of other lengths."""
    from torch._dynamo.utils import counters

    from ov_train.data.samples import collate

    base, examples, _ = mixed_batch
    pad_id = tiny_model_and_tokenizer[1].pad_token_id
    batches = [collate(examples[:3], pad_id), collate(examples[2:], pad_id)]
    eager = copy.deepcopy(base).train()
    compiled = copy.deepcopy(base).train()
    options = ModelConfig.stock(packing=True, loss="chunked", activation_checkpointing=("llm",), compile=True)
    prepare_model(compiled, options)
    counters.clear()
    for batch in batches:
        results = []
        for model, opts in ((eager, ModelConfig.stock(packing=True, loss="chunked")), (compiled, options)):
            model.zero_grad()
            sums, counts, _ = sample_losses(model, batch, opts)
            (sums.sum() / counts.sum()).backward()
            results.append((sums.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        (ref_sums, ref_grads), (sums, grads) = results
        assert torch.allclose(sums, ref_sums, atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.allclose(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4), name
    assert counters["stats"]["unique_graphs"] >= 2  # a tower layer graph and an LLM layer graph at least
