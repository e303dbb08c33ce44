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
UNUSED: tuple[str, ...] = (
    r"^model\.vision_tower\.(vision_model\.)?post_layernorm\.",
    r"^model\.vision_tower\.(vision_model\.)?head\.",
)


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


def apply_stage(model: nn.Module, part_lrs: dict[str, float], lr_scale: float = 1.0, weight_decay: float = 0.0):
    """Freeze every part without a positive learning rate and return (optimizer groups, table rows).

    Frozen tensors get requires_grad=False and appear in no group, so they get neither gradients
    nor optimizer state. Every trainable tensor lands in exactly one group (asserted). Tensors the
    model never runs (UNUSED) stay frozen even when their part trains.
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
    counts = {p: [0, 0, 0] for p in PARTS}  # params, tensors, trainable params
    for name, param in model.named_parameters():  # tied weights are listed once
        part = part_of(name)
        lr = float(part_lrs.get(part) or 0.0)
        train = lr > 0 and not any(re.search(p, name) for p in UNUSED)
        param.requires_grad_(train)
        counts[part][0] += param.numel()
        counts[part][1] += 1
        if train:
            counts[part][2] += param.numel()
            grouped[part].append(param)
    groups, rows = [], []
    for part in PARTS:
        lr = float(part_lrs.get(part) or 0.0) * lr_scale
        rows.append(PartRow(part, lr > 0, lr, *counts[part]))
        if lr > 0 and grouped[part]:
            groups.append({"name": part, "params": grouped[part], "lr": lr, "weight_decay": weight_decay})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable), "a trainable tensor is missing from the groups"
    if not trainable:
        raise ValueError(f"stage.parts {dict(part_lrs)} leaves nothing trainable; give a part a learning rate > 0")
    return groups, rows


def format_table(rows: list[PartRow]) -> str:
    header = f"{'part':<14}{'state':<11}{'lr':>10}{'params':>16}{'tensors':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        state = "trainable" if r.trainable else "frozen"
        lr = f"{r.lr:.2e}" if r.trainable else "-"
        lines.append(f"{r.part:<14}{state:<11}{lr:>10}{r.params:>16,}{r.tensors:>9}")
    total = sum(r.params for r in rows)
    train = sum(r.params if r.trainable_params is None else r.trainable_params for r in rows if r.trainable)
    lines.append(f"{'total':<14}{'':<11}{'':>10}{total:>16,}   trainable {train:,} ({100 * train / max(total, 1):.1f}%)")
    return "\n".join(lines)
