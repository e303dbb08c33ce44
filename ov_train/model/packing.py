"""Padding-free packing: the samples of a padded batch laid end to end in rows of up to `max_tokens`.

Every sample keeps its own positions (position_ids restart at 0) and attends only to itself:
- `sdpa` / `eager` / `flex_attention`: the language model gets position_ids and no attention
  mask; transformers then reads the restarts as packed sequences and builds a block-diagonal
  causal mask (a dense mask for sdpa/eager, a BlockMask for flex).
- `ov_varlen` (CUDA): torch.nn.attention.varlen over cumulative sequence lengths, registered in
  transformers' attention interface; no mask is built at all.

A sample longer than `max_tokens` gets a row of its own. Rows shorter than the longest are
filled with a padding tail that is a sequence of its own (positions from 0, no loss).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ov_train.constants import IGNORE_INDEX, ULYSSES, VARLEN
from ov_train.model import layout

try:
    from torch.nn.attention.varlen import varlen_attn

    # Its signature changed across torch releases (is_causal -> window_size, later enable_gqa, scale).
    _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, _VARLEN_PARAMS = None, frozenset()


def _gather(padded: torch.Tensor, source: torch.Tensor, fill) -> torch.Tensor:
    flat = torch.cat([padded.flatten(), padded.new_full((1,), fill)])
    return flat[source]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L], restarting at 0 for each sample and each padding tail
    targets: torch.Tensor  # [R, L] next-token label per position; IGNORE_INDEX at sample ends and padding
    source: torch.Tensor  # [R, L] flat index into the padded [B, Lpad] batch; B * Lpad for padding
    sample: torch.Tensor  # [R, L] sample index; -1 for padding
    cu_seqlens: torch.Tensor  # int32 [segments + 1] over the flattened rows (varlen attention)
    max_seqlen: int

    def gather(self, padded: torch.Tensor, fill) -> torch.Tensor:
        """Values of a padded [B, Lpad] tensor at the packed positions; `fill` on padding."""
        return _gather(padded, self.source, fill)


def plan_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: fewer, fuller rows than keeping the batch order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(max_tokens - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


def pack_into_rows(batch: dict, max_tokens: int) -> PackedBatch:
    """Pack a right-padded batch (ov_train.data.samples.collate) into rows of up to `max_tokens`."""
    ids = batch["input_ids"]
    batch_size, padded_len = ids.shape
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = plan_rows(lengths, max_tokens)
    row_len = max(sum(lengths[i] for i in row) for row in rows)
    pad_source = batch_size * padded_len
    source = torch.full((len(rows), row_len), pad_source, dtype=torch.long)
    sample = torch.full((len(rows), row_len), -1, dtype=torch.long)
    position = torch.zeros((len(rows), row_len), dtype=torch.long)
    segments = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            source[r, start : start + n] = i * padded_len + torch.arange(n)
            sample[r, start : start + n] = i
            position[r, start : start + n] = torch.arange(n)
            segments.append(n)
            start += n
        if start < row_len:
            position[r, start:] = torch.arange(row_len - start)
            segments.append(row_len - start)
    cu_seqlens = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    device = ids.device
    source = source.to(device)
    # Position t predicts the padded batch's label at t + 1 (IGNORE_INDEX past a sample's end).
    next_labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return PackedBatch(
        input_ids=_gather(ids, source, 0),  # padding tails read token 0: they only see each other
        position_ids=position.to(device),
        targets=_gather(next_labels, source, IGNORE_INDEX),
        source=source,
        sample=sample.to(device),
        cu_seqlens=cu_seqlens.to(device),
        max_seqlen=max(segments),
    )


def language_model_hidden(model, embeds: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Final hidden states [R, L, d] of the packed rows, each sample isolated."""
    lm = layout.language_model(model)
    kwargs = {"inputs_embeds": embeds, "position_ids": packed.position_ids, "use_cache": False}
    if lm.config._attn_implementation in (VARLEN, ULYSSES):
        # A ready mask per layer type makes transformers skip building one; varlen and the Ulysses row attention
        # (isolating samples by cu_seqlens) need none.
        kwargs["attention_mask"] = dict.fromkeys(set(lm.config.layer_types))
        kwargs.update(
            cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens,
            max_length_q=packed.max_seqlen, max_length_k=packed.max_seqlen,
        )
    return lm(**kwargs).last_hidden_state


def _varlen_kwargs(q_heads: int, kv_heads: int, scaling: float | None, head_dim: int) -> tuple[dict, int]:
    """Keyword arguments for this torch's varlen_attn and the factor by which k/v heads must be
    repeated when it cannot do grouped-query attention itself."""
    params = _VARLEN_PARAMS
    kwargs: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim**-0.5) > 1e-12:
        raise ValueError(f"this torch's varlen_attn has no scale argument and scaling {scaling} is not 1/sqrt(head_dim)")
    repeat = 1
    if kv_heads != q_heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            repeat = q_heads // kv_heads
    return kwargs, repeat


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: [B, H, L, D] q/k/v -> [B, L, H, D], causal per packed sequence."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        # Not a packed call (e.g. the stock forward of a model set to this implementation).
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.dtype not in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(query.device.type):
        # Under bf16-mixed the rotary embedding returns fp32 queries and keys (its cos/sin follow the fp32
        # residual stream). Autocast casts sdpa's inputs, not this kernel's: cast them as it would.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{VARLEN} attention runs in bf16/fp16 only, got {query.dtype}: use bf16 precision or attn_implementation=sdpa")
    if dropout or kwargs.get("sliding_window"):
        raise ValueError(f"{VARLEN} attention supports neither dropout nor sliding windows")
    batch, q_heads, length, head_dim = query.shape
    options, repeat = _varlen_kwargs(q_heads, key.shape[1], scaling, head_dim)
    q = query.transpose(1, 2).reshape(batch * length, q_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    max_len = kwargs["max_length_q"]
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)
    return out.view(batch, length, q_heads, head_dim), None


AttentionInterface.register(VARLEN, varlen_attention)
# Unpacked calls on a model set to ov_varlen build the sdpa mask and fall back to sdpa above.
AttentionMaskInterface.register(VARLEN, sdpa_mask)


def set_attention(model, implementation: str) -> None:
    """Attention of the language model: sdpa, eager, flex_attention or ov_varlen (CUDA, packed)."""
    layout.language_model(model).config._attn_implementation = implementation
