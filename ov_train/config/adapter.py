"""The `adapter` group resolved: which parts train through PEFT adapters, which as a whole copy, which not at all.

`adapter.targets.<part>` is a list of module names (adapters on those linear layers of the part; its own weights
frozen, the stage's learning rate for the part applying to its adapters; the stage must train the part), `full`
(the part trains whole as the stage says, frozen when the stage freezes it) or `frozen` (whatever the stage says).
Against the stage's learning rates each part gets a mode: `adapters`, `copy` (trained whole beside adapters: PEFT's
modules_to_save, so that PEFT's format holds it) or `frozen`.

`adapter_problems` checks the values (the schema has checked keys and types) when the plan is resolved;
`adapter_plan` turns them into the AdapterPlan the model, the optimizer groups, the strategies and the checkpoints
read. Plan floor: nothing here imports the model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from omegaconf import OmegaConf

from ov_train.config.schema import QLoraConfig
from ov_train.constants import (
    ADAPTED,
    ADAPTER_TARGETS,
    ADAPTERS,
    COPY,
    COPYABLE,
    FROZEN,
    FULL,
    PARTS,
    QUANT_TYPES,
)

QLORA_INSTALL = "pip install 'ov_train[qlora]' (bitsandbytes)"


@dataclass(frozen=True)
class AdapterPlan:
    """A run's adapters (None in the plan under adapter=none). Checkpoints record it (`ov_train.adapter`), with the
    base the adapters sit on, so that resumes and ov-export rebuild the frozen base without the run's config."""

    kind: str  # lora | dora | qlora
    r: int
    alpha: float
    dropout: float
    targets: dict  # part -> tuple of module names, `full` or `frozen`
    modes: dict  # part -> adapters | copy | frozen, under this stage
    # What the adapters sit on: {"model": the model plan's fields (paths absolute), "seed": the run's seed, which
    # decides random weights and the embedding rows added for new tokens}.
    base: dict
    # adapter=qlora's 4-bit weights (config/schema.py QLoraConfig); other kinds record QLoraConfig's defaults.
    quant_type: str
    double_quant: bool

    @property
    def adapted(self) -> tuple[str, ...]:
        """Parts whose trainable tensors are PEFT's (adapters or a whole copy), their own weights frozen."""
        return tuple(part for part, mode in self.modes.items() if mode in (ADAPTED, COPY))

    def part_lrs(self, part_lrs: dict[str, float]) -> dict[str, float]:
        """A stage's learning rates with the parts the adapters freeze at 0."""
        return {part: 0.0 if self.modes[part] == FROZEN else lr for part, lr in part_lrs.items()}

    def modules(self, part: str) -> tuple[str, ...]:
        """The modules of `part` that carry adapters (none unless its mode is `adapters`)."""
        return tuple(self.targets[part]) if self.modes.get(part) == ADAPTED else ()

    def settings(self) -> dict:
        """What decides the adapter tensors and their training (the base aside)."""
        out = asdict(self)
        out.pop("base")
        out["targets"] = {p: list(v) if isinstance(v, tuple) else v for p, v in self.targets.items()}
        return out

    def same_weights(self, other: AdapterPlan) -> bool:
        """Whether `other` places the same adapter tensors (dropout does not matter to the weights)."""
        keys = ("kind", "r", "alpha", "targets", "modes")
        mine, theirs = self.settings(), other.settings()
        return all(mine[k] == theirs[k] for k in keys)

    def to_dict(self) -> dict:
        return {**self.settings(), "base": self.base}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterPlan:
        targets = {p: v if isinstance(v, str) else tuple(v) for p, v in data["targets"].items()}
        return cls(**{**_quantization(QLoraConfig()), **data, "targets": targets})


def _targets(node) -> dict:
    raw = OmegaConf.to_container(node.targets, resolve=True)
    return {part: value if isinstance(value, str) else tuple(value) for part, value in raw.items()}


def modes(targets: dict, part_lrs: dict[str, float]) -> dict[str, str]:
    """Each part's mode under a stage's learning rates."""
    out = {}
    for part in PARTS:
        target = targets.get(part, FROZEN)
        if not part_lrs.get(part, 0.0) > 0 or target == FROZEN:
            out[part] = FROZEN
        else:
            out[part] = COPY if target == FULL else ADAPTED
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def adapter_problems(node, part_lrs: dict[str, float], strategy, accelerator: str, machine: bool = True) -> list[str]:
    """What keeps the `adapter` node from working, each problem by key; `part_lrs` are the stage's learning rates.
    `machine=False` leaves out what depends on this machine (CUDA, bitsandbytes): the planner plans for another."""
    name = node.name
    if name not in ADAPTERS:
        return [f"adapter.name={name!r}; allowed: {list(ADAPTERS)} (adapter=none|lora|dora|qlora)"]
    if name == "none":
        return []
    problems = []
    if node.r < 1:
        problems.append(f"adapter.r={node.r!r} must be a positive integer (the adapters' rank)")
    if not node.alpha > 0:
        problems.append(f"adapter.alpha={node.alpha!r} must be a number > 0 (adapters are scaled by alpha / r)")
    if not 0 <= node.dropout < 1:
        problems.append(f"adapter.dropout={node.dropout!r} must be in [0, 1)")
    targets = _targets(node)
    for part in PARTS:
        target, key, allowed = targets.get(part, FROZEN), f"adapter.targets.{part}", list(ADAPTER_TARGETS[part])
        if isinstance(target, str):
            if target not in (FULL, FROZEN):
                problems.append(f"{key}={target!r}; allowed: a list of modules from {allowed}, full, frozen")
            elif target == FULL and part not in COPYABLE:
                problems.append(f"{key}=full: the {part} trains through adapters or stays frozen under adapter={name};"
                                f" list modules from {allowed}, or use adapter=none to train it whole")
            continue
        unknown = [m for m in target if not isinstance(m, str) or m not in ADAPTER_TARGETS[part]]
        if unknown or not target:
            problems.append(f"{key}={list(target)}: unknown target module(s) {unknown}; allowed: {allowed} (or full /"
                            " frozen)")
        elif not part_lrs.get(part, 0.0) > 0:
            problems.append(f"{key}={list(target)}: adapters on a part this stage freezes (stage.parts.{part} is"
                            f" {part_lrs.get(part, 0.0)}); give it a learning rate or set {key}=frozen")
    if not problems and all(mode == FROZEN for mode in modes(targets, part_lrs).values()):
        shown = {p: list(v) if isinstance(v, tuple) else v for p, v in targets.items()}
        problems.append(f"adapter={name}: with adapter.targets {shown} and stage.parts {dict(part_lrs)} nothing"
                        " would train")
    if name == "qlora":
        problems += _qlora_problems(node, targets, strategy, accelerator, machine)
    return problems


def _qlora_problems(node, targets: dict, strategy, accelerator: str, machine: bool) -> list[str]:
    import torch

    problems = []
    if node.quant_type not in QUANT_TYPES:
        problems.append(f"adapter.quant_type={node.quant_type!r}; allowed: {list(QUANT_TYPES)}")
    if isinstance(targets.get("llm", FROZEN), str):
        problems.append("adapter.targets.llm: adapter=qlora quantizes the LLM and trains adapters on it; list its modules")
    if machine and (accelerator == "cpu" or not torch.cuda.is_available()):
        where = "trainer.accelerator=cpu" if accelerator == "cpu" else "this machine has no CUDA device"
        problems.append(f"adapter=qlora needs CUDA (bitsandbytes 4-bit weights) and {where}; use adapter=lora or"
                        " adapter=dora here")
    if strategy.name == "deepspeed" and strategy.stage == 3:
        problems.append("adapter=qlora with strategy.stage=3 (ZeRO-3): ZeRO-3 cannot partition 4-bit weights; use"
                        " ZeRO-2, ddp, or adapter=lora")
    if strategy.name == "fsdp2":
        problems.append("adapter=qlora with strategy=fsdp2: FSDP2 cannot shard these 4-bit weights; use ddp or"
                        " deepspeed_zero2, or adapter=lora")
    if machine and not problems:
        from importlib.util import find_spec

        if find_spec("bitsandbytes") is None:
            problems.append(f"adapter=qlora needs bitsandbytes: {QLORA_INSTALL}")
    return problems


def adapter_plan(node, part_lrs: dict[str, float], base: dict) -> AdapterPlan | None:
    """The checked `adapter` node as a plan (None under adapter=none)."""
    if node.name == "none":
        return None
    targets = _targets(node)
    return AdapterPlan(kind=node.name, r=node.r, alpha=float(node.alpha), dropout=float(node.dropout),
                       targets=targets, modes=modes(targets, part_lrs), base=base,
                       **_quantization(node if node.name == "qlora" else QLoraConfig()))


def _quantization(node) -> dict:
    return {"quant_type": node.quant_type, "double_quant": node.double_quant}
