"""The memory and time planner: model state per engine by hand, the trace against a measured CPU run, the
preflight's refusal and override, the Liger stand-in's memory, and `ov-train plan --json`."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from ov_train.config.run_plan import ConfigError, model_plan, optim_plan, resolve_plan
from ov_train.planner.estimate import PlanError, Setup, meta_model, step_samples
from ov_train.planner.report import preflight
from ov_train.planner.state import Counts, Engine, count, model_state
from ov_train.planner.trace import trace_step
from ov_train.planner.workload import ONEVISION_MIX, REPLY_TOKENS, fill
from ov_train.vision.geometry import VisionGeometry
from tests.conftest import REPO, SMALL_DATA, compose_config

# 1,000 parameters, 600 of them trained (largest group 400); layers of 100, a root unit of 200 whose largest
# module is 150; 4 devices.
C = Counts(total=1000, trainable=600, largest_group=400, largest_layer=100, root=200, largest_other=150)
SMALL_BUCKETS = {"reduce_bucket": 50, "allgather_bucket": 30}


def _setup(overrides: list[str]) -> Setup:
    """What `ov-train plan` plans for these overrides (cli/plan.py)."""
    return Setup.of(resolve_plan(compose_config(overrides), machine=False))


@pytest.mark.parametrize("engine, expected", [
    # weights, gradients, masters, moments, buffers, step working set, host
    (Engine("single", 1, "bf16-true"), (2000, 1200, 2400, 4800, 0, 3200, 0)),
    (Engine("single", 1, "32-true"), (4000, 2400, 0, 4800, 0, 1600, 0)),
    (Engine("ddp", 4, "bf16-mixed"), (4000, 2400, 0, 4800, 2400, 1600, 0)),  # buckets: one more gradient copy
    (Engine("zero", 4, "bf16-mixed", 2, **SMALL_BUCKETS), (2000, 300, 600, 1200, 200, 460, 0)),
    (Engine("zero", 4, "bf16-mixed", 3, **SMALL_BUCKETS), (500, 300, 600, 1200, 200 + 500, 600, 0)),
    (Engine("zero", 4, "bf16-mixed", 3, True, True, **SMALL_BUCKETS), (0, 0, 0, 0, 700, 0, 1800 + 300 + 500)),
    (Engine("zero", 4, "bf16-mixed", 1, overlap_comm=False, **SMALL_BUCKETS), (2000, 1200, 600, 1200, 100, 460, 0)),
    # fp32 shards; root unit + two layers gathered in bf16, one layer's gradients in bf16 and fp32
    (Engine("fsdp2", 4, "bf16-mixed"), (1000, 600, 0, 1200, 2 * (200 + 200) + 6 * 100, 400, 0)),
    (Engine("fsdp2", 4, "bf16-mixed", reshard_after_forward=False), (1000, 600, 0, 1200, 2 * 1000 + 600, 400, 0)),
])
def test_model_state_per_engine(engine, expected):
    s = model_state(C, engine)
    assert (s.weights, s.gradients, s.masters, s.optimizer, s.buffers, s.step_working_set, s.host) == expected


def test_counts_follow_the_adapter_config():
    """The planner counts what adapter=lora / dora place (the same numbers PEFT's model has), not a rank of its own."""
    from ov_train.config.run_plan import run_adapter_plan
    from ov_train.model.adapters import wrap
    from ov_train.model.build import build_model
    from ov_train.model.parts import apply_stage
    from ov_train.utils.paths import cache_dir

    cfg = compose_config([])
    model = meta_model(model_plan(cfg.model))
    apply_stage(model, optim_plan(cfg).part_lrs)
    full = count(model)
    llm = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("model.language_model.", "lm_head.")))
    assert full.total == sum(p.numel() for p in model.parameters()) and full.largest_group == llm
    for kind in ("lora", "dora"):
        cfg = compose_config([f"adapter={kind}", "adapter.r=8", "adapter.targets.vision_tower=[fc1]"])
        adapter, optim = run_adapter_plan(cfg), optim_plan(cfg, run_adapter_plan(cfg))
        planned = meta_model(model_plan(cfg.model))
        apply_stage(planned, optim.part_lrs)
        counts = count(planned, adapter)
        real, _ = build_model(model_plan(cfg.model), cache_dir(), seed=0)
        wrap(real, adapter)
        apply_stage(real, optim.part_lrs, adapted=optim.adapted)
        assert counts.total == sum(p.numel() for p in real.parameters())
        assert counts.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
        assert counts.adapters == counts.trainable  # the projector as a trained copy, the rest adapters
        assert counts.largest_group < llm and set(counts.trainable_parts) == {"vision_tower", "projector", "llm"}


def test_gpu_precision_is_the_run_plans_choice(monkeypatch):
    # The planner decides the GPU precision off the GPU; it must be what the run plan picks on one.
    for overrides in ([], ["trainer.devices=2"], ["strategy=ddp"], ["strategy=fsdp2", "trainer.devices=2"]):
        cfg = compose_config(["trainer.accelerator=gpu", "plan.device=h100", *overrides])
        planned = Setup.of(resolve_plan(cfg, machine=False)).engine.precision
        with monkeypatch.context() as gpus:
            gpus.setattr(torch.cuda, "is_available", lambda: True)
            gpus.setattr(torch.cuda, "device_count", lambda: 8)
            assert planned == resolve_plan(cfg).precision, overrides


def test_workload_fills_the_budget_in_the_recipes_proportions():
    # The shipped onevision recipe's mix (the paper's Figure 5: 31.2 / 43.0 / 25.9%), as fractions.
    assert pytest.approx({"single_image": 0.3117, "multi_image": 0.4296, "video": 0.2587}, abs=1e-4) == ONEVISION_MIX
    cfg = compose_config(["model=ov_qwen2_0_5b"])
    geometry = VisionGeometry.from_model_config(meta_model(model_plan(cfg.model)).config)
    samples = fill(32768, ONEVISION_MIX, geometry, max_frames=32, anyres=True)
    assert sum(s.tokens for s in samples) == 32768
    by = {m: sum(s.tokens for s in samples if s.modality == m) for m in ONEVISION_MIX}
    for modality, share in ONEVISION_MIX.items():
        assert share * 32768 - 8200 <= by[modality] <= share * 32768  # each share filled to within one sample
    video = [s for s in samples if s.modality == "video"][0]
    assert video.crops == (32,) and video.visual == (32 * 196 + 1,) and video.reply == REPLY_TOKENS


@pytest.mark.slow
def test_trace_against_a_measured_cpu_run():
    # The same step on real tensors (tiny geometry, 2,048 tokens, fp32, sdpa, chunked loss), measured by the
    # process's resident set: the fake-tensor trace must predict it.
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-m", "ov_train.planner.calibrate", "--model", "tiny", "--tokens", "2048",
         "--json", "/dev/stdout"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout[out.stdout.index("["):])[0]
    assert result["measured_bytes"] > 50 * 2**20  # activations dominate, not noise
    assert 0.9 <= result["ratio"] <= 1.1, result


def test_fused_loss_stand_in_keeps_a_head_gradient_per_sample():
    # Liger's kernel, called once per sample by ov_train.model.loss, keeps grad_input and a [vocab, d] weight
    # gradient until backward: the plan's loss working set holds one per sample.
    cfg = compose_config(["plan.device=h100", "plan.tokens=1024", "model.max_tokens=1024"])
    setup = Setup.of(resolve_plan(cfg, machine=False))
    assert setup.fused_loss and setup.options.attention() == "ov_varlen" and setup.engine.compute == "bf16"
    model = meta_model(setup.model)
    vocab, width = model.lm_head.weight.shape
    samples = step_samples(setup, VisionGeometry.from_model_config(model.config))
    trace = trace_step(model, setup.parts, samples, setup.options, "bf16", "ov_train", fused_loss=True)
    assert len(samples) >= 3
    assert len(samples) * vocab * width * 2 <= trace.loss < (len(samples) + 1) * vocab * width * 2


def _refusing(tmp_path, *extra):
    # A 1 MiB device: nothing fits, whatever the suggestions try.
    overrides = ["plan.device=a100_40g", "plan.memory_gib=0.001", "plan.reserve_gib=0", "trainer.max_steps=1"]
    return compose_config([*SMALL_DATA, *overrides, *extra], tmp_path / "run")


def test_preflight_refuses_a_peak_over_the_device_and_says_what_fits(tmp_path):
    from ov_train.run import train

    cfg = _refusing(tmp_path)
    with pytest.raises(PlanError) as err:
        train(cfg)
    message = str(err.value)
    assert "GiB per device exceeds the 0.00 GiB usable on a100_40g" in message and "plan.enforce=false" in message
    assert "activations (peak)" in message and "would fit" not in message  # nothing fits a 1 MiB device
    assert "not enough alone: model.activation_checkpointing=[vision,llm]" in message
    assert not (tmp_path / "run").exists()  # stopped before any work
    # On CPU with plan.device unset there is no GPU run to plan.
    with open_dict(cfg):
        cfg.plan.device = None
    assert preflight(resolve_plan(cfg)) is None


def test_preflight_override_goes_ahead(tmp_path, caplog):
    cfg = _refusing(tmp_path, "plan.enforce=false")
    plan = preflight(resolve_plan(cfg))
    assert plan["fits"] is False and plan["peak_gib"] > plan["usable_gib"]
    assert "training anyway" in caplog.text
    fits = preflight(resolve_plan(compose_config([*SMALL_DATA, "plan.device=h100"], tmp_path / "run")))
    assert fits["fits"] is True and fits["device_gib"] == 79.1


@pytest.mark.slow
def test_cli_plan_json_keys():
    script = shutil.which("ov-train") or str(Path(sys.executable).parent / "ov-train")
    out = subprocess.run([script, "plan", "plan.device=h200", "trainer.devices=2", "strategy=fsdp2", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    for key in ("fits", "peak_gib", "device_gib", "weights_gib", "gradients_gib", "optimizer_gib", "masters_gib",
                "buffers_gib", "activations_gib", "loss_gib", "flops_per_step", "step_time_s"):
        assert key in plan, key
    assert plan["fits"] is True and plan["device_gib"] == 139.8 and plan["strategy"] == "FSDP2" and plan["devices"] == 2
    assert 0 < plan["peak_gib"] < 1 and plan["step_time_s"] > 0


def test_cli_names_a_bad_key(capsys):
    from ov_train.cli.plan import main

    assert main(["plan.device=h300", "plan.mfu=2"]) == 2
    err = capsys.readouterr().err
    assert "plan.mfu=2.0 must be a number in (0, 1]" in err
    assert main(["plan.device=h300"]) == 2
    assert "plan.device='h300'; allowed:" in capsys.readouterr().err
    # What Hydra refuses while composing (a typo, an option that does not exist): Hydra says it, as it does for
    # training (the same composition), naming it without a traceback.
    assert main(["plan.device=h100", "trainer.max_step=2"]) == 1
    err = capsys.readouterr().err
    assert "Key 'max_step' not in 'TrainerConfig'" in err and "Traceback" not in err
    assert "trainer.max_step: no such key; did you mean trainer.max_steps?" in err  # ours, after Hydra's
    assert main(["plan.device=h100", "strategy=zero9"]) == 1
    err = capsys.readouterr().err
    assert "Could not find 'strategy/zero9'" in err and "Available options" in err


def test_stock_path_holds_full_logits():
    # plan.path=stock: the public recipe's step (batch 1, fp32 weights under bf16 autocast, the stock forward's
    # full logits and loss) on the longest sample of the same batch.
    cfg = compose_config(["plan.device=h100", "plan.path=stock", "plan.tokens=1024", "model.max_tokens=1024"])
    setup = Setup.of(resolve_plan(cfg, machine=False))
    assert setup.engine.compute == "mixed" and not setup.options.packing and setup.options.loss == "full"
    model = meta_model(setup.model)
    vocab = model.lm_head.weight.shape[0]
    samples = step_samples(setup, VisionGeometry.from_model_config(model.config))
    assert len(samples) == 1
    trace = trace_step(model, setup.parts, samples, setup.options, "mixed", "stock", fused_loss=False)
    assert trace.row_tokens == samples[0].tokens
    assert trace.loss >= samples[0].tokens * vocab * (2 + 4)  # bf16 logits and their fp32 copy


def test_plans_check_the_adapter_and_media_nodes_as_a_run_does_but_plan_qlora_off_cuda():
    # A config the run would refuse is refused by the plan too, naming the key; qlora's need for CUDA and
    # bitsandbytes is the target machine's, not this one's.
    for bad, key in (["adapter=lora", "adapter.targets.llm=[foo]"], "adapter.targets.llm"), (
            ["stage.image_strategy=anyres_max_0"], "stage.image_strategy"):
        with pytest.raises(ConfigError, match=key):  # what a run on that machine says
            _setup(["model=ov_qwen2_0_5b", "plan.device=h100", *bad])
    setup = _setup(["model=ov_qwen2_0_5b", "plan.device=h100", "adapter=qlora"])
    assert setup.adapter.kind == "qlora"


def test_cli_plans_an_experiment_of_the_users_config_directory(tmp_path, capsys):
    """`ov-train plan` takes the overrides training takes, --config-dir (README, Quickstart) included."""
    from ov_train.cli.plan import main

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\ntrainer:\n  devices: 2\nstrategy:\n  name: ddp\n")
    for where in (["--config-dir", str(tmp_path)], [f"--config-dir={tmp_path}"], ["-cd", str(tmp_path)]):
        assert main([*where, "experiment=mine", "plan.device=h200", "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["devices"] == 2
    assert main(["--config-dir", str(tmp_path / "nope"), "plan.device=h200"]) == 1
    assert f"Additional config directory '{tmp_path / 'nope'}' not found" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, reference, engine, copy_bytes, forwards", [
    ([], "frozen", Engine("single", 1, "bf16-true"), 2 * C.total, 1.0),  # a whole copy, in the weights' dtype
    ([], "frozen", Engine("zero", 4, "bf16-mixed", 3), 2 * C.total, 1.0),  # no engine shards it
    ([], "frozen", Engine("ddp", 2, "32-true"), 4 * C.total, 1.0),
    (["adapter=lora", "adapter.targets.projector=frozen"], "adapters_off", Engine("single", 1, "bf16-true"), 0, 1.0),
    (["stage.preference.reference=precomputed"], "precomputed", Engine("single", 1, "bf16-true"), 0, 0.0),
])
def test_the_planner_counts_each_preference_reference(overrides, reference, engine, copy_bytes, forwards):
    from ov_train.planner.state import reference_state

    assert _setup(["stage=dpo", "plan.device=h100", *overrides]).reference == reference
    assert reference_state(C, engine, reference)[:2] == (copy_bytes, forwards)
    state = replace(model_state(C, engine), reference=copy_bytes)
    assert state.resident == model_state(C, engine).resident + copy_bytes  # held through the step
    assert reference_state(C, engine, None) == (0, 0.0, None)  # conversation stages: none
    assert _setup(["plan.device=h100"]).reference is None


def test_cli_plans_the_dpo_stage_end_to_end(capsys):
    """`ov-train plan stage=dpo` (the embedded default's composition, model_stage/tiny_dpo.yaml included): the frozen
    reference's copy is counted in the model state and its forward in the FLOPs; a precomputed reference costs neither."""
    from ov_train.cli.plan import main

    plans = {}
    for reference in ("frozen", "precomputed"):
        assert main(["stage=dpo", "plan.device=cpu", f"stage.preference.reference={reference}", "--json"]) == 0, \
            capsys.readouterr().err
        plans[reference] = json.loads(capsys.readouterr().out)
    frozen, precomputed = plans["frozen"], plans["precomputed"]
    assert (frozen["reference"], precomputed["reference"]) == ("frozen", "precomputed")
    assert frozen["reference_gib"] == pytest.approx(frozen["weights_gib"], abs=0.01) and precomputed["reference_gib"] == 0
    assert frozen["fits"] and frozen["peak_gib"] > precomputed["peak_gib"]
    assert frozen["flops_per_step"] > precomputed["flops_per_step"]  # the reference's forward each step
