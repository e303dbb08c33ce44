"""Numbers that must not mislead: chance n/a without answer options, no MFU against a GPU peak on a CPU, and a
model.pretrained of another geometry than `model=` refused, naming both."""
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaOnevisionConfig

from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.constants import MODALITIES
from ov_train.training.metrics import TrainingMetrics
from ov_train.training.module import OneVisionModule
from tests.conftest import compose_config, plan_of


def validation_end(chances: list[float]) -> dict:
    """OneVisionModule's validation summary over held-out samples with these chance values (0: no options)."""
    val = defaultdict(lambda: torch.zeros(5, dtype=torch.float64))
    for chance in chances:  # loss sum, tokens, correct, chance, samples
        val["single_image"] += torch.tensor([2.0, 4.0, 1.0, chance, 1.0], dtype=torch.float64)
    logged = {}
    module = SimpleNamespace(_val=val, trainer=SimpleNamespace(world_size=1), global_step=7,
                             log_dict=lambda values, **kw: logged.update(values),
                             log=lambda key, value, **kw: logged.update({key: value}))
    module.summed_over_ranks = OneVisionModule.summed_over_ranks.__get__(module)
    OneVisionModule.on_validation_epoch_end(module)
    assert set(val) <= set(MODALITIES)
    return {**module.val_metrics, "logged": logged}


def test_chance_is_not_zero_but_unknown_without_answer_options():
    own = validation_end([0.0, 0.0, 0.0])
    assert "val/chance_accuracy" not in own and own["val/accuracy"] == 1.0  # summary.json: null; the log: n/a
    assert validation_end([0.25, 0.5])["val/chance_accuracy"] == pytest.approx(0.375)
    assert own["logged"]["step"] == 7  # dashboards count validation at the step the console reports


def test_mfu_is_not_measured_against_a_gpu_peak_on_a_cpu(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    pl_module = SimpleNamespace(device=torch.device("cpu"), model=model)
    metrics = TrainingMetrics()
    metrics.setup(None, pl_module, "fit")
    assert metrics.peak_flops is None
    given = TrainingMetrics(peak_tflops=2.0)  # metrics.peak_tflops: a measured CPU peak
    given.setup(None, pl_module, "fit")
    assert given.peak_flops == 2e12


def test_a_checkpoint_of_another_geometry_is_refused_naming_both(tmp_path):
    tiny = plan_of([]).model
    LlavaOnevisionConfig(vision_config={"model_type": "siglip_vision_model", **tiny.vision},
                         text_config={"model_type": "qwen2", **tiny.text}).to_json_file(tmp_path / "config.json")
    cfg = compose_config(["model=ov_qwen2_0_5b", f"model.pretrained={tmp_path}"], run_dir=Path("/tmp/x"))
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    assert f"model.pretrained='{tmp_path}' is another geometry than model=ov_qwen2_0_5b" in str(err.value)
    assert "text hidden_size 192 (model=ov_qwen2_0_5b: 896)" in str(err.value)
    # The geometry it is: accepted.
    assert plan_of([f"model.pretrained={tmp_path}", "model.random_init=false"]).model.route == "pretrained"
