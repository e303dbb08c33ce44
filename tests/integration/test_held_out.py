"""Held-out batches in equal numbers on every rank (ov_train.training.held_out): 2 gloo processes whose loaders hold
3 and 1 batches, and 2 and 0, each batch run through an FSDP2-sharded layer (an all-gather per forward), as
validation does under a sharded engine. Without the padding the rank that runs out first leaves the other waiting
in its next all-gather."""
from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.processes import run_one

pytestmark = pytest.mark.slow  # two processes

# Batches each rank's loader holds, per case: uneven, and a rank with none at all.
CASES = {"uneven": (3, 1), "one_rank_empty": (2, 0)}


def _batches(n: int, rank: int) -> list[dict]:
    return [{"x": torch.full((2, 4), float(10 * rank + i)), "modality": ["image", "video"]} for i in range(n)]


def main(out: Path, padded: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ov_train.training.held_out import EvenHeldOut

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (2,))
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    for unit in layer:  # resharded after each forward, as ov_train.strategies shards the model's layers
        fully_shard(unit, mesh=mesh)
    fully_shard(layer, mesh=mesh)
    result = {}
    for case, counts in CASES.items():
        loader = _batches(counts[rank], rank)
        seen = []
        with torch.no_grad():
            for batch in EvenHeldOut(loader) if padded else loader:
                layer(batch["x"])  # FSDP2 all-gathers each unit's weights: every rank must be here
                seen.append([float(batch["x"][0, 0]), bool(batch.get("padding"))])
        result[case] = seen
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # Neither rank tears gloo down while the other still talks to it (a peer gone mid-teardown aborts the process).
    dist.barrier()
    dist.destroy_process_group()


def _launch(out: Path, padded: bool) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "tests.integration.test_held_out", str(out), str(int(padded))]
    run_one(command, out / "run.log", timeout=240)


def test_uneven_held_out_batches_do_not_hang_sharded_engines(tmp_path):
    _launch(tmp_path, padded=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # The rank with more runs its own; the other runs its own, then repeats its last as padding.
    assert rank0["uneven"] == [[0.0, False], [1.0, False], [2.0, False]]
    assert rank1["uneven"] == [[10.0, False], [10.0, True], [10.0, True]]
    # A rank with none borrows rank 0's first batch, as padding only.
    assert rank0["one_rank_empty"] == [[0.0, False], [1.0, False]]
    assert rank1["one_rank_empty"] == [[0.0, True], [0.0, True]]


def test_uneven_held_out_batches_hang_sharded_engines_unpadded(tmp_path):
    """The failure the padding prevents: unpadded, rank 0 waits in an all-gather rank 1 never joins (here it fails
    once rank 1 exits; in a run, where rank 1 waits in its next collective, it hangs)."""
    with pytest.raises(AssertionError):
        _launch(tmp_path, padded=False)
    assert not (tmp_path / "rank0.json").exists() or not (tmp_path / "rank1.json").exists()


if __name__ == "__main__":
    main(Path(sys.argv[1]), bool(int(sys.argv[2])))
