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
over all crops and frames of its batch or over one dummy crop for a text-only batch, so FSDP2 shards each SigLIP
encoder layer and each Qwen2 decoder layer; the rest (embeddings, projector, image_newline, lm_head) stays in the
root unit, gathered once per step. ZeRO-3 likewise sees the same calls on every rank whatever the batches hold.
"""
from __future__ import annotations

import os

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
from omegaconf import OmegaConf

STRATEGIES = ("auto", "ddp", "deepspeed", "fsdp2")


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with every process in one data-parallel (FSDP2) mesh dimension, no tensor parallelism.

    With `trainable_only` (adapters: the frozen base comes from model.*), checkpoints hold the tensors that train
    and their optimizer state only, sharded or whole.
    """

    def __init__(self, world_size: int, reshard_after_forward: bool, trainable_only: bool = False, **kwargs):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.trainable_only = trainable_only

    def lightning_module_state_dict(self) -> dict:
        if not self.trainable_only:
            return super().lightning_module_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True,
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
        """fully_shard each SigLIP and Qwen2 layer, then the LightningModule as the root, whose steps gather it."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
        from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

        # Under bf16-mixed: compute and all-gather in bf16; weights, optimizer and gradient reduction stay fp32.
        policy = MixedPrecisionPolicy()
        if self.precision_plugin.precision == "bf16-mixed":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        mesh = self.device_mesh["data_parallel"]
        for layer in [m for m in module.modules() if isinstance(m, (SiglipEncoderLayer, Qwen2DecoderLayer))]:
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        for method in ("training_step", "validation_step"):
            register_fsdp_forward_method(module, method)


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


def deepspeed_config(s, batch_size: int) -> dict:
    """DeepSpeed's config for a `strategy` node; Lightning adds precision and gradient accumulation."""
    zero = {
        "stage": int(s.stage),
        "overlap_comm": bool(s.overlap_comm),
        "contiguous_gradients": bool(s.contiguous_gradients),
        "allgather_bucket_size": int(s.allgather_bucket_size),
        "reduce_bucket_size": int(s.reduce_bucket_size),
        "stage3_param_persistence_threshold": int(s.param_persistence_threshold),
    }
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(s.pin_memory)}
    if s.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(s.pin_memory)}
    return {
        # DeepSpeed only reports with it; Lightning cannot read it off our loaders (they batch inside the dataset).
        "train_micro_batch_size_per_gpu": batch_size,
        "zero_optimization": zero,
        # DeepSpeed wraps our optimizer (per-part groups) instead of building one from its config. Under offload
        # that is DeepSpeedCPUAdam, or torch's AdamW where DeepSpeed's C++ op cannot be built (training/optim.py).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def devices_per_node(devices, accelerator: str = "auto") -> int:
    """How many devices Lightning runs on per node for `trainer.devices` (int, list, "auto", "-1", "2" or "0,1")."""
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        # "auto" and -1 mean every visible GPU; on the CPU Lightning runs one process.
        on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return torch.cuda.device_count() if on_gpu else 1
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    return int(text)


def world_size(trainer_cfg) -> int:
    return devices_per_node(trainer_cfg.devices, str(trainer_cfg.accelerator)) * int(trainer_cfg.num_nodes)


def default_precision(cfg) -> str:
    """trainer.precision when the config leaves it null.

    One GPU: bf16 weights with fp32 masters in the optimizer (ov_train.training.optim), so no autocast
    re-casts. Several: bf16-mixed, so DDP reduces fp32 gradients, and DeepSpeed and FSDP2 (bf16 compute on
    fp32 shards) keep fp32 weights of their own. CPU: fp32.
    """
    if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available():
        return "32-true"
    one_gpu = world_size(cfg.trainer) == 1
    return "bf16-true" if one_gpu and cfg.strategy.name == "auto" else "bf16-mixed"


def launcher_tasks() -> int | None:
    """How many processes the submitit job running this process started (hydra/launcher=local, submitit_local or
    slurm); None outside such a job."""
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if executor == "local":
        return int(os.environ["SUBMITIT_LOCAL_NTASKS"])
    if executor == "slurm":
        return int(os.environ["SLURM_NTASKS"])
    return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def launcher_problems(trainer_cfg) -> list[str]:
    """What keeps Lightning from adopting this job's processes (config.validate reports it before any work)."""
    tasks, processes = launcher_tasks(), world_size(trainer_cfg)
    if tasks is None and processes > 1 and _in_multirun() and not ({"LOCAL_RANK", "SLURM_NTASKS"} & os.environ.keys()):
        return [
            f"trainer.devices x trainer.num_nodes = {processes} processes per job of a multirun (-m) need a launcher"
            " that starts them: hydra/launcher=local (or slurm); Lightning's own would re-run the whole sweep"
        ]
    if tasks is not None and tasks != processes:
        per_node = devices_per_node(trainer_cfg.devices, str(trainer_cfg.accelerator))
        return [
            f"trainer.devices x trainer.num_nodes = {processes} but this submitit job has {tasks} task(s): use"
            " hydra/launcher=local or slurm, whose tasks follow the trainer (or hydra.launcher.tasks_per_node="
            f"{per_node})"
        ]
    return []


def adopt_launcher_tasks() -> None:
    """Let Lightning adopt the processes a submitit job started, one per device, instead of starting its own.

    Processes Lightning starts itself re-run the command line of rank 0, which inside a submitit job (or any Hydra
    multirun) is not the job's command: they would fail or start sweeps of their own. So the launchers start one
    task per device (launcher_problems checks it). On SLURM, Lightning's SLURMEnvironment reads SLURM's variables;
    for submitit's local executor, each task's rank is exported the way torchrun does (submitit's
    TorchDistributedEnvironment), which Lightning's default environment adopts.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and int(os.environ["SUBMITIT_LOCAL_NTASKS"]) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        # Every task sees every GPU; Lightning picks its own by local rank.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def build_strategy(cfg):
    """The Lightning strategy (or the string `auto`) for `cfg.strategy`; config.validate has checked its settings.

    Inside a submitit job it first hands the job's tasks to Lightning (adopt_launcher_tasks).
    """
    adopt_launcher_tasks()
    s = cfg.strategy
    # Adapters (ov_train.model.adapters): checkpoints keep the trainable tensors only, the base comes from model.*.
    trainable_only = (cfg.get("adapter") or {}).get("name", "none") != "none"
    if s.name == "auto":
        return "auto"
    if s.name == "ddp":
        return DDPStrategy(
            process_group_backend=s.process_group_backend,
            find_unused_parameters=bool(s.find_unused_parameters),
            bucket_cap_mb=s.bucket_cap_mb,
        )
    if s.name == "deepspeed":
        config = deepspeed_config(s, cfg.data.get("batch_size") or 1)
        return DeepSpeedCPUStrategy(config=config, process_group_backend=s.process_group_backend,
                                    exclude_frozen_parameters=trainable_only)
    if s.name == "fsdp2":
        return FSDP2Strategy(
            world_size=world_size(cfg.trainer),
            reshard_after_forward=bool(s.reshard_after_forward), trainable_only=trainable_only,
            save_distributed_checkpoint=bool(s.save_distributed_checkpoint),
            process_group_backend=s.process_group_backend,
        )
    raise ValueError(f"strategy.name={s.name!r}; allowed: {list(STRATEGIES)}")
