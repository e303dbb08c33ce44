"""The run plan: the composed config resolved once into every decision of a run.

`resolve_plan(cfg)` checks every value (config/checks.py, config/adapter.py), converts each setting once (precision,
forward options, recipe and token budget, part learning rates, adapters, strategy, run paths, resume target) and
returns a frozen RunPlan. Everything downstream takes its piece of the plan: model/build.py the ModelPlan, the data
module the DataPlan, the LightningModule the OptimPlan and the model node (`forward`), strategies.py the StrategyPlan.
A config with problems raises ConfigError listing all of them, each by key, before any work.

This module sits on the ground floor of the package: it reads files (the recipe, whether paths exist) but
imports nothing above ov_train.config.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ov_train.checkpoints.paths import last_checkpoint, resume_targets
from ov_train.config import checks
from ov_train.config.adapter import AdapterPlan, adapter_plan, adapter_problems
from ov_train.config.media import ImageSettings, MediaSettings, read_media
from ov_train.config.options import (
    CpuShare,
    TokenBudget,
    cpu_share,
    default_precision,
    devices_per_node,
    in_half,
    world_size,
)
from ov_train.config.parallel import data_parallel_size, sequence_parallel_problems
from ov_train.config.preference import PreferenceSettings, reference_problems
from ov_train.config.recipe import RecipeError, RecipeSpec, pipe_problems, read_recipe, root_problems
from ov_train.config.reproduce import Reproduction
from ov_train.config.schema import CheckpointConfig, DataConfig, EvalConfig, LoggerConfig, MetricsConfig, ModelConfig, StrategyConfig
from ov_train.constants import ADAPTED, FROZEN, PARTS, SYNTHETIC
from ov_train.resources import CONF_DIR
from ov_train.utils.logging import get_logger
from ov_train.utils.redact import redact_text, redact_tree

log = get_logger(__name__)


class ConfigError(ValueError):
    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        return cls("invalid config:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class RunPaths:
    """Everything a run writes, under its run directory."""

    run_dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.last_checkpoint.parent

    @property
    def last_checkpoint(self) -> Path:
        return last_checkpoint(self.run_dir)

    @property
    def export(self) -> Path:
        return self.run_dir / "export"

    @property
    def tokenizer(self) -> Path:
        return self.run_dir / "tokenizer"

    @property
    def predictions(self) -> Path:
        return self.run_dir / "predictions"

    @property
    def summary(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def parameters(self) -> Path:
        return self.run_dir / "parameters.txt"

    @property
    def consumed_keys(self) -> Path:
        return self.run_dir / "consumed_keys.jsonl"

    @property
    def reference(self) -> Path:
        """Precomputed reference log-probabilities (stage.preference.reference=precomputed)."""
        return self.run_dir / "reference"

    @property
    def warm_start(self) -> Path:
        """The SFT warm start a preference run from random weights trains first (run.py: warm_start)."""
        return self.run_dir / "warm_start"

    @property
    def lock(self) -> Path:
        """Held by the run using the directory (ov_train.utils.run_lock)."""
        return self.run_dir / ".ov_train.lock"


@dataclass(frozen=True)
class ModelPlan:
    """How to build the model: `route` is export | checkpoint | pretrained | compose | random."""

    name: str
    route: str
    source: str | None  # what the route reads: init_from, pretrained, or None
    vision_tower: str | None
    llm: str | None
    tokenizer: str | None
    vision: dict  # SiglipVisionConfig keys (random route)
    text: dict  # Qwen2Config keys (random route)
    vision_aspect_ratio: str
    trust_checkpoint: bool = False
    # model.pretrained beside a model.init_from adapter checkpoint: the base its adapters go on, instead of the one
    # the checkpoint records (checkpoints/adapters.py); not part of what a resume compares (base_record).
    base_dir: str | None = None

    def paths(self) -> dict[str, str | None]:
        """The paths this plan builds from, by the config key that names each."""
        source = "model.init_from" if self.route in ("export", "checkpoint") else "model.pretrained"
        named = {source: self.source, "model.vision_tower": self.vision_tower, "model.llm": self.llm,
                 "model.tokenizer": self.tokenizer}
        return {**named, "model.pretrained": self.base_dir} if self.base_dir else named


@dataclass(frozen=True)
class SamplePlan:
    """How a raw sample becomes model input (the stage's text and vision settings)."""

    template: str
    media: MediaSettings  # image strategy and grid, video sampling (per recipe source where it says)
    max_length: int
    decode: str  # data.decode
    placement: str = "front"  # stage.media_placement
    labels: str = "replies"  # stage.labels, as stage.reproduce resolves it (config/reproduce.py)
    plain_newline: str = "apart"  # stage.plain_newline, likewise


@dataclass(frozen=True)
class DataPlan:
    """The data node (config/schema.py DataConfig, or SyntheticDataConfig) and what the run works out from it."""

    config: DataConfig
    recipe: RecipeSpec
    budget: TokenBudget
    samples: SamplePlan
    num_workers: int  # data.num_workers, or the CpuShare's choice when it is null
    seed: int
    samples_per_rank: int | None = None  # data.samples_per_step / data-parallel size: each train item is a step's bundle
    # Consecutive ranks that read the same batches (strategy.sequence_parallel: a group splits each row between them).
    replicas: int = 1
    pairs: bool = False  # stage.preference: samples are preference pairs (ov_train.data.pairs)

    @property
    def synthetic(self) -> dict | None:
        """None: the user's shards (under config.root); else the synthetic data's setting, data.synthetic's keys and
        the run's seed (generated once per setting, under config.root or a cache directory)."""
        settings = getattr(self.config, "synthetic", None)
        return None if settings is None else {**asdict(settings), "seed": self.seed}


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step holds and how its loss is weighed (stage.loss_weighting, data.samples_per_step)."""

    loss_weighting: str
    # A global batch in samples, a bundle of micro-batches (training/step.py); None: every token-budget batch is a step.
    samples_per_step: int | None = None
    # trainer.gradient_clip_val: the norm every step clips to (training/module.py; DeepSpeed's engine by its config);
    # None: no clipping. Steps are taken by hand, so Lightning's Trainer never gets it.
    clip_val: float | None = None
    # trainer.max_steps as data.epochs sets it, and the sum for the log; None: trainer.max_steps as configured.
    derived_max_steps: int | None = None
    max_steps_from: str | None = None


@dataclass(frozen=True)
class OptimPlan:
    part_lrs: dict[str, float]  # every part, learning rate with model.lr_scale applied; 0: frozen (by the adapters too)
    weight_decay: float
    warmup_ratio: float
    total_steps: int
    step: StepPlan
    adapted: tuple[str, ...] = ()  # parts in which only PEFT's tensors train (config/adapter.py), their own frozen
    warmup_schedule: str = "ov_train"  # stage.warmup_schedule, as stage.reproduce resolves it (training/schedule.py)


@dataclass(frozen=True)
class StrategyPlan:
    """The strategy node (config/schema.py: one class per option) and what the run adds to it."""

    config: StrategyConfig
    world_size: int
    micro_batch_size: int = 1  # what DeepSpeed reports per GPU (batches are built in the loader)
    gradient_clipping: float | None = None  # StepPlan.clip_val, which DeepSpeed's engine applies inside its step
    trainable_only: bool = False  # checkpoints hold the trainable tensors only (adapters: the base comes from model.*)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sequence_parallel(self) -> int:
        """Ranks sharing a packed row (config/parallel.py); set up by strategies.py."""
        return self.config.sequence_parallel

    @property
    def settings(self) -> dict:
        """The strategy node's engine keys (all but name and sequence_parallel)."""
        return {k: v for k, v in asdict(self.config).items() if k not in ("name", "sequence_parallel")}


@dataclass(frozen=True)
class LoggerPlan:
    """The logger node and the names this run goes by on the dashboards."""

    config: LoggerConfig
    run_name: str  # `<stage>-<model>`, plus `-<job number>` in a multirun
    group: str  # logger.group, else the sweep directory in a multirun, else the stage
    display_name: str  # the dashboards' name: run_name, plus the job's swept values in a multirun

    @property
    def kind(self) -> str:
        """wandb | csv | tensorboard | mlflow | none"""
        return self.config.name


@dataclass(frozen=True)
class RunPlan:
    stage: str
    model: ModelPlan
    data: DataPlan
    cpus: CpuShare  # loader workers and torch threads of each process
    forward: ModelConfig  # the model node, its attention `auto` decided for this run (ModelConfig.attention)
    optim: OptimPlan
    adapter: AdapterPlan | None  # None: adapter=none
    precision: str
    strategy: StrategyPlan
    trainer: dict  # Lightning Trainer arguments (precision resolved)
    logger: LoggerPlan
    checkpoint: CheckpointConfig
    paths: RunPaths | None  # None outside a run (no run directory)
    ckpt_path: str | None  # the checkpoint to resume, `last` / `auto` resolved
    ckpt_fallbacks: tuple[str, ...]  # `last` / `auto`: the older ones to resume if ckpt_path does not read
    identity: dict  # what a resume must share with the run that wrote the checkpoint
    planner: dict  # the `plan` node: the memory planner's settings (ov_train/planner)
    nonfinite: str
    metrics: MetricsConfig  # the MFU's peak (None: the device's own) and the prediction table's size
    eval: EvalConfig  # whether the prediction table's replies are generated too
    seed: int
    export: bool
    config: dict  # the resolved config, for the dashboards
    # None: the stage trains on conversations; the reference and the warm start are the ones this run uses.
    preference: PreferenceSettings | None = None


def for_device(plan: RunPlan, on_gpu: bool) -> RunPlan:
    """The same run on a machine with GPUs (`on_gpu`) or without: what resolve_plan decides from the machine (the
    default precision, the forward's half precision, what attention `auto` stands for) decided for that one by the
    functions the run uses. The planner's what-if: `ov-train plan plan.device=h100` on a laptop."""
    precision = plan.config["trainer"]["precision"] or default_precision(
        OmegaConf.create(plan.trainer), plan.strategy.name, on_gpu)
    forward = replace(plan.forward, attn_implementation=plan.config["model"]["attn_implementation"])
    forward = replace(forward, attn_implementation=forward.attention(in_half(precision), on_gpu))
    return replace(plan, precision=precision, forward=forward, trainer={**plan.trainer, "precision": precision})


def run_identity(cfg: DictConfig, max_steps: int | None = None, adapter: AdapterPlan | None = None) -> dict:
    """What a resume must share with the run that wrote the checkpoint (kept in its `ov_train` metadata);
    `max_steps`: the plan's, when data.epochs derived it; with adapters, their settings and the base they sit on."""
    identity = {
        "stage": cfg.stage.name,
        "model": cfg.model.name,
        "geometry": OmegaConf.to_container(OmegaConf.masked_copy(cfg.model, ["vision", "text"]), resolve=True),
        "max_steps": max_steps or cfg.trainer.max_steps,
        "seed": cfg.seed,  # the data order, the shuffle buffers and dropout follow it
    }
    if adapter:
        identity.update(adapter=adapter.settings(), base=adapter.base)
    return identity


def model_plan(model, trust: bool = False, image: ImageSettings | None = None) -> ModelPlan:
    """The build route of a `model` node, in the order a user would expect: an earlier stage's export or checkpoint,
    a OneVision checkpoint, a SigLIP tower + a Qwen2 LLM, random weights. With the stage's `image` settings, the
    model is built with the anyres_max_N it trains with (its own model.vision_aspect_ratio otherwise)."""
    if model.init_from:
        route = "export" if (Path(model.init_from) / "config.json").is_file() else "checkpoint"
    elif model.pretrained:
        route = "pretrained"
    elif model.vision_tower and model.llm:
        route = "compose"
    else:
        route = "random"
    text = {k: v for k, v in OmegaConf.to_container(model.text, resolve=True).items() if v is not None}
    return ModelPlan(
        name=model.name, route=route, source=model.init_from or model.pretrained, vision_tower=model.vision_tower,
        llm=model.llm, tokenizer=model.tokenizer, vision=OmegaConf.to_container(model.vision, resolve=True),
        text=text, trust_checkpoint=trust,
        vision_aspect_ratio=image.vision_aspect_ratio(model.vision_aspect_ratio) if image else model.vision_aspect_ratio,
        base_dir=model.pretrained if model.init_from else None,
    )


def _recipe(data, machine: bool = True) -> tuple[RecipeSpec | None, list[str]]:
    try:
        spec, problems = read_recipe(str(data.recipe))
    except RecipeError as err:
        spec, problems = None, err.problems
    if spec and not data.allow_pipe:
        problems += pipe_problems(spec)
    where = f"data.recipe={data.recipe}"
    problems = [p if p.startswith("data.recipe") else f"{where}: {p}" for p in problems]
    # Synthetic sources start in the generated data set; where the user's shards are is the run machine's question.
    if spec and machine and data.name != SYNTHETIC:
        problems += root_problems(spec, data.root)
    if spec and data.batch_size is None and data.max_tokens_per_batch is None and spec.max_tokens_per_batch is None:
        problems.append("data.batch_size and data.max_tokens_per_batch are both null (nor does the recipe set a budget)")
    return spec, problems


def run_cpu_share(cfg: DictConfig) -> CpuShare:
    """Each process's share of the node's usable CPUs: the run starts trainer.devices processes per node."""
    return cpu_share(cfg.data.num_workers, devices_per_node(cfg.trainer.devices, str(cfg.trainer.accelerator)))


def data_plan(cfg: DictConfig, spec: RecipeSpec, media: MediaSettings, cpus: CpuShare) -> DataPlan:
    data, stage = cfg.data, cfg.stage
    # The data config's budget wins over the recipe's.
    budget = TokenBudget(data.max_tokens_per_batch or spec.max_tokens_per_batch, data.batch_size)
    fidelity = Reproduction.from_stage(stage)
    samples = SamplePlan(stage.template, media, stage.max_length, data.decode, stage.media_placement, fidelity.labels,
                         fidelity.plain_newline)
    parallel = data_parallel_size(cfg.strategy, world_size(cfg.trainer))
    per_rank = data.samples_per_step // parallel if data.samples_per_step else None
    return DataPlan(
        config=OmegaConf.to_object(data), recipe=spec, budget=budget, samples=samples, num_workers=cpus.workers, seed=cfg.seed,
        samples_per_rank=per_rank, replicas=cfg.strategy.sequence_parallel, pairs=stage.preference is not None,
    )


def step_plan(cfg: DictConfig, spec: RecipeSpec | None) -> StepPlan:
    """The step's contents; with data.epochs, trainer.max_steps = ceil(epochs x the recipe's samples / samples_per_step)."""
    data = cfg.data
    steps, max_steps_from = None, None
    if data.epochs is not None and spec is not None:
        samples = sum(int(s.weight) for s in spec.sources)
        steps = max(1, math.ceil(data.epochs * samples / data.samples_per_step))
        max_steps_from = (f"trainer.max_steps = ceil({data.epochs:g} epoch(s) x {samples} samples (recipe {spec.name})"
                          f" / {data.samples_per_step} samples per step) = {steps}")
    return StepPlan(cfg.stage.loss_weighting, data.samples_per_step, cfg.trainer.gradient_clip_val or None, steps,
                    max_steps_from)


def max_steps(cfg: DictConfig, step: StepPlan) -> int:
    """trainer.max_steps, or what data.epochs derived from it."""
    return step.derived_max_steps or cfg.trainer.max_steps


def stage_lrs(cfg: DictConfig) -> dict[str, float]:
    """Every part's learning rate as the stage gives it, model.lr_scale applied; 0: frozen."""
    return {p: float(cfg.stage.parts.get(p) or 0.0) * cfg.model.lr_scale for p in PARTS}


def base_record(model: ModelPlan, seed: int) -> dict:
    """What an adapter run's frozen base is, for resumes and ov-export to rebuild it (checkpoints/adapters.py): the
    model plan with its paths made absolute (trusting a checkpoint is the reader's choice), and the seed."""
    node = asdict(model)
    node.pop("trust_checkpoint")
    node.pop("base_dir")
    for key in ("source", "vision_tower", "llm", "tokenizer"):
        if node[key]:
            node[key] = str(Path(node[key]).resolve())
    return {"model": node, "seed": seed}


def run_adapter_plan(cfg: DictConfig) -> AdapterPlan | None:
    """The run's adapters against its stage (None under adapter=none); the values were checked by resolve_plan."""
    return adapter_plan(cfg.adapter, stage_lrs(cfg), base_record(model_plan(cfg.model), cfg.seed))


def optim_plan(cfg: DictConfig, adapter: AdapterPlan | None = None, step: StepPlan | None = None) -> OptimPlan:
    """The stage's learning rates and schedule; parts the adapters freeze get 0."""
    step = step or step_plan(cfg, None)
    part_lrs = adapter.part_lrs(stage_lrs(cfg)) if adapter else stage_lrs(cfg)
    return OptimPlan(part_lrs, cfg.stage.weight_decay, cfg.stage.warmup_ratio, max_steps(cfg, step), step,
                     adapter.adapted if adapter else (), Reproduction.from_stage(cfg.stage).warmup_schedule)


def strategy_plan(cfg: DictConfig, adapter: AdapterPlan | None = None, step: StepPlan | None = None) -> StrategyPlan:
    step = step or step_plan(cfg, None)
    return StrategyPlan(OmegaConf.to_object(cfg.strategy), world_size(cfg.trainer), cfg.data.batch_size or 1,
                        step.clip_val, trainable_only=adapter is not None)


def swept_overrides(hydra) -> list[str]:
    """This multirun job's overrides of the keys the sweep varies (`key=value`), in command-line order.

    A job only sees its own overrides; which keys were swept (`k=a,b`, ranges, choices, or the sweeper's
    `params`) is in the sweep's multirun.yaml, which Hydra writes before it launches any job.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        sweep = OmegaConf.load(Path(hydra.sweep.dir) / "multirun.yaml").hydra
    except OSError:
        return []
    parser = OverridesParser.create()
    swept = {o.key_or_group for o in parser.parse_overrides(list(sweep.overrides.task)) if o.is_sweep_override()}
    swept |= set(sweep.sweeper.get("params") or {})
    return [o.input_line for o in parser.parse_overrides(list(hydra.overrides.task)) if o.key_or_group in swept]


def logger_plan(cfg: DictConfig) -> LoggerPlan:
    """Runs are named `<stage>-<model>`, plus `-<job number>` inside a Hydra multirun, where the dashboards' run
    names also carry the job's values of the swept keys (`onevision-tiny-1 stage.parts.llm=2e-5`). They are grouped
    by the sweep directory in a multirun (every job of one sweep side by side), else by stage, unless logger.group
    says otherwise (MLflow, which has no groups, gets it as the `group` tag)."""
    name, group = f"{cfg.stage.name}-{cfg.model.name}", cfg.stage.name
    swept = []
    if hydra := checks.multirun():
        # The job number is set when the launcher starts the job (a composed-only multirun config lacks it).
        num = OmegaConf.select(hydra, "job.num", throw_on_missing=False)
        name, group = (f"{name}-{num}" if num is not None else name), str(hydra.sweep.dir)
        swept = swept_overrides(hydra)
    return LoggerPlan(OmegaConf.to_object(cfg.logger), name, cfg.logger.get("group") or group,
                      redact_text(f"{name} {','.join(swept)}") if swept else name)


def preference_plan(cfg: DictConfig, adapter: AdapterPlan | None) -> tuple[PreferenceSettings | None, list[str]]:
    """The stage's preference objective against the run's adapters, with the reference and the warm start this run
    uses, and what is wrong with it (its own values are checked by PreferenceSettings.problems)."""
    if cfg.stage.get("preference") is None:
        return None, []
    settings = OmegaConf.to_object(cfg.stage.preference)
    # Switching the adapters off gives the starting weights only when nothing trains beside them.
    adapted_only = None if adapter is None else all(m in (ADAPTED, FROZEN) for m in adapter.modes.values())
    problems = reference_problems(settings, adapted_only)
    if cfg.data.samples_per_step and cfg.stage.loss_weighting != "sample":
        problems.append(f"stage.loss_weighting={cfg.stage.loss_weighting!r} with stage.preference and "
                        "data.samples_per_step: a step averages its pairs' losses, so use sample")
    steps = settings.warm_start_steps if model_plan(cfg.model).route == "random" else 0
    if settings.warm_start_stage not in stage_names() or settings.warm_start_stage == cfg.stage.name:
        problems.append(f"stage.preference.warm_start_stage={settings.warm_start_stage!r}; allowed: "
                        f"{[n for n in stage_names() if n != cfg.stage.name]}")
    if steps > 0 and world_size(cfg.trainer) > 1:
        problems.append(f"stage.preference.warm_start_steps={steps} runs in one process: train the warm start first "
                        f"(stage={settings.warm_start_stage}) and give its export as model.init_from")
    plan = replace(settings, reference=settings.resolved_reference(adapted_only), warm_start_steps=max(steps, 0))
    return plan, problems


def stage_names() -> list[str]:
    """The shipped stage configs."""
    return sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))


def resolve_plan(cfg: DictConfig, machine: bool = True) -> RunPlan:
    """Check every value of `cfg` and resolve it into a RunPlan; ConfigError lists every problem, by key.
    `machine=False`: the plan of a run on another machine (`ov-train plan`; for_device then decides what
    depends on its device), so what only the run's machine can answer is not checked: that the paths the config
    names exist (and hold weights), where relative recipe paths start (data.root), the checkpoint to resume, and
    qlora's CUDA and bitsandbytes."""
    missing = checks.missing_problems(cfg) or checks.world_problems(cfg.trainer)
    if missing:
        raise ConfigError.of(missing)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    precision = cfg.trainer.precision or default_precision(cfg.trainer, cfg.strategy.name)
    spec, recipe_problems = _recipe(cfg.data, machine)
    # Each node's dataclass, made once: it checks its own values (and those of the nodes it holds), and the plan
    # holds the instance it checked.
    nodes = {name: OmegaConf.to_object(cfg[name])
             for name in ("stage", "model", "data", "strategy", "checkpoint", "metrics", "eval", "logger")}
    media, media_problems = read_media(cfg.stage, spec.sources if spec else ())
    problems = (
        checks.added_key_problems(cfg) + media_problems
        + (checks.model_problems(cfg.model) if machine else checks.geometry_problems(cfg.model))
        + checks.strategy_problems(cfg.strategy, cfg.trainer)
        + checks.step_problems(cfg.data, cfg.trainer, spec.unit if spec else None,
                               cfg.strategy.sequence_parallel if isinstance(cfg.strategy.sequence_parallel, int) else 1)
        + sequence_parallel_problems(cfg.strategy, world_size(cfg.trainer), cfg.model, cfg.eval.generate)
        + recipe_problems + checks.run_problems(cfg)
        + [p for node in nodes.values() for p in node.problems()]
        + checks.precision_problems(precision, cfg) + checks.trainer_problems(cfg.trainer, precision)
        + adapter_problems(cfg.adapter, stage_lrs(cfg), cfg.strategy, str(cfg.trainer.accelerator), machine)
    )
    targets = ()
    try:
        targets = resume_targets(cfg.ckpt_path, run_dir)
    except ValueError as err:
        problems.append(str(err))
    ckpt_path, *fallbacks = targets or (None,)
    if machine and ckpt_path and not Path(ckpt_path).exists():
        problems.append(f"ckpt_path={ckpt_path!r}: checkpoint does not exist")
    if problems:
        raise ConfigError.of(problems)

    step = step_plan(cfg, spec)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer["precision"] = precision
    trainer["max_steps"] = max_steps(cfg, step)
    # Every step is taken by hand (training/step.py), where Lightning refuses both: StepPlan holds what they were.
    trainer.pop("gradient_clip_val", None)
    trainer.pop("accumulate_grad_batches", None)
    if trainer.get("val_check_interval") is None:
        # null: once, at the end. Lightning's int val_check_interval counts training batches (check_val_every_n_epoch
        # is None, run.py), and every batch is one optimizer step (training/step.py), so this is the last step.
        trainer["val_check_interval"] = trainer["max_steps"]
    adapter = run_adapter_plan(cfg)
    cpus = run_cpu_share(cfg)
    model = nodes["model"]
    preference, preference_problems = preference_plan(cfg, adapter)
    if preference_problems:
        raise ConfigError.of(preference_problems)
    return RunPlan(
        stage=cfg.stage.name,
        model=model_plan(cfg.model, cfg.checkpoint.trust, media.image),
        data=data_plan(cfg, spec, media, cpus),
        cpus=cpus,
        forward=replace(model, attn_implementation=model.attention(in_half(precision))),
        optim=optim_plan(cfg, adapter, step),
        adapter=adapter,
        precision=precision,
        strategy=strategy_plan(cfg, adapter, step),
        trainer=trainer,
        logger=logger_plan(cfg),
        checkpoint=nodes["checkpoint"],
        paths=RunPaths(run_dir) if run_dir else None,
        ckpt_path=ckpt_path,
        ckpt_fallbacks=tuple(fallbacks),
        identity=run_identity(cfg, trainer["max_steps"], adapter),
        planner=OmegaConf.to_container(cfg.plan, resolve=True),
        nonfinite=cfg.nonfinite,
        metrics=nodes["metrics"],
        eval=nodes["eval"],
        seed=cfg.seed,
        export=cfg.export,
        # What dashboards get: URLs without their credentials (the data reads use cfg's own values).
        config=redact_tree(OmegaConf.to_container(cfg, resolve=True)),
        preference=preference,
    )
