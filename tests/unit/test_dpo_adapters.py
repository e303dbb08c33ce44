"""stage=dpo with LoRA-family adapters: the reference is the policy with its adapters switched off, and that is the
starting model even once the adapters have moved (DoRA's magnitude vector included), while the policy differs."""
from __future__ import annotations

import copy

import pytest
import torch

from ov_train.data.pairs import PairProcessor, collate_pairs
from ov_train.model.adapters import wrap
from ov_train.model.preference import pair_logps
from ov_train.training.preference import PreferenceModule
from tests.conftest import plan_of
from tests.unit.test_pair_forward import pair_raw

DORA_ONLY = ["stage=dpo", "adapter=dora", "adapter.targets.projector=frozen"]


@pytest.mark.parametrize("overrides, reference", [
    (DORA_ONLY, "adapters_off"),
    (["stage=dpo", "adapter=dora", "adapter.targets.projector=[linear_1,linear_2]"], "adapters_off"),
    (["stage=dpo", "adapter=dora"], "frozen"),  # the projector trains whole beside the adapters: off is not the start
])
def test_dora_runs_get_the_adapters_off_reference_when_only_adapters_train(overrides, reference):
    assert plan_of(overrides, run_dir="/tmp/x").preference.reference == reference


@pytest.fixture(scope="module")
def pair_batch(tiny_model_and_tokenizer):
    from ov_train.config.media import MediaSettings
    from ov_train.data.samples import SampleProcessor
    from ov_train.vision.geometry import VisionGeometry
    from tests.helpers import noise_png

    model, tokenizer = tiny_model_and_tokenizer
    process = SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5",
                              MediaSettings.of("anyres_max_9", 8), max_length=4096)
    raws = [pair_raw("a", "<image>\nWhat colour?", "red", "blue", [noise_png(70, 30, 1)]),
            pair_raw("d", "What is the opposite of up?", "down", "sideways")]
    return collate_pairs([PairProcessor(process)(r) for r in raws], tokenizer.pad_token_id)


def test_the_dora_reference_is_the_starting_model_after_the_adapters_moved(tiny_model_and_tokenizer, pair_batch):
    base = tiny_model_and_tokenizer[0]
    plan = plan_of(DORA_ONLY, run_dir="/tmp/x")
    model = copy.deepcopy(base)
    wrap(model, plan.adapter)
    module = PreferenceModule(model, plan.optim, plan.preference, forward_options=plan.forward, adapter=plan.adapter)
    module.eval()  # no adapter dropout: the policy's numbers are deterministic
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trained) and all("lora_" in n for n in trained)
    torch.manual_seed(0)
    with torch.no_grad():  # as after some training: B away from 0, magnitudes away from the weights' norms
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        start, _, _ = pair_logps(copy.deepcopy(base).eval(), pair_batch, plan.forward)
        policy, _, _ = pair_logps(model, pair_batch, plan.forward)
    reference = module.reference_logps(pair_batch)
    torch.testing.assert_close(reference.chosen, start.chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(reference.rejected, start.rejected, rtol=1e-5, atol=1e-4)
    assert (policy.chosen - start.chosen).abs().max() > 1e-2  # the adapters are on for the policy
    # Switched on again after the reference's pass.
    again, _, _ = pair_logps(model, pair_batch, plan.forward)
    torch.testing.assert_close(again.chosen, policy.chosen)
