"""Frame-parallel vision tower: within a sequence-parallel group, each rank encodes its share of the batch's crops
and frames, and the group gathers the features.

The group holds the same batch, so every rank has the same [n, 3, S, S] tower input. It is padded with blank crops
to a multiple of the group size N and cut into N equal contiguous shares; rank r encodes share r only (never the
whole batch, and always at least one crop, so every rank makes the same tower calls, as sharded engines need). The
features are all-gathered with torch's differentiable all_gather: each rank then places the ones its shard of the row
needs, and in the backward each share's gradient, summed over the group, flows to the rank that encoded it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def share_bounds(count: int, size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s share of `count` crops padded to a multiple of `size`."""
    share = -(-count // size)
    return rank * share, (rank + 1) * share


def encode_shared(encode: Callable, model, pixels: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """encode(model, pixels) for all n crops of `pixels` [n, 3, S, S], each rank encoding only its share."""
    size, rank, count = dist.get_world_size(group), dist.get_rank(group), pixels.shape[0]
    start, stop = share_bounds(count, size, rank)
    padded = stop - start
    mine = pixels[start:min(stop, count)]
    if mine.shape[0] < padded:  # blank crops make the shares equal; their features are dropped below
        mine = torch.cat([mine, mine.new_zeros(padded - mine.shape[0], *pixels.shape[1:])])
    features = encode(model, mine).contiguous()
    gathered = funcol.wait_tensor(funcol.all_gather_single_autograd(features, 0, group))
    return gathered[:count]
