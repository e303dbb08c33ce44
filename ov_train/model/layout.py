"""Where things sit inside LlavaOnevisionForConditionalGeneration: the one module that walks its attribute paths.

It names the parts (vision tower, projector, LLM) by parameter name, the layer lists of the tower and the
LLM, the units FSDP2 shards, the layers activation checkpointing may wrap, the tensors OneVision never
reads, and where PEFT's adapters go and how PEFT names what it adds (model/adapters.py places them).
Strategies, checkpointing, the forward pass, freezing, adapters and building ask here; a transformers release
that moves a module changes this file only.

Sharding units: FSDP2 shards each SigLIP encoder layer and each Qwen2 decoder layer as a unit of its own;
the rest (embeddings, projector, image_newline, lm_head) stays in the root unit, gathered once per step.
ZeRO-3 partitions every parameter and gathers each submodule's weights around its call by itself, so it
needs no unit list; both rely on every rank making the same calls (ov_train.model.forward sees to that).
"""
from __future__ import annotations

import re

from torch import nn

from ov_train.constants import CHECKPOINTABLE, PARTS

# Parameter-name patterns of each part; first match wins.
PART_PATTERNS: dict[str, tuple[str, ...]] = {
    "vision_tower": (r"^model\.vision_tower\.",),
    # image_newline lives in the LLM's embedding space and is learnt with the projector.
    "projector": (r"^model\.multi_modal_projector\.", r"^model\.image_newline$"),
    "llm": (r"^model\.language_model\.", r"^lm_head\."),
}
assert tuple(PART_PATTERNS) == PARTS

# Tensors LLaVA-OneVision never runs: image features are the tower's last kept layer *before* SigLIP's
# post_layernorm, and the pooling head is not used. They stay frozen in every stage: they would get no
# gradient, so an optimizer would only carry them, and DDP (find_unused_parameters=False) fails on them.
# (Under adapters a tower trained whole is PEFT's copy: `vision_tower.modules_to_save.default.` and the frozen
# `vision_tower.original_module.` prefix the same names.)
UNUSED: tuple[str, ...] = (
    r"^model\.vision_tower\.((modules_to_save\.\w+|original_module)\.)?(vision_model\.)?post_layernorm\.",
    r"^model\.vision_tower\.((modules_to_save\.\w+|original_module)\.)?(vision_model\.)?head\.",
)
# Tensors PEFT adds: LoRA / DoRA matrices and magnitudes, and the trained copy of a module trained whole beside
# adapters (modules_to_save). In an adapted part only these train; the rest is frozen base.
PEFT_COPY = r"\.modules_to_save\."
ADAPTER_WEIGHTS: tuple[str, ...] = (r"\.lora_[A-Za-z_]+\.", PEFT_COPY)


def part_of(name: str) -> str:
    """The part a parameter belongs to, from its name in the model's state dict."""
    for part, patterns in PART_PATTERNS.items():
        if any(re.search(p, name) for p in patterns):
            return part
    raise KeyError(f"parameter {name!r} belongs to no part; known parts: {sorted(PARTS)}")


def is_unused(name: str) -> bool:
    return any(re.search(p, name) for p in UNUSED)


def is_adapter_weight(name: str) -> bool:
    return any(re.search(p, name) for p in ADAPTER_WEIGHTS)


def is_peft_copy(name: str) -> bool:
    return re.search(PEFT_COPY, name) is not None


def core(model) -> nn.Module:
    """The LlavaOnevisionModel inside: it holds the tower, the projector, image_newline and the LLM, and the
    stock anyres packing (`pack_image_features`)."""
    return model.model


def vision_tower(model) -> nn.Module:
    return model.model.vision_tower


def vision_transformer(model) -> nn.Module:
    """The SigLIP transformer: older transformers nest it as `vision_model` inside SiglipVisionModel."""
    tower = vision_tower(model)
    return getattr(tower, "vision_model", tower)


def nests_vision_model(model) -> bool:
    """Whether the tower's parameter names carry a `vision_model.` prefix (older transformers)."""
    return hasattr(vision_tower(model), "vision_model")


def projector(model) -> nn.Module:
    return model.model.multi_modal_projector


def image_newline(model) -> nn.Parameter:
    return model.model.image_newline


def language_model(model) -> nn.Module:
    """The Qwen2 decoder (no LM head)."""
    return model.model.language_model


def lm_head(model) -> nn.Module:
    return model.lm_head


def layers(model, module: str) -> nn.ModuleList:
    """The layer list of `vision` (SigLIP encoder layers) or `llm` (Qwen2 decoder layers)."""
    if module not in CHECKPOINTABLE:
        raise ValueError(f"no layer list {module!r}; allowed: {list(CHECKPOINTABLE)}")
    return vision_transformer(model).encoder.layers if module == "vision" else language_model(model).layers


def shard_units(model) -> list[nn.Module]:
    """What FSDP2 shards as units of their own, before the root: every tower layer, then every LLM layer."""
    return [*layers(model, "vision"), *layers(model, "llm")]


def module_name(model, module: nn.Module) -> str:
    """`module`'s qualified name inside `model`."""
    return next(name for name, m in model.named_modules() if m is module)


def adapter_scope(model, part: str) -> tuple[str, bool]:
    """Where a part's adapter target modules are looked for: (the qualified name of the module holding them,
    whether they sit inside its numbered layers). The tower's and the LLM's are inside their layer lists (not the
    tower's head, nor the LLM's head); the projector's are its own linear layers."""
    if part == "projector":
        return module_name(model, projector(model)), False
    return module_name(model, layers(model, "vision" if part == "vision_tower" else "llm")), True


def whole_module(model, part: str) -> nn.Module:
    """The module a part trained whole beside adapters is (PEFT copies it: modules_to_save); the projector part's
    image_newline is a bare parameter PEFT cannot copy, so under adapters it keeps its base value."""
    if part == "vision_tower":
        return vision_tower(model)
    if part == "projector":
        return projector(model)
    raise ValueError(f"the {part} has no module PEFT trains whole; it trains through adapters or stays frozen")
