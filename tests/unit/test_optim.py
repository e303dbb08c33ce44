"""MasterWeightAdamW: AdamW on fp32 masters of bf16 weights, exact against torch's AdamW, resumable; which
optimizer each precision and strategy gets; the default precision per machine and strategy."""
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from ov_train.config.options import default_precision, devices_per_node
from ov_train.training.optim import MasterWeightAdamW, build_adamw
from tests.conftest import compose_config


def _pairs(seed: int = 0):
    """fp32 reference parameters and bf16 ones holding the same (bf16-representable) values."""
    torch.manual_seed(seed)
    low = [torch.nn.Parameter(torch.randn(5, 3).to(torch.bfloat16)), torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))]
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    return ref, low


def _groups(params):
    return [{"params": params[:1], "lr": 1e-3, "weight_decay": 0.1}, {"params": params[1:], "lr": 3e-4, "weight_decay": 0.0}]


def _step_with(optimizers_and_params, generator):
    grads = [torch.randn(p.shape, generator=generator) for p in optimizers_and_params[0][1]]
    for optimizer, params in optimizers_and_params:
        for p, g in zip(params, grads):
            p.grad = g.to(torch.bfloat16).to(p.dtype)  # the same bf16 gradient for both
        optimizer.step()


def test_masters_follow_torch_adamw_exactly_and_weights_are_their_rounding():
    ref, low = _pairs()
    reference = torch.optim.AdamW(_groups(ref), betas=(0.9, 0.999), eps=1e-8)
    ours = MasterWeightAdamW(_groups(low))
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):
        _step_with([(reference, ref), (ours, low)], generator)
    for r, p in zip(ref, low):
        master = ours.state[p]["master"]
        assert master.dtype == torch.float32 and torch.equal(master, r)
        assert p.dtype == torch.bfloat16 and torch.equal(p, master.to(torch.bfloat16))


def test_small_updates_accumulate_in_the_masters_where_bf16_weights_lose_them():
    plain_weight = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    master_weight = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    plain = torch.optim.AdamW([plain_weight], lr=1e-5, weight_decay=0.0)
    ours = MasterWeightAdamW([master_weight], lr=1e-5)
    for _ in range(100):
        for p in (plain_weight, master_weight):
            p.grad = torch.ones_like(p)
        plain.step()
        ours.step()
    # Each step moves a weight by about lr = 1e-5, below bf16's spacing at 1.0 (2^-7 above, 2^-8 below).
    assert torch.equal(plain_weight, torch.ones_like(plain_weight))
    assert torch.allclose(ours.state[master_weight]["master"], torch.full((8,), 1 - 100e-5), atol=1e-6)


def test_state_dict_round_trip_keeps_fp32_state_and_resumes_bit_for_bit():
    _, straight_params = _pairs()
    straight = MasterWeightAdamW(_groups(straight_params))
    _, first_params = _pairs()
    first = MasterWeightAdamW(_groups(first_params))
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for _ in range(3):
        _step_with([(straight, straight_params)], g1)
        _step_with([(first, first_params)], g2)
    saved = first.state_dict()
    # A fresh process: weights from the (bf16) checkpoint, optimizer state from its dict.
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    resumed = MasterWeightAdamW(_groups(resumed_params))
    resumed.load_state_dict(saved)
    assert all(v.dtype == torch.float32 for s in resumed.state.values() for v in s.values())
    for _ in range(3):
        _step_with([(straight, straight_params)], g1)
        _step_with([(resumed, resumed_params)], g2)
    for a, b in zip(straight_params, resumed_params):
        assert torch.equal(a, b)
        assert torch.equal(straight.state[a]["master"], resumed.state[b]["master"])


def test_build_adamw_picks_masters_only_for_bf16_weights_outside_deepspeed():
    fp32 = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    bf16 = [{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], "lr": 1e-3}]
    assert type(build_adamw(fp32)) is torch.optim.AdamW
    assert type(build_adamw(bf16)) is MasterWeightAdamW
    # DeepSpeed wraps the optimizer and keeps fp32 master partitions of its own.
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    assert type(build_adamw(bf16, deepspeed)) is torch.optim.AdamW
    group = build_adamw(bf16).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (1e-3, (0.9, 0.999), 1e-8)


def _visible_gpus(monkeypatch, gpus: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


@pytest.mark.parametrize(
    "overrides, gpus, expected",
    [
        ([], 0, "32-true"),
        ([], 8, "bf16-true"),
        (["trainer.accelerator=cpu"], 1, "32-true"),
        (["trainer.devices=[3]"], 8, "bf16-true"),
        (["trainer.devices=2"], 8, "bf16-mixed"),
        (["trainer.devices='0,1'"], 8, "bf16-mixed"),
        (["trainer.devices=auto"], 1, "bf16-true"),
        (["trainer.devices=auto"], 8, "bf16-mixed"),
        (["trainer.devices=-1"], 8, "bf16-mixed"),
        (["trainer.num_nodes=2"], 8, "bf16-mixed"),
        (["strategy=ddp"], 1, "bf16-mixed"),
        (["strategy=fsdp2"], 1, "bf16-mixed"),
        (["strategy=deepspeed_zero3"], 1, "bf16-mixed"),
    ],
)
def test_default_precision(monkeypatch, overrides, gpus, expected):
    _visible_gpus(monkeypatch, gpus)
    cfg = compose_config(overrides)
    assert default_precision(cfg.trainer, cfg.strategy.name) == expected


@pytest.mark.parametrize(
    "devices, accelerator, gpus, expected",
    [(4, "gpu", 8, 4), ([0, 2], "gpu", 8, 2), ("3", "gpu", 8, 3), ("0,1,", "gpu", 8, 2),
     ("auto", "auto", 8, 8), ("auto", "cpu", 8, 1), ("auto", "auto", 0, 1), (-1, "gpu", 4, 4)],
)
def test_devices_per_node_reads_every_form_lightning_takes(monkeypatch, devices, accelerator, gpus, expected):
    _visible_gpus(monkeypatch, gpus)
    assert devices_per_node(devices, accelerator) == expected
