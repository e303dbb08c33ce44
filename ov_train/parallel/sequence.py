"""Ulysses sequence parallelism for the LLM over packed rows.

A sequence-parallel group of N ranks holds the same batch. Its samples are packed end to end into one row (longest
first, positions restarting at 0 per sample), padded to a multiple of N with a padding segment that carries no loss,
and cut into N contiguous shards: each rank embeds and runs only its shard. In every attention layer DeepSpeed's
Ulysses layer for transformers (`UlyssesSPAttentionHF`) exchanges q/k/v with an all-to-all, [L/N, heads, d] ->
[L, heads/N, d], the attention runs over the whole row with each sample isolated (the row's cu_seqlens: varlen on
CUDA, a block-diagonal causal mask under sdpa/eager), and a second all-to-all gives every rank its shard back.

Heads: N must divide the query heads. Key/value heads follow DeepSpeed's rule: when N divides them each rank takes
kv_heads / N; when they divide N each is repeated N / kv_heads times (repeat_interleave, so the rank holding a query
head also holds the key/value head that query head reads); other degrees are refused (`check_degree`).

Loss: each rank's per-sample loss sums cover its shard only; they are summed over the group by a differentiable
all-reduce, and the supervised-token counts by a plain one, so every rank holds the one-process sums and counts of the
whole row, and model/loss.py's weighting applies unchanged. The all-reduce's backward sums the group's identical loss
gradients, which scales each rank's gradient by N: the data-parallel mean over all world ranks (DDP, FSDP2, ZeRO) is
then exactly the mean over the world / N groups of one process's gradient on its group's row.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ov_train.config.parallel import allowed_degrees, degree_problems  # noqa: F401  (re-exported)
from ov_train.constants import IGNORE_INDEX, ULYSSES, VARLEN
from ov_train.model import layout
from ov_train.model.packing import PackedBatch, pack_into_rows, set_attention, varlen_attention
from ov_train.parallel.frames import encode_shared
from ov_train.utils.logging import settle_deepspeed_accelerator

# Attention implementations the row's attention can run in once the heads are exchanged.
CORES = ("sdpa", "eager", VARLEN)


def check_degree(degree: int, heads: int, kv_heads: int, world: int | None = None) -> None:
    """Refuse a degree the heads or the world size cannot be split by, naming the key and what is allowed
    (config/parallel.py checks the config the same way before any work)."""
    problems = degree_problems(degree, heads, kv_heads, world)
    if problems:
        raise ValueError("; ".join(problems))


def sequence_groups(world: int, degree: int) -> list[list[int]]:
    """The sequence-parallel groups: consecutive ranks, so a group shares a node where it can (all-to-all traffic)."""
    return [list(range(start, start + degree)) for start in range(0, world, degree)]


def segment_causal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, length, length] boolean mask: causal within each packed sequence, nothing across them."""
    positions = torch.arange(length, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
    allowed = (segment[:, None] == segment[None, :]) & (positions[:, None] >= positions[None, :])
    return allowed[None, None]


def masked_row_attention(module, query, key, value, attention_mask, **kwargs):
    """The whole row's attention under sdpa (and eager): each packed sequence isolated by a block-diagonal mask
    (dense, row length squared: CPU runs and short rows; long rows on CUDA take ov_varlen)."""
    mask = segment_causal_mask(kwargs.pop("cu_seq_lens_q"), query.shape[2])
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def shard(packed: PackedBatch, size: int, rank: int, pad_source: int) -> PackedBatch:
    """Rank `rank`'s contiguous shard of a one-row pack, padded first to a multiple of `size` with a padding segment
    (token 0, positions from 0, no loss, source `pad_source`). cu_seqlens and max_seqlen stay the whole row's: the
    attention, after the all-to-all, sees all of it."""
    length = packed.input_ids.shape[1]
    extra = -length % size
    cu_seqlens, max_seqlen = packed.cu_seqlens, packed.max_seqlen
    fields = [packed.input_ids, packed.position_ids, packed.targets, packed.source, packed.sample]
    if extra:
        ramp = torch.arange(extra, device=packed.input_ids.device)
        fills = [ramp * 0, ramp, ramp * 0 + IGNORE_INDEX, ramp * 0 + pad_source, ramp * 0 - 1]
        fields = [torch.cat([f, fill[None].to(f.dtype)], dim=1) for f, fill in zip(fields, fills)]
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:] + extra])
        max_seqlen = max(max_seqlen, extra)
    step = (length + extra) // size
    ids, positions, targets, source, sample = (f[:, rank * step : (rank + 1) * step] for f in fields)
    return PackedBatch(ids, positions, targets, source, sample, cu_seqlens, max_seqlen)


class SequenceParallel:
    """This rank's sequence-parallel group, and what the training forward asks of it (model/forward.py: `pack`,
    `encoder`, `reduce`, `reduce_predictions`)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._ulysses = None

    @classmethod
    def create(cls, degree: int) -> SequenceParallel:
        """Split the initialised world into groups of `degree` consecutive ranks; every rank must call this."""
        world = dist.get_world_size()
        if world % degree:
            raise ValueError(f"strategy.sequence_parallel={degree} does not divide the {world} processes of the run")
        mine = None
        for ranks in sequence_groups(world, degree):
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if dist.get_rank() in ranks:
                mine = group
        return cls(mine)

    def apply(self, model) -> None:
        """Run the model's LLM attention through the Ulysses exchange from now on (after prepare_model, which chose
        the attention the row's attention runs in: sdpa, eager or ov_varlen)."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        config = layout.language_model(model).config
        core = config._attn_implementation
        if core not in CORES:
            raise ValueError(f"sequence parallelism runs the row's attention in {list(CORES)}, not {core!r}")
        check_degree(self.size, config.num_attention_heads, config.num_key_value_heads)
        _init_deepspeed_comm()
        self._ulysses = UlyssesSPAttentionHF(
            attn=varlen_attention if core == VARLEN else masked_row_attention,
            batch_size=1,  # one row per group
            attn_head_count=config.num_attention_heads,
            attn_head_size=layout.layers(model, "llm")[0].self_attn.head_dim,
            kv_head_count=config.num_key_value_heads,
            num_hidden_layers=config.num_hidden_layers,
            process_group=self.group,
            seq_length_is_variable=True,
        )
        # One group per process: the registered name dispatches to this group's exchange.
        AttentionInterface.register(ULYSSES, self._attention)
        AttentionMaskInterface.register(ULYSSES, sdpa_mask)
        set_attention(model, ULYSSES)

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        groups = module.num_key_value_groups
        try:
            # The row's attention builds its own isolation from cu_seqlens; no mask of the shard's length applies.
            return self._ulysses(module, query, key, value, None, **kwargs)
        finally:
            module.num_key_value_groups = groups  # DeepSpeed rewrites it when it repeats key/value heads

    def pack(self, batch: dict) -> PackedBatch:
        """This rank's shard of the batch packed as one row (the batch's token budget is the row's length)."""
        row = pack_into_rows(batch, int(batch["attention_mask"].sum()))  # room for every sample: one row
        return shard(row, self.size, self.rank, batch["input_ids"].numel())

    def encoder(self, encode):
        """`encode(model, pixels)` run frame-parallel: this rank encodes its share, the group gathers the rest."""
        return lambda model, pixels: encode_shared(encode, model, pixels, self.group)

    def reduce(self, sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's per-sample loss sums (differentiably) and supervised-token counts."""
        sums = funcol.wait_tensor(funcol.all_reduce(sums, "sum", self.group))
        counts = counts.clone()
        dist.all_reduce(counts, group=self.group)
        return sums, counts

    def reduce_predictions(self, preds: torch.Tensor) -> torch.Tensor:
        """Greedy predictions [B, L-1] of the whole batch: each position is predicted on one rank, IGNORE_INDEX
        (below every token id) elsewhere."""
        preds = preds.clone()
        dist.all_reduce(preds, op=dist.ReduceOp.MAX, group=self.group)
        return preds


def _init_deepspeed_comm() -> None:
    """DeepSpeed's collectives dispatch through deepspeed.comm, which adopts the process group already set up."""
    settle_deepspeed_accelerator()
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
