"""Adapters through PEFT: LoRA, DoRA and QLoRA placed on the model's parts as the plan's AdapterPlan says
(config/adapter.py: each part's mode and target modules).

The model keeps its class: PEFT injects its layers in place (get_peft_model), so the forward pass, the
strategies and the checkpoints see the same module tree with adapter layers inside; where the targets are and
how PEFT names what it adds is model/layout.py's. Adapter checkpoints (rebuilding their base, merging,
PEFT's own format) are checkpoints/adapters.py's.

QLoRA quantizes the base LLM's linear layers to 4 bits with bitsandbytes (CUDA only) before the adapters go on.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from ov_train.config.adapter import AdapterPlan
from ov_train.constants import ADAPTED, COPY, PARTS
from ov_train.model import layout


def target_pattern(model, adapter: AdapterPlan) -> str | None:
    """PEFT's `target_modules` as one regular expression (PEFT full-matches it against module names): the listed
    modules of each adapted part, where model/layout.py says they are."""
    alternatives = []
    for part in PARTS:
        modules = adapter.modules(part)
        if not modules:
            continue
        names = "|".join(re.escape(m) for m in modules)
        scope, in_layers = layout.adapter_scope(model, part)
        inner = r"\.\d+\.(?:.+\.)?" if in_layers else r"\."
        alternatives.append(rf"{re.escape(scope)}{inner}(?:{names})")
    return "|".join(f"(?:{a})" for a in alternatives) or None


def lora_config(model, adapter: AdapterPlan, base_path: str | None = None):
    from peft import LoraConfig

    copies = [layout.module_name(model, layout.whole_module(model, part)).rsplit(".", 1)[-1]
              for part, mode in adapter.modes.items() if mode == COPY]
    pattern = target_pattern(model, adapter)
    return LoraConfig(
        r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, use_dora=adapter.kind == "dora",
        # With no adapted part (only whole copies), an empty list: PEFT then places no adapter layer.
        target_modules=pattern if pattern is not None else [], modules_to_save=copies or None,
        base_model_name_or_path=base_path,
    )


def quantize_llm(model, adapter: AdapterPlan) -> int:
    """Replace the LLM layers' linear modules by bitsandbytes 4-bit ones, quantized now on this process's GPU (the
    rest of the model moves there with the trainer). Returns how many were replaced."""
    import bitsandbytes as bnb

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    replaced = 0
    for layer in layout.layers(model, "llm"):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.bfloat16,
                    compress_statistics=adapter.double_quant, quant_type=adapter.quant_type, device="meta",
                )
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=adapter.double_quant,
                    quant_type=adapter.quant_type,
                ).to(device)  # quantizes
                if child.bias is not None:
                    quantized.bias = nn.Parameter(child.bias.data.to(device), requires_grad=False)
                setattr(parent, name, quantized)
                replaced += 1
    return replaced


def wrap(model, adapter: AdapterPlan, base_path: str | None = None, quantize: bool = False):
    """Place the adapters on `model` in place; returns PEFT's PeftModel around it (for saving and merging).
    Every listed target module must exist in its part."""
    from peft import get_peft_model

    if quantize:
        quantize_llm(model, adapter)
    peft_model = get_peft_model(model, lora_config(model, adapter, base_path))
    placed: dict[str, set[str]] = {part: set() for part in PARTS}
    for name, _ in model.named_parameters():
        if ".lora_A." in name:
            placed[layout.part_of(name)].add(name.split(".lora_A.")[0].rsplit(".", 1)[-1])
    for part, mode in adapter.modes.items():
        missing = sorted(set(adapter.modules(part)) - placed[part]) if mode == ADAPTED else []
        if missing:
            raise ValueError(f"adapter.targets.{part}: no {missing} module in the {part} of this model")
    return peft_model


def merged(peft_model):
    """The adapters merged into their base weights (PEFT's merge_and_unload): a stock model, every tensor trainable
    again as a plain model's are."""
    model = peft_model.merge_and_unload()
    model.requires_grad_(True)
    return model


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """Adapter dropout's seed for one step on one rank, so a resumed run draws the masks a straight one does."""
    return (seed * 1_000_003 + step) * 1_009 + rank
