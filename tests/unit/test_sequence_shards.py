"""Sequence parallelism's single-process pieces (parallel/sequence.py): the shards of a packed row, the visual features
each shard embeds, the row's attention mask, the degrees a model's heads allow. tests/integration/
test_sequence_parallel.py runs the whole thing on 2 and 4 processes."""
from __future__ import annotations

import pytest
import torch

from ov_train.constants import IGNORE_INDEX
from ov_train.model.forward import embed_inputs
from ov_train.model.packing import pack_into_rows
from ov_train.parallel.frames import share_bounds
from ov_train.parallel.sequence import allowed_degrees, check_degree, segment_causal_mask, shard


def _row(batch):
    return pack_into_rows(batch, int(batch["attention_mask"].sum()))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shards_cut_the_row_padded_to_a_multiple_of_the_degree(mixed_batch, size):
    _, _, batch = mixed_batch
    row, pad_source = _row(batch), batch["input_ids"].numel()
    length = row.input_ids.shape[1]
    extra = -length % size
    shards = [shard(row, size, rank, pad_source) for rank in range(size)]
    assert {s.input_ids.shape for s in shards} == {(1, (length + extra) // size)}
    whole = {f: torch.cat([getattr(s, f) for s in shards], dim=1)
             for f in ("input_ids", "position_ids", "targets", "source", "sample")}
    for field, values in whole.items():
        assert torch.equal(values[:, :length], getattr(row, field)), field
    # The padding is a sequence of its own: token 0, positions from 0, no loss, no sample, the padded batch's end.
    assert whole["input_ids"][0, length:].tolist() == [0] * extra
    assert whole["position_ids"][0, length:].tolist() == list(range(extra))
    assert whole["targets"][0, length:].tolist() == [IGNORE_INDEX] * extra
    assert whole["sample"][0, length:].tolist() == [-1] * extra
    assert whole["source"][0, length:].tolist() == [pad_source] * extra
    for s in shards:  # the attention after the all-to-all sees the whole row
        expected = row.cu_seqlens.tolist() + ([length + extra] if extra else [])
        assert s.cu_seqlens.tolist() == expected and s.max_seqlen == max(row.max_seqlen, extra)


@torch.no_grad()
@pytest.mark.parametrize("size", [2, 3])
def test_each_shard_embeds_its_slice_of_the_row_visual_features_included(mixed_batch, size):
    model, _, batch = mixed_batch
    row, pad_source = _row(batch), batch["input_ids"].numel()
    whole = embed_inputs(model, batch, row)
    shards = torch.cat([embed_inputs(model, batch, shard(row, size, r, pad_source)) for r in range(size)], dim=1)
    assert torch.equal(shards[:, : whole.shape[1]], whole)


def test_row_mask_isolates_each_sequence_as_position_restarts_do(mixed_batch):
    """The mask from cu_seqlens equals the one transformers reads off the positions (a restart at 0 starts a new
    sequence): causal within each sample and within the padding, nothing across."""
    _, _, batch = mixed_batch
    packed = shard(_row(batch), 4, 0, batch["input_ids"].numel())  # padded to a multiple of 4
    length = int(packed.cu_seqlens[-1])
    positions = torch.cat([shard(_row(batch), 4, r, 0).position_ids for r in range(4)], dim=1)[0]
    sequence = (positions == 0).cumsum(0)
    causal = torch.arange(length)[:, None] >= torch.arange(length)[None, :]
    expected = (sequence[:, None] == sequence[None, :]) & causal
    assert torch.equal(segment_causal_mask(packed.cu_seqlens, length)[0, 0], expected)


@pytest.mark.parametrize(("heads", "kv_heads", "allowed"), [
    (14, 2, [1, 2, 14]),  # Qwen2-0.5B
    (28, 4, [1, 2, 4, 28]),  # Qwen2-7B
    (64, 8, [1, 2, 4, 8, 16, 32, 64]),  # Qwen2-72B
    (4, 2, [1, 2, 4]),  # the tiny model
])
def test_degrees_the_heads_allow(heads, kv_heads, allowed):
    assert allowed_degrees(heads, kv_heads) == allowed


def test_a_degree_the_heads_cannot_split_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"strategy.sequence_parallel=8: .* 28 query / 4 key-value heads split only by \[1, 2, 4, 28\]"):
        check_degree(8, 28, 4)
    with pytest.raises(ValueError, match="strategy.sequence_parallel=4 does not divide the 6 processes"):
        check_degree(4, 28, 4, world=6)


@pytest.mark.parametrize(("count", "size"), [(5, 2), (5, 4), (1, 4), (8, 4), (13, 3)])
def test_frame_shares_are_equal_and_cover_every_crop(count, size):
    bounds = [share_bounds(count, size, r) for r in range(size)]
    assert len({stop - start for start, stop in bounds}) == 1 and bounds[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and bounds[-1][1] >= count
    assert bounds[-1][1] - count < size  # at most size - 1 blank crops
