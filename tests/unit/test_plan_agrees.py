"""The planner and training agree by construction: for the same overrides, what `ov-train plan` prints and the plan a
run resolves (resolve_plan on the composed config, as run.py does, on a machine of the planned kind) name the same
attention, precision, token budget, strategy, adapters and preference reference."""
from __future__ import annotations

import json

import pytest
import torch

from ov_train.cli.plan import main as ov_train_plan
from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.planner.state import engine_from_plan
from tests.conftest import compose_config

# (overrides, GPUs on the run's machine: None plans for the CPU the tests run on)
CASES = [
    ([], 1),
    (["stage=onevision", "strategy=fsdp2", "trainer.devices=2", "data.max_tokens_per_batch=512"], 2),
    (["adapter=lora", "adapter.r=4"], None),
    (["model.attn_implementation=auto", "model.packing=true"], 1),  # auto: ov_varlen on a GPU in bf16
    (["model.attn_implementation=auto", "model.packing=true", "trainer.precision=32-true"], 1),  # auto: sdpa in fp32
    (["stage=dpo"], 1),
]


def _printed(overrides: list[str], device: str, capsys) -> dict:
    assert ov_train_plan([*overrides, f"plan.device={device}", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _run_plan(overrides: list[str], device: str, gpus: int | None, run_dir, monkeypatch):
    """The plan training resolves from the same overrides on a machine with `gpus` GPUs (None: this CPU machine)."""
    cfg = compose_config([*overrides, f"plan.device={device}"], run_dir)
    with monkeypatch.context() as machine:
        if gpus:
            machine.setattr(torch.cuda, "is_available", lambda: True)
            machine.setattr(torch.cuda, "device_count", lambda: gpus)
        plan = resolve_plan(cfg)
        return plan, plan.forward.attention()  # `auto` as the run's model build resolves it there


def test_ov_train_plan_prints_the_runs_decisions(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a plan writes nothing; a stray output would land here
    seen = []
    for overrides, gpus in CASES:
        device = "h100" if gpus else "cpu"
        printed = _printed(overrides, device, capsys)
        run, attention = _run_plan(overrides, device, gpus, tmp_path / "run", monkeypatch)
        assert printed["attention"] == attention, overrides
        assert printed["precision"] == run.precision, overrides
        assert printed["tokens"] == (run.data.budget.max_tokens or run.forward.max_tokens), overrides  # a batch, or a row
        assert printed["strategy"] == engine_from_plan(run.strategy, run.precision).label, overrides
        assert (printed["devices"], printed["sequence_parallel"]) == (run.strategy.world_size, run.strategy.sequence_parallel)
        assert printed["adapter"] == (run.adapter and {"kind": run.adapter.kind, "r": run.adapter.r}), overrides
        assert printed["reference"] == (run.preference and run.preference.reference), overrides
        seen.append(printed)
    # The cases differ where a planner of its own could go wrong: both attentions `auto` stands for, the precisions of
    # one GPU, several GPUs and the CPU, a token budget, adapters, a preference reference.
    assert {p["attention"] for p in seen} == {"ov_varlen", "sdpa"}
    assert {p["precision"] for p in seen} == {"bf16-true", "bf16-mixed", "32-true"}
    assert (seen[1]["tokens"], seen[1]["tokens_from"], seen[1]["strategy"]) == (512, "data.max_tokens_per_batch", "FSDP2")
    assert seen[2]["adapter"] == {"kind": "lora", "r": 4} and seen[5]["reference"] == "frozen"


def test_ov_train_plan_stage_dpo_prints_its_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert ov_train_plan(["stage=dpo", "plan.device=h100"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "note: the frozen reference: a whole copy of the weights on every device" in text and ": fits" in text
    assert list(tmp_path.iterdir()) == []


def test_a_plan_for_another_machine_leaves_out_only_this_machines_files():
    """`ov-train plan` plans a run for the machine it will run on: the export to start from and the shards are there,
    not here. A run here refuses the same config, naming them; both refuse a bad value."""
    overrides = ["model=ov_qwen2_0_5b", "model.init_from=/nowhere/export", "data=recipe", "plan.device=h100"]
    with pytest.raises(ConfigError) as err:
        resolve_plan(compose_config(overrides))
    assert "model.init_from='/nowhere/export': path does not exist" in str(err.value)
    assert "data.root is required" in str(err.value)
    plan = resolve_plan(compose_config(overrides), machine=False)
    assert (plan.model.route, plan.model.source, plan.data.recipe.name) == ("checkpoint", "/nowhere/export", "onevision")
    with pytest.raises(ConfigError, match="model.text.num_key_value_heads=3 must divide"):
        resolve_plan(compose_config([*overrides, "model.text.num_key_value_heads=3"]), machine=False)


def test_the_budgets_source_is_the_key_that_set_it(tmp_path, monkeypatch, capsys):
    """The data config's budget wins over the recipe's, also when both say the same number (the source was once
    guessed from the number, and a data.max_tokens_per_batch equal to the recipe's was called the recipe's)."""
    monkeypatch.chdir(tmp_path)
    recipe = ["stage=onevision", "data=recipe", "data.recipe=onevision", "data.batch_size=null"]
    own = _printed([*recipe, "data.max_tokens_per_batch=32768"], "h100", capsys)
    shipped = _printed(recipe, "h100", capsys)
    assert (own["tokens"], own["tokens_from"]) == (32768, "data.max_tokens_per_batch")
    assert (shipped["tokens"], shipped["tokens_from"]) == (32768, "recipe onevision's max_tokens_per_batch")
