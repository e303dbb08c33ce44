"""train(cfg): validate -> data -> model -> fit -> export -> summary.json."""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ov_train.config import ConfigError, validate
from ov_train.data.synthetic import SYNTHETIC, ensure_synthetic, synthetic_root
from ov_train.model.adapters import AdapterRun, AdapterSettings, wrap
from ov_train.model.build import build_model
from ov_train.model.forward import ForwardOptions
from ov_train.planner.report import preflight
from ov_train.strategies import build_strategy, default_precision
from ov_train.model.tokenizer import load_tokenizer
from ov_train.tools.export import adapted_from_checkpoint, adapter_record, checkpoint_metadata, export_checkpoint
from ov_train.training.callbacks import build_callbacks, previous_of, save_whole
from ov_train.training.datamodule import OneVisionData
from ov_train.training.loggers import build_logger
from ov_train.training.module import OneVisionModule
from ov_train.training.stream_state import StreamState
from ov_train.utils.logging import get_logger
from ov_train.utils.paths import cache_dir
from ov_train.utils.safe_load import CheckpointError
from ov_train.vision.geometry import VisionGeometry

log = get_logger(__name__)
NO_HELD_OUT = ("no held-out data, so no held-out accuracy or val loss: no recipe source has held-out samples"
               " (val-*.tar beside its train shards, as `ov-data convert --holdout N` writes, or a source's `val:`)")
NO_VALIDATION = "no validation ran (trainer.limit_val_batches=0?), so no held-out accuracy or val loss"


def resolve_ckpt_path(cfg: DictConfig) -> None:
    """`last`: this run directory's checkpoints/last.ckpt, which must exist; `auto`: it if it exists, else
    a fresh start (what a requeued SLURM job wants). Both mean resuming in the first run's hydra.run.dir."""
    if cfg.ckpt_path not in ("last", "auto"):
        return
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    if not last.exists() and previous_of(last).exists():
        # Killed between save_whole's two renames: the previous checkpoint is the last whole one.
        last = previous_of(last)
    if last.exists():
        cfg.ckpt_path = str(last)
    elif cfg.ckpt_path == "auto":
        cfg.ckpt_path = None
    else:
        raise ConfigError(f"ckpt_path=last: no checkpoint at {last}; resume in the first run's hydra.run.dir")


# The model keys that decide an adapter run's base weights (with the seed); the others are performance settings.
BASE_KEYS = ("name", "pretrained", "vision_tower", "llm", "init_from", "tokenizer", "random_init", "vision_aspect_ratio",
             "vision", "text")


def base_record(cfg: DictConfig) -> dict:
    """What an adapter run's frozen base is, for resumes and ov-export to rebuild it: model.*'s route and paths (made
    absolute) and geometry, and the seed (random weights, embedding rows added for new tokens)."""
    node = OmegaConf.to_container(cfg.model, resolve=True)
    model = {k: node.get(k) for k in BASE_KEYS}
    for key in ("pretrained", "vision_tower", "llm", "init_from", "tokenizer"):
        if model[key]:
            model[key] = str(Path(model[key]).resolve())
    return {"model": model, "seed": cfg.seed}


def adapter_run(cfg: DictConfig, source: AdapterRun | None = None) -> AdapterRun | None:
    """The run's adapters (None under adapter=none); the base is the one `source` (a model.init_from adapter
    checkpoint whose adapters go on training) sits on, else model.* itself."""
    settings = AdapterSettings.from_config(cfg.get("adapter"))
    if not settings.enabled:
        return None
    return AdapterRun(settings, settings.modes(dict(cfg.stage.parts)), source.base if source else base_record(cfg))


def run_identity(cfg: DictConfig, adapter: AdapterRun | None = None) -> dict:
    """What a resume must share with the run that wrote the checkpoint (kept in its `ov_train` metadata)."""
    identity = {
        "stage": cfg.stage.name,
        "model": cfg.model.name,
        "geometry": OmegaConf.to_container(OmegaConf.masked_copy(cfg.model, ["vision", "text"]), resolve=True),
        "max_steps": cfg.trainer.max_steps,
    }
    if adapter:
        identity.update(adapter=adapter.settings.to_dict(), base=adapter.base)
    return identity


def check_init_from(cfg: DictConfig) -> AdapterRun | None:
    """model.init_from an adapter checkpoint: under adapter=none it is merged into its base and trains whole; under
    adapters they go on training, so they must place the same tensors (kind, r, alpha, targets, the parts' modes).
    Returns its record (None for exports and full checkpoints). Reads only the checkpoint's pickles."""
    init_from = cfg.model.get("init_from")
    if not init_from or (Path(init_from) / "config.json").is_file():
        return None
    try:
        source = adapter_record(init_from, trust=cfg.checkpoint.trust)
    except CheckpointError as err:
        raise ConfigError(f"model.init_from={init_from}: {err}") from None
    settings = AdapterSettings.from_config(cfg.get("adapter"))
    if source is None or not settings.enabled:
        return None
    modes = settings.modes(dict(cfg.stage.parts))
    if not settings.same_weights(source.settings) or modes != source.modes:
        raise ConfigError(
            f"model.init_from={init_from}: its adapters ({source.settings.to_dict()}, parts {source.modes}) are not this"
            f" run's (adapter={settings.kind}: {settings.to_dict()}, parts {modes}); continue them with the same"
            " adapter.* settings, or start from its merged export (model.init_from=RUN/export)"
        )
    return source


def _flat(tree: dict, prefix: str) -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}") if isinstance(value, dict) else {f"{prefix}.{key}": value})
    return out


def check_resume(cfg: DictConfig, adapter: AdapterRun | None = None) -> None:
    """Before anything heavy: ckpt_path must load safely and come from this same run (stage, model and its
    geometry, max_steps: the learning-rate schedule spans max_steps, so another value would make it jump, or
    with fewer steps than done end the run at once). Reads only the checkpoint's pickles (tensors stay on disk)."""
    if not cfg.ckpt_path:
        return
    try:
        meta = checkpoint_metadata(cfg.ckpt_path, trust=cfg.checkpoint.trust)
    except CheckpointError as err:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {err}") from None
    stored, now = (meta.get("ov_train") or {}).get("run"), run_identity(cfg, adapter)
    if stored is None:
        log.warning("ckpt_path=%s records no run identity (an older checkpoint): resuming unchecked", cfg.ckpt_path)
        return
    problems = [
        f"{key}: the checkpoint's {before!r}, this run's {after!r}"
        for key, before, after in (("stage", stored.get("stage"), now["stage"]), ("model", stored.get("model"), now["model"]))
        if before != after
    ]
    if not problems:
        before, after = _flat(stored.get("geometry") or {}, "model"), _flat(now["geometry"], "model")
        problems += [
            f"{key}: the checkpoint's {before.get(key)!r}, this run's {after.get(key)!r}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)
        ]
    for key, what in (("adapter", "adapter"), ("base", "the adapters' base (model.* and seed)")):
        if stored.get(key) != now.get(key):
            problems.append(f"{what}: the checkpoint's {stored.get(key)!r}, this run's {now.get(key)!r}")
    if stored.get("max_steps") != now["max_steps"]:
        problems.append(
            f"trainer.max_steps: the checkpoint's run has {stored.get('max_steps')}, this one {now['max_steps']}"
            f" (at step {meta.get('global_step')}); the learning-rate schedule spans max_steps, so resume with"
            f" trainer.max_steps={stored.get('max_steps')}, or train on from it in a new run with model.init_from=CKPT"
        )
    if problems:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a checkpoint of this run:\n  " + "\n  ".join(problems))
    log.info("resuming from %s at step %s", cfg.ckpt_path, meta.get("global_step"))


def prepare_synthetic(cfg: DictConfig) -> None:
    """Find or generate the synthetic shards of this run's settings (once per setting: concurrent ranks and runs
    queue on a file lock) and point data.root at them."""
    settings = dict(cfg.data.synthetic, seed=cfg.seed)
    cfg.data.root = str(ensure_synthetic(synthetic_root(cfg.data.root, **settings), **settings))


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if kwargs.get("val_check_interval") is None:
        kwargs["val_check_interval"] = kwargs["max_steps"]
    return L.Trainer(
        default_root_dir=run_dir,
        logger=build_logger(cfg, run_dir),
        strategy=build_strategy(cfg),
        callbacks=build_callbacks(cfg, run_dir),
        check_val_every_n_epoch=None,
        **kwargs,
    )


def build_for_training(cfg: DictConfig, adapter: AdapterRun | None, continuing: bool = False):
    """(model, tokenizer): model.* built, then the adapters placed (PEFT, in place); a model.init_from adapter
    checkpoint whose adapters go on training (`continuing`) comes back on its base with its trained tensors."""
    trust = cfg.checkpoint.trust
    quantize = adapter is not None and adapter.settings.kind == "qlora"
    if adapter and continuing:  # check_init_from matched its adapters to this run's
        peft_model, tokenizer_dir, _ = adapted_from_checkpoint(cfg.model.init_from, trust, quantize=quantize)
        if not cfg.model.tokenizer and not (tokenizer_dir and Path(tokenizer_dir).exists()):
            raise ValueError(f"model.init_from={cfg.model.init_from}: its tokenizer {tokenizer_dir!r} is gone; set model.tokenizer")
        tokenizer = load_tokenizer(cfg.model.tokenizer or tokenizer_dir)
        log.info("continuing the adapters of %s", cfg.model.init_from)
        return peft_model.base_model.model, tokenizer
    model, tokenizer = build_model(cfg.model, cache_dir(), trust_checkpoint=trust, seed=cfg.seed)
    if adapter:
        base = adapter.base["model"]
        wrap(model, adapter.settings, adapter.modes, base.get("pretrained") or base.get("init_from"), quantize=quantize)
        log.info("adapter=%s placed (r=%d): %s", adapter.settings.kind, adapter.settings.r, adapter.modes)
    return model, tokenizer


def train(cfg: DictConfig) -> dict:
    resolve_ckpt_path(cfg)
    if cfg.trainer.precision is None:
        cfg.trainer.precision = default_precision(cfg)
    validate(cfg)
    source = check_init_from(cfg)
    adapter = adapter_run(cfg, source)
    check_resume(cfg, adapter)
    # Memory plan before any heavy work: on GPU runs (or when plan.device names a device) a configuration whose
    # planned peak exceeds the device's memory stops here, unless plan.enforce=false.
    preflight(cfg)
    start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.data.name == SYNTHETIC:
        prepare_synthetic(cfg)
    model, tokenizer = build_for_training(cfg, adapter, continuing=source is not None)
    geometry = VisionGeometry.from_model_config(model.config)
    data = OneVisionData(cfg.data, cfg.stage, tokenizer, geometry, cfg.seed)
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    module = OneVisionModule(
        model, cfg.stage, cfg.model.lr_scale, cfg.trainer.max_steps, str(tokenizer_dir),
        forward_options=ForwardOptions.from_config(cfg.model, cfg.trainer.precision), nonfinite=cfg.nonfinite,
        identity=run_identity(cfg, adapter), adapter=adapter, seed=cfg.seed,
    )
    trainer = build_trainer(cfg, run_dir)
    # weights_only reaches every load Lightning makes (check_resume already read the checkpoint's pickles).
    trainer.fit(module, datamodule=data, ckpt_path=cfg.ckpt_path, weights_only=not cfg.checkpoint.trust)
    # A final checkpoint, written by every rank in the strategy's own format; under ZeRO-3 / FSDP2 no rank holds
    # the full model, so the export is consolidated from it, as ov-export does.
    last = run_dir / "checkpoints" / "last.ckpt"
    if not trainer.checkpoint_callback.saved_at(trainer.global_step):
        save_whole(trainer, last)
    if not trainer.is_global_zero:
        return {}
    if cfg.export:  # with adapters: merged, and export/adapter/ in PEFT's format
        export_checkpoint(last, run_dir / "export", tokenizer, cfg.checkpoint.trust, template=cfg.stage.template)
    metrics = getattr(module, "val_metrics", {})
    summary = {
        "stage": cfg.stage.name,
        "model": cfg.model.name,
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
        summary["held_out"] = NO_VALIDATION if any(s.val_shards for s in data.recipe.sources) else NO_HELD_OUT
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if not summary["val_samples"]:
        log.warning("done in %.0f s: %s -> %s", summary["wall_time_s"], summary["held_out"], run_dir)
    else:
        log.info(
            "done in %.0f s: held-out accuracy %.3f (chance %.3f), val loss %.3f -> %s",
            summary["wall_time_s"], summary["val_accuracy"] or 0, summary["chance_accuracy"] or 0,
            summary["val_loss"] or 0, run_dir,
        )
    return summary
