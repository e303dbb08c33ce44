"""Strategies: each `strategy` config builds its engine, and the per-part optimizer groups survive its setup.

ddp and fsdp2 run 2 processes on CPU (gloo) through `python -m tests.integration.test_strategies OVERRIDES`:
train.py plus a probe callback that records, per rank, the optimizer groups as the engine holds them.
Lightning's DeepSpeedStrategy refuses every accelerator but CUDA, so DeepSpeed's ZeRO engine is driven here
directly, the way Lightning drives it (`... deepspeed STRATEGY OUT OVERRIDES` under torch.distributed.run),
on CPU over gloo; what stays GPU-only is Lightning's wrapper around it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from omegaconf import open_dict

from ov_train.config.run_plan import (
    ConfigError,
    model_plan,
    optim_plan,
    resolve_plan,
    strategy_plan,
)
from ov_train.strategies import FSDP2Strategy, build_strategy
from tests.conftest import CONF, REPO, SMALL_DATA, compose_config

STRATEGY_CONFIGS = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
# Base learning rate x model.lr_scale (100) of the tiny model; parts without one are frozen.
RATES = {
    "onevision": {"vision_tower": 2e-4, "projector": 1e-3, "llm": 1e-3},
    "mid": {"vision_tower": 2e-4, "projector": 1e-3, "llm": 1e-3},
    "pretrain": {"projector": 1e-1},
}


# ---------------------------------------------------------------- what the engines hold


def optimizer_groups(optimizer, named_params) -> list[dict]:
    """Each group's name, base lr and member tensors {name: numel}, read off the engine's optimizer."""
    names = {id(p): n for n, p in named_params}
    # DeepSpeed's ZeRO optimizers step flat fp32 partitions and keep each group's own tensors aside.
    members = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None)
    members = members or [g["params"] for g in optimizer.param_groups]
    return [
        {
            "name": group["name"],
            "lr": group["initial_lr"],  # the rate the schedule scales (LambdaLR keeps it in each group)
            "params": {names[id(p)]: getattr(p, "ds_numel", p.numel()) for p in params},  # ZeRO-3: full size
        }
        for group, params in zip(optimizer.param_groups, members)
    ]


def expected_groups(cfg) -> list[dict]:
    """What apply_stage decides for a fresh model of the same config."""
    from ov_train.model.build import build_model
    from ov_train.model.parts import apply_stage
    from ov_train.utils.paths import cache_dir

    model, _ = build_model(model_plan(cfg.model), cache_dir())
    optim = optim_plan(cfg)
    groups, _ = apply_stage(model, optim.part_lrs, optim.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    return [{"name": g["name"], "lr": g["lr"], "params": {names[id(p)]: p.numel() for p in g["params"]}} for g in groups]


def layer_names(cfg) -> list[str]:
    """Module names of the SigLIP layers, then the Qwen2 layers, of a fresh model of the config."""
    from ov_train.model.build import build_model
    from ov_train.model.layout import layers
    from ov_train.utils.paths import cache_dir

    model, _ = build_model(model_plan(cfg.model), cache_dir())
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for part in ("vision", "llm") for layer in layers(model, part)]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: its shard under FSDP2 (a DTensor), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def fingerprint(optimizer, named_params) -> dict:
    """Sums of this rank's weights and Adam moments (its shards under FSDP2): equal iff the states are equal."""
    return {
        "weights": sum(local(p.detach()).double().sum().item() for _, p in named_params),
        "exp_avg": sum(local(s["exp_avg"]).double().sum().item() for s in optimizer.state.values() if "exp_avg" in s),
        "lrs": [g["lr"] for g in optimizer.param_groups],
    }


class Probe(Callback):
    """Writes {start,end}_rank{R}.json into `out` (step, optimizer groups, fingerprint, this rank's training loss
    of each batch), and at the end this rank's part of each weight, weights_rank{R}.pt."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((batch_idx, float(trainer.callback_metrics["train/loss"])))

    def _write(self, trainer, when: str) -> None:
        optimizer = trainer.optimizers[0]
        from torch.distributed.fsdp import FSDPModule

        record = {
            "step": trainer.global_step,
            "groups": optimizer_groups(optimizer, self.params),
            "fingerprint": fingerprint(optimizer, self.params),
            # FSDP2's units below the root, by module name.
            "fsdp_units": [n for n, m in trainer.lightning_module.model.named_modules() if isinstance(m, FSDPModule)],
            "losses": self.losses,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{when}_rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_train_start(self, trainer, pl_module):
        # The parameters the optimizer holds; after a validation FSDP2's root shows its gathered copies instead.
        self.params = list(pl_module.model.named_parameters())
        self._write(trainer, "start")

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, "end")
        torch.save({n: local(p.detach()) for n, p in self.params}, self.out / f"weights_rank{trainer.global_rank}.pt")


def probe_records(out: Path, when: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{when}_rank*.json"))]


# ---------------------------------------------------------------- subprocess runs


def launch(args: list[str], log: Path, probe: Path | None = None, timeout: int = 300) -> None:
    """Run this module as a script in its own session; on timeout the whole session (every rank) is killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **({"OV_PROBE": str(probe)} if probe else {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"timeout after {timeout} s (a hung collective?)"
    assert rc == 0, f"{' '.join(args)} -> {rc}\n{log.read_text()[-8000:]}"


def train_overrides(data_root, stage: str, steps: int, run_dir: Path) -> list[str]:
    return [
        f"stage={stage}", f"trainer.max_steps={steps}", f"data.root={data_root}", *SMALL_DATA,
        "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}",
    ]


def run_train(overrides: list[str], run_dir: Path, probe: Path) -> None:
    """`python train.py OVERRIDES` with the probe; Lightning starts rank 1 itself."""
    run_dir.mkdir(parents=True, exist_ok=True)
    launch([sys.executable, "-m", "tests.integration.test_strategies", *overrides], run_dir.with_suffix(".log"), probe)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", STRATEGY_CONFIGS)
def test_every_strategy_config_builds_its_lightning_engine(name):
    cfg = compose_config([f"strategy={name}", "trainer.devices=2"])
    strategy = build_strategy(strategy_plan(cfg))
    s = cfg.strategy
    if s.name == "auto":
        assert strategy == "auto"
    elif s.name == "ddp":
        assert type(strategy) is DDPStrategy and strategy._ddp_kwargs["find_unused_parameters"] is False
    elif s.name == "fsdp2":
        assert isinstance(strategy, FSDP2Strategy) and strategy.reshard_after_forward
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
    else:
        zero = strategy.config["zero_optimization"]
        assert type(strategy) is DeepSpeedStrategy and zero["stage"] == int(name[len("deepspeed_zero")])
        assert ("offload_optimizer" in zero) == name.endswith("_offload")
        assert ("offload_param" in zero) == (name == "deepspeed_zero3_offload")
        assert strategy.config["train_micro_batch_size_per_gpu"] == cfg.data.batch_size


def _problems(overrides: list[str], **strategy) -> str:
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.strategy.update(strategy)
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    return str(err.value)


def test_bad_strategy_settings_fail_before_any_work():
    message = _problems(["strategy=ddp"], name="zero9")
    assert "strategy.name='zero9'" in message and "'fsdp2'" in message and "'deepspeed'" in message
    message = _problems(["strategy=deepspeed_zero2"], offload_parameters=True)
    assert "strategy.offload_parameters=true needs strategy.stage=3" in message
    assert "trainer.devices='auto'" in _problems(["strategy=fsdp2", "trainer.devices=auto"])
    assert "nccl needs GPUs" in _problems(["strategy=ddp", "trainer.accelerator=cpu"], process_group_backend="nccl")
    if not torch.cuda.is_available():
        assert "strategy=deepspeed needs CUDA GPUs" in _problems(["strategy=deepspeed_zero3"])


# ---------------------------------------------------------------- 2 processes on CPU


def losses_by_step(records: list[dict], micro_batches: int = 1) -> list[float]:
    """Mean training loss of each optimizer step over every rank's (or micro-batch's) batch."""
    per_step: dict[int, list[float]] = {}
    for record in records:
        for batch_idx, loss in record["losses"]:
            per_step.setdefault(batch_idx // micro_batches, []).append(loss)
    return [sum(v) / len(v) for _, v in sorted(per_step.items())]


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory, small_data_root):
    """The global batches of 2 ranks in one process: its 2 loader workers are the ranks' readers (readers are
    numbered rank x workers + worker), and each step accumulates one batch of each."""
    root = tmp_path_factory.mktemp("reference")
    overrides = [*train_overrides(small_data_root, "onevision", 2, root / "run"), "data.num_workers=2",
                 "trainer.accumulate_grad_batches=2"]
    run_train(overrides, root / "run", root / "probe")
    return losses_by_step(probe_records(root / "probe", "end"), micro_batches=2)


# Data parallel engines average the ranks' mean losses' gradients where one process averages its micro-batches':
# the same update, up to float32 summation order.
PARITY = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "stage", "checkpoint_is_dir"),
    [("ddp", "onevision", False), ("fsdp2", "onevision", True), ("fsdp2", "pretrain", True)],
)
def test_two_cpu_processes_keep_the_stage_groups_and_one_process_losses(
    tmp_path, small_data_root, strategy, stage, checkpoint_is_dir, request
):
    overrides = [*train_overrides(small_data_root, stage, 2, tmp_path / "run"), f"strategy={strategy}", "trainer.devices=2"]
    run_train(overrides, tmp_path / "run", tmp_path / "probe")
    if stage == "onevision":
        # Loss parity: the same global batches as one process, the same losses step by step.
        ours = losses_by_step(probe_records(tmp_path / "probe", "end"))
        assert len(ours) == 2 and ours == pytest.approx(request.getfixturevalue("one_process_reference"), rel=PARITY)

    expected = expected_groups(compose_config(overrides))
    records = probe_records(tmp_path / "probe", "start")
    assert len(records) == 2
    layers = layer_names(compose_config(overrides))
    for record in records:
        assert record["groups"] == expected
        assert {g["name"]: g["lr"] for g in record["groups"]} == pytest.approx(RATES[stage])
        # Every SigLIP and Qwen2 layer is its own unit: the forward runs the tower once per step on every rank.
        assert record["fsdp_units"] == (layers if strategy == "fsdp2" else [])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["val_samples"] > 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_dir() == checkpoint_is_dir
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


# ---------------------------------------------------------------- DeepSpeed's engine, 2 processes on CPU


def deepspeed_run(strategy_name: str, out: Path, overrides: list[str]) -> None:
    """One rank of a ZeRO run set up as Lightning's DeepSpeedStrategy does it, on CPU: 2 steps, then a checkpoint.

    Writes groups_rank{R}.json, the checkpoint `out/last.ckpt` (Lightning's layout: DeepSpeed's directory, the
    Lightning state as client state) and, from rank 0, the trained full weights `out/weights.pt`.
    """
    import deepspeed

    from ov_train.config.recipe import parse_recipe
    from ov_train.config.run_plan import data_plan
    from ov_train.data.prepare import prepare_data
    from ov_train.model.build import build_model
    from ov_train.model.forward import sample_losses
    from ov_train.training.datamodule import OneVisionData
    from ov_train.training.module import OneVisionModule
    from ov_train.utils.paths import cache_dir
    from ov_train.vision.geometry import VisionGeometry

    deepspeed.init_distributed("gloo")  # torch.distributed.run supplies rank, world size and address
    rank = torch.distributed.get_rank()
    # The plan's pieces, without its check that DeepSpeed has GPUs: Lightning's wrapper is what needs them.
    cfg = compose_config([f"strategy={strategy_name}", *overrides], run_dir=out)
    strategy = build_strategy(strategy_plan(cfg))
    model, tokenizer = build_model(model_plan(cfg.model), cache_dir())
    data_cfg = data_plan(cfg, parse_recipe(cfg.data.recipe))
    data = OneVisionData(data_cfg, prepare_data(data_cfg), tokenizer, VisionGeometry.from_model_config(model.config))
    tokenizer.save_pretrained(out / "tokenizer")
    module = OneVisionModule(model, optim_plan(cfg), tokenizer_dir=str(out / "tokenizer"))
    optim = module.configure_optimizers()
    engine, optimizer, _, _ = deepspeed.initialize(
        config=strategy.config,
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        optimizer=optim["optimizer"],
        lr_scheduler=optim["lr_scheduler"]["scheduler"],
        dist_init_required=False,
    )
    (out / f"groups_rank{rank}.json").write_text(json.dumps(optimizer_groups(optimizer, model.named_parameters())))

    def loss(batch):
        sums, counts, _ = sample_losses(model, batch, module.forward_options)
        return sums.sum() / counts.sum().clamp_min(1)

    # Lightning sends each step through the engine with the module's forward redirected to training_step.
    module.forward = loss
    batches = iter(data.train_dataloader())
    for _ in range(int(cfg.trainer.max_steps)):
        engine.backward(engine(next(batches)))
        engine.step()
    state = {"global_step": int(cfg.trainer.max_steps)}
    module.on_save_checkpoint(state)
    engine.save_checkpoint(out / "last.ckpt", tag="checkpoint", client_state=state)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=strategy.zero_stage_3):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(weights, out / "weights.pt")


@pytest.mark.slow
# ZeRO-3 runs `onevision`: ranks whose batches hold different media (or none) still make the same tower calls.
@pytest.mark.parametrize(
    ("strategy", "stage"),
    [("deepspeed_zero2", "onevision"), ("deepspeed_zero2_offload", "pretrain"), ("deepspeed_zero3_offload", "onevision")],
)
def test_deepspeed_keeps_the_groups_and_its_checkpoint_consolidates(tmp_path, small_data_root, strategy, stage):
    from transformers import LlavaOnevisionForConditionalGeneration

    from ov_train.model.checkpoint_io import model_from_checkpoint
    from ov_train.tools.export import main as ov_export

    overrides = [
        f"stage={stage}", "trainer.max_steps=2", f"data.root={small_data_root}", *SMALL_DATA,
        "strategy.param_persistence_threshold=0",  # partition every tensor of the tiny model under ZeRO-3
    ]
    launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "tests.integration.test_strategies", "deepspeed", strategy, str(tmp_path), *overrides],
        tmp_path / "run.log",
    )
    expected = expected_groups(compose_config([f"strategy={strategy}", *overrides]))
    for rank in (0, 1):
        groups = json.loads((tmp_path / f"groups_rank{rank}.json").read_text())
        assert groups == expected
        assert {g["name"]: g["lr"] for g in groups} == pytest.approx(RATES[stage])

    # The sharded checkpoint consolidates to the weights the engine trained, frozen parts included.
    trained = torch.load(tmp_path / "weights.pt")
    model, _ = model_from_checkpoint(tmp_path / "last.ckpt")
    state = dict(model.named_parameters())
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k].detach(), trained[k]) for k in trained)
    assert ov_export([str(tmp_path / "last.ckpt"), str(tmp_path / "export")]) == 0
    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


# ---------------------------------------------------------------- script entry points


def _train_main() -> None:
    import hydra

    import ov_train.run as run

    # train.py, plus the probe: the one extra callback goes in where train() collects its callbacks.
    build_callbacks = run.build_callbacks
    run.build_callbacks = lambda plan: [*build_callbacks(plan), Probe(os.environ["OV_PROBE"])]
    hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")(run.train)()


if __name__ == "__main__":
    if sys.argv[1:2] == ["deepspeed"]:
        deepspeed_run(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
    else:
        _train_main()
