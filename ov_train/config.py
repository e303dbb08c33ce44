"""Checks on the composed config, run before any work; every problem is reported at once, by key."""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ov_train.data.recipe import RecipeError, load_recipe
from ov_train.data.remote import IOSettings, io_problems, redact
from ov_train.data.synthetic import MIN_PX as MIN_SYNTHETIC_PX
from ov_train.data.synthetic import SYNTHETIC, occupied, synthetic_root
from ov_train.model.adapters import adapter_problems
from ov_train.model.forward import ForwardOptions
from ov_train.model.parts import PARTS
from ov_train.strategies import STRATEGIES, default_precision, launcher_problems
from ov_train.text.template import TEMPLATES
from ov_train.training.loggers import LOGGERS, missing_package
from ov_train.training.module import NONFINITE

WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(ValueError):
    pass


def _stage_problems(stage) -> list[str]:
    problems = []
    for part, lr in (stage.get("parts") or {}).items():
        if part not in PARTS:
            problems.append(f"stage.parts.{part}: no such part; allowed: {sorted(PARTS)}")
        elif not isinstance(lr, (int, float)) or lr < 0:
            problems.append(f"stage.parts.{part}={lr!r}: learning rate must be a number >= 0 (0 freezes the part)")
    if not any(isinstance(v, (int, float)) and v > 0 for v in (stage.get("parts") or {}).values()):
        problems.append("stage.parts: no part has a learning rate > 0, so nothing would train")
    if stage.get("template") not in TEMPLATES:
        problems.append(f"stage.template={stage.get('template')!r}; allowed: {list(TEMPLATES)}")
    strategy = str(stage.get("image_strategy"))
    if strategy != "single_crop" and not re.fullmatch(r"anyres_max_\d+", strategy):
        problems.append(f"stage.image_strategy={strategy!r}; allowed: single_crop, anyres_max_N (e.g. anyres_max_9)")
    for key in ("max_length", "max_frames"):
        if not isinstance(stage.get(key), int) or stage.get(key) < 1:
            problems.append(f"stage.{key}={stage.get(key)!r} must be a positive integer")
    if not 0 <= float(stage.get("warmup_ratio", 0)) < 1:
        problems.append(f"stage.warmup_ratio={stage.get('warmup_ratio')!r} must be in [0, 1)")
    return problems


def _model_problems(model) -> list[str]:
    problems = []
    for key in ("pretrained", "vision_tower", "llm", "init_from", "tokenizer"):
        value = model.get(key)
        if value and not Path(value).exists():
            problems.append(f"model.{key}={value!r}: path does not exist")
    if bool(model.get("vision_tower")) != bool(model.get("llm")):
        problems.append("model.vision_tower and model.llm: give both (SigLIP + Qwen2 route) or neither")
    has_weights = any(model.get(k) for k in ("pretrained", "vision_tower", "init_from"))
    if not has_weights and not model.get("random_init"):
        problems.append(
            f"model={model.get('name')}: needs weights: model.pretrained=DIR, or model.vision_tower=DIR model.llm=DIR,"
            " or model.init_from=DIR (model.random_init=true trains the geometry from scratch)"
        )
    return problems


def _strategy_problems(strategy, trainer) -> list[str]:
    name = strategy.get("name")
    if name not in STRATEGIES:
        configs = "auto, ddp, deepspeed_zero2[_offload], deepspeed_zero3[_offload], fsdp2"
        return [f"strategy.name={name!r}; allowed: {list(STRATEGIES)} (strategy={configs})"]
    problems = []
    if name == "deepspeed":
        if strategy.stage not in (1, 2, 3):
            problems.append(f"strategy.stage={strategy.stage!r}; allowed: 1, 2, 3 (ZeRO stages)")
        if strategy.offload_parameters and strategy.stage != 3:
            problems.append(
                f"strategy.offload_parameters=true needs strategy.stage=3 (ZeRO-{strategy.stage} does not shard weights)"
            )
    devices = trainer.devices
    counted = isinstance(devices, int) and devices > 0 or OmegaConf.is_list(devices) and len(devices) > 0
    if name == "fsdp2" and not counted:
        problems.append(f"trainer.devices={devices!r}: strategy=fsdp2 needs a device count (or list) to size its mesh")
    if name != "auto" and strategy.get("process_group_backend") == "nccl" and trainer.accelerator == "cpu":
        problems.append("strategy.process_group_backend=nccl needs GPUs; with trainer.accelerator=cpu use gloo (or null)")
    return problems + launcher_problems(trainer)


def _precision_problems(precision: str, cfg) -> list[str]:
    problems = []
    if precision in ("16-true", "16"):
        problems.append(
            f"trainer.precision={precision}: fp16 weights without loss scaling underflow; use bf16-true (fp32 master"
            " weights in the optimizer), bf16-mixed or 16-mixed"
        )
    strategy = cfg.strategy.get("name")
    if strategy == "fsdp2" and precision == "bf16-true":
        problems.append(
            "trainer.precision=bf16-true with strategy=fsdp2 would shard bf16 weights with no fp32 copy; use"
            " bf16-mixed, under which FSDP2 computes in bf16 from fp32 shards"
        )
    if cfg.model.get("compile") and strategy == "deepspeed" and cfg.strategy.get("stage") == 3:
        problems.append("model.compile=true with ZeRO-3: its per-module weight gathering breaks the graphs; use fsdp2 or ZeRO-2")
    return problems


def _int_problem(key: str, value, minimum: int, meaning: str, nullable: bool = False) -> list[str]:
    if nullable and value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return []
    allowed = f"an integer >= {minimum}" + (" or null" if nullable else "")
    return [f"{key}={value!r} must be {allowed} ({meaning})"]


def _stream_problems(data, seed) -> list[str]:
    return (
        _int_problem("data.num_workers", data.get("num_workers"), 0, "loader processes per rank; 0 loads in the main one")
        + _int_problem("data.shuffle_buffer", data.get("shuffle_buffer"), 1, "raw samples per shuffled block")
        + _int_problem("data.val_samples", data.get("val_samples"), 1, "held-out samples per source; null: all", True)
        + _int_problem("data.max_skips_in_a_row", data.get("max_skips_in_a_row"), 1,
                       "unusable samples in a row that stop the stream")
        + _int_problem("seed", seed, 0, "it seeds the model, the data streams and the synthetic data")
        + io_problems(data.get("io"))
    )


def _synthetic_problems(data, seed) -> tuple[list[str], Path]:
    """Problems of data.synthetic and of an explicit data.root, and where the shards will be."""
    settings = data.get("synthetic") or {}
    minimums = {"train_per_subset": 1, "val_per_subset": 1, "image_px": MIN_SYNTHETIC_PX}
    problems = [f"data.synthetic.{key}: no such setting; allowed: {list(minimums)}" for key in settings
                if key not in minimums]
    for key, minimum in minimums.items():
        problems += _int_problem(f"data.synthetic.{key}", settings.get(key), minimum, "synthetic data settings")
    if problems:
        return problems, Path(data.get("root") or ".")  # enough for the recipe's structure
    kwargs = dict(settings, seed=seed)
    root = synthetic_root(data.get("root"), **kwargs)
    occupant = occupied(root, **kwargs) if data.get("root") else None
    if occupant:
        problems.append(f"data.root={str(data.root)!r}: {occupant}; choose another, or data.root=null for a cache"
                        " directory per setting")
    return problems, root


def _data_problems(data, seed) -> list[str]:
    problems = _stream_problems(data, seed)
    if data.get("name") == SYNTHETIC:
        # Its shards are generated after validation (in a directory per setting unless data.root says where).
        more, root = _synthetic_problems(data, seed)
        problems += more
        require_shards = False
    elif OmegaConf.is_missing(data, "root") or not data.get("root"):
        return problems + [
            f"data.root is required for data={data.get('name')}: the directory the recipe's sources are relative to"
        ]
    else:
        root, require_shards = data.root, True
    recipe_budget = None
    try:
        recipe_budget = load_recipe(str(data.recipe), root, require_shards=require_shards,
                                    io=IOSettings.from_config(data.get("io")) if not io_problems(data.get("io"))
                                    else IOSettings()).max_tokens_per_batch
    except RecipeError as err:
        where = f"data.recipe={data.recipe} (data.root={redact(str(root))})"
        problems += [p if p.startswith("data.recipe") else f"{where}: {p}" for p in err.problems]
    budget, batch = data.get("max_tokens_per_batch"), data.get("batch_size")
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        problems.append(f"data.max_tokens_per_batch={budget!r} must be a positive integer or null")
    if batch is None and budget is None and recipe_budget is None:
        problems.append("data.batch_size and data.max_tokens_per_batch are both null (nor does the recipe set a budget)")
    elif batch is not None and (not isinstance(batch, int) or batch < 1):
        problems.append(f"data.batch_size={batch!r} must be a positive integer or null (with a token budget)")
    return problems


def _checkpoint_problems(ckpt) -> list[str]:
    if ckpt is None:
        return ["checkpoint: missing (every_n_steps, every_minutes, keep, trust)"]
    problems = []
    steps, minutes, keep = ckpt.get("every_n_steps"), ckpt.get("every_minutes"), ckpt.get("keep")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        problems.append(f"checkpoint.every_n_steps={steps!r} must be a positive integer or null (off)")
    if minutes is not None and (not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0):
        problems.append(f"checkpoint.every_minutes={minutes!r} must be a positive number or null (off)")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        problems.append(f"checkpoint.keep={keep!r} must be an integer >= 0 (earlier checkpoints kept besides last.ckpt)")
    if not isinstance(ckpt.get("trust"), bool):
        problems.append(f"checkpoint.trust={ckpt.get('trust')!r} must be true or false")
    return problems


def validate(cfg: DictConfig) -> None:
    problems = _stage_problems(cfg.stage) + _model_problems(cfg.model) + _strategy_problems(cfg.strategy, cfg.trainer)
    problems += _data_problems(cfg.data, cfg.get("seed")) + _checkpoint_problems(cfg.get("checkpoint"))
    problems += adapter_problems(cfg.get("adapter"), dict(cfg.stage.get("parts") or {}), cfg.strategy,
                                 str(cfg.trainer.accelerator))
    if cfg.get("nonfinite") not in NONFINITE:
        problems.append(f"nonfinite={cfg.get('nonfinite')!r}; allowed: {list(NONFINITE)}")
    peak = cfg.metrics.get("peak_tflops")
    if not isinstance(peak, (int, float)) or peak <= 0:
        problems.append(f"metrics.peak_tflops={peak!r} must be a positive number (the device's peak TFLOP/s)")
    precision = cfg.trainer.get("precision") or default_precision(cfg)
    problems += _precision_problems(str(precision), cfg)
    try:
        ForwardOptions.from_config(cfg.model, precision)
    except ValueError as err:
        problems += [line.strip() for line in str(err).splitlines()[1:]]
    if cfg.logger.name not in LOGGERS:
        problems.append(f"logger.name={cfg.logger.name!r}; allowed: {list(LOGGERS)}")
    elif package := missing_package(cfg.logger.name):
        problems.append(f"logger={cfg.logger.name} needs the {package} package: pip install 'ov_train[loggers]'")
    if cfg.logger.name == "wandb" and cfg.logger.get("mode") not in WANDB_MODES:
        problems.append(f"logger.mode={cfg.logger.get('mode')!r}; allowed: {list(WANDB_MODES)}")
    steps = cfg.trainer.get("max_steps")
    if not isinstance(steps, int) or steps < 1:
        problems.append(f"trainer.max_steps={steps!r} must be a positive integer (training streams have no epochs)")
    if cfg.ckpt_path and not Path(cfg.ckpt_path).exists():
        problems.append(f"ckpt_path={cfg.ckpt_path!r}: checkpoint does not exist")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
