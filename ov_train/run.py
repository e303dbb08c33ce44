"""train(cfg): plan -> checks -> run directory lock -> data -> model -> fit -> export -> summary.json.

The composed config is resolved once into a RunPlan (ov_train.config.run_plan); every step below takes its
piece of it. Anything wrong with the config, the data or the checkpoint to resume stops the run before the
model or the data are built, with every problem named.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ov_train.checkpoints.adapters import build_for_training, init_from_adapters
from ov_train.checkpoints.export import export_checkpoint
from ov_train.checkpoints.reading import resume_problems
from ov_train.checkpoints.saving import AtomicCheckpoints, PeriodicCheckpoint, SaveOnSigterm, save_whole
from ov_train.config.adapter import AdapterPlan
from ov_train.config.compose import compose
from ov_train.config.run_plan import ConfigError, RunPlan, resolve_plan
from ov_train.constants import MODALITIES
from ov_train.data.compute_batches import SampleCost
from ov_train.data.prepare import locate_shards, prepare_data
from ov_train.data.recipe import Recipe
from ov_train.planner.report import preflight
from ov_train.strategies import StopRanksOnError, adopt_launcher_tasks, build_strategy, strategy_callbacks
from ov_train.training.datamodule import OneVisionData
from ov_train.training.loggers import build_logger
from ov_train.training.metrics import TrainingMetrics, ValidationPredictions
from ov_train.training.module import OneVisionModule
from ov_train.training.preference import PreferenceModule
from ov_train.training.progress import StepProgressBar
from ov_train.training.reference_store import reference_store
from ov_train.training.stream_state import StreamState
from ov_train.utils.logging import get_logger, rank, tidy_library_output
from ov_train.utils.redact import redact_files
from ov_train.utils.run_lock import hold_run_dir
from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.settings import apply_to_model_config

log = get_logger(__name__)
# How a per-modality metric's key ends (val/rewards/accuracy_video).
MODALITY_SUFFIXES = tuple(f"_{m}" for m in MODALITIES)
NO_HELD_OUT = ("no held-out data, so no held-out accuracy or val loss: no recipe source has held-out samples"
               " (val-*.tar beside its train shards, as `ov-data convert --holdout N` writes, or a source's `val:`)")
NO_VALIDATION = "no validation ran (trainer.limit_val_batches=0?), so no held-out accuracy or val loss"


def check(plan: RunPlan) -> tuple[RunPlan, AdapterPlan | None, Recipe | None]:
    """What the plan alone cannot see: the data's shards (listed once: the recipe comes back with the plan), the
    checkpoint to resume (ckpt_path becomes the newest that reads) and a model.init_from adapter checkpoint (its
    adapters come back too). Reads no sample and no tensor."""
    recipe, problems = locate_shards(plan.data)
    if plan.ckpt_path:
        ckpt_path, resume = resume_problems((plan.ckpt_path, *plan.ckpt_fallbacks), plan.identity, plan.checkpoint.trust)
        plan = replace(plan, ckpt_path=ckpt_path, ckpt_fallbacks=())
        problems += resume
    source, init_problems = init_from_adapters(plan)
    problems += init_problems
    if problems:
        raise ConfigError.of(problems)
    return plan, source, recipe


def hydra_files() -> list[Path]:
    """The files Hydra wrote for this job (.hydra/*.yaml) and its sweep (multirun.yaml): the command line as typed."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    files = list((Path(hydra.runtime.output_dir) / hydra.output_subdir).glob("*.yaml")) if hydra.output_subdir else []
    sweep = OmegaConf.select(hydra, "sweep.dir", throw_on_missing=False)
    return files + ([Path(sweep) / "multirun.yaml"] if sweep else [])


def build_callbacks(plan: RunPlan) -> list:
    ckpt, paths = plan.checkpoint, plan.paths
    checkpoints = PeriodicCheckpoint(paths.checkpoints, ckpt.every_n_steps, ckpt.every_minutes, ckpt.keep)
    return [
        checkpoints,
        AtomicCheckpoints(ckpt.trust),
        SaveOnSigterm(paths.last_checkpoint),
        StopRanksOnError(),
        TrainingMetrics(plan.metrics.peak_tflops),
        ValidationPredictions(paths.predictions, plan.metrics.predictions, plan.eval.generate, plan.eval.max_new_tokens),
        StreamState(paths.consumed_keys if plan.data.config.record_keys else None),
    ]


def build_trainer(plan: RunPlan) -> L.Trainer:
    callbacks = build_callbacks(plan) + strategy_callbacks(plan.strategy)
    if plan.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    return L.Trainer(
        default_root_dir=plan.paths.run_dir,
        logger=build_logger(plan.logger, plan.paths.run_dir, plan.config),
        strategy=build_strategy(plan.strategy),
        callbacks=callbacks,
        check_val_every_n_epoch=None,
        **plan.trainer,
    )


def train(cfg: DictConfig) -> dict:
    tidy_library_output()
    # The ranks of a submitit job are known before anything reads them (the lock, rank-aware logging).
    adopt_launcher_tasks()
    if rank() == 0:  # Hydra's files hold the command line as typed, whatever follows (a refusal, a config error)
        redact_files(hydra_files())
    plan, source, recipe = check(resolve_plan(cfg))
    # Memory plan before any heavy work: on GPU runs (or when plan.device names a device) a configuration whose
    # planned peak exceeds the device's memory stops here, unless plan.enforce=false.
    preflight(plan)
    # The job holds its run directory through rank 0 (its ranks share it) from its first write to its end; a second
    # run there stops here.
    with hold_run_dir(plan.paths.lock) if rank() == 0 else nullcontext():
        started = warm_start(cfg, plan)
        if started is not None:
            cfg = started
            plan, source, recipe = check(resolve_plan(cfg))
        return _run(cfg, plan, source, recipe)


def warm_start(cfg: DictConfig, plan: RunPlan) -> DictConfig | None:
    """A preference run from random weights (the embedded tiny model) starts from an SFT warm start of its own:
    stage.preference.warm_start_steps steps of warm_start_stage on the same data (the chosen replies), trained in
    RUN/warm_start (resumed there when it was stopped, reused once it has its export). Returns the run's config with
    model.init_from at that export; None when the run has no warm start."""
    preference = plan.preference
    if preference is None or not preference.warm_start_steps:
        return None
    export = plan.paths.warm_start / "export"
    if not (export / "config.json").is_file():
        log.info("stage.preference.warm_start_steps=%d: training the warm start (stage=%s) in %s first",
                 preference.warm_start_steps, preference.warm_start_stage, plan.paths.warm_start)
        sft = cfg.copy()
        shipped = compose([f"stage={preference.warm_start_stage}", "logger=csv"])
        with open_dict(sft):
            sft.stage, sft.logger = shipped.stage, shipped.logger
            sft.trainer.max_steps = preference.warm_start_steps
            sft.trainer.val_check_interval = None
            sft.run_dir, sft.ckpt_path, sft.export = str(plan.paths.warm_start), "auto", True
        train(sft)
    started = cfg.copy()
    with open_dict(started):
        started.model.init_from = str(export)
    return started


def _run(cfg: DictConfig, plan: RunPlan, source: AdapterPlan | None, located: Recipe | None) -> dict:
    if plan.optim.step.max_steps_from:
        log.info("%s", plan.optim.step.max_steps_from)
    start = time.time()
    # Threads and workers from the CPUs this process may use, not the machine's count (ov_train.config.options).
    torch.set_num_threads(plan.cpus.threads)
    log.info("%s", plan.cpus.describe())
    paths = plan.paths
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(plan.seed, workers=True)
    recipe = prepare_data(plan.data, located)
    model, tokenizer, adapter = build_for_training(plan, source)
    # The stage's anyres N and grid go into the model config: the forward packs by them and the export carries them.
    apply_to_model_config(model.config, plan.data.samples.media, plan.data.samples.placement)
    trainable = {part for part, lr in plan.optim.part_lrs.items() if lr > 0}
    data = OneVisionData(plan.data, recipe, tokenizer, VisionGeometry.from_model_config(model.config),
                         SampleCost.of_model(model.config, trainable))
    tokenizer.save_pretrained(paths.tokenizer)
    settings = {"forward_options": plan.forward, "tokenizer_dir": str(paths.tokenizer), "nonfinite": plan.nonfinite,
                "identity": plan.identity, "template": plan.data.samples.template, "adapter": adapter, "seed": plan.seed}
    if plan.preference:
        module = PreferenceModule(model, plan.optim, plan.preference, reference_store(plan, model, data), **settings)
    else:
        module = OneVisionModule(model, plan.optim, **settings)
    if rank() == 0:
        paths.parameters.write_text(module.parameter_table + "\n")
    trainer = build_trainer(plan)
    # weights_only reaches every load Lightning makes (check() already read the checkpoint's pickles).
    trainer.fit(module, datamodule=data, ckpt_path=plan.ckpt_path, weights_only=not plan.checkpoint.trust)
    # A final checkpoint, written by every rank in the strategy's own format; under ZeRO-3 / FSDP2 no rank holds
    # the full model, so the export is consolidated from it, as ov-export does.
    if not trainer.checkpoint_callback.saved_at(trainer.global_step):
        save_whole(trainer, paths.last_checkpoint)
    if not trainer.is_global_zero:
        return {}
    if plan.export:  # with adapters: merged, and export/adapter/ in PEFT's format
        export_checkpoint(paths.last_checkpoint, paths.export, tokenizer, plan.checkpoint.trust,
                          template=plan.data.samples.template)
    if plan.ckpt_path and trainer.global_step == getattr(module, "resumed_step", None) and paths.summary.exists():
        # A requeue (ckpt_path=auto) of a run that had finished: no step trained and no validation ran, so the
        # summary of the run that trained it stays as it is.
        log.info("ckpt_path=%s is at step %d of trainer.max_steps=%d: nothing left to train; %s kept",
                 plan.ckpt_path, trainer.global_step, plan.trainer["max_steps"], paths.summary)
        return json.loads(paths.summary.read_text())
    metrics = getattr(module, "val_metrics", {})
    if plan.preference:
        return _preference_summary(plan, trainer, metrics, recipe, start)
    summary = {
        "stage": plan.stage,
        "model": plan.model.name,
        # What the weights came from (its geometry is model's: config checks refuse another one).
        "model_from": f"{plan.model.route} {plan.model.source}" if plan.model.source else plan.model.route,
        "steps": trainer.global_step,
        "wall_time_s": round(time.time() - start, 1),
        "val_accuracy": metrics.get("val/accuracy"),
        "chance_accuracy": metrics.get("val/chance_accuracy"),
        "val_loss": metrics.get("val/loss"),
        "val_samples": metrics.get("val/samples"),
        "val_by_modality": {k[len("val/"):]: v for k, v in metrics.items() if k.startswith(("val/accuracy_", "val/loss_"))},
        # The stream's counts, which survive resumes (this rank's share under several ranks).
        "skipped_samples": next((dict(c.skipped) for c in trainer.callbacks if isinstance(c, StreamState)), {}),
    }
    if not summary["val_samples"]:
        # No held-out data is not a score of zero: say so, in the summary and the log.
        summary["held_out"] = NO_VALIDATION if any(s.val_shards for s in recipe.sources) else NO_HELD_OUT
    paths.summary.write_text(json.dumps(summary, indent=2))
    if not summary["val_samples"]:
        log.warning("done in %.0f s: %s -> %s", summary["wall_time_s"], summary["held_out"], paths.run_dir)
    else:
        chance = summary["chance_accuracy"]
        log.info(
            "done in %.0f s: held-out accuracy %.3f (chance %s), val loss %.3f -> %s",
            summary["wall_time_s"], summary["val_accuracy"] or 0,
            "n/a: no answer options" if chance is None else f"{chance:.3f}", summary["val_loss"] or 0, paths.run_dir,
        )
    return summary


def _preference_summary(plan: RunPlan, trainer, metrics: dict, recipe, start: float) -> dict:
    """summary.json of a preference run: held-out preference accuracy (pairs whose chosen reply gains the greater
    reward) and reward margin, overall and per modality, and the pair loss."""
    summary = {
        "stage": plan.stage,
        "model": plan.model.name,
        "steps": trainer.global_step,
        "wall_time_s": round(time.time() - start, 1),
        "preference_loss": plan.preference.loss,
        "reference": plan.preference.reference,
        "val_preference_accuracy": metrics.get("val/preference_accuracy"),
        "val_reward_margin": metrics.get("val/reward_margin"),
        "val_loss": metrics.get("val/loss"),
        "val_pairs": metrics.get("val/samples"),
        "val_by_modality": {k[len("val/"):]: v for k, v in metrics.items()
                            if k.startswith("val/") and k.endswith(MODALITY_SUFFIXES)},
        "skipped_samples": next((dict(c.skipped) for c in trainer.callbacks if isinstance(c, StreamState)), {}),
    }
    if not summary["val_pairs"]:
        summary["held_out"] = NO_VALIDATION if any(s.val_shards for s in recipe.sources) else NO_HELD_OUT
    plan.paths.summary.write_text(json.dumps(summary, indent=2))
    if not summary["val_pairs"]:
        log.warning("done in %.0f s: %s -> %s", summary["wall_time_s"], summary["held_out"], plan.paths.run_dir)
    else:
        log.info("done in %.0f s: held-out preference accuracy %.3f, reward margin %.3f, val loss %.3f (%d pairs) -> %s",
                 summary["wall_time_s"], summary["val_preference_accuracy"], summary["val_reward_margin"],
                 summary["val_loss"], summary["val_pairs"], plan.paths.run_dir)
    return summary
