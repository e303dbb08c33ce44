"""Value checks of the composed config, run before any work; every problem is a line that names its key.

The schema (config/schema.py) has already refused unknown keys and wrong types; these are the values a
type cannot rule out: a negative learning rate, a template that does not exist, a strategy that needs GPUs.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from ov_train.config.options import devices_per_node, in_half, world_size
from ov_train.constants import NONFINITE, VARLEN

STRATEGIES = ("auto", "ddp", "deepspeed", "fsdp2")
LOGGERS = ("wandb", "csv", "tensorboard", "mlflow", "none")
WANDB_MODES = ("offline", "online", "disabled")
# What the dashboards beyond W&B and CSV import (any one of them), installed with the `loggers` extra.
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


def missing_package(kind: str) -> str | None:
    """The package `logger=kind` needs and lacks here, or None."""
    from importlib.util import find_spec

    needed = LOGGER_PACKAGES.get(kind, ())
    return needed[0] if needed and not any(find_spec(name) for name in needed) else None


def missing_problems(cfg) -> list[str]:
    """Mandatory values (`???`) nobody set; the other checks need them, so these come alone."""
    return [f"{key} is required: set {key}=VALUE, or choose a config that sets it" for key in sorted(OmegaConf.missing_keys(cfg))]


def added_key_problems(node, where: str = "") -> list[str]:
    """Keys added with `+key=value` where the schema has no such setting (composition lets `+` through on purpose:
    for Lightning Trainer arguments, which trainer_problems checks, and for stage.parts, which StageConfig does)."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind) or kind.__name__ == "TrainerConfig":
        return []
    fields = [f.name for f in dataclasses.fields(kind)]
    problems = [f"{where}{key}: no such setting; allowed: {fields}" for key in node if key not in fields]
    for key in node:
        if key in fields and OmegaConf.is_config(node._get_node(key)) and not node._get_node(key)._is_missing():
            problems += added_key_problems(node[key], f"{where}{key}.")
    return problems


MODEL_PATHS = ("pretrained", "vision_tower", "llm", "init_from", "tokenizer")


def missing_paths(named: dict[str, str | None]) -> dict[str, str]:
    """The paths of `named` (config key -> path, None: unset) that do not exist. Every model path is a local one
    (there is no hub here): transformers would take a missing one for a hub repo id and say so instead."""
    return {key: str(path) for key, path in named.items() if path and not Path(path).exists()}


def model_problems(model) -> list[str]:
    missing = missing_paths({f"model.{key}": model.get(key) for key in MODEL_PATHS})
    problems = [f"{key}={path!r}: path does not exist" for key, path in missing.items()]
    if bool(model.vision_tower) != bool(model.llm):
        problems.append("model.vision_tower and model.llm: give both (SigLIP + Qwen2 route) or neither")
    has_weights = any(model.get(k) for k in ("pretrained", "vision_tower", "init_from"))
    if not has_weights and not model.random_init:
        problems.append(
            f"model={model.name}: needs weights: model.pretrained=DIR, or model.vision_tower=DIR model.llm=DIR,"
            " or model.init_from=DIR (model.random_init=true trains the geometry from scratch)"
        )
    problems += geometry_problems(model)
    return problems + ([] if missing else checkpoint_geometry_problems(model))


# What makes a checkpoint another model than the `model=` config's geometry: the tower's and the LLM's shapes. (Not
# the vocabulary, which grows by the media tokens, nor the tower's layer count: OneVision drops SigLIP's last layer.)
GEOMETRY_KEYS = {
    "vision": ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size"),
    "text": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"),
}


def checkpoint_geometry_problems(model) -> list[str]:
    """A OneVision directory (model.pretrained, or an export as model.init_from) whose config.json is another
    geometry than `model=`'s: the run would train the checkpoint's model under the config's name. Reads config.json
    only; a directory without one is left to the build to name."""
    key = "init_from" if model.get("init_from") else "pretrained"
    directory = model.get(key)
    config_file = Path(directory) / "config.json" if directory else None
    if config_file is None or not config_file.is_file():
        return []
    try:
        found = json.loads(config_file.read_text())
    except ValueError:
        return []
    differs = []
    for part in ("vision", "text"):
        held = found.get(f"{part}_config") or {}
        for name in GEOMETRY_KEYS[part]:
            want = model[part].get(name)
            if want is not None and name in held and held[name] != want:
                differs.append(f"{part} {name} {held[name]} (model={model.name}: {want})")
    if not differs:
        return []
    return [f"model.{key}={str(directory)!r} is another geometry than model={model.name}: {', '.join(differs)};"
            " choose the model= config of that checkpoint (e.g. model=tiny for a tiny one)"]


def geometry_problems(model) -> list[str]:
    """The tower's and the LLM's sizes: positive, and heads that split the width (Q, then K/V, groups)."""
    problems = []
    for part in ("vision", "text"):
        for key, value in model[part].items():
            if isinstance(value, int) and not isinstance(value, bool):
                problems += at_least(f"model.{part}.{key}", value, 1, "a size of the model's geometry")
    if problems:
        return problems
    splits = [("vision", "num_attention_heads", "hidden_size"), ("text", "num_attention_heads", "hidden_size"),
              ("text", "num_key_value_heads", "num_attention_heads")]
    for part, divisor, whole in splits:
        if model[part][whole] % model[part][divisor]:
            problems.append(f"model.{part}.{divisor}={model[part][divisor]} must divide model.{part}.{whole}="
                            f"{model[part][whole]}")
    return problems


def strategy_problems(strategy, trainer) -> list[str]:
    """The strategy against the trainer's devices and launcher (its own values: StrategyConfig.problems)."""
    name = strategy.name
    if name not in STRATEGIES:
        return []
    problems = []
    devices = trainer.devices
    counted = isinstance(devices, int) and not isinstance(devices, bool) and devices > 0 or OmegaConf.is_list(devices) and len(devices) > 0
    if name == "fsdp2" and not counted:
        problems.append(f"trainer.devices={devices!r}: strategy=fsdp2 needs a device count (or list) to size its mesh")
    if name != "auto" and strategy.get("process_group_backend") == "nccl" and trainer.accelerator == "cpu":
        problems.append("strategy.process_group_backend=nccl needs GPUs; with trainer.accelerator=cpu use gloo (or null)")
    return problems + launcher_problems(trainer)


def launcher_tasks() -> int | None:
    """How many processes the submitit job running this process started (hydra/launcher=local, submitit_local or
    slurm); None outside such a job."""
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if executor == "local":
        return int(os.environ["SUBMITIT_LOCAL_NTASKS"])
    if executor == "slurm":
        return int(os.environ["SLURM_NTASKS"])
    return None


def multirun():
    """This job's Hydra config inside a multirun (-m), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get() if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN else None


def launcher_problems(trainer_cfg) -> list[str]:
    """What keeps Lightning from adopting this job's processes (reported before any work)."""
    tasks, processes = launcher_tasks(), world_size(trainer_cfg)
    if tasks is None and processes > 1 and multirun() is not None and not ({"LOCAL_RANK", "SLURM_NTASKS"} & os.environ.keys()):
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


def precision_problems(precision: str, cfg) -> list[str]:
    problems = []
    if precision in ("16-true", "16"):
        problems.append(
            f"trainer.precision={precision}: fp16 weights without loss scaling underflow; use bf16-true (fp32 master"
            " weights in the optimizer), bf16-mixed or 16-mixed"
        )
    strategy = cfg.strategy.name
    if strategy == "fsdp2" and precision == "bf16-true":
        problems.append(
            "trainer.precision=bf16-true with strategy=fsdp2 would shard bf16 weights with no fp32 copy; use"
            " bf16-mixed, under which FSDP2 computes in bf16 from fp32 shards"
        )
    if cfg.model.attn_implementation == VARLEN and not in_half(precision):
        problems.append(f"model.attn_implementation={VARLEN} runs in bf16/fp16 only: set trainer.precision=bf16-true or bf16-mixed")
    if cfg.model.compile and strategy == "deepspeed" and cfg.strategy.stage == 3:
        problems.append("model.compile=true with ZeRO-3: its per-module weight gathering breaks the graphs; use fsdp2 or ZeRO-2")
    return problems


def at_least(key: str, value, minimum: int, meaning: str, nullable: bool = False) -> list[str]:
    if (nullable and value is None) or (value is not None and value >= minimum):
        return []
    allowed = f"an integer >= {minimum}" + (" or null" if nullable else "")
    return [f"{key}={value!r} must be {allowed} ({meaning})"]


def step_problems(data, trainer, unit: str | None, sequence_parallel: int = 1) -> list[str]:
    """data.samples_per_step and data.epochs (`unit`: what the recipe's numbers are, None when it did not read;
    `sequence_parallel`: ranks that share their batches, strategy.sequence_parallel)."""
    per_step, epochs = data.samples_per_step, data.epochs
    problems = []
    if per_step is not None:
        world = world_size(trainer) // max(1, sequence_parallel)
        if per_step < 1:
            problems.append(f"data.samples_per_step={per_step!r} must be an integer >= 1 (a global batch in samples) or null")
        elif per_step % world:
            problems.append(
                f"data.samples_per_step={per_step} does not divide over {world} processes (trainer.num_nodes x"
                f" trainer.devices); every rank takes the same share: use a multiple of {world}" if sequence_parallel <= 1
                else f"data.samples_per_step={per_step} does not divide over {world} data-parallel groups (trainer.num_nodes"
                f" x trainer.devices / strategy.sequence_parallel); every group takes the same share: use a multiple of"
                f" {world}"
            )
    if epochs is not None:
        if not 0 < epochs < math.inf:
            problems.append(f"data.epochs={epochs!r} must be a number > 0 or null")
        elif per_step is None:
            problems.append("data.epochs needs data.samples_per_step (steps = epochs x samples / samples_per_step)")
        elif unit == "weight":
            problems.append(
                f"data.epochs needs sample counts: recipe {data.recipe!r} gives weights; give each source"
                " `samples: N`, or set trainer.max_steps instead of data.epochs"
            )
    return problems


def world_problems(trainer) -> list[str]:
    """trainer.devices and trainer.num_nodes, which the other checks count the world from, so these come alone."""
    try:
        per_node = devices_per_node(trainer.devices, "cpu")
    except (TypeError, ValueError):
        per_node = 0
    problems = [] if per_node >= 1 else [
        f"trainer.devices={trainer.devices!r} must be a positive count, -1 or auto (every visible GPU), or a list"
        " of device indices"
    ]
    return problems + at_least("trainer.num_nodes", trainer.num_nodes, 1, "machines of the run")


def _val_check_problems(interval) -> list[str]:
    """null, a number of optimizer steps, or Lightning's time-based 'DD:HH:MM:SS' (or timedelta kwargs); a fraction
    of an epoch means nothing to a stream without epochs."""
    if interval is None or (isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1):
        return []
    if isinstance(interval, str) or OmegaConf.is_dict(interval):
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from ov_train.utils.lightning_internals import time_interval_seconds

        try:
            if time_interval_seconds(OmegaConf.to_container(interval) if OmegaConf.is_dict(interval) else interval) > 0:
                return []
        except (TypeError, ValueError, MisconfigurationException):
            pass
    return [f"trainer.val_check_interval={interval!r} must be a number of optimizer steps (an integer >= 1), a"
            " duration ('DD:HH:MM:SS') or null (once, at the end)"]


def trainer_problems(trainer, precision: str) -> list[str]:
    """Values Lightning would refuse (or divide by) only once the data and the model are built."""
    problems = []
    from ov_train.utils.lightning_internals import trainer_precisions

    if precision not in trainer_precisions():
        problems.append(f"trainer.precision={precision!r}; allowed: {trainer_precisions()} or null")
    if trainer.accumulate_grad_batches != 1:
        # Every step is taken by hand (training/step.py), which Lightning's own accumulation does not serve.
        problems.append(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches!r}: must be 1; a larger"
                        " optimizer step is data.samples_per_step (a global batch in samples, accumulated over"
                        " token-budget micro-batches)")
    problems += at_least("trainer.log_every_n_steps", trainer.log_every_n_steps, 1, "steps between metrics lines")
    problems += _val_check_problems(trainer.val_check_interval)
    clip = trainer.gradient_clip_val
    if clip is not None and not clip >= 0:  # a negative norm would flip every gradient's sign
        problems.append(f"trainer.gradient_clip_val={clip!r} must be a number >= 0 (0: no clipping) or null")
    if trainer.max_steps < 1:
        problems.append(f"trainer.max_steps={trainer.max_steps!r} must be a positive integer (training streams have no epochs)")
    # Only to read its signature: keys added with +trainer.NAME.
    from lightning.pytorch import Trainer

    arguments = inspect.signature(Trainer).parameters
    unknown = sorted(set(trainer) - set(arguments))
    if unknown:
        close = difflib.get_close_matches(unknown[0], arguments, n=3)
        problems.append(f"trainer.{unknown[0]}: not a Lightning Trainer argument" + (f" (nor {unknown[1:]})" if unknown[1:] else "")
                        + (f"; did you mean {', '.join(f'trainer.{c}' for c in close)}?" if close else ""))
    return problems


def run_problems(cfg) -> list[str]:
    wrong = [] if cfg.nonfinite in NONFINITE else [f"nonfinite={cfg.nonfinite!r}; allowed: {list(NONFINITE)}"]
    return wrong + at_least("seed", cfg.seed, 0, "it seeds the model, the data streams and the synthetic data")
