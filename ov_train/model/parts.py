"""What trains: freezing and optimizer groups from the plan's learning rate per part (0: frozen).

The parts and the parameter names of each are model/layout.py's; the learning rates are the run plan's
(stage.parts scaled by model.lr_scale, checked there; parts the adapter config freezes at 0).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ov_train.constants import PARTS
from ov_train.model.layout import is_adapter_weight, is_peft_copy, is_unused, part_of


@dataclass
class PartRow:
    part: str
    trainable: bool
    lr: float
    params: int
    tensors: int
    trainable_params: int | None = None  # params that train: all but the unused ones (None: all of them)
    adapter_params: int = 0  # of `params`, those PEFT added (adapters, trained copies); the rest is base
    copy: bool = False  # trained as a whole copy beside adapters (PEFT's modules_to_save), not through adapters


def apply_stage(model: nn.Module, part_lrs: dict[str, float], weight_decay: float = 0.0, adapted: tuple[str, ...] = ()):
    """Freeze every part without a positive learning rate and return (optimizer groups, table rows).

    Frozen tensors get requires_grad=False and appear in no group, so they get neither gradients
    nor optimizer state. Every trainable tensor lands in exactly one group (asserted). Tensors the
    model never runs (layout.UNUSED) stay frozen even when their part trains. In the `adapted` parts only PEFT's
    tensors (layout.ADAPTER_WEIGHTS) train, at the part's learning rate; their base weights are frozen like any other.
    """
    grouped: dict[str, list[nn.Parameter]] = {p: [] for p in PARTS}
    counts = {p: [0, 0, 0, 0] for p in PARTS}  # params, tensors, trainable params, adapter params
    copies = set()
    for name, param in model.named_parameters():  # tied weights are listed once
        part = part_of(name)
        adapter = is_adapter_weight(name)
        train = part_lrs.get(part, 0.0) > 0 and not is_unused(name) and (adapter or part not in adapted)
        param.requires_grad_(train)
        counts[part][0] += param.numel()
        counts[part][1] += 1
        counts[part][3] += param.numel() if adapter else 0
        if train:
            counts[part][2] += param.numel()
            grouped[part].append(param)
            if is_peft_copy(name):
                copies.add(part)
    groups, rows = [], []
    for part in PARTS:
        lr = float(part_lrs.get(part, 0.0))
        rows.append(PartRow(part, lr > 0, lr, *counts[part], copy=part in copies))
        if lr > 0 and grouped[part]:
            groups.append({"name": part, "params": grouped[part], "lr": lr, "weight_decay": weight_decay})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable), "a trainable tensor is missing from the groups"
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
