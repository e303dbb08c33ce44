"""Adapters through PEFT on the tiny model: placement per target list, a frozen base under a real AdamW step, the
merge and PEFT's own format reproducing the adapted model, the trainable table, and configs refused by key."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.model.adapters import merged, target_pattern, wrap
from ov_train.model.forward import forward_logits, token_losses
from ov_train.model.layout import is_adapter_weight, part_of
from ov_train.model.parts import apply_stage, format_table
from tests.conftest import compose_config, plan_of

LLM_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(base, overrides: list[str]):
    """A copy of `base` with the plan's adapters placed and the stage applied: (peft model, model, groups, rows)."""
    plan = plan_of(overrides)
    model = copy.deepcopy(base)
    peft_model = wrap(model, plan.adapter)
    groups, rows = apply_stage(model, plan.optim.part_lrs, plan.optim.weight_decay, plan.optim.adapted)
    return peft_model, model, groups, rows


def lora_modules(model) -> dict[str, set[str]]:
    """Module names carrying a LoRA A matrix, by part."""
    out: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        if ".lora_A." in name:
            out.setdefault(part_of(name), set()).add(name.split(".lora_A.")[0])
    return out


@pytest.fixture
def base(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[0]


@pytest.fixture(scope="module")
def batch(mixed_batch, tiny_model_and_tokenizer):
    """An anyres image and a text-only sample: the tower, the projector and the LLM all run."""
    from ov_train.data.samples import collate

    _, examples, _ = mixed_batch
    return collate([examples[0], examples[3]], tiny_model_and_tokenizer[1].pad_token_id)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["adapter=lora"], {"llm": LLM_ALL}),
        (["adapter=lora", "adapter.targets.llm=[q_proj,v_proj]", "adapter.targets.vision_tower=[fc1,out_proj]",
          "adapter.targets.projector=[linear_2]"],
         {"llm": ["q_proj", "v_proj"], "vision_tower": ["fc1", "out_proj"], "projector": ["linear_2"]}),
    ],
    ids=["default", "every_part"],
)
def test_adapters_sit_exactly_on_the_listed_modules_of_each_part(base, overrides, expected):
    _, model, groups, rows = adapted(base, overrides)
    layers = {"llm": "model.language_model.layers", "vision_tower": "model.vision_tower.encoder.layers"}
    want = {}
    for part, modules in expected.items():
        if part == "projector":
            want[part] = {f"model.multi_modal_projector.{m}" for m in modules}
            continue
        config = model.config.text_config if part == "llm" else model.config.vision_config
        n_layers = config.num_hidden_layers
        sub = {"llm": {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"},
               "vision_tower": {"out_proj": "self_attn", "q_proj": "self_attn", "v_proj": "self_attn"}}[part]
        want[part] = {f"{layers[part]}.{i}.{sub.get(m, 'mlp')}.{m}" for i in range(n_layers) for m in modules}
    assert lora_modules(model) == want
    # The base is frozen everywhere an adapter or a PEFT copy trains; only PEFT's tensors are in the groups.
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_weight(n) for n in trainable)
    assert {names[id(p)] for g in groups for p in g["params"]} == trainable
    # The projector trains whole (a PEFT copy) unless it carries adapters; the tower is frozen by default.
    copies = {n for n in trainable if ".modules_to_save." in n}
    assert bool(copies) == ("projector" not in expected)
    assert ("vision_tower" in {g["name"] for g in groups}) == ("vision_tower" in expected)
    # The stage's learning rate for a part (x lr_scale 100) applies to its adapters.
    lrs = {"vision_tower": 2e-4, "projector": 1e-3, "llm": 1e-3}
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx({p: lrs[p] for p in {g["name"] for g in groups}})
    table = format_table(rows)
    assert "base params" in table and "adapter params" in table
    for r in rows:
        params = [(n, p) for n, p in model.named_parameters() if part_of(n) == r.part]
        assert r.adapter_params == sum(p.numel() for n, p in params if is_adapter_weight(n))
        assert r.trainable_params == sum(p.numel() for _, p in params if p.requires_grad)


def test_target_pattern_is_one_regex_per_adapted_part(base):
    adapter = plan_of(["adapter=lora", "adapter.targets.llm=[q_proj]"]).adapter
    assert adapter.modes == {"llm": "adapters", "projector": "copy", "vision_tower": "frozen"}
    pattern = target_pattern(base, adapter)
    matched = [n for n, _ in base.named_modules() if re.fullmatch(pattern, n)]
    assert matched == [f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(3)]


def test_frozen_base_gets_no_gradient_and_no_optimizer_state(base, batch):
    _, model, groups, _ = adapted(base, ["adapter=dora"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    losses, mask = token_losses(forward_logits(model, batch), batch["labels"])
    (losses.sum() / mask.sum()).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param in optimizer.state, name
        else:
            assert param.grad is None and param not in optimizer.state, name
            assert torch.equal(param, before[name]), name
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".lora_B." in n for n in changed) and any("lora_magnitude_vector" in n for n in changed)
    assert len(optimizer.state) == sum(p.requires_grad for p in model.parameters())


def _perturbed(peft_model):
    """Adapters away from their identity initialisation (LoRA B starts at 0), as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return peft_model


@pytest.mark.parametrize("kind", ["lora", pytest.param("dora", marks=pytest.mark.slow)])  # DoRA: about 8 s
def test_merged_model_is_stock_and_equals_the_adapted_one(base, batch, kind, tmp_path):
    from peft import PeftModel
    from transformers import LlavaOnevisionForConditionalGeneration

    overrides = [f"adapter={kind}", "adapter.targets.vision_tower=[q_proj,fc2]"]
    peft_model, model, _, _ = adapted(base, overrides)
    _perturbed(peft_model).eval()
    with torch.no_grad():
        reference = forward_logits(model, batch)
    # PEFT's own format over the same base reproduces the adapted model.
    peft_model.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(forward_logits(again.base_model.model, batch), reference, atol=1e-6)
    # The merge: a stock model (stock keys), the same logits within float tolerance.
    stock = merged(peft_model)
    assert type(stock) is LlavaOnevisionForConditionalGeneration
    assert set(stock.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        assert torch.allclose(forward_logits(stock, batch), reference, atol=1e-5, rtol=1e-4)


def _problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        resolve_plan(compose_config(overrides))
    return str(err.value)


def test_configs_that_cannot_work_fail_before_any_work_naming_the_key():
    message = _problems(["adapter=lora", "adapter.targets.llm=[q_proj,qkv]"])
    assert "adapter.targets.llm=['q_proj', 'qkv']: unknown target module(s) ['qkv']" in message and "'down_proj'" in message
    message = _problems(["adapter=lora", "stage=pretrain"])
    assert "adapter.targets.llm" in message and "adapters on a part this stage freezes" in message
    assert "stage.parts.llm" in message
    message = _problems(["adapter=qlora", "trainer.accelerator=cpu", "strategy=deepspeed_zero3"])
    assert "adapter=qlora needs CUDA" in message and "adapter=qlora with strategy.stage=3 (ZeRO-3)" in message
    assert "adapter.targets.llm=full" in _problems(["adapter=lora", "adapter.targets.llm=full"])
    assert "adapter.targets.head: no such setting" in _problems(["adapter=lora", "+adapter.targets.head=full"])
    assert "adapter.r=0" in _problems(["adapter=lora", "adapter.r=0"])
    assert "adapter.dropout=1.5" in _problems(["adapter=dora", "adapter.dropout=1.5"])
    assert "adapter.name='ia3'" in _problems(["adapter=lora", "adapter.name=ia3"])
    assert "nothing would train" in _problems(
        ["adapter=lora", "adapter.targets.llm=frozen", "adapter.targets.projector=frozen"])
    # The defaults are valid on CPU.
    for name in ("none", "lora", "dora"):
        resolve_plan(compose_config([f"adapter={name}", "trainer.accelerator=cpu"]))


def test_keys_of_another_adapter_or_no_part_fail_while_composing():
    from hydra.errors import ConfigCompositionException

    for overrides in (["adapter=none", "adapter.r=8"], ["adapter=lora", "adapter.quant_type=nf4"],
                      ["adapter=lora", "adapter.targets.head=full"], ["adapter=lora", "adapter.r=many"]):
        with pytest.raises(ConfigCompositionException, match="adapter"):
            compose_config(overrides)


@pytest.mark.parametrize("route", ["pretrained", "compose"])
def test_a_recorded_base_that_is_gone_is_named_by_its_key(tmp_path, route):
    """A checkpoint's base record (what an adapter run wrote) whose directories were moved: each one is named by the
    key that recorded it, with how to point at the base, for ov-export and for model.init_from; nothing is built."""
    from ov_train.checkpoints.adapters import EXPORT_OPTIONS, RUN_OPTIONS, base_problems

    keys = ["model.pretrained"] if route == "pretrained" else ["model.vision_tower", "model.llm"]
    for key in keys:
        (tmp_path / key).mkdir()
    record = plan_of(["adapter=lora", *(f"{key}={tmp_path / key}" for key in keys), "model.random_init=false"]).adapter
    assert base_problems(record, "CKPT") == []
    for key in keys:
        (tmp_path / key).rmdir()
    problems = base_problems(record, "CKPT")
    assert [p.split(" which")[0] for p in problems] == [
        f"CKPT: the base its adapters were trained on is gone: the checkpoint records {key}='{tmp_path / key}',"
        for key in keys]
    assert all(p.endswith("with --base DIR") for p in problems)
    assert all(p.endswith("with model.pretrained=DIR") for p in base_problems(record, "CKPT", RUN_OPTIONS))
    # A base directory given instead: built from it, with the tokenizer named (the one it records, else yours).
    assert base_problems(record, "CKPT", EXPORT_OPTIONS, tmp_path, str(tmp_path)) == []
    assert base_problems(record, "CKPT", EXPORT_OPTIONS, tmp_path, str(tmp_path / "gone")) == [
        f"CKPT: the tokenizer its base is built with, '{tmp_path / 'gone'}', does not exist; name one with"
        " --tokenizer DIR"]


def test_the_adapter_record_resumes_compare_keeps_its_keys_and_values():
    """AdapterPlan.settings, which adapter checkpoints record and resumes compare: a lora run records qlora's
    quantization defaults as every checkpoint so far has, a record without them reads back the same plan, and
    qlora records its own."""
    from ov_train.config.adapter import AdapterPlan

    lora = plan_of(["adapter=lora"]).adapter
    assert list(lora.settings()) == ["kind", "r", "alpha", "dropout", "targets", "modes", "quant_type", "double_quant"]
    assert (lora.settings()["quant_type"], lora.settings()["double_quant"]) == ("nf4", True)
    assert AdapterPlan.from_dict(lora.to_dict()) == lora
    older = {k: v for k, v in lora.to_dict().items() if k not in ("quant_type", "double_quant")}
    assert AdapterPlan.from_dict(older) == lora
    qlora = resolve_plan(compose_config(["adapter=qlora", "adapter.quant_type=fp4", "adapter.double_quant=false"]),
                         machine=False).adapter
    assert (qlora.kind, qlora.settings()["quant_type"], qlora.settings()["double_quant"]) == ("qlora", "fp4", False)
