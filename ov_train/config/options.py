"""Small settings objects of the run plan that the lower layers take as they are: how data reads retry, the
batches' token budget, and the parallel world and precision the trainer runs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from ov_train.utils.cpus import cpus_per_process


@dataclass
class IOSettings:
    """`data.io.*`: reads of shards and parquet files (local, https://, s3://, gs://, hf://, pipe:). A failed read is
    retried `retries` times (waiting backoff_s, then twice that, ...); a shard still unreadable is skipped and
    counted (data/skipped_shard_unreadable). timeout_s bounds each connect and read, so a dead server cannot hang
    the run."""

    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    def problems(self) -> list[str]:
        problems = [] if self.retries >= 0 else [
            f"data.io.retries={self.retries!r} must be an integer >= 0 (attempts after a failed read)"]
        problems += [f"data.io.{key}={getattr(self, key)!r} must be a finite number >= 0 (seconds)"
                     for key in ("backoff_s", "timeout_s") if not 0 <= getattr(self, key) < math.inf]
        return problems + (["data.io.timeout_s=0 would fail every request; give seconds > 0"] if self.timeout_s == 0 else [])


@dataclass(frozen=True)
class TokenBudget:
    """What closes a batch: padded tokens (samples x longest) and/or samples; the plan ensures one is set."""

    max_tokens: int | None = None  # padded tokens per batch; None: no token limit
    max_samples: int | None = None  # samples per batch; None: no sample limit

    def admits(self, count: int, longest: int, length: int) -> bool:
        """Whether a batch of `count` samples, the longest `longest` tokens, takes one more of `length`.
        An empty batch takes anything, so a sample over the budget goes alone."""
        if count == 0:
            return True
        n = count + 1
        tokens_ok = self.max_tokens is None or n * max(longest, length) <= self.max_tokens
        return tokens_ok and (self.max_samples is None or n <= self.max_samples)

    def full(self, count: int, longest: int) -> bool:
        """No further sample can join: even one no longer than the longest would break the budget."""
        return not self.admits(count, longest, 1)


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


# Loader workers per process at most when data.num_workers is null: decoding beyond that rarely keeps up with
# anything but the largest batches, and each worker holds its own copy of the stream's buffers.
AUTO_MAX_WORKERS = 4


@dataclass(frozen=True)
class CpuShare:
    """How one training process uses the CPUs it may use (ov_train.utils.cpus: affinity, cgroup quota, SLURM,
    shared with the run's other processes on the node): loader workers (each one a process, one thread) and torch's
    intra-op threads for the rest. Threads or workers sized by the machine's core count oversubscribe a shared
    machine: spinning OpenMP threads of a process that cannot run them all at once made a run 15x slower."""

    cpus: int
    workers: int
    threads: int
    auto_workers: bool  # data.num_workers was null

    def describe(self) -> str:
        how = "sized from them" if self.auto_workers else "data.num_workers"
        return (f"CPUs: {self.cpus} usable by this process; {self.workers} loader worker(s) ({how}),"
                f" {self.threads} torch thread(s)")


def cpu_share(num_workers: int | None, local_processes: int, cpus: int | None = None) -> CpuShare:
    """Workers: data.num_workers, or (null) half the process's CPUs up to AUTO_MAX_WORKERS; threads: the CPUs
    the workers leave, at least one."""
    cpus = cpus if cpus is not None else cpus_per_process(local_processes)
    workers = num_workers if num_workers is not None else min(AUTO_MAX_WORKERS, cpus // 2)
    return CpuShare(cpus=cpus, workers=workers, threads=max(1, cpus - workers), auto_workers=num_workers is None)


def world_size(trainer_cfg) -> int:
    return devices_per_node(trainer_cfg.devices, str(trainer_cfg.accelerator)) * int(trainer_cfg.num_nodes)


def default_precision(trainer_cfg, strategy_name: str, on_gpu: bool | None = None) -> str:
    """trainer.precision when the config leaves it null.

    One GPU: bf16 weights with fp32 masters in the optimizer (ov_train.training.optim), so no autocast
    re-casts. Several: bf16-mixed, so DDP reduces fp32 gradients, and DeepSpeed and FSDP2 (bf16 compute on
    fp32 shards) keep fp32 weights of their own. CPU: fp32. `on_gpu`: whether the run has GPUs (None: this
    machine's answer; the planner asks about the GPUs it plans for).
    """
    if on_gpu is None:
        on_gpu = trainer_cfg.accelerator != "cpu" and torch.cuda.is_available()
    if not on_gpu:
        return "32-true"
    one_gpu = world_size(trainer_cfg) == 1
    return "bf16-true" if one_gpu and strategy_name == "auto" else "bf16-mixed"


def in_half(precision: str | None) -> bool:
    """Whether trainer.precision computes in bf16/fp16 (None: assume so)."""
    return precision is None or str(precision).startswith(("bf16", "16"))
