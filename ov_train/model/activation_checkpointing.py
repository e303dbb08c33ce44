"""Activation checkpointing chosen per module: the vision tower's layers, the LLM's layers, every k-th.

It uses the per-layer switch of transformers' GradientCheckpointingLayer (what
`gradient_checkpointing_enable` flips on every layer of a model), so it can be set on some layers
only. Non-reentrant checkpointing: correct with frozen inputs and keyword arguments.
"""
from __future__ import annotations

from functools import partial

from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from ov_train.constants import CHECKPOINTABLE
from ov_train.model import layout


def apply_activation_checkpointing(model, modules, every: int = 1) -> list[str]:
    """Checkpoint layers 0, k, 2k, ... of each named module (the plan has checked the names and k; others are
    switched off); returns their names."""
    selected = set(modules)
    checkpointed = []
    for module in CHECKPOINTABLE:
        for i, layer in enumerate(layout.layers(model, module)):
            if not isinstance(layer, GradientCheckpointingLayer):
                raise TypeError(f"{module} layer {type(layer).__name__} cannot be checkpointed per layer")
            layer.gradient_checkpointing = module in selected and i % every == 0
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            if layer.gradient_checkpointing:
                checkpointed.append(f"{module}.{i}")
    return checkpointed
