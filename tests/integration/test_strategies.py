"""Strategies: each `strategy` config builds its Lightning engine and trains as 2 CPU processes through the
Lightning code users run, and the per-part optimizer groups survive the engine's setup.

- DeepSpeed (ZeRO-2, ZeRO-3 and their offload variants): Lightning's DeepSpeedStrategy, through DeepSpeedCPUStrategy
  on the CPU accelerator (gloo), Lightning starting rank 1 itself. ZeRO-3 is stopped by SIGTERM and requeued.
- ddp and fsdp2: 2 "nodes" x 1 process started the way `srun` starts tasks: test_multinode.py.
- fsdp2 under Lightning's own launcher: test_checkpoints.py; `auto` (DDP) at trainer.devices=2 in a sweep:
  test_sweeps.py; ranks holding different modalities in one step: test_mixed_ranks.py.

Each run is `python -m tests.integration.test_strategies OVERRIDES`: train.py plus a probe callback that records,
per rank, the optimizer groups as the engine holds them, state fingerprints, losses and the trained weights.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import open_dict

from ov_train.config.run_plan import ConfigError, model_plan, optim_plan, resolve_plan, strategy_plan
from ov_train.strategies import DeepSpeedCPUStrategy, FSDP2Strategy, build_strategy
from tests.conftest import CONF, SMALL_DATA, compose_config
from tests.prebuild import CPU_ADAM, SHM
from tests.processes import run_one

STRATEGY_CONFIGS = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
# Base learning rate x model.lr_scale (100) of the tiny model; parts without one are frozen.
RATES = {
    "onevision": {"vision_tower": 2e-4, "projector": 1e-3, "llm": 1e-3},
    "mid": {"vision_tower": 2e-4, "projector": 1e-3, "llm": 1e-3},
    "pretrain": {"projector": 1e-1},
}
# Partition every tensor of the tiny model under ZeRO-3 (the default keeps small ones whole on every rank).
ZERO3_ALL = "strategy.param_persistence_threshold=0"


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
    """What apply_stage decides for a fresh model of the same config (its adapters placed, if any)."""
    from ov_train.config.run_plan import run_adapter_plan
    from ov_train.model.adapters import wrap
    from ov_train.model.build import build_model
    from ov_train.model.parts import apply_stage
    from ov_train.utils.paths import cache_dir

    model, _ = build_model(model_plan(cfg.model), cache_dir())
    adapter = run_adapter_plan(cfg)
    if adapter:
        wrap(model, adapter)
    optim = optim_plan(cfg, adapter)
    groups, _ = apply_stage(model, optim.part_lrs, optim.weight_decay, optim.adapted)
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


def rank_weights(strategy, named_params) -> dict[str, torch.Tensor]:
    """This rank's weights: its shards under FSDP2, the full tensors otherwise (gathered under ZeRO-3, where each
    rank holds a placeholder; every rank must call this, in the same order)."""
    if getattr(strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named_params]):
            return {n: p.detach().clone() for n, p in named_params}
    return {n: local(p.detach()).clone() for n, p in named_params}


def fingerprint(optimizer, weights: dict) -> dict:
    """Sums of this rank's weights and Adam moments (its shards or partitions): equal iff the states are equal."""
    return {
        "weights": sum(w.double().sum().item() for w in weights.values()),
        "exp_avg": sum(local(s["exp_avg"]).double().sum().item() for s in optimizer.state.values() if "exp_avg" in s),
        "lrs": [g["lr"] for g in optimizer.param_groups],
    }


class Probe(Callback):
    """Writes {start,end}_rank{R}.json into `out` (step, optimizer groups and class, fingerprint, losses) and at the
    end this rank's weights, weights_rank{R}.pt. With `sigterm_at_step`, rank 0 sends itself SIGTERM once training
    reaches that step (a preemption at a known point); `end` is then written where the run stops."""

    def __init__(self, out: str, sigterm_at_step: int | None = None):
        self.out, self.sigterm_at_step = Path(out), sigterm_at_step
        self.losses: list[list] = []

    def _write(self, trainer, when: str) -> None:
        from torch.distributed.fsdp import FSDPModule

        optimizer = trainer.optimizers[0]
        weights = rank_weights(trainer.strategy, self.params)
        record = {
            "step": trainer.global_step,
            "groups": optimizer_groups(optimizer, self.params),
            "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,  # inside DeepSpeed's wrapper
            "fingerprint": fingerprint(optimizer, weights),
            # FSDP2's units below the root, by module name.
            "fsdp_units": [n for n, m in trainer.lightning_module.model.named_modules() if isinstance(m, FSDPModule)],
            "losses": self.losses,  # [batch index, loss of that batch] for every batch this rank trained on
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{when}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
        if when == "end":
            torch.save(weights, self.out / f"weights_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module):
        # The parameters the optimizer holds; after a validation FSDP2's root shows its gathered copies instead.
        self.params = list(pl_module.model.named_parameters())
        self._write(trainer, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append([batch_idx, float(outputs["loss"])])  # each batch is one step (training/step.py)
        if trainer.global_step == self.sigterm_at_step and trainer.is_global_zero and not trainer.received_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, "end")

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):  # every rank stops here together, so they can gather
            self._write(trainer, "end")


def probe_records(out: Path, when: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{when}_rank*.json"))]


def with_probe(out: Path, sigterm_at_step: int | None = None):
    """A `build_callbacks` that adds a Probe to the run's own callbacks (patch it over ov_train.run.build_callbacks)."""
    from ov_train.run import build_callbacks

    return lambda plan: [*build_callbacks(plan), Probe(str(out), sigterm_at_step)]


# ---------------------------------------------------------------- subprocess runs


def train_overrides(data_root, stage: str, steps: int, run_dir: Path) -> list[str]:
    return [
        f"stage={stage}", f"trainer.max_steps={steps}", f"data.root={data_root}", *SMALL_DATA,
        "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}",
    ]


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "tests.integration.test_strategies", *overrides]


def run_train(overrides: list[str], run_dir: Path, probe: Path, sigterm_at_step: int | None = None) -> None:
    """`python train.py OVERRIDES` with the probe; Lightning starts rank 1 itself."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {"OV_PROBE": str(probe), "OV_PROBE_SIGTERM_AT": str(sigterm_at_step or "")}
    run_one(train_command(overrides), run_dir.with_suffix(f".{probe.name}.log"), timeout=300, env=env)


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
        assert type(strategy) is DeepSpeedCPUStrategy and zero["stage"] == int(name[len("deepspeed_zero")])
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
    # DeepSpeed runs on CPU too now: a CPU config is valid.
    resolve_plan(compose_config(["strategy=deepspeed_zero3", "trainer.accelerator=cpu", "trainer.devices=2"]))


# ---------------------------------------------------------------- DeepSpeed through Lightning, 2 CPU processes


def cpu_adam_missing() -> str | None:
    """Why DeepSpeed's CPU optimizer (a C++ op built on first use) cannot be built here, or None when it can."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("CPUAdamBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return f"DeepSpeed's CPUAdamBuilder is not compatible with the {get_accelerator().device_name()} accelerator here"
    try:
        builder.load(verbose=False)
    except Exception as err:  # no compiler, no headers, no ninja...
        return f"DeepSpeedCPUAdam does not build here: {type(err).__name__}: {err}"
    return None


def trained_full_weights(probe: Path) -> dict[str, torch.Tensor]:
    """The full weights a DeepSpeed run ended with (every rank holds them all, gathered under ZeRO-3)."""
    weights = [torch.load(p) for p in sorted(probe.glob("weights_rank*.pt"))]
    assert len(weights) == 2 and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    return weights[0]


def assert_consolidates_to(ckpt: Path, trained: dict[str, torch.Tensor]) -> None:
    """The sharded checkpoint consolidates (on one CPU process) to exactly the weights the engine trained."""
    from ov_train.checkpoints.reading import model_from_checkpoint

    model, _ = model_from_checkpoint(ckpt)
    state = dict(model.named_parameters())
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k].detach(), trained[k]) for k in trained)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, small_data_root):
    """ZeRO-3 through Lightning: a 3-step run preempted by SIGTERM after step 2 (it saves and exits 0), then the
    same command again in the same run directory (`ckpt_path=auto`, as a requeued job) trains step 3."""
    root = tmp_path_factory.mktemp("zero3")
    overrides = [
        *train_overrides(small_data_root, "onevision", 3, root / "run"), "strategy=deepspeed_zero3", ZERO3_ALL,
        "trainer.devices=2", "ckpt_path=auto", "trainer.limit_val_batches=2", "export=false",
    ]
    run_train(overrides, root / "run", root / "first", sigterm_at_step=2)
    run_train(overrides, root / "run", root / "resumed")
    return root, compose_config(overrides)


@pytest.mark.slow
@pytest.mark.deepspeed_ops(SHM)
def test_deepspeed_zero3_keeps_the_groups(zero3_run):
    root, cfg = zero3_run
    expected = expected_groups(cfg)
    for record in probe_records(root / "first", "start"):
        assert record["groups"] == expected and record["optimizer"] == "AdamW"
        assert {g["name"]: g["lr"] for g in record["groups"]} == pytest.approx(RATES["onevision"])


@pytest.mark.slow
@pytest.mark.deepspeed_ops(SHM)
def test_deepspeed_zero3_resumes_where_sigterm_stopped_it(zero3_run):
    from ov_train.checkpoints.reading import checkpoint_metadata

    root, _ = zero3_run
    first_end, resumed_start = probe_records(root / "first", "end"), probe_records(root / "resumed", "start")
    assert [r["step"] for r in first_end] == [2, 2] and [r["step"] for r in resumed_start] == [2, 2]
    # Every rank continues from the weights, its Adam moment partitions and the learning rates it stopped at.
    for end, start in zip(first_end, resumed_start):
        assert start["fingerprint"] == end["fingerprint"] and start["groups"] == end["groups"]
    resumed_end = probe_records(root / "resumed", "end")
    assert [r["step"] for r in resumed_end] == [3, 3]
    assert resumed_end[0]["fingerprint"]["weights"] != resumed_start[0]["fingerprint"]["weights"]  # step 3 trained
    assert checkpoint_metadata(root / "run" / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.slow
@pytest.mark.deepspeed_ops(SHM)
def test_deepspeed_zero3_checkpoint_exports_the_trained_model(zero3_run, small_data_root, tmp_path):
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from ov_train.cli.export import main as ov_export
    from ov_train.model.forward import forward_logits
    from tests.integration.test_train import _held_out_batch

    root, _ = zero3_run
    trained = trained_full_weights(root / "resumed")
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    assert_consolidates_to(ckpt, trained)
    assert ov_export([str(ckpt), str(tmp_path / "export")]) == 0
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reference = LlavaOnevisionForConditionalGeneration(model.config)
    reference.load_state_dict(trained)
    batch = _held_out_batch(model, AutoTokenizer.from_pretrained(tmp_path / "export"), small_data_root)
    model.eval(), reference.eval()
    with torch.no_grad():  # the fp32 parity tolerance of test_checkpoints.py
        assert torch.allclose(forward_logits(model, batch), forward_logits(reference, batch), atol=1e-5, rtol=1e-4)
    assert json.loads((root / "run" / "summary.json").read_text())["steps"] == 3


# Offloading pretrain: the optimizer holds the projector only, the frozen tower and LLM stay out of it. Plain ZeRO-2
# (no offload) is left to test_adapter_runs.py::test_adapters_under_each_engine (its groups, on AdamW, and its
# checkpoint exported) and test_dpo_runs.py; its engine and checkpoint format are the offload case's below.
@pytest.mark.slow
@pytest.mark.deepspeed_ops(SHM, CPU_ADAM)
@pytest.mark.parametrize(
    ("strategy", "stage"), [("deepspeed_zero2_offload", "pretrain"), ("deepspeed_zero3_offload", "onevision")],
)
def test_deepspeed_keeps_the_groups_and_its_checkpoint_consolidates(tmp_path, small_data_root, strategy, stage):
    offload = strategy.endswith("_offload")
    if offload and (why := cpu_adam_missing()):
        pytest.skip(why)
    overrides = [
        *train_overrides(small_data_root, stage, 2, tmp_path / "run"), f"strategy={strategy}", ZERO3_ALL,
        "trainer.devices=2", "trainer.limit_val_batches=2", "export=false",
    ]
    run_train(overrides, tmp_path / "run", tmp_path / "probe")
    expected = expected_groups(compose_config(overrides))
    for record in probe_records(tmp_path / "probe", "start"):
        assert record["groups"] == expected
        assert {g["name"]: g["lr"] for g in record["groups"]} == pytest.approx(RATES[stage])
        # ZeRO-Offload steps DeepSpeed's vectorised CPU AdamW (adamw_mode), on the same groups.
        assert record["optimizer"] == ("DeepSpeedCPUAdam" if offload else "AdamW")
    assert [r["step"] for r in probe_records(tmp_path / "probe", "end")] == [2, 2]
    assert_consolidates_to(tmp_path / "run" / "checkpoints" / "last.ckpt", trained_full_weights(tmp_path / "probe"))


# ---------------------------------------------------------------- script entry point


def _train_main() -> None:
    import hydra

    import ov_train.run as run

    # train.py, plus the probe: the one extra callback goes in where train() collects its callbacks.
    sigterm_at = os.environ.get("OV_PROBE_SIGTERM_AT")
    run.build_callbacks = with_probe(Path(os.environ["OV_PROBE"]), int(sigterm_at) if sigterm_at else None)
    hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")(run.train)()


if __name__ == "__main__":
    _train_main()
