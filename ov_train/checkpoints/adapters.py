"""Adapter checkpoints: what they record, their base rebuilt, the adapters put back on it (to export, merge or go
on training), and a run's model built with its adapters.

An adapter run's checkpoints hold the trainable tensors and their optimizer state only; `ov_train.adapter` records
the AdapterPlan (config/adapter.py) with the base the adapters sit on: the model plan (paths absolute) and the seed,
which decides random weights and the embedding rows added for new tokens. The base is rebuilt from that record
(model/build.py), or read from a Hugging Face directory of it (`ov-export --base DIR`). Reading the checkpoint
itself is checkpoints/reading.py's, the export checkpoints/export.py's; placing adapters is model/adapters.py's.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ov_train.checkpoints.reading import checkpoint_format, load_weights, ov_train_metadata
from ov_train.checkpoints.safe_load import CheckpointError
from ov_train.config.adapter import AdapterPlan
from ov_train.config.checks import missing_paths
from ov_train.config.run_plan import ModelPlan, RunPlan, base_record
from ov_train.constants import PARTS
from ov_train.model.adapters import merged, wrap
from ov_train.model.build import build_model, checkpoint_tokenizer
from ov_train.model.parts import apply_stage
from ov_train.utils.logging import get_logger
from ov_train.utils.paths import cache_dir
from ov_train.vision.settings import CONFIG_KEY

log = get_logger(__name__)

# How each tool names a base directory and a tokenizer in place of the ones a checkpoint records.
EXPORT_OPTIONS = ("--base DIR", "--tokenizer DIR")
RUN_OPTIONS = ("model.pretrained=DIR", "model.tokenizer=DIR")


def recorded_adapters(meta: dict) -> AdapterPlan | None:
    """The adapters a checkpoint's `ov_train` metadata records, with their base; None for a full checkpoint."""
    return AdapterPlan.from_dict(meta["adapter"]) if meta.get("adapter") else None


def base_plan(adapter: AdapterPlan, trust: bool = False, base_dir: str | Path | None = None,
              tokenizer_dir: str | None = None) -> ModelPlan:
    """How to build the adapters' base: as recorded, or from `base_dir`, a Hugging Face directory of it."""
    plan = ModelPlan(**adapter.base["model"], trust_checkpoint=trust)
    if base_dir is None:
        return plan
    return replace(plan, route="pretrained", source=str(base_dir), vision_tower=None, llm=None,
                   tokenizer=tokenizer_dir or plan.tokenizer)


def rebuild_base(adapter: AdapterPlan, trust: bool = False, base_dir: str | Path | None = None,
                 tokenizer_dir: str | None = None):
    """The base model the adapters trained on (its random weights and new embedding rows drawn from the seed)."""
    model, _ = build_model(base_plan(adapter, trust, base_dir, tokenizer_dir), cache_dir(), seed=adapter.base["seed"])
    return model


def base_problems(adapter: AdapterPlan, where: str, options: tuple[str, str] = EXPORT_OPTIONS,
                  base_dir: str | Path | None = None, tokenizer_dir: str | None = None) -> list[str]:
    """Why the adapters' base cannot be built here: a path it would read that does not exist (a base moved since
    training), named by the key that recorded it, and how to point at it instead (`options`: the tool's ways to name
    a base directory and a tokenizer). Checked before anything is built, so a missing path never reaches
    transformers, which would take it for a hub repo id."""
    missing = missing_paths(base_plan(adapter, base_dir=base_dir, tokenizer_dir=tokenizer_dir).paths())
    if base_dir is None:
        return [f"{where}: the base its adapters were trained on is gone: the checkpoint records {key}={path!r},"
                f" which does not exist; move it back, or name a Hugging Face directory of the base with {options[0]}"
                for key, path in missing.items()]
    return [f"{where}: the tokenizer its base is built with, {path!r}, does not exist; name one with {options[1]}"
            if key == "model.tokenizer" else f"{key}={path!r}: path does not exist" for key, path in missing.items()]


def _base_path(adapter: AdapterPlan, base_dir=None) -> str | None:
    """What PEFT's adapter_config.json names as the base (base_model_name_or_path)."""
    return str(base_dir) if base_dir else adapter.base["model"]["source"]


def adapted_from_checkpoint(ckpt_path: str | Path, trust: bool = False, base_dir: str | Path | None = None,
                            quantize: bool = False, tokenizer_dir: str | None = None,
                            options: tuple[str, str] = EXPORT_OPTIONS):
    """An adapter checkpoint on its base: (PeftModel with the trained tensors loaded, tokenizer_dir, AdapterPlan).
    With `quantize` (QLoRA runs going on), the base LLM is quantized as in training. A base from `base_dir` is
    built with `tokenizer_dir` (default: the one the checkpoint records). A base path that is gone is a
    CheckpointError naming it and `options` (base_problems)."""
    path = Path(ckpt_path)
    meta = ov_train_metadata(path, trust)
    adapter = recorded_adapters(meta)
    if adapter is None:
        raise CheckpointError(f"{path}: a full checkpoint, without adapters")
    tokenizer_dir = tokenizer_dir or meta.get("tokenizer_dir")
    problems = base_problems(adapter, str(path), options, base_dir, tokenizer_dir)
    if problems:
        raise CheckpointError("\n".join(problems))
    model = rebuild_base(adapter, trust, base_dir, tokenizer_dir)
    _trained_media(model.config, meta.get("model_config") or {})
    peft_model = wrap(model, adapter, _base_path(adapter, base_dir), quantize=quantize)
    # What trained is what the checkpoint holds: the same rule as training's (model/parts.py).
    apply_stage(model, adapter.part_lrs(dict.fromkeys(PARTS, 1.0)), adapted=adapter.adapted)
    load_weights(path, checkpoint_format(path), model, trust, trainable_only=True)
    return peft_model, meta.get("tokenizer_dir"), adapter


def _trained_media(config, trained: dict) -> None:
    """The stage's image settings as training had them (vision/settings.py put them in the run's model config);
    the base rebuilt from the record has the geometry's defaults, and the export's processor files follow these."""
    for key in ("vision_aspect_ratio", "image_grid_pinpoints", CONFIG_KEY):
        if key in trained:
            setattr(config, key, trained[key])


def init_from_adapters(plan: RunPlan) -> tuple[AdapterPlan | None, list[str]]:
    """The adapters a model.init_from checkpoint holds (None: an export or a full checkpoint), and why this run
    cannot go on training them. Under adapter=none the checkpoint is merged into its base and trains whole; under
    adapters they go on training, so they must place the same tensors (kind, r, alpha, targets, the parts' modes).
    Reads only the checkpoint's pickles."""
    if plan.model.route != "checkpoint":
        return None, []
    where = f"model.init_from={plan.model.source}"
    try:
        meta = ov_train_metadata(plan.model.source, plan.checkpoint.trust)
    except CheckpointError as err:
        return None, [f"{where}: {err}"]
    source = recorded_adapters(meta)
    if source is None:
        return None, []
    problems = base_problems(source, where, RUN_OPTIONS, plan.model.base_dir,
                             plan.model.tokenizer or meta.get("tokenizer_dir"))
    if plan.adapter and not plan.adapter.same_weights(source):
        problems.append(
            f"{where}: its adapters ({source.settings()}) are not this run's"
            f" (adapter={plan.adapter.kind}: {plan.adapter.settings()}); continue them with the same adapter.*"
            " settings, or start from its merged export (model.init_from=RUN/export)"
        )
    return source, problems


def build_for_training(plan: RunPlan, source: AdapterPlan | None = None):
    """(model, tokenizer, the adapters to record in checkpoints): model.* built, then the plan's adapters placed
    (PEFT, in place). A model.init_from adapter checkpoint (`source`, from init_from_adapters) comes back on its base
    with its trained tensors: merged under adapter=none, its adapters going on training (on its base) otherwise."""
    adapter, trust = plan.adapter, plan.checkpoint.trust
    quantize = adapter is not None and adapter.kind == "qlora"
    if source:
        base_dir = plan.model.base_dir
        peft_model, tokenizer_dir, _ = adapted_from_checkpoint(plan.model.source, trust, base_dir, quantize,
                                                               plan.model.tokenizer, RUN_OPTIONS)
        tokenizer = checkpoint_tokenizer(plan.model, tokenizer_dir)
        if base_dir:
            log.info("the adapters of %s go on model.pretrained=%s, not on the base the checkpoint records",
                     plan.model.source, base_dir)
        if adapter is None:
            log.info("initialised from adapter checkpoint %s, merged into its base", plan.model.source)
            return merged(peft_model), tokenizer, None
        log.info("continuing the adapters of %s", plan.model.source)
        # Their checkpoints record the base they now sit on (model.pretrained's, if given) for ov-export and merges.
        base = source.base if not base_dir else base_record(
            base_plan(source, base_dir=base_dir, tokenizer_dir=plan.model.tokenizer or tokenizer_dir),
            source.base["seed"])
        return peft_model.base_model.model, tokenizer, replace(adapter, base=base)
    # With adapters, seeded as the base is when it is rebuilt from the record.
    model, tokenizer = build_model(plan.model, cache_dir(), seed=plan.seed if adapter else None)
    if adapter:
        wrap(model, adapter, _base_path(adapter), quantize=quantize)
        log.info("adapter=%s placed (r=%d): %s", adapter.kind, adapter.r, adapter.modes)
    return model, tokenizer, adapter
