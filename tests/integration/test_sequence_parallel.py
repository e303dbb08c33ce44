"""Sequence parallelism (parallel/sequence.py) and the frame-parallel tower (parallel/frames.py) on CPU processes
(gloo): the tiny model's losses and gradients equal one process's on the same packed rows.

The program, `python -m torch.distributed.run --nproc-per-node=N -m tests.integration.test_sequence_parallel OUT`,
runs the cases of its world size one after the other in the same processes and writes OUT/<case>.json from rank 0:
- `frames<N>`: the tower's features of 5 crops encoded frame-parallel over N ranks, and their gradients;
- `sp<N>_<engine>`: a mixed batch (anyres image, three images, a video, text) packed into one row split over N
  ranks, the model under torch's DistributedDataParallel or FSDP2 (fully_shard) over the whole world;
- `sp2dp2_ddp` (4 processes): 2 sequence-parallel groups of 2, each with a batch of its own, under DDP.
With 4 processes the LLM's 2 key/value heads are fewer than the degree: DeepSpeed's Ulysses layer repeats them.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import noise_png, raw_sample
from tests.processes import run_one

pytestmark = pytest.mark.slow

# float32 on CPU: a loss may differ from one process's by this fraction (reduction order of the sharded matmuls and
# the group's sum; measured: at most 7e-8), a gradient tensor by this fraction of its largest entry (measured: at most
# 1.1e-6); tensors whose gradient is zero in exact arithmetic (the attention key biases) are measured against a
# thousandth of the step's largest gradient instead.
LOSS_TOLERANCE, GRAD_TOLERANCE, FLOOR = 1e-6, 1e-5, 1e-3
# Per world size: frame-parallel tower over N ranks; sequence parallelism of degree N (DP = world / N) under an engine.
CASES = {2: ["frames2", "sp2_ddp", "sp2_fsdp2"], 4: ["frames4", "sp4_ddp", "sp2dp2_ddp"]}


def batches(model, tokenizer) -> list[dict]:
    """Two collated batches of mixed media, different from each other."""
    from ov_train.config.media import MediaSettings
    from ov_train.data.samples import SampleProcessor, collate
    from ov_train.data.video import encode_mp4
    from ov_train.vision.geometry import VisionGeometry

    process = SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5", MediaSettings.of("anyres_max_9", 8),
                              max_length=4096)
    rng = np.random.default_rng(0)
    video = [encode_mp4(rng.integers(0, 255, (n, 32, 32, 3), np.uint8), fps=1) for n in (6, 3)]
    first = [
        raw_sample("a", "<image>\nWhat colour?", "red", [noise_png(70, 30, 1)]),
        raw_sample("b", "<image>\n<image>\n<image>\nWhich one?", "the second one",
                   [noise_png(32, 32, 2), noise_png(50, 20, 3), noise_png(16, 64, 4)]),
        raw_sample("c", "<video>\nWhich way?", "left, then right", video=video[0]),
        raw_sample("d", "What is the opposite of up?", "down"),
    ]
    second = [
        raw_sample("e", "<video>\nWhat happens?", "nothing much", video=video[1]),
        raw_sample("f", "Name a colour.", "blue"),
        raw_sample("g", "<image>\nHow many?", "three", [noise_png(100, 250, 5)]),
    ]
    return [collate([process(r) for r in raws], tokenizer.pad_token_id) for raws in (first, second)]


def build(options):
    """The tiny model as the onevision stage trains it (seeded: the same weights on every rank)."""
    from ov_train.model import layout
    from ov_train.model.build import build_model
    from ov_train.model.forward import prepare_model
    from ov_train.utils.paths import cache_dir
    from tests.conftest import plan_of

    plan = plan_of(["stage=onevision"])
    torch.manual_seed(0)
    model, tokenizer = build_model(plan.model, cache_dir())
    for name, p in model.named_parameters():
        p.requires_grad_(not layout.is_unused(name))
    prepare_model(model, plan.forward if options is None else options)
    return model.train(), tokenizer, plan.forward


def grad_errors(ours: dict, reference) -> tuple[dict, list[str]]:
    """{name: [largest difference, largest one-process gradient]} of the tensors one process gives a gradient, and
    the trainable tensors either side left without one."""
    errors = {n: [(ours[n] - p.grad).abs().max().item(), p.grad.abs().max().item()]
              for n, p in reference.named_parameters() if p.grad is not None and ours.get(n) is not None}
    missing = [n for n, p in reference.named_parameters() if p.requires_grad and n not in errors]
    return errors, missing


def count_encoded(model) -> list[int]:
    """The number of crops of every call of the tower from now on."""
    from ov_train.model import layout

    calls: list[int] = []
    layout.vision_transformer(model).embeddings.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    return calls


def run_frames(degree: int) -> dict:
    import torch.distributed as dist

    from ov_train.model.forward import _tower_features
    from ov_train.parallel.frames import encode_shared
    from ov_train.parallel.sequence import SequenceParallel

    parallel = SequenceParallel.create(degree)
    model, _, options = build(None)
    reference, _, _ = build(options)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    encoded = count_encoded(model)
    feats = encode_shared(_tower_features, model, pixels, parallel.group)
    weights = torch.randn(feats.shape, generator=torch.Generator().manual_seed(2))
    # Each rank uses every degree-th feature map (not the ones it encoded): gradients must cross ranks.
    (feats * weights)[parallel.rank :: degree].sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:  # the tower's and the projector's (the LLM is not run here)
            dist.all_reduce(p.grad)  # the group's sum: each rank's part of the loss is its own
            grads[name] = p.grad
    expected = _tower_features(reference, pixels)
    (expected * weights).sum().backward()
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, encoded)
    return {"feature_error": (feats - expected).abs().max().item(), "feature_scale": expected.abs().max().item(),
            "errors": grad_errors(grads, reference)[0], "shares": shares, "crops": pixels.shape[0]}


class GroupLoss(torch.nn.Module):
    """The token-weighted loss of this rank's group, as DDP wraps a model (it syncs what forward used)."""

    def __init__(self, model, options, parallel):
        super().__init__()
        self.model, self.options, self.parallel = model, options, parallel

    def forward(self, batch):
        from ov_train.model.forward import sample_losses
        from ov_train.model.loss import weighted_loss

        sums, counts, _ = sample_losses(self.model, batch, self.options, parallel=self.parallel)
        return weighted_loss(sums, counts, "token")


def run_sequence(degree: int, engine: str) -> dict:
    """One training step's loss and gradients under `engine` (ddp or fsdp2, over the whole world) with sequence
    parallelism of `degree`, against one process's; and the greedy predictions, before the step."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from ov_train.model import layout
    from ov_train.model.forward import sample_losses
    from ov_train.model.loss import weighted_loss
    from ov_train.parallel.sequence import SequenceParallel

    world, rank = dist.get_world_size(), dist.get_rank()
    parallel = SequenceParallel.create(degree)
    model, tokenizer, options = build(None)
    reference, _, _ = build(options)
    parallel.apply(model)
    data = batches(model, tokenizer)
    groups = world // degree
    mine = data[rank // degree]
    encoded = count_encoded(model)
    with torch.no_grad():
        _, _, preds = sample_losses(model, mine, options, predict=True, parallel=parallel)
    step = GroupLoss(model, options, parallel)
    if engine == "fsdp2":  # as strategies.py shards: every tower and LLM layer, then the root
        for unit in layout.shard_units(model):
            fully_shard(unit)
        fully_shard(step)
    else:
        step = DistributedDataParallel(step)
    loss = step(mine)
    loss.backward()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in model.named_parameters() if p.grad is not None}
    losses = [None] * world
    dist.all_gather_object(losses, [loss.item(), encoded, sum(mine[k].shape[0] for k in ("pixel_values", "video_frames"))])
    expected = []
    for batch in data[:groups]:
        sums, counts, _ = sample_losses(reference, batch, options)
        expected.append(weighted_loss(sums, counts, "token"))
    (sum(expected) / groups).backward()  # data parallel: the mean of the groups' losses
    with torch.no_grad():
        _, _, expected_preds = sample_losses(reference, mine, options, predict=True)
    errors, missing = grad_errors(grads, reference)
    return {
        "missing": missing,
        "loss_errors": [abs(got - expected[r // degree].item()) / expected[r // degree].item()
                        for r, (got, _, _) in enumerate(losses)],
        "errors": errors,
        "shares": [encoded for _, encoded, _ in losses], "crops": [crops for _, _, crops in losses],
        "predictions_equal": bool(torch.equal(preds, expected_preds)),
    }


def main(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    for case in CASES[dist.get_world_size()]:
        degree = int(case.split("_")[0][-1]) if case.startswith("frames") else int(case[2])
        result = run_frames(degree) if case.startswith("frames") else run_sequence(degree, case.split("_")[1])
        if dist.get_rank() == 0:
            (out / f"{case}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both world sizes, one launch each (one interpreter start per process for all its cases)."""
    out = tmp_path_factory.mktemp("sequence_parallel")
    failures = {}
    for world in CASES:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "-m", "tests.integration.test_sequence_parallel", str(out)]
        try:
            run_one(command, out / f"run{world}.log", timeout=400)
        except AssertionError as err:
            failures[world] = str(err)
    return out, failures


def _result(runs, case: str) -> dict:
    out, failures = runs
    path = out / f"{case}.json"
    assert path.exists(), f"{case} did not complete: {failures}"
    return json.loads(path.read_text())


def _assert_gradients_equal(errors: dict) -> None:
    assert any(".vision_tower." in n for n in errors)
    floor = FLOOR * max(largest for _, largest in errors.values())
    relative = {n: diff / max(largest, floor) for n, (diff, largest) in errors.items()}
    worst = max(relative, key=relative.get)
    assert relative[worst] < GRAD_TOLERANCE, f"{worst} differs by {relative[worst]:.2e} of its largest gradient"


@pytest.mark.parametrize("degree", [2, 4])
def test_frame_parallel_tower_equals_one_process(runs, degree):
    result = _result(runs, f"frames{degree}")
    assert result["feature_error"] <= LOSS_TOLERANCE * result["feature_scale"]
    _assert_gradients_equal(result["errors"])
    # 5 crops padded to a multiple of the degree: each rank encodes its share only.
    assert result["shares"] == [[math.ceil(result["crops"] / degree)]] * degree


@pytest.mark.parametrize("case", ["sp2_ddp", "sp2_fsdp2", "sp4_ddp", "sp2dp2_ddp"])
def test_sequence_parallel_losses_and_gradients_equal_one_process(runs, case):
    result = _result(runs, case)
    degree = int(case[2])
    assert not result["missing"], f"trainable tensors without a gradient: {result['missing']}"
    assert max(result["loss_errors"]) < LOSS_TOLERANCE, result["loss_errors"]
    _assert_gradients_equal(result["errors"])
    assert result["predictions_equal"]
    for encoded, crops in zip(result["shares"], result["crops"]):
        # Two forwards (the predictions and the step), each encoding this rank's share of the crops and frames.
        assert encoded == [math.ceil(crops / degree)] * 2 and encoded[0] < crops


if __name__ == "__main__":
    main(Path(sys.argv[1]))
