"""The forward's performance options (model/forward.py, docs/PERFORMANCE.md): the `model` node's performance keys,
described and defaulted in config/schema.py ModelConfig, with the trainer's precision."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ov_train.config.schema import ModelConfig
from ov_train.constants import ATTENTION, CHECKPOINTABLE, LOSSES, VARLEN

try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (only whether it exists matters here)

    HAS_VARLEN = True
except ImportError:
    HAS_VARLEN = False


@dataclass(frozen=True)
class ForwardOptions:
    """ModelConfig's keys of these names, and whether the model computes in bf16/fp16 (varlen attention needs it).
    No defaults of its own: `from_config` a model config, or the `stock` forward."""

    packing: bool
    max_tokens: int
    loss: str
    loss_chunk: int
    attn_implementation: str
    activation_checkpointing: tuple[str, ...]
    checkpoint_every: int
    compile: bool
    half_precision: bool

    @classmethod
    def from_config(cls, model=None, precision: str | None = None) -> ForwardOptions:
        """From a `model` node or ModelConfig (None: its defaults) and trainer.precision (None: assume bf16/fp16)."""
        model = ModelConfig() if model is None else model
        values = {k: getattr(model, k) for k in cls.__dataclass_fields__ if k != "half_precision"}
        values["activation_checkpointing"] = tuple(values["activation_checkpointing"])
        return cls(**values, half_precision=in_half(precision))

    @classmethod
    def stock(cls, **changes) -> ForwardOptions:
        """The stock forward with ModelConfig's defaults for the rest, then `changes`."""
        return replace(cls.from_config().as_stock(), **changes)

    def as_stock(self) -> ForwardOptions:
        """The stock forward (transformers' own: a padded batch, sdpa, one logits tensor), the rest as here."""
        return replace(self, packing=False, loss="full", attn_implementation="sdpa")

    def problems(self) -> list[str]:
        out = []
        if self.loss not in LOSSES:
            out.append(f"model.loss={self.loss!r}; allowed: {list(LOSSES)}")
        if self.attn_implementation not in ATTENTION:
            out.append(f"model.attn_implementation={self.attn_implementation!r}; allowed: {list(ATTENTION)}")
        if self.attn_implementation == VARLEN and not self.packing:
            out.append(f"model.attn_implementation={VARLEN} needs model.packing=true")
        if self.attn_implementation == VARLEN and not HAS_VARLEN:
            out.append(f"model.attn_implementation={VARLEN}: this torch has no torch.nn.attention.varlen")
        if self.attn_implementation == VARLEN and not self.half_precision:
            out.append(f"model.attn_implementation={VARLEN} runs in bf16/fp16 only: set trainer.precision=bf16-true or bf16-mixed")
        unknown = sorted(set(self.activation_checkpointing) - set(CHECKPOINTABLE))
        if unknown:
            out.append(f"model.activation_checkpointing has {unknown}; allowed: {list(CHECKPOINTABLE)}")
        for key in ("max_tokens", "loss_chunk", "checkpoint_every"):
            if getattr(self, key) < 1:
                out.append(f"model.{key}={getattr(self, key)!r} must be a positive integer")
        return out

    def attention(self, on_gpu: bool | None = None) -> str:
        """The attention implementation `auto` stands for on a machine with GPUs or without (None: this one)."""
        if self.attn_implementation != "auto":
            return self.attn_implementation
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        usable = self.packing and self.half_precision and on_gpu and HAS_VARLEN
        return VARLEN if usable else "sdpa"


def in_half(precision: str | None) -> bool:
    """Whether trainer.precision computes in bf16/fp16 (None: assume so)."""
    return precision is None or str(precision).startswith(("bf16", "16"))
