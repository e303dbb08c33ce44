"""What trains: freezing and optimizer groups from the plan's learning rate per part (0: frozen).

The parts and the parameter names of each are model/layout.py's; the learning rates are the run plan's
(stage.parts scaled by model.lr_scale, checked there).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ov_train.constants import PARTS
from ov_train.model.layout import is_unused, part_of


@dataclass
class PartRow:
    part: str
    trainable: bool
    lr: float
    params: int
    tensors: int
    trainable_params: int | None = None  # params that train: all but the unused ones (None: all of them)


def apply_stage(model: nn.Module, part_lrs: dict[str, float], weight_decay: float = 0.0):
    """Freeze every part without a positive learning rate and return (optimizer groups, table rows).

    Frozen tensors get requires_grad=False and appear in no group, so they get neither gradients
    nor optimizer state. Every trainable tensor lands in exactly one group (asserted). Tensors the
    model never runs (layout.UNUSED) stay frozen even when their part trains.
    """
    grouped: dict[str, list[nn.Parameter]] = {p: [] for p in PARTS}
    counts = {p: [0, 0, 0] for p in PARTS}  # params, tensors, trainable params
    for name, param in model.named_parameters():  # tied weights are listed once
        part = part_of(name)
        train = part_lrs.get(part, 0.0) > 0 and not is_unused(name)
        param.requires_grad_(train)
        counts[part][0] += param.numel()
        counts[part][1] += 1
        if train:
            counts[part][2] += param.numel()
            grouped[part].append(param)
    groups, rows = [], []
    for part in PARTS:
        lr = float(part_lrs.get(part, 0.0))
        rows.append(PartRow(part, lr > 0, lr, *counts[part]))
        if lr > 0 and grouped[part]:
            groups.append({"name": part, "params": grouped[part], "lr": lr, "weight_decay": weight_decay})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable), "a trainable tensor is missing from the groups"
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
