"""The one place that decides what trains: model parts, freezing and optimizer groups from the stage config."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Parameter-name patterns of each part of LlavaOnevisionForConditionalGeneration; first match wins.
PARTS: dict[str, tuple[str, ...]] = {
    "vision_tower": (r"^model\.vision_tower\.",),
    # image_newline lives in the LLM's embedding space and is learnt with the projector.
    "projector": (r"^model\.multi_modal_projector\.", r"^model\.image_newline$"),
    "llm": (r"^model\.language_model\.", r"^lm_head\."),
}

# Tensors LLaVA-OneVision never runs: image features are the tower's last kept layer *before* SigLIP's
# post_layernorm, and the pooling head is not used. They stay frozen in every stage: they would get no
# gradient, so an optimizer would only carry them, and DDP (find_unused_parameters=False) fails on them.
# (Under adapters a tower trained whole is PEFT's copy: `vision_tower.modules_to_save.default.` and the frozen
# `vision_tower.original_module.` prefix the same names.)
UNUSED: tuple[str, ...] = (
    r"^model\.vision_tower\.((modules_to_save\.\w+|original_module)\.)?(vision_model\.)?post_layernorm\.",
    r"^model\.vision_tower\.((modules_to_save\.\w+|original_module)\.)?(vision_model\.)?head\.",
)
# Tensors PEFT adds (ov_train.model.adapters): LoRA / DoRA matrices and magnitudes, and the trained copy of a module
# trained whole beside adapters (modules_to_save). In an adapted part only these train; the rest is frozen base.
ADAPTER_WEIGHTS: tuple[str, ...] = (r"\.lora_[A-Za-z_]+\.", r"\.modules_to_save\.")


def is_adapter_weight(name: str) -> bool:
    return any(re.search(p, name) for p in ADAPTER_WEIGHTS)


def part_of(name: str) -> str:
    for part, patterns in PARTS.items():
        if any(re.search(p, name) for p in patterns):
            return part
    raise KeyError(f"parameter {name!r} belongs to no part; known parts: {sorted(PARTS)}")


@dataclass
class PartRow:
    part: str
    trainable: bool
    lr: float
    params: int
    tensors: int
    trainable_params: int | None = None  # params that train: all but the UNUSED ones (None: all of them)
    adapter_params: int = 0  # of `params`, those PEFT added (adapters, trained copies); the rest is base
    copy: bool = False  # trained as a whole copy beside adapters (PEFT's modules_to_save), not through adapters


def apply_stage(model: nn.Module, part_lrs: dict[str, float], lr_scale: float = 1.0, weight_decay: float = 0.0,
                adapted: tuple[str, ...] = ()):
    """Freeze every part without a positive learning rate and return (optimizer groups, table rows).

    Frozen tensors get requires_grad=False and appear in no group, so they get neither gradients
    nor optimizer state. Every trainable tensor lands in exactly one group (asserted). Tensors the
    model never runs (UNUSED) stay frozen even when their part trains. In the `adapted` parts only PEFT's tensors
    (ADAPTER_WEIGHTS) train, at the part's learning rate; their base weights are frozen like any other.
    """
    unknown = sorted(set(part_lrs) - set(PARTS))
    if unknown:
        raise KeyError(f"stage.parts has unknown part(s) {unknown}; allowed: {sorted(PARTS)}")
    negative = {p: lr for p, lr in part_lrs.items() if lr is not None and float(lr) < 0}
    if negative:
        raise ValueError(f"stage.parts {negative}: learning rates must be >= 0 (0 freezes the part)")
    if not lr_scale > 0:
        raise ValueError(f"lr_scale={lr_scale!r} must be > 0")
    grouped: dict[str, list[nn.Parameter]] = {p: [] for p in PARTS}
    counts = {p: [0, 0, 0, 0] for p in PARTS}  # params, tensors, trainable params, adapter params
    for name, param in model.named_parameters():  # tied weights are listed once
        part = part_of(name)
        lr = float(part_lrs.get(part) or 0.0)
        adapter = is_adapter_weight(name)
        train = lr > 0 and not any(re.search(p, name) for p in UNUSED) and (adapter or part not in adapted)
        param.requires_grad_(train)
        counts[part][0] += param.numel()
        counts[part][1] += 1
        counts[part][3] += param.numel() if adapter else 0
        if train:
            counts[part][2] += param.numel()
            grouped[part].append(param)
    groups, rows = [], []
    for part in PARTS:
        lr = float(part_lrs.get(part) or 0.0) * lr_scale
        copy = any(".modules_to_save." in n for n, p in model.named_parameters() if part_of(n) == part and p.requires_grad)
        rows.append(PartRow(part, lr > 0, lr, *counts[part], copy=copy))
        if lr > 0 and grouped[part]:
            groups.append({"name": part, "params": grouped[part], "lr": lr, "weight_decay": weight_decay})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable), "a trainable tensor is missing from the groups"
    if not trainable:
        raise ValueError(f"stage.parts {dict(part_lrs)} leaves nothing trainable; give a part a learning rate > 0")
    return groups, rows


def format_table(rows: list[PartRow]) -> str:
    """Per part: state, learning rate, parameters and tensors; with adapters, base and adapter parameters apart
    (`adapters`: only PEFT's tensors train, the base is frozen; `copy`: a whole copy trains, the original is frozen)."""
    adapters = any(r.adapter_params for r in rows)
    params = f"{'base params':>16}{'adapter params':>16}" if adapters else f"{'params':>16}"
    header = f"{'part':<14}{'state':<11}{'lr':>10}{params}{'tensors':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        state = ("copy" if r.copy else "adapters" if r.adapter_params else "trainable") if r.trainable else "frozen"
        lr = f"{r.lr:.2e}" if r.trainable else "-"
        counts = f"{r.params - r.adapter_params:>16,}{r.adapter_params:>16,}" if adapters else f"{r.params:>16,}"
        lines.append(f"{r.part:<14}{state:<11}{lr:>10}{counts}{r.tensors:>9}")
    total = sum(r.params for r in rows)
    train = sum(r.params if r.trainable_params is None else r.trainable_params for r in rows if r.trainable)
    width = 32 if adapters else 16
    lines.append(f"{'total':<14}{'':<11}{'':>10}{total:>{width},}   trainable {train:,} ({100 * train / max(total, 1):.1f}%)")
    return "\n".join(lines)
