"""ModelFlops against torch's FLOP counter on the tiny model, and against the recipe's measured 0.5B row."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from ov_train.config.media import MediaSettings
from ov_train.config.run_plan import model_plan
from ov_train.data.recipe import load_recipe
from ov_train.data.samples import SampleProcessor, collate
from ov_train.data.stream import ValStream
from ov_train.model.build import build_model
from ov_train.model.forward import forward_logits
from ov_train.model.layout import part_of
from ov_train.model.parts import apply_stage
from ov_train.training.metrics import batch_counts
from ov_train.utils.flops import ModelFlops, TokenCounts
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.tokens import anyres_tokens, best_resolution
from tests.conftest import compose_config, plan_of


@pytest.fixture(scope="module")
def eager_model(_offline_cache):
    # Eager attention runs as matrix products, which the counter sees (CPU sdpa kernels it does not count).
    model, tokenizer = build_model(plan_of([]).model, _offline_cache)
    model.set_attn_implementation("eager")
    return model, tokenizer


@pytest.fixture(scope="module")
def one_sample_batches(eager_model, small_data_root):
    """One batch of a single held-out sample per source (anyres image, multi-image, video): no padding."""
    model, tokenizer = eager_model
    geometry = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geometry, "qwen_1_5", MediaSettings.of("anyres_max_9", 32), max_length=4096)
    return [
        collate(list(ValStream([source], process, limit=1)), tokenizer.pad_token_id)
        for source in load_recipe("synthetic_onevision", small_data_root)
    ]


def _counts(batch) -> TokenCounts:
    images, tokens, pairs, samples = batch_counts(batch).tolist()
    assert samples == 1 and pairs == tokens * (tokens + 1) / 2
    # The counter charges eager attention for the full square, not the causal half the formula needs.
    return TokenCounts(images, tokens, pairs=tokens * tokens)


def test_forward_flops_equal_the_flop_counter(eager_model, one_sample_batches):
    model, _ = eager_model
    flops = ModelFlops.from_config(model.config)
    for batch in one_sample_batches:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward_logits(model, batch)
        ours = sum(m + a for m, a in flops.forward(_counts(batch)).values())
        # The only matrix product left out is RoPE's frequency table (2 x head_dim/2 x tokens).
        assert ours == pytest.approx(counter.get_total_flops(), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "mid", "onevision"])
def test_training_flops_follow_what_each_stage_trains(eager_model, one_sample_batches, stage):
    """Forward + backward as counted by torch, with the stage's parts frozen: within 2%.

    The formula charges input gradients to the first layer of the first trainable part, which autograd
    skips: half the projector when it trains behind a frozen tower, a large share only in the tiny model.
    """
    model, _ = eager_model
    apply_stage(model, plan_of([f"stage={stage}"]).optim.part_lrs)
    trainable = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    flops = ModelFlops.from_config(model.config)
    for batch in one_sample_batches:
        with FlopCounterMode(display=False) as counter:
            forward_logits(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
        assert flops.train_step(_counts(batch), trainable) == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_a_frozen_tower_costs_one_forward():
    flops = ModelFlops(
        vision_per_image=10, vision_attention_per_image=1, projector_per_image=0, llm_per_token=0, llm_per_pair=0
    )
    counts = TokenCounts(images=1, tokens=0, pairs=0)
    assert flops.train_step(counts, {"projector", "llm"}) == 11
    assert flops.train_step(counts, {"vision_tower"}) == 3 * 10 + 3 * 1


def _meta_model(name: str):
    plan = model_plan(compose_config([f"model={name}"]).model)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(vision_use_head=False, **plan.vision).to_dict(),
        text_config=Qwen2Config(**plan.text).to_dict(),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    with torch.device("meta"):
        return LlavaOnevisionForConditionalGeneration(config)


def _linear_weights(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("name", ["ov_qwen2_0_5b", "ov_qwen2_7b", "ov_qwen2_72b"])
def test_real_geometries_cost_two_flops_per_weight_and_token(name):
    """Against the modules transformers builds (on the meta device: no memory): GQA widths, head, projector."""
    model = _meta_model(name)
    flops = ModelFlops.from_config(model.config)
    inner, vision = model.model, model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    assert flops.llm_per_token == 2 * (_linear_weights(inner.language_model) + model.lm_head.weight.numel())
    assert flops.projector_per_image == 2 * patches * _linear_weights(inner.multi_modal_projector)
    patch_embedding = next(m for m in inner.vision_tower.modules() if isinstance(m, torch.nn.Conv2d))
    tower_weights = _linear_weights(inner.vision_tower) + patch_embedding.weight.numel()
    assert flops.vision_per_image == 2 * patches * tower_weights


def test_recipe_measurement_on_the_0_5b_geometry():
    """The recipe measured 22,852 tokens/s at 15.1% MFU (989 TFLOP/s peak) on 8 single-image samples of
    38,632 tokens, and puts the 790 TFLOP/s matmul ceiling at about 121k tokens/s. 4,829 tokens a sample
    fit a 1024x768 image (4,744 visual tokens) plus 85 text tokens, read here as that mix."""
    config = _meta_model("ov_qwen2_0_5b").config
    geometry = VisionGeometry(image_size=384, patch_size=14, grid_pinpoints=default_pinpoints(384))
    assert anyres_tokens(1024, 768, geometry) == 4744
    canvas_h, canvas_w = best_resolution(1024, 768, geometry)
    crops = (canvas_h // 384) * (canvas_w // 384) + 1
    per_sample = 38632 / 8
    counts = TokenCounts(8 * crops, 38632, 8 * per_sample * (per_sample + 1) / 2)
    flops_per_token = ModelFlops.from_config(config).train_step(counts, {"vision_tower", "projector", "llm"}) / 38632
    assert 22852 * flops_per_token / 989e12 == pytest.approx(0.151, rel=0.05)
    assert 790e12 / flops_per_token == pytest.approx(121_000, rel=0.05)
