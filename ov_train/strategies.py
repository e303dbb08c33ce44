"""The `strategy` group -> a Lightning strategy: the one place parallelism is chosen.

- `auto`: Lightning picks (one device, or DDP for several).
- `ddp`: Lightning's DDPStrategy.
- `deepspeed`: Lightning's DeepSpeedStrategy, ZeRO stage 2 or 3, optionally offloaded to CPU, on GPUs or (through
  DeepSpeedCPUStrategy, which only lifts Lightning's CUDA-only checks) on CPU processes over gloo. DeepSpeed wraps
  the optimizer from `configure_optimizers`, so the per-part groups and learning rates are the ones it steps.
  ZeRO-3 gathers each submodule's weights around its calls and insists that every rank makes the same calls.
- `fsdp2`: Lightning's ModelParallelStrategy, data parallel only; `FSDP2Strategy.parallelize` applies FSDP2's
  `fully_shard` from the module's `configure_model` hook (once the process group exists, before the optimizer).

Both sharded engines gather a submodule's weights around its calls and need every rank to make the same calls.
The training forward (ov_train.model.forward) runs the tower and projector exactly once per step on every rank,
over all crops and frames of its batch or over one dummy crop for a text-only batch; the units FSDP2 shards are
model/layout.py's `shard_units`. ZeRO-3 likewise sees the same calls on every rank whatever the batches hold.
Settings come from the plan's StrategyPlan (ov_train.config.run_plan), which has checked them. With adapters
(`trainable_only`) every engine writes checkpoints of the trainable tensors and their optimizer state only: DDP
through the LightningModule's on_save_checkpoint, DeepSpeed with exclude_frozen_parameters, FSDP2 below.
"""
from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

from ov_train.config.run_plan import StrategyPlan
from ov_train.model import layout
from ov_train.utils.logging import get_logger

log = get_logger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with every process in one data-parallel (FSDP2) mesh dimension, no tensor parallelism.

    With `trainable_only` (adapters: the frozen base comes from model.*), checkpoints hold the tensors that train
    and their optimizer state only, sharded or whole.
    """

    def __init__(self, world_size: int, reshard_after_forward: bool, trainable_only: bool = False,
                 save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.trainable_only = trainable_only
        self.save_distributed = save_distributed_checkpoint  # the checkpoint's form: sharded, or one whole file

    def lightning_module_state_dict(self) -> dict:
        if not self.trainable_only:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=not self.save_distributed, cpu_offload=True,
                                   ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        """Lightning's loading, except that a sharded checkpoint of trainable tensors only is read into those
        (Lightning's asks the checkpoint for every tensor of the model)."""
        from pathlib import Path

        path = Path(self.broadcast(checkpoint_path))
        if not (self.trainable_only and path.is_dir()):
            return super().load_checkpoint(checkpoint_path, weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=True, cpu_offload=True)
        state = {"state_dict": get_model_state_dict(self.model, options=options)}
        state.update({f"optimizer_{i}": get_optimizer_state_dict(self.model, opt, options=options)
                      for i, opt in enumerate(self.optimizers)})
        dcp.load(state, checkpoint_id=path)  # fails naming any trainable tensor the checkpoint lacks
        # Not strict: the frozen base is not in the checkpoint (it was built from model.*).
        set_model_state_dict(self.model, state.pop("state_dict"),
                             options=StateDictOptions(ignore_frozen_params=True, strict=False))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, state.pop(f"optimizer_{i}"), options=options)
        return torch.load(path / "meta.pt", weights_only=weights_only)  # Lightning's metadata file

    def parallelize(self, module: torch.nn.Module) -> None:
        """fully_shard each unit the layout names (SigLIP and Qwen2 layers), then the LightningModule as the root,
        whose steps gather it."""
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        # Under bf16-mixed: compute and all-gather in bf16; weights, optimizer and gradient reduction stay fp32.
        policy = MixedPrecisionPolicy()
        if self.precision_plugin.precision == "bf16-mixed":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        mesh = self.device_mesh["data_parallel"]
        for layer in layout.shard_units(module.model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        # The module's forward (`fsdp_forward`: every micro-batch of a step, each validation batch): the root's
        # weights are gathered around each call, the backward runs after it, as FSDP2's gradient accumulation expects.
        register_fsdp_forward_method(module, module.fsdp_forward)


class DeepSpeedCPUStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy that also runs on the CPU accelerator (gloo), so 2 CPU processes exercise the
    code path GPU jobs take. On CUDA it is Lightning's strategy unchanged.

    Lightning insists on CUDA in two places: `setup_environment` refuses any other accelerator, and the device
    index of each process (checked against the local ranks, and handed to `deepspeed.initialize` as
    `device_rank`) is None for CPU devices. Here CPU processes are numbered by local rank, as DeepSpeed's own CPU
    accelerator numbers them, and DeepSpeed is told to use that accelerator.
    """

    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_environment()
            return
        from deepspeed.accelerator import get_accelerator, set_accelerator

        if get_accelerator().device_name() != "cpu":  # GPUs present, but trainer.accelerator=cpu
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            set_accelerator(CPU_Accelerator())
        self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        # DeepSpeedStrategy's parent sets up the process group through DeepSpeedStrategy.setup_distributed.
        DDPStrategy.setup_environment(self)


def deepspeed_config(s: dict, batch_size: int) -> dict:
    """DeepSpeed's config for the strategy's settings; Lightning adds precision and gradient accumulation."""
    zero = {
        "stage": int(s["stage"]),
        "overlap_comm": bool(s["overlap_comm"]),
        "contiguous_gradients": bool(s["contiguous_gradients"]),
        "allgather_bucket_size": int(s["allgather_bucket_size"]),
        "reduce_bucket_size": int(s["reduce_bucket_size"]),
        "stage3_param_persistence_threshold": int(s["param_persistence_threshold"]),
    }
    if s["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(s["pin_memory"])}
    if s["offload_parameters"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(s["pin_memory"])}
    return {
        # DeepSpeed only reports with it; Lightning cannot read it off our loaders (they batch inside the dataset).
        "train_micro_batch_size_per_gpu": batch_size,
        "zero_optimization": zero,
        # DeepSpeed wraps our AdamW (per-part groups) instead of building one from its config; under offload it
        # steps it on the CPU copies rather than insisting on its JIT-compiled DeepSpeedCPUAdam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def adopt_launcher_tasks() -> None:
    """Let Lightning adopt the processes a submitit job started, one per device, instead of starting its own.

    Processes Lightning starts itself re-run the command line of rank 0, which inside a submitit job (or any Hydra
    multirun) is not the job's command: they would fail or start sweeps of their own. So the launchers start one
    task per device (ov_train.config.checks.launcher_problems checks it). On SLURM, Lightning's SLURMEnvironment reads SLURM's variables;
    for submitit's local executor, each task's rank is exported the way torchrun does (submitit's
    TorchDistributedEnvironment), which Lightning's default environment adopts.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and int(os.environ["SUBMITIT_LOCAL_NTASKS"]) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        # Every task sees every GPU; Lightning picks its own by local rank.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class SequenceParallelSetup(Callback):
    """strategy.sequence_parallel=N (config/parallel.py): the groups of N consecutive ranks, and the model's LLM
    attention through the Ulysses exchange (parallel/sequence.py), set up once the world's process group exists
    (Lightning's setup hook) and before the engine wraps or shards the model (configure_model, then the strategy's
    setup). The LightningModule gets the group as `sequence_parallel`: its forward then splits each packed row over
    the group, encodes the frames and crops frame-parallel (parallel/frames.py) and reduces the loss sums and token
    counts over the group. The data module reads one stream per group (DataPlan.replicas)."""

    def __init__(self, degree: int):
        self.degree = degree

    def setup(self, trainer, pl_module, stage: str) -> None:
        if getattr(pl_module, "sequence_parallel", None) is not None:
            return  # a second fit / validate on the same module: already set up
        from ov_train.parallel.sequence import SequenceParallel

        parallel = SequenceParallel.create(self.degree)
        parallel.apply(pl_module.model)
        pl_module.sequence_parallel = parallel
        if trainer.is_global_zero:
            log.info("sequence parallel: each packed row split over %d ranks (their frames and crops encoded"
                     " frame-parallel), data parallel over %d groups", self.degree, trainer.world_size // self.degree)


def strategy_callbacks(plan: StrategyPlan) -> list[Callback]:
    """The callbacks the strategy needs beside the engine: sequence parallelism's setup when it is on."""
    return [SequenceParallelSetup(plan.sequence_parallel)] if plan.sequence_parallel > 1 else []


def build_strategy(plan: StrategyPlan):
    """The Lightning strategy (or the string `auto`) of the plan; inside a submitit job it first hands the job's
    tasks to Lightning (adopt_launcher_tasks)."""
    adopt_launcher_tasks()
    s = plan.settings
    if plan.name == "auto":
        return "auto"
    if plan.name == "ddp":
        return DDPStrategy(
            process_group_backend=s["process_group_backend"],
            find_unused_parameters=bool(s["find_unused_parameters"]),
            bucket_cap_mb=s["bucket_cap_mb"],
        )
    if plan.name == "deepspeed":
        config = deepspeed_config(s, plan.micro_batch_size)
        # The engine clips inside its step (Lightning's DeepSpeed precision leaves the module's clipping call to it).
        config["gradient_clipping"] = plan.gradient_clipping or 0.0
        return DeepSpeedCPUStrategy(config=config, process_group_backend=s["process_group_backend"],
                                    exclude_frozen_parameters=plan.trainable_only)
    return FSDP2Strategy(
        world_size=plan.world_size,
        reshard_after_forward=bool(s["reshard_after_forward"]), trainable_only=plan.trainable_only,
        save_distributed_checkpoint=bool(s["save_distributed_checkpoint"]),
        process_group_backend=s["process_group_backend"],
    )


class StopRanksOnError(Callback):
    """An error on a rank ends the ranks this process started (`trainer.devices` > 1 with no scheduler starting
    them): one stuck in a collective would otherwise wait for the failed rank until the process group's timeout
    (NCCL does not notice a dead peer). Lightning does so itself on Ctrl-C only. Ranks a scheduler started (srun,
    torchrun) are the scheduler's to stop: the launcher has none of them.

    The error is logged first: once a rank it started has died, Lightning's watch over them kills this process
    too, maybe before the error reaches the console."""

    def on_exception(self, trainer, pl_module, exception):
        launcher = trainer.strategy.launcher
        if trainer.world_size == 1 or launcher is None or not isinstance(exception, Exception):
            return  # SIGTERMException (every rank saves and exits) and KeyboardInterrupt (Lightning's) stop by themselves
        log.error("rank %d: %s: %s", trainer.global_rank, type(exception).__name__, exception)
        launcher.kill(signal.SIGKILL)
