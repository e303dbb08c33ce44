"""Ranks holding different modalities in one step: rank 0 only text and rank 1 only videos, then the reverse.

Sharded engines gather each unit's weights around its calls and need every rank to make the same calls: a rank
whose batch has no image and skips the vision tower leaves the other waiting in the tower's gathers forever, the
most reported ZeRO-3 failure of the public multimodal trainers. ov_train's forward runs the tower on every rank
(on a zero-weighted dummy crop for text-only batches). Here ddp, fsdp2 and deepspeed_zero3, built by train.py's
build_strategy and driven by Lightning's Trainer, train 2 such steps as 2 CPU processes under a timeout, and each
step's gradients equal those of one process holding both batches.

The program, `python -m torch.distributed.run --nproc-per-node=2 -m tests.integration.test_mixed_ranks OUT`, runs
the three engines one after the other in the same 2 processes (Lightning adopts torchrun's ranks) and writes
OUT/<engine>.json per engine it completed.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.conftest import compose_config
from tests.helpers import raw_sample
from tests.prebuild import SHM
from tests.processes import run_one

# Training runs and subprocesses: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

ENGINES = {"ddp": [], "fsdp2": [], "deepspeed_zero3": ["strategy.param_persistence_threshold=0"]}
# Each gradient may differ from one process's by this fraction of its largest entry (float32 reduction order; ddp
# and fsdp2 agree bit for bit, ZeRO-3 to about 1e-6). Tensors whose gradient is zero in exact arithmetic (the
# attention key biases) are measured against a thousandth of the step's largest gradient instead of their noise.
TOLERANCE, FLOOR = 1e-4, 1e-3


def modality_batches(model, tokenizer) -> dict[str, dict]:
    """Two text-only samples, and two videos (different frames, so their gradients differ), each collated."""
    from ov_train.config.media import MediaSettings
    from ov_train.data.samples import SampleProcessor, collate
    from ov_train.data.video import encode_mp4
    from ov_train.vision.geometry import VisionGeometry

    geometry = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geometry, "qwen_1_5", MediaSettings.of("anyres_max_9", 4), max_length=4096)
    rng = np.random.default_rng(0)
    texts = [raw_sample("t0", "What is the opposite of up?", "down"), raw_sample("t1", "Name a colour.", "red")]
    videos = [
        raw_sample(f"v{i}", "<video>\nWhich way?", answer, video=encode_mp4(rng.integers(0, 255, (4, 32, 32, 3), np.uint8), fps=1))
        for i, answer in enumerate(("left", "right"))
    ]
    return {
        "text": collate([process(r) for r in texts], tokenizer.pad_token_id),
        "video": collate([process(r) for r in videos], tokenizer.pad_token_id),
    }


def full_weights(strategy, named: list[tuple[str, torch.nn.Parameter]]) -> dict:
    """Every rank's full weights; all ranks call it, outside a forward (ZeRO-3 cannot release a gathered weight that
    a running forward holds, and each step runs inside the engine's forward under manual optimization)."""
    if getattr(strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: _full(p.detach()).clone() for n, p in named}


def full_gradients(strategy, named: list[tuple[str, torch.nn.Parameter]]) -> dict:
    """Every rank's full (rank-averaged) gradients of the trainable parameters; all ranks call it."""
    if getattr(strategy, "zero_stage_3", False):
        from deepspeed.utils import safe_get_full_grad

        return {n: safe_get_full_grad(p).clone() for n, p in named if p.requires_grad}
    return {n: _full(p.grad).clone() for n, p in named if p.requires_grad}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors


class CompareGradients(Callback):
    """Before each optimizer step: this step's gradients against one process's over both ranks' batches, as
    {name: [largest difference, largest one-process gradient]} per step (the weights read as the step starts)."""

    def __init__(self, reference, batches: dict, options):
        self.reference, self.batches, self.options = reference, batches, options
        self.errors: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights = full_weights(trainer.strategy, list(pl_module.model.named_parameters()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from ov_train.model.forward import sample_losses

        grads = full_gradients(trainer.strategy, list(pl_module.model.named_parameters()))
        if not trainer.is_global_zero:
            return
        self.reference.load_state_dict(self.weights, strict=False)
        self.reference.zero_grad(set_to_none=True)
        losses = []
        for batch in self.batches.values():
            sums, counts, _ = sample_losses(self.reference, batch, self.options)
            losses.append(sums.sum() / counts.sum().clamp_min(1))
        (sum(losses) / len(losses)).backward()  # data parallel: the mean of the ranks' losses
        ours = dict(self.reference.named_parameters())
        self.errors.append({n: [(g - ours[n].grad).abs().max().item(), ours[n].grad.abs().max().item()] for n, g in grads.items()})


def train_engine(name: str, overrides: list[str]) -> dict | None:
    """2 steps of `strategy=name` on this rank's batches (rank 0: text then video, rank 1: video then text)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ov_train.config.run_plan import resolve_plan
    from ov_train.model.build import build_model
    from ov_train.model.forward import prepare_model
    from ov_train.strategies import build_strategy
    from ov_train.training.module import OneVisionModule
    from ov_train.utils.paths import cache_dir

    plan = resolve_plan(compose_config(["stage=onevision", f"strategy={name}", "trainer.accelerator=cpu", "trainer.devices=2",
                                        "trainer.max_steps=2", *overrides]))
    L.seed_everything(0)  # the same initial weights on both ranks
    model, tokenizer = build_model(plan.model, cache_dir())
    reference, _ = build_model(plan.model, cache_dir())
    prepare_model(reference, plan.forward)
    batches = modality_batches(model, tokenizer)
    order = ["text", "video"] if os.environ["RANK"] == "0" else ["video", "text"]  # torchrun's rank
    module = OneVisionModule(model, plan.optim, plan.forward)
    check = CompareGradients(reference.train(), batches, plan.forward)
    trainer = L.Trainer(
        strategy=build_strategy(plan.strategy), accelerator="cpu", devices=2, precision="32-true", max_steps=2,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, callbacks=[check],
    )
    loader = DataLoader([batches[m] for m in order], batch_size=None, collate_fn=lambda batch: batch)
    trainer.fit(module, train_dataloaders=loader)
    return {"steps": trainer.global_step, "errors": check.errors} if trainer.is_global_zero else None


def main(out: Path) -> None:
    for name, overrides in ENGINES.items():
        result = train_engine(name, overrides)
        if result is not None:
            (out / f"{name}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def mixed_rank_runs(tmp_path_factory):
    """The three engines in one launch (one interpreter start for all); a failure or hang is kept for the tests."""
    out = tmp_path_factory.mktemp("mixed_ranks")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "tests.integration.test_mixed_ranks", str(out)]
    try:
        run_one(command, out / "run.log", timeout=300)
        failure = None
    except AssertionError as err:
        failure = str(err)
    return out, failure


@pytest.mark.deepspeed_ops(SHM)  # the launch runs every engine
@pytest.mark.parametrize("engine", list(ENGINES))
def test_ranks_with_different_modalities_step_together_with_one_process_gradients(mixed_rank_runs, engine):
    out, failure = mixed_rank_runs
    result_file = out / f"{engine}.json"
    assert result_file.exists(), f"{engine} did not complete its 2 steps: {failure}"
    result = json.loads(result_file.read_text())
    assert result["steps"] == 2 and len(result["errors"]) == 2
    for step, errors in enumerate(result["errors"]):
        # (A trainable tensor without a gradient fails the program.) The tower's count, on the text-only rank too.
        assert any(".vision_tower." in n for n in errors) and any(".multi_modal_projector." in n for n in errors)
        floor = FLOOR * max(largest for _, largest in errors.values())
        relative = {n: diff / max(largest, floor) for n, (diff, largest) in errors.items()}
        worst = max(relative, key=relative.get)
        assert relative[worst] < TOLERANCE, f"step {step}: {worst} differs by {relative[worst]:.2e} of its largest gradient"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
