"""train(cfg): validate -> data -> model -> fit -> export -> summary.json."""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from ov_train.config import ConfigError, validate
from ov_train.data.synthetic import ensure_synthetic
from ov_train.model.build import build_model
from ov_train.model.forward import ForwardOptions
from ov_train.strategies import build_strategy, default_precision
from ov_train.tools.export import checkpoint_metadata, export_pretrained, model_from_checkpoint
from ov_train.tools.model_card import card_facts
from ov_train.training.callbacks import build_callbacks
from ov_train.training.datamodule import OneVisionData
from ov_train.training.loggers import build_logger
from ov_train.training.module import OneVisionModule
from ov_train.training.stream_state import StreamState
from ov_train.utils.logging import get_logger
from ov_train.utils.paths import cache_dir
from ov_train.vision.geometry import VisionGeometry

log = get_logger(__name__)


def resolve_ckpt_path(cfg: DictConfig) -> None:
    """`last`: this run directory's checkpoints/last.ckpt, which must exist; `auto`: it if it exists, else
    a fresh start (what a requeued SLURM job wants). Both mean resuming in the first run's hydra.run.dir."""
    if cfg.ckpt_path not in ("last", "auto"):
        return
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    if last.exists():
        cfg.ckpt_path = str(last)
    elif cfg.ckpt_path == "auto":
        cfg.ckpt_path = None
    else:
        raise ConfigError(f"ckpt_path=last: no checkpoint at {last}; resume in the first run's hydra.run.dir")


def prepare_synthetic(cfg: DictConfig) -> None:
    """Generate the synthetic shards once: concurrently started ranks queue on a file lock and find them complete."""
    root = Path(cfg.data.root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):
        ensure_synthetic(root, **cfg.data.synthetic, seed=cfg.seed)


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


def train(cfg: DictConfig) -> dict:
    resolve_ckpt_path(cfg)
    if cfg.trainer.precision is None:
        cfg.trainer.precision = default_precision(cfg)
    validate(cfg)
    start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.data.name == "synthetic":
        prepare_synthetic(cfg)
    model, tokenizer = build_model(cfg.model, cache_dir())
    geometry = VisionGeometry.from_model_config(model.config)
    data = OneVisionData(cfg.data, cfg.stage, tokenizer, geometry, cfg.seed)
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    module = OneVisionModule(
        model, cfg.stage, cfg.model.lr_scale, cfg.trainer.max_steps, str(tokenizer_dir),
        forward_options=ForwardOptions.from_config(cfg.model, cfg.trainer.precision), nonfinite=cfg.nonfinite,
    )
    trainer = build_trainer(cfg, run_dir)
    trainer.fit(module, datamodule=data, ckpt_path=cfg.ckpt_path)
    # A final checkpoint, written by every rank in the strategy's own format; under ZeRO-3 / FSDP2 no rank holds
    # the full model, so the export is consolidated from it, as ov-export does.
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)
    if not trainer.is_global_zero:
        return {}
    if cfg.export:
        facts = card_facts(checkpoint_metadata(last))
        export_pretrained(model_from_checkpoint(last)[0], tokenizer, run_dir / "export", cfg.stage.template, facts)
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
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "done in %.0f s: held-out accuracy %.3f (chance %.3f), val loss %.3f -> %s",
        summary["wall_time_s"], summary["val_accuracy"] or 0, summary["chance_accuracy"] or 0,
        summary["val_loss"] or 0, run_dir,
    )
    return summary
