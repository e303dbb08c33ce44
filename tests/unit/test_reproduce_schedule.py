"""stage.warmup_schedule: ov_train's warmup by default; under stage.reproduce=public_code the public trainer's (ceil(0.03 T)
steps at lr x step / W, then cosine), against tests/public_code.py's port of it."""
import torch

from ov_train.training.schedule import lr_schedule
from tests import public_code
from tests.conftest import plan_of

T = 9_375  # e.g. 4.8M samples at 512 a step


def _factors(rule: str, total: int = T, ratio: float = 0.03) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    (factor,) = lr_schedule(optimizer, total, ratio, rule).lr_lambdas
    return [factor(step) for step in range(total + 1)]


def test_public_warmup_is_the_public_trainers_step_for_step():
    assert public_code.warmup_steps(T, 0.03) == 282
    for total, ratio in ((T, 0.03), (100, 0.03), (7, 0.5), (50, 0.0)):
        port = [public_code.cosine_lr_factor(step, total, ratio) for step in range(total + 1)]
        assert _factors("transformers", total, ratio) == port, (total, ratio)
    public = _factors("transformers")
    assert public[0] == 0.0 and public[281] == 281 / 282 and public[282] == 1.0


def test_default_warmup_unchanged():
    ours = _factors("ov_train")
    # round(0.03 x 9,375) = 281 steps, the first already at lr / 281.
    assert ours[0] == 1 / 281 and ours[280] == 1.0 and ours[281] == 1.0 and ours[282] < 1.0
    assert ours != [public_code.cosine_lr_factor(step, T, 0.03) for step in range(T + 1)]


def test_the_switch_reaches_the_optimizer_plan():
    assert plan_of([]).optim.warmup_schedule == "ov_train"
    assert plan_of(["stage.reproduce=public_code"]).optim.warmup_schedule == "transformers"
    assert plan_of(["stage.warmup_schedule=transformers"]).optim.warmup_schedule == "transformers"


def test_the_module_steps_the_planned_schedule(tiny_model_and_tokenizer):
    import copy

    from ov_train.training.module import OneVisionModule

    plan = plan_of(["stage.reproduce=public_code", "trainer.max_steps=100"])
    module = OneVisionModule(copy.deepcopy(tiny_model_and_tokenizer[0]), plan.optim, plan.forward)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    ratio = plan.optim.warmup_ratio
    for factor in scheduler.lr_lambdas:
        assert [factor(s) for s in range(101)] == [public_code.cosine_lr_factor(s, 100, ratio) for s in range(101)]
