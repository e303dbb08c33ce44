"""The optimizer: AdamW over the stage's per-part groups, with fp32 master weights when the model is bf16.

Under `trainer.precision=bf16-true` Lightning casts the model to bf16 before it builds the optimizer, so
every matrix product runs on bf16 weights without autocast re-casting fp32 weights each step (a fifth of
the public recipe's GPU time in a profile of its step on one H100; docs/PERFORMANCE.md). AdamW stepping bf16 weights directly would
lose most updates: a 1e-5 step is below bf16's resolution for most weights. `MasterWeightAdamW` keeps an
fp32 master copy of each parameter in its state, steps that, and writes the rounded result into the bf16
weight. The masters are optimizer state, so checkpoints hold them and a resume continues bit for bit.

DeepSpeed keeps fp32 master partitions of its own and FSDP2 keeps fp32 shards: they get plain AdamW, or, when
ZeRO offloads the optimizer to the CPU, DeepSpeed's CPU AdamW (vectorised C++, built on first use), the one
ZeRO-Offload is designed around.
"""
from __future__ import annotations

from itertools import chain

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.optim.adamw import adamw

from ov_train.utils.logging import get_logger

log = get_logger(__name__)

BETAS = (0.9, 0.999)
EPS = 1e-8


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) on fp32 master copies of the parameters."""

    def __init__(self, params, lr: float = 1e-3, betas=BETAS, eps: float = EPS, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["master"] = param.detach().to(torch.float32, copy=True)
            state["exp_avg"] = torch.zeros_like(state["master"])
            state["exp_avg_sq"] = torch.zeros_like(state["master"])
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            masters = [s["master"] for s in states]
            adamw(
                masters, [p.grad.float() for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            )
            torch._foreach_copy_(params, masters)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # The base class casts floating state to each parameter's dtype: masters and moments must stay fp32.
        saved = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        current = chain.from_iterable(g["params"] for g in self.param_groups)
        for index, param in zip(saved, current):
            if index in state_dict["state"]:
                self.state[param] = {
                    key: value.detach().clone() if key == "step"
                    else value.detach().to(device=param.device, dtype=torch.float32, copy=True)
                    for key, value in state_dict["state"][index].items()
                }


def offloads_optimizer(strategy) -> bool:
    """Whether `strategy` is DeepSpeed with its optimizer offloaded to the CPU (ZeRO-Offload)."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    config = getattr(strategy, "config", None) or {}  # None until the strategy has read its config
    return bool(config.get("zero_optimization", {}).get("offload_optimizer"))


def deepspeed_cpu_adam(groups: list[dict]) -> torch.optim.Optimizer | None:
    """DeepSpeed's DeepSpeedCPUAdam in AdamW mode over `groups`, or None (logged) where its C++ op cannot be built."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=BETAS, eps=EPS, adamw_mode=True)
    except Exception as err:  # a missing compiler or headers: DeepSpeed then steps torch's AdamW on the CPU copies
        log.warning("DeepSpeedCPUAdam cannot be built here (%s: %s); the offloaded optimizer is torch's AdamW",
                    type(err).__name__, err)
        return None


def build_adamw(groups: list[dict], strategy=None) -> torch.optim.Optimizer:
    """AdamW over `groups`; DeepSpeed's CPU AdamW under ZeRO-Offload; with fp32 masters when the parameters are bf16
    and no engine keeps masters itself."""
    if offloads_optimizer(strategy):
        optimizer = deepspeed_cpu_adam(groups)
        if optimizer is not None:
            return optimizer
    bf16 = any(p.dtype == torch.bfloat16 for g in groups for p in g["params"])
    if bf16 and not isinstance(strategy, DeepSpeedStrategy):
        return MasterWeightAdamW(groups, betas=BETAS, eps=EPS)
    return torch.optim.AdamW(groups, betas=BETAS, eps=EPS)
