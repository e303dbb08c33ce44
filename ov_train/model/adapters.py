"""Adapters through PEFT: LoRA, DoRA and QLoRA on the model's parts, from the `adapter` config group.

Each part gets a mode from `adapter.targets.<part>`:
- a list of module names (`[q_proj, v_proj]`): PEFT adapters on those linear layers of the part's layers; the
  part's own weights stay frozen (no gradient, no optimizer state) and the stage's learning rate for the part
  applies to its adapters. The stage must train the part.
- `full`: the part trains whole, as the stage says (frozen when the stage freezes it). PEFT keeps it as a trained
  copy (`modules_to_save`) so that its PEFT-format directory holds it.
- `frozen`: frozen whatever the stage says.

The model keeps its class: PEFT injects its layers in place (get_peft_model), so the forward pass, the
strategies and the checkpoints see the same module tree with adapter layers inside. Merging and PEFT-format
directories are made at export, on a model rebuilt from a checkpoint (ov_train.tools.export).

QLoRA quantizes the base LLM's linear layers to 4 bits with bitsandbytes (CUDA only) before the adapters go on.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ov_train.model.checkpointing import module_layers
from ov_train.model.parts import PARTS, part_of

ADAPTERS = ("none", "lora", "dora", "qlora")
FULL, FROZEN = "full", "frozen"
# Per-part modes once resolved against the stage: adapters on listed modules, a whole trained copy, or frozen.
ADAPTED, COPY = "adapters", "copy"
# Linear modules inside each part that can carry adapters, as transformers names them (SigLIP, projector, Qwen2).
TARGETABLE: dict[str, tuple[str, ...]] = {
    "vision_tower": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "projector": ("linear_1", "linear_2"),
    "llm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# The module PEFT copies and trains whole (modules_to_save) for a part in `full` mode. The projector part's
# image_newline is a bare parameter PEFT cannot copy: under adapters it keeps its base value.
WHOLE = {"vision_tower": "vision_tower", "projector": "multi_modal_projector"}
QUANT_TYPES = ("nf4", "fp4")
QLORA_INSTALL = "pip install 'ov_train[qlora]' (bitsandbytes)"


@dataclass(frozen=True)
class AdapterSettings:
    """The `adapter` config node."""

    kind: str = "none"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: dict = field(default_factory=dict)  # part -> tuple of module names, `full` or `frozen`
    quant_type: str = "nf4"  # qlora
    double_quant: bool = True  # qlora: quantize the quantization constants too

    @classmethod
    def from_config(cls, node) -> AdapterSettings:
        if node is None:
            return cls()
        node = dict(node)
        targets = {}
        for part, value in dict(node.get("targets") or {}).items():
            targets[part] = value if isinstance(value, str) or value is None else tuple(value)
        known = {k: node[k] for k in ("r", "alpha", "dropout", "quant_type", "double_quant") if node.get(k) is not None}
        return cls(kind=str(node.get("name", "none")), targets=targets, **known)

    @classmethod
    def from_dict(cls, data: dict) -> AdapterSettings:
        """From what to_dict wrote (a checkpoint's record)."""
        return cls.from_config({"name": data["kind"], **data})

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def target(self, part: str):
        """A part's setting: a tuple of module names, `full` or `frozen` (an absent part is frozen)."""
        return self.targets.get(part) or FROZEN

    def modes(self, part_lrs: dict[str, float]) -> dict[str, str]:
        """Each part's mode under this stage: `adapters`, `copy` (trained whole beside adapters) or `frozen`."""
        out = {}
        for part in PARTS:
            trains, target = float(part_lrs.get(part) or 0) > 0, self.target(part)
            if not trains or target == FROZEN:
                out[part] = FROZEN
            else:
                out[part] = COPY if target == FULL else ADAPTED
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        out["targets"] = {p: list(v) if isinstance(v, tuple) else v for p, v in self.targets.items()}
        return out

    def same_weights(self, other: AdapterSettings) -> bool:
        """Whether `other` places the same adapter tensors (dropout does not matter to the weights)."""
        return (self.kind, self.r, self.alpha, self.to_dict()["targets"]) == (
            other.kind, other.r, other.alpha, other.to_dict()["targets"])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def adapter_problems(node, part_lrs: dict[str, float], strategy, accelerator: str) -> list[str]:
    """What keeps the `adapter` config from working, by key (checked before any work)."""
    name = (node or {}).get("name", "none")
    if name not in ADAPTERS:
        return [f"adapter.name={name!r}; allowed: {list(ADAPTERS)} (adapter=none|lora|dora|qlora)"]
    if name == "none":
        return []
    problems = []
    r, alpha, dropout = node.get("r"), node.get("alpha"), node.get("dropout")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"adapter.r={r!r} must be a positive integer (the adapters' rank)")
    if not _is_number(alpha) or alpha <= 0:
        problems.append(f"adapter.alpha={alpha!r} must be a number > 0 (adapters are scaled by alpha / r)")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        problems.append(f"adapter.dropout={dropout!r} must be in [0, 1)")
    targets = dict(node.get("targets") or {})
    for part in sorted(set(targets) - set(PARTS)):
        problems.append(f"adapter.targets.{part}: no such part; allowed: {list(PARTS)}")
    settings = AdapterSettings.from_config(node)
    for part in PARTS:
        target, key, lr = settings.target(part), f"adapter.targets.{part}", float(part_lrs.get(part) or 0)
        if isinstance(target, str):
            if target not in (FULL, FROZEN):
                problems.append(f"{key}={target!r}; allowed: a list of modules from {list(TARGETABLE[part])}, full, frozen")
            elif target == FULL and part not in WHOLE:
                problems.append(f"{key}=full: the {part} trains through adapters or stays frozen under adapter={name};"
                                f" list modules from {list(TARGETABLE[part])}, or use adapter=none to train it whole")
            continue
        unknown = [m for m in target if m not in TARGETABLE[part]]
        if unknown or not target:
            problems.append(f"{key}={list(target)}: unknown target module(s) {unknown}; allowed: {list(TARGETABLE[part])}"
                            f" (or full / frozen)")
        elif lr <= 0:
            problems.append(f"{key}={list(target)}: adapters on a part this stage freezes (stage.parts.{part} is"
                            f" {part_lrs.get(part) or 0}); give it a learning rate or set {key}=frozen")
    if not problems and all(mode == FROZEN for mode in settings.modes(part_lrs).values()):
        problems.append(f"adapter={name}: with adapter.targets {settings.to_dict()['targets']} and stage.parts"
                        f" {dict(part_lrs)} nothing would train")
    if name == "qlora":
        problems += _qlora_problems(node, settings, strategy, accelerator)
    return problems


def _qlora_problems(node, settings: AdapterSettings, strategy, accelerator: str) -> list[str]:
    problems = []
    if node.get("quant_type") not in QUANT_TYPES:
        problems.append(f"adapter.quant_type={node.get('quant_type')!r}; allowed: {list(QUANT_TYPES)}")
    if isinstance(settings.target("llm"), str):
        problems.append("adapter.targets.llm: adapter=qlora quantizes the LLM and trains adapters on it; list its modules")
    if accelerator == "cpu" or not torch.cuda.is_available():
        where = "trainer.accelerator=cpu" if accelerator == "cpu" else "this machine has no CUDA device"
        problems.append(f"adapter=qlora needs CUDA (bitsandbytes 4-bit weights) and {where}; use adapter=lora or"
                        " adapter=dora here")
    if strategy.get("name") == "deepspeed" and strategy.get("stage") == 3:
        problems.append("adapter=qlora with strategy.stage=3 (ZeRO-3): ZeRO-3 cannot partition 4-bit weights; use"
                        " ZeRO-2, ddp, or adapter=lora")
    if strategy.get("name") == "fsdp2":
        problems.append("adapter=qlora with strategy=fsdp2: FSDP2 cannot shard these 4-bit weights; use ddp or"
                        " deepspeed_zero2, or adapter=lora")
    if not problems:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            problems.append(f"adapter=qlora needs bitsandbytes: {QLORA_INSTALL}")
    return problems


def _module_name(model, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def target_pattern(model, settings: AdapterSettings, modes: dict[str, str]) -> str | None:
    """PEFT's `target_modules` as one regular expression (PEFT full-matches it against module names): the listed
    modules inside each adapted part's layers, or inside the projector."""
    alternatives = []
    for part, mode in modes.items():
        if mode != ADAPTED:
            continue
        names = "|".join(re.escape(m) for m in settings.target(part))
        if part == "projector":
            prefix = re.escape(_module_name(model, model.model.multi_modal_projector))
            alternatives.append(rf"{prefix}\.(?:{names})")
        else:
            prefix = re.escape(_module_name(model, module_layers(model, "vision" if part == "vision_tower" else "llm")))
            alternatives.append(rf"{prefix}\.\d+\.(?:.+\.)?(?:{names})")
    return "|".join(f"(?:{a})" for a in alternatives) or None


def lora_config(model, settings: AdapterSettings, modes: dict[str, str], base_path: str | None = None):
    from peft import LoraConfig

    copies = [WHOLE[part] for part, mode in modes.items() if mode == COPY]
    pattern = target_pattern(model, settings, modes)
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, use_dora=settings.kind == "dora",
        # With no adapted part (only whole copies), an empty list: PEFT then places no adapter layer.
        target_modules=pattern if pattern is not None else [], modules_to_save=copies or None,
        base_model_name_or_path=base_path,
    )


def quantize_llm(model, settings: AdapterSettings) -> int:
    """Replace the LLM layers' linear modules by bitsandbytes 4-bit ones, quantized now on this process's GPU (the
    rest of the model moves there with the trainer). Returns how many were replaced."""
    import bitsandbytes as bnb

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    replaced = 0
    for layer in module_layers(model, "llm"):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.bfloat16,
                    compress_statistics=settings.double_quant, quant_type=settings.quant_type, device="meta",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=settings.double_quant,
                    quant_type=settings.quant_type,
                ).to(device)  # quantizes
                if child.bias is not None:
                    quantized.bias = nn.Parameter(child.bias.data.to(device), requires_grad=False)
                setattr(parent, name, quantized)
                replaced += 1
    return replaced


def wrap(model, settings: AdapterSettings, modes: dict[str, str], base_path: str | None = None, quantize: bool = False):
    """Place the adapters on `model` in place; returns PEFT's PeftModel around it (for saving and merging).
    Every listed target module must exist in its part."""
    from peft import get_peft_model

    if quantize:
        quantize_llm(model, settings)
    peft_model = get_peft_model(model, lora_config(model, settings, modes, base_path))
    placed = {part: set() for part in PARTS}
    for name, _ in model.named_parameters():
        if ".lora_A." in name:
            placed[part_of(name)].add(name.split(".lora_A.")[0].rsplit(".", 1)[-1])
    for part, mode in modes.items():
        missing = sorted(set(settings.target(part)) - placed[part]) if mode == ADAPTED else []
        if missing:
            raise ValueError(f"adapter.targets.{part}: no {missing} module in the {part} of this model")
    return peft_model


def stage_lrs(part_lrs: dict[str, float], modes: dict[str, str]) -> dict[str, float]:
    """The stage's learning rates with the parts the adapter config freezes at 0."""
    return {part: (0.0 if modes.get(part) == FROZEN else float(part_lrs.get(part) or 0)) for part in PARTS}


def adapted_parts(modes: dict[str, str]) -> tuple[str, ...]:
    """Parts whose trainable tensors are PEFT's (adapters or a whole copy), their base weights frozen."""
    return tuple(part for part, mode in modes.items() if mode in (ADAPTED, COPY))


@dataclass(frozen=True)
class AdapterRun:
    """What a run with adapters records in its checkpoints (`ov_train.adapter`) and needs to rebuild the model:
    the settings, each part's mode, and the base the adapters sit on (see run.base_record)."""

    settings: AdapterSettings
    modes: dict
    base: dict

    def to_dict(self) -> dict:
        return {"settings": self.settings.to_dict(), "modes": dict(self.modes), "base": self.base}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterRun:
        return cls(AdapterSettings.from_dict(data["settings"]), dict(data["modes"]), dict(data["base"]))

    def step_seed(self, seed: int, step: int, rank: int) -> int:
        """Adapter dropout's seed for one step on one rank, so a resumed run draws the masks a straight one does."""
        return (seed * 1_000_003 + step) * 1_009 + rank
