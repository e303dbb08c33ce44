"""apply_stage: which tensors train per stage, optimizer groups, freezing under a real AdamW step, the table."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from ov_train.config.run_plan import ConfigError, model_plan
from ov_train.constants import PARTS
from ov_train.model.build import build_model
from ov_train.model.forward import forward_logits, token_losses
from ov_train.model.layout import UNUSED, part_of
from ov_train.model.parts import apply_stage, format_table
from tests.conftest import CONF, compose_config, plan_of

STAGES = sorted(p.stem for p in (CONF / "stage").glob("*.yaml"))
PREFIXES = {
    "vision_tower": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.", "model.image_newline"),
    "llm": ("model.language_model.", "lm_head."),
}


def _expected_part(name: str) -> str:
    (part,) = [p for p, prefixes in PREFIXES.items() if name.startswith(prefixes)]
    return part


def _unused(name: str) -> bool:
    """SigLIP's post_layernorm (and pooling head): never run by OneVision, which reads pre-norm hidden states."""
    return re.fullmatch(r"model\.vision_tower\.(vision_model\.)?(post_layernorm|head)\..+", name) is not None


@pytest.fixture
def model(tiny_model_and_tokenizer):
    return copy.deepcopy(tiny_model_and_tokenizer[0])


@pytest.fixture
def batch(mixed_batch):
    """An anyres image, three images, a video, text only: every trainable tensor gets a gradient."""
    return mixed_batch[2]


def test_stage_configs_are_the_four_stages_and_dpo():
    assert STAGES == ["dpo", "final_image", "mid", "onevision", "pretrain"]
    assert set(PARTS) == {"vision_tower", "projector", "llm"}


def test_every_parameter_has_exactly_one_part(model):
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) > 0
    for name in names:
        assert part_of(name) == _expected_part(name), name
    assert {part_of(n) for n in names} == set(PARTS)
    unused = [n.replace("vision_model.", "") for n in names if _unused(n)]
    assert unused == ["model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"]
    assert all(any(re.search(p, n) for p in UNUSED) == _unused(n) for n in names)
    with pytest.raises(KeyError, match="no part"):
        part_of("model.something_new.weight")


@pytest.mark.parametrize("stage", STAGES)
def test_apply_stage_per_stage_config(stage, model):
    cfg = compose_config([f"stage={stage}"])
    lr_scale = float(cfg.model.lr_scale)
    assert lr_scale == 100.0  # the tiny model scales fine-tuning learning rates
    optim = plan_of([f"stage={stage}"]).optim
    groups, rows = apply_stage(model, optim.part_lrs, optim.weight_decay)

    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if stage == "pretrain":
        expected_lrs = {"projector": 1e-3 * lr_scale}
        assert trainable == {n for n in names.values() if n.startswith(("model.multi_modal_projector.", "model.image_newline"))}
        assert "model.image_newline" in trainable
        assert {n.split(".")[-1] for n in trainable if "multi_modal_projector" in n} == {"weight", "bias"}
    elif stage == "dpo":  # one rate for every part: on the tiny model model_stage/tiny_dpo.yaml's (test_dpo_stage
        # checks dpo_ov7b.sh's 5e-7 on a real model)
        expected_lrs = dict.fromkeys(("vision_tower", "projector", "llm"), 2e-06 * lr_scale)
        assert trainable == {n for n in names.values() if not _unused(n)}
    else:
        expected_lrs = {"vision_tower": 2e-6 * lr_scale, "projector": 1e-5 * lr_scale, "llm": 1e-5 * lr_scale}
        assert trainable == {n for n in names.values() if not _unused(n)}
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(expected_lrs, rel=1e-12)
    assert all(g["weight_decay"] == cfg.stage.weight_decay for g in groups)

    # Every trainable tensor in exactly one group, of its own part; frozen tensors in none.
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert {names[i] for i in grouped} == trainable
    for g in groups:
        assert all(part_of(names[id(p)]) == g["name"] and p.requires_grad for p in g["params"])

    # Rows: one per part, counting every tensor of the part, trainable or not.
    assert [r.part for r in rows] == list(PARTS)
    for r in rows:
        params = [p for n, p in model.named_parameters() if part_of(n) == r.part]
        assert r.params == sum(p.numel() for p in params) and r.tensors == len(params)
        assert r.trainable == (r.part in expected_lrs)
        assert r.lr == pytest.approx(expected_lrs.get(r.part, 0.0), rel=1e-12)
        assert r.trainable_params == sum(p.numel() for p in params if p.requires_grad)


def test_lr_scale_one_gives_the_stage_learning_rates(model):
    groups, _ = apply_stage(model, plan_of(["stage=onevision", "model.lr_scale=1"]).optim.part_lrs, 0.1)
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {
        "vision_tower": (2e-6, 0.1),
        "projector": (1e-5, 0.1),
        "llm": (1e-5, 0.1),
    }


def test_tied_embeddings_are_one_llm_tensor(_offline_cache):
    torch.manual_seed(0)
    tied, _ = build_model(model_plan(compose_config(["model.text.tie_word_embeddings=true"]).model), _offline_cache)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    groups, rows = apply_stage(tied, {"llm": 1e-5})
    (llm,) = groups
    embed = tied.get_input_embeddings().weight
    assert sum(p is embed for p in llm["params"]) == 1
    assert llm["name"] == "llm" and len(llm["params"]) == len({id(p) for p in llm["params"]})
    unique = {id(p): p for p in tied.parameters()}
    assert sum(r.params for r in rows) == sum(p.numel() for p in unique.values())
    assert sum(r.params for r in rows) < sum(p.numel() for _, p in tied.named_parameters(remove_duplicate=False))


# ---------------------------------------------------------------------------------------------------------------
# A real optimizer step


STEP_CASES = {
    "pretrain": None,  # from conf/stage/pretrain.yaml
    "onevision": None,  # from conf/stage/onevision.yaml
    "llm_only": {"llm": 1e-5},
    "frozen_projector": {"vision_tower": 2e-6, "llm": 1e-5},  # gradient passes through a frozen projector
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_adamw_step_touches_only_trainable_tensors(case, model, batch):
    plan = plan_of([f"stage={case}"] if STEP_CASES[case] is None else [])
    part_lrs = plan.optim.part_lrs if STEP_CASES[case] is None else STEP_CASES[case]
    groups, _ = apply_stage(model, part_lrs, plan.optim.weight_decay)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups)

    model.train()
    losses, mask = token_losses(forward_logits(model, batch), batch["labels"])
    loss = losses.sum() / mask.sum()
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    optimizer.step()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n in before if part_lrs.get(part_of(n), 0) > 0 and not _unused(n)}
    state_ids = set(map(id, optimizer.state))
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert id(p) in state_ids and optimizer.state[p]["step"] == 1, name
            assert not torch.equal(p.detach(), before[name]), name
        else:
            assert p.grad is None, name
            assert id(p) not in state_ids, name
            assert torch.equal(p.detach(), before[name]), name
    assert len(state_ids) == len(trainable)


# ---------------------------------------------------------------------------------------------------------------
# Errors


# The plan checks the learning rates once, before any model exists; apply_stage takes them as they are.


def test_unknown_part_is_named_with_the_allowed_parts():
    with pytest.raises(ConfigError) as err:
        plan_of(["stage=pretrain", "+stage.parts.mm_projector=1e-3"])
    msg = str(err.value)
    assert "stage.parts.mm_projector: no such part" in msg and all(part in msg for part in PARTS)


@pytest.mark.parametrize("overrides", [["stage.parts.vision_tower=0", "stage.parts.projector=0", "stage.parts.llm=0"],
                                       ["stage=pretrain", "stage.parts.projector=0.0"]])
def test_nothing_trainable_is_refused(overrides):
    with pytest.raises(ConfigError, match="no part has a learning rate > 0, so nothing would train"):
        plan_of(overrides)


@pytest.mark.parametrize("override, message", [("stage.parts.llm=-1e-5", "stage.parts.llm=-1e-05: learning rate must"),
                                               ("model.lr_scale=0", "model.lr_scale=0.0 must be > 0")])
def test_negative_lr_or_scale_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        plan_of([override])


# ---------------------------------------------------------------------------------------------------------------
# The table


def _table_rows(table: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in table.splitlines()[2:]}


@pytest.mark.parametrize("stage", ["pretrain", "onevision"])
def test_format_table(stage, model):
    cfg = compose_config([f"stage={stage}"])
    _, rows = apply_stage(model, plan_of([f"stage={stage}"]).optim.part_lrs)
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["part", "state", "lr", "params", "tensors"]
    assert set(lines[1]) == {"-"}
    parsed = _table_rows(table)
    assert list(parsed) == [*PARTS, "total"]
    for part in PARTS:
        named = [(n, p) for n, p in model.named_parameters() if part_of(n) == part]
        _, state, lr, params, tensors = parsed[part]
        assert int(params.replace(",", "")) == sum(p.numel() for _, p in named)
        assert int(tensors) == len(named)
        train = stage != "pretrain" or part == "projector"
        assert state == ("trainable" if train else "frozen")
        assert lr == ("-" if not train else f"{dict(cfg.stage.parts)[part] * 100:.2e}")
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    assert int(parsed["total"][1].replace(",", "")) == total == sum(r.params for r in rows)
    assert parsed["total"][2:4] == ["trainable", f"{trainable:,}"]
    assert parsed["total"][4] == f"({100 * trainable / total:.1f}%)"
    if stage == "onevision":
        hidden = model.config.vision_config.hidden_size
        assert total - trainable == 2 * hidden  # only SigLIP's unused post_layernorm stays frozen
