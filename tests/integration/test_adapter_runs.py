"""LoRA runs end to end: checkpoints of the trainable tensors only, exact resume, the merged export (stock
transformers, PEFT not even importable), PEFT's format over the base, ov-export --adapter-only / --base,
model.init_from an adapter checkpoint or a merged export, a base moved away named (and pointed at), and resumes refused
for other adapters or another base."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ov_train.checkpoints.adapters import (
    adapted_from_checkpoint,
    build_for_training,
    init_from_adapters,
    rebuild_base,
    recorded_adapters,
)
from ov_train.checkpoints.reading import ov_train_metadata
from ov_train.config.run_plan import ConfigError
from ov_train.model.forward import forward_logits
from ov_train.run import check, train
from tests.conftest import REPO, SMALL_DATA, compose_config, plan_of
from tests.integration.test_train import _held_out_batch
from tests.prebuild import SHM

pytestmark = pytest.mark.slow


def checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def overrides(data_root, *extra) -> list[str]:
    # adapter.dropout stays at its default (0.05): the resume must also draw the same dropout masks.
    return [f"data.root={data_root}", *SMALL_DATA, "adapter=lora", "trainer.max_steps=6", "+trainer.limit_val_batches=0",
            "data.record_keys=true", *extra]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, small_data_root):
    """6 LoRA steps straight (with its export), and the same run stopped after 3 steps then resumed to 6."""
    root = tmp_path_factory.mktemp("lora")
    straight, first, resumed = root / "straight", root / "first", root / "resumed"
    train(compose_config(overrides(small_data_root), run_dir=straight))
    stop = ["export=false", "+trainer.limit_train_batches=1", "+trainer.max_epochs=3"]
    train(compose_config(overrides(small_data_root, *stop), run_dir=first))
    resume = ["export=false", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"]
    train(compose_config(overrides(small_data_root, *resume), run_dir=resumed))
    return straight, first, resumed


def test_checkpoint_holds_the_trainable_tensors_and_their_optimizer_state_only(lora_runs):
    straight, _, _ = lora_runs
    ckpt = checkpoint(straight)
    peft_model, _, record = adapted_from_checkpoint(straight / "checkpoints" / "last.ckpt")
    trainable = {f"model.{n}" for n, p in peft_model.base_model.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    assert all(".lora_" in k or ".modules_to_save." in k for k in trainable)
    (optimizer,) = ckpt["optimizer_states"]
    assert len(optimizer["state"]) == len(trainable) == sum(len(g["params"]) for g in optimizer["param_groups"])
    assert {g["name"] for g in optimizer["param_groups"]} == {"projector", "llm"}
    # What the base was: model.* (the tiny random init) and the seed that rebuilds it.
    assert record.base["seed"] == 0 and record.base["model"]["route"] == "random"
    assert record.modes == {"vision_tower": "frozen", "projector": "copy", "llm": "adapters"}
    assert ckpt["ov_train"]["run"]["adapter"]["kind"] == "lora"


def test_resume_is_exact(lora_runs):
    straight, first, resumed = lora_runs
    consumed = [json.loads(line) for run in (first, resumed)
                for line in (run / "consumed_keys.jsonl").read_text().splitlines()]
    assert consumed == [json.loads(line) for line in (straight / "consumed_keys.jsonl").read_text().splitlines()]
    a, b = checkpoint(straight), checkpoint(resumed)
    assert a["global_step"] == b["global_step"] == 6 and checkpoint(first)["global_step"] == 3
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    (state_a,), (state_b,) = a["optimizer_states"], b["optimizer_states"]
    for index, tensors in state_a["state"].items():
        assert all(torch.equal(v, state_b["state"][index][k]) for k, v in tensors.items())


STOCK_LOAD = """
import sys
sys.modules["peft"] = None  # as if PEFT were not installed
import torch
from transformers import LlavaOnevisionForConditionalGeneration
model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(sys.argv[1], output_loading_info=True)
assert not any(info.values()), info
from ov_train.model.forward import forward_logits
with torch.no_grad():
    torch.save(forward_logits(model.eval(), torch.load(sys.argv[2])), sys.argv[3])
"""


def test_export_is_merged_stock_and_its_adapter_dir_is_peft_format(lora_runs, small_data_root, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    straight, _, _ = lora_runs
    export = straight / "export"
    peft_model, _, record = adapted_from_checkpoint(straight / "checkpoints" / "last.ckpt")
    adapted = peft_model.base_model.model.eval()
    batch = _held_out_batch(adapted, AutoTokenizer.from_pretrained(export), small_data_root)
    with torch.no_grad():
        reference = forward_logits(adapted, batch)
    # Stock transformers, PEFT not importable: no missing or unexpected keys, the adapted model's logits.
    torch.save(batch, tmp_path / "batch.pt")
    subprocess.run([sys.executable, "-c", STOCK_LOAD, str(export), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert torch.allclose(torch.load(tmp_path / "out.pt"), reference, atol=1e-5, rtol=1e-4)
    config = json.loads((export / "config.json").read_text())
    assert "peft" not in json.dumps(config).lower()
    # The stage's image settings as training recorded them, not the rebuilt base's defaults.
    trained = checkpoint(straight)["ov_train"]["model_config"]
    assert config["ov_train_media"] == trained["ov_train_media"]
    assert config["image_grid_pinpoints"] == trained["image_grid_pinpoints"]
    # PeftModel.from_pretrained(base, export/adapter) over the base model gives the same logits.
    again = PeftModel.from_pretrained(rebuild_base(record), export / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(forward_logits(again.base_model.model, batch), reference, atol=1e-6)


def test_ov_export_adapter_only_and_base_dir(lora_runs, tmp_path):
    from safetensors.torch import load_file

    from ov_train.cli.export import main as ov_export

    straight, _, _ = lora_runs
    ckpt = straight / "checkpoints" / "last.ckpt"
    assert ov_export([str(ckpt), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.suffix != ".md") == [
        "adapter_config.json", "adapter_model.safetensors"]
    ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == load_file(straight / "export" / "adapter" / "adapter_model.safetensors").keys()
    # --base: the base as a Hugging Face directory gives the run's own merged export.
    rebuild_base(recorded_adapters(ov_train_metadata(ckpt))).save_pretrained(tmp_path / "base")
    assert ov_export([str(ckpt), str(tmp_path / "merged"), "--base", str(tmp_path / "base")]) == 0
    mine, run = load_file(tmp_path / "merged" / "model.safetensors"), load_file(straight / "export" / "model.safetensors")
    assert mine.keys() == run.keys() and all(torch.equal(mine[k], run[k]) for k in run)
    with pytest.raises(SystemExit):  # refused before any work
        ov_export([str(ckpt), str(tmp_path / "x"), "--base", str(tmp_path / "missing")])


def test_init_from_an_adapter_checkpoint_or_a_merged_export(lora_runs, small_data_root):
    straight, _, _ = lora_runs
    ckpt = straight / "checkpoints" / "last.ckpt"
    stored = checkpoint(straight)["state_dict"]
    # adapter=lora: the adapters go on training from the checkpoint's tensors, on the same base.
    plan = plan_of(overrides(small_data_root, f"model.init_from={ckpt}"))
    source, problems = init_from_adapters(plan)
    assert not problems and source.base["model"]["route"] == "random"
    assert plan.adapter.base["model"]["route"] == "checkpoint"  # this run's own model.*, for its resumes
    model, _, adapter = build_for_training(plan, source)
    assert adapter.base == source.base  # what its checkpoints record: the base the adapters sit on
    state = model.state_dict()
    assert all(torch.equal(state[k.removeprefix("model.")], v) for k, v in stored.items())
    # Other adapter settings cannot continue them.
    with pytest.raises(ConfigError, match="its adapters"):
        check(plan_of(overrides(small_data_root, f"model.init_from={ckpt}", "adapter.r=8")))
    # adapter=none: the checkpoint merged into its base, i.e. the run's merged export, trains whole.
    from transformers import LlavaOnevisionForConditionalGeneration

    plan = plan_of([*overrides(small_data_root, f"model.init_from={ckpt}"), "adapter=none"])
    source, problems = init_from_adapters(plan)
    assert not problems and plan.adapter is None
    model, _, adapter = build_for_training(plan, source)
    assert adapter is None
    export = LlavaOnevisionForConditionalGeneration.from_pretrained(straight / "export").state_dict()
    assert all(torch.equal(v, export[k]) for k, v in model.state_dict().items())
    # A merged export with new adapters on it.
    plan = plan_of(overrides(small_data_root, f"model.init_from={straight / 'export'}"))
    model, _, _ = build_for_training(plan, init_from_adapters(plan)[0])
    assert any(".lora_A." in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def moved_base(tmp_path_factory, small_data_root, _offline_cache):
    """(checkpoint, where its base was, where it is now): 2 LoRA steps on a OneVision directory (model.pretrained),
    which was then moved."""
    from ov_train.model.build import build_model

    root = tmp_path_factory.mktemp("moved")
    torch.manual_seed(5)
    model, tokenizer = build_model(plan_of([]).model, _offline_cache)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    args = [f"data.root={small_data_root}", *SMALL_DATA, "adapter=lora", "trainer.max_steps=2", "export=false",
            "+trainer.limit_val_batches=0", f"model.pretrained={root / 'base'}"]
    train(compose_config(args, run_dir=root / "run"))
    (root / "base").rename(root / "moved")
    return root / "run" / "checkpoints" / "last.ckpt", root / "base", root / "moved"


def _base_gone(text: str, ckpt, base, how: str) -> bool:
    """The message names the checkpoint, the key that recorded the base, the directory, and how to point at it."""
    return all(part in text for part in (str(ckpt), f"model.pretrained='{base}'", "does not exist", how)) and \
        "Repo id" not in text


def test_init_from_an_adapter_checkpoint_whose_base_moved(moved_base, small_data_root, tmp_path):
    ckpt, base, moved = moved_base
    args = [f"data.root={small_data_root}", *SMALL_DATA, "adapter=lora", "trainer.max_steps=1",
            f"model.init_from={ckpt}"]
    done = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    console = done.stdout + done.stderr
    assert done.returncode == 1, console[-3000:]
    assert _base_gone(console, ckpt, base, "model.pretrained=DIR"), console[-3000:]
    assert "Traceback" not in console and not (tmp_path / "run" / "tokenizer").exists()  # before any work
    # model.pretrained=DIR names the base: the adapters go on training on it, and their checkpoints record it.
    plan = plan_of([*args, f"model.pretrained={moved}"])
    plan, source, _ = check(plan)
    model, _, adapter = build_for_training(plan, source)
    assert adapter.base["model"]["source"] == str(moved) and adapter.base["seed"] == source.base["seed"]
    state, stored = model.state_dict(), checkpoint(ckpt.parents[1])["state_dict"]
    assert all(torch.equal(state[k.removeprefix("model.")], v) for k, v in stored.items())
    from transformers import LlavaOnevisionForConditionalGeneration

    on_disk = LlavaOnevisionForConditionalGeneration.from_pretrained(moved).state_dict()
    frozen = [k for k in on_disk if "vision_tower" in k]  # the tower is frozen: the base's own weights
    assert frozen and all(torch.equal(state[k], on_disk[k]) for k in frozen)


def test_ov_export_of_an_adapter_checkpoint_whose_base_moved(moved_base, tmp_path):
    ckpt, base, moved = moved_base
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "ov_train.cli.export", str(ckpt), str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert _base_gone(done.stderr, ckpt, base, "--base DIR"), done.stderr[-3000:]
    assert not (tmp_path / "out").exists()
    done = subprocess.run([*command, "--base", str(moved)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import LlavaOnevisionForConditionalGeneration

    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values())


def test_resume_refuses_other_adapters_or_another_base(lora_runs, small_data_root):
    straight, _, _ = lora_runs
    resume = f"ckpt_path={straight / 'checkpoints' / 'last.ckpt'}"
    for extra, message in ((["adapter.alpha=8"], "adapter: the checkpoint's"), (["seed=1"], "adapters' base"),
                           (["adapter=none"], "adapter: the checkpoint's")):
        with pytest.raises(ConfigError, match=message):
            check(plan_of(overrides(small_data_root, resume, *extra)))


# ---------------------------------------------------------------- 2 CPU processes under each engine


# FSDP2 reads trainable-only sharded checkpoints through ov_train's own code (strategies.FSDP2Strategy), so it resumes
# here too; DDP's checkpoints are Lightning files as in one process (test_resume_is_exact), DeepSpeed's its engine's.
@pytest.mark.parametrize(("strategy", "adapter", "resume"), [
    ("ddp", "lora", False), ("fsdp2", "dora", True),
    pytest.param("deepspeed_zero2", "lora", False, marks=pytest.mark.deepspeed_ops(SHM)),
])
def test_adapters_under_each_engine(tmp_path, small_data_root, strategy, adapter, resume):
    """The engine holds the adapter groups after its set-up; the run exports merged from its trainable-only
    checkpoint. With `resume`: 1 step, then `ckpt_path=last` to 2, every rank going on where it stopped."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from tests.integration.test_strategies import ZERO3_ALL, expected_groups, probe_records, run_train, train_overrides

    run_dir = tmp_path / "run"
    args = [*train_overrides(small_data_root, "onevision", 2, run_dir), f"strategy={strategy}", f"adapter={adapter}",
            "trainer.devices=2", "+trainer.limit_val_batches=0", ZERO3_ALL if strategy.startswith("deepspeed") else
            "adapter.targets.vision_tower=[q_proj,fc1]"]
    first = ["+trainer.limit_train_batches=1", "+trainer.max_epochs=1", "export=false"] if resume else []
    run_train([*args, *first], run_dir, tmp_path / "first")
    expected = expected_groups(compose_config(args))
    assert all(".lora_" in n or ".modules_to_save." in n for g in expected for n in g["params"])
    for record in probe_records(tmp_path / "first", "start"):
        assert record["groups"] == expected and record["optimizer"] == "AdamW"  # torch's, inside DeepSpeed's ZeRO-2 wrapper
    if resume:
        run_train([*args, "ckpt_path=last"], run_dir, tmp_path / "resumed")
        first_end, resumed_start = probe_records(tmp_path / "first", "end"), probe_records(tmp_path / "resumed", "start")
        assert [r["step"] for r in first_end] == [1, 1] and [r["step"] for r in resumed_start] == [1, 1]
        for end, start in zip(first_end, resumed_start):
            assert start["fingerprint"] == end["fingerprint"] and start["groups"] == end["groups"]
    assert [r["step"] for r in probe_records(tmp_path / ("resumed" if resume else "first"), "end")] == [2, 2]
    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(run_dir / "export", output_loading_info=True)
    assert not any(info.values())
    peft_model, _, _ = adapted_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (run_dir / "export" / "adapter" / "adapter_config.json").is_file()
    assert sum(p.requires_grad for p in peft_model.parameters()) == sum(len(g["params"]) for g in expected)
