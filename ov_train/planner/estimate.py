"""The plan of a run: what one device holds at the peak of a training step, and how long the step takes.

`Setup.of` takes the run plan (config/run_plan.py: resolve_plan, as training resolves it) and what it decides on the
planned device (for_device: precision, attention), and adds the planner's own choices (loss kernel, engine, the
step's samples); `cached_trace` traces the step (cached on disk: activation memory depends on the
geometry, the samples and the forward options, not on the engine or the device count); `evaluate` adds the
engine's model state and the FLOPs; `plan_setup` does all three. Peaks, per device:

    forward/backward:  weights + masters + AdamW moments + buffers + (activations and gradients as they grow)
    optimizer step:    weights + masters + AdamW moments + buffers + gradients + the step's working set

Gradients build up while activations are freed, so the first line takes the trace's joint peak where the engine
keeps full gradients on the device (one device, DDP, ZeRO-1, and only when gradients are not already held from
an earlier micro-batch); sharded engines hold their gradient partitions all along.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from filelock import FileLock

from ov_train.config.adapter import AdapterPlan
from ov_train.config.media import ImageSettings, MediaSettings, VideoSettings
from ov_train.config.parallel import allowed_degrees
from ov_train.config.recipe import RecipeSpec
from ov_train.config.run_plan import ModelPlan, RunPlan, for_device
from ov_train.config.schema import ModelConfig
from ov_train.constants import ADAPTED
from ov_train.model.loss import fused_available
from ov_train.planner.devices import Device, DeviceError, resolve
from ov_train.planner.state import Counts, Engine, count, engine_from_plan, model_state, reference_state
from ov_train.planner.trace import Trace, trace_step
from ov_train.planner.workload import ONEVISION_MIX, Sample, fill, rank_share
from ov_train.utils.flops import ModelFlops, TokenCounts
from ov_train.utils.paths import cache_dir
from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.settings import apply_to_model_config

GIB = 2**30
PATHS = ("ov_train", "stock")
CODE = Path(__file__).resolve().parents[1]
# Source the trace depends on: a change there invalidates cached traces.
TRACED_SOURCES = ("model/forward.py", "model/loss.py", "model/packing.py", "model/activation_checkpointing.py", "model/build.py",
                  "planner/trace.py", "planner/workload.py")


class PlanError(ValueError):
    """A configuration the planner refuses: its peak exceeds the device's memory (or plan keys are wrong)."""


def plan_problems(plan) -> list[str]:
    out = []
    if plan.get("path", "ov_train") not in PATHS:
        out.append(f"plan.path={plan.get('path')!r}; allowed: {list(PATHS)}")
    mfu = plan.get("mfu", 0.4)
    if not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        out.append(f"plan.mfu={mfu!r} must be a number in (0, 1]")
    for key in ("tokens",):
        value = plan.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            out.append(f"plan.{key}={value!r} must be a positive integer or null")
    modality = plan.get("modality")
    if modality is not None and modality not in ("video", "multi_image", "single_image", "text"):
        out.append(f"plan.modality={modality!r}; allowed: null (the recipe's mix), video, multi_image, single_image, text")
    for key in ("reserve_gib", "memory_gib"):
        value = plan.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            out.append(f"plan.{key}={value!r} must be a number >= 0 or null")
    return out


def _step_tokens(run: RunPlan, tokens: int | None) -> tuple[int, str]:
    """Tokens of one step's batch per device, and where the figure comes from: plan.tokens, else the run's token
    budget (the data config's, else the recipe's: config/run_plan.py), else one packed row or one sample."""
    if tokens:
        return int(tokens), "plan.tokens"
    budget, recipe = run.data.budget.max_tokens, run.data.recipe
    if budget:
        # The data config's budget wins over the recipe's (config/run_plan.py: data_plan).
        return budget, ("data.max_tokens_per_batch" if run.data.config.max_tokens_per_batch
                        else f"recipe {recipe.name}'s max_tokens_per_batch")
    if run.forward.packing:
        return run.forward.max_tokens, "model.max_tokens (no token budget: one packed row; plan.tokens sets it)"
    return run.data.samples.max_length, "stage.max_length (no token budget: one sample)"


def _shares(modality: str | None, recipe: RecipeSpec) -> dict[str, float]:
    return {modality: 1.0} if modality else recipe.shares("modality") or dict(ONEVISION_MIX)


def planned_device(settings, accelerator: str) -> Device:
    """The device the `plan` config node names (None: this machine's), its keys checked first."""
    problems = plan_problems(settings)
    if problems:
        raise PlanError("invalid plan config:\n  " + "\n  ".join(problems))
    try:
        return resolve(settings.get("device"), accelerator, settings.get("memory_gib"))
    except DeviceError as err:
        raise PlanError(str(err)) from err


def meta_model(model: ModelPlan):
    """The plan's model on the meta device: no weights are read or allocated (an export's or checkpoint's config
    when the route has one, else the configured geometry)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from ov_train.model.build import build_model

    if model.route in ("export", "pretrained") and (Path(model.source) / "config.json").is_file():
        with torch.device("meta"):
            return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig.from_pretrained(model.source))
    with torch.device("meta"):
        return build_model(replace(model, route="random"), cache_dir())[0]


@dataclass(frozen=True)
class Setup:
    """Everything the plan depends on: a run plan on one device kind, with the planner's own choices."""

    model: ModelPlan
    parts: dict  # learning rate per part (the run plan's); > 0: trains
    device: Device
    engine: Engine
    options: ModelConfig
    path: str
    fused_loss: bool
    tokens: int
    tokens_from: str
    shares: dict
    adapter: AdapterPlan | None  # the run's adapters (config/adapter.py); None: adapter=none
    mfu: float
    reserve_gib: float
    image: ImageSettings = ImageSettings()  # the stage's image strategy and grid
    video: VideoSettings = VideoSettings()  # the stage's frames, pooling and newline layout
    reference: str | None = None  # a preference stage's reference (config/preference.py), resolved; None: no stage.preference

    def samples(self, geometry: VisionGeometry) -> list[Sample]:
        """The step's samples: the token budget of a device, or of a sequence-parallel group's row."""
        video = self.video
        return fill(self.tokens, self.shares, geometry, video.max_frames, self.image.anyres, video.pool, video.newline)

    @classmethod
    def of(cls, run: RunPlan) -> Setup:
        """The plan of `run` (resolve_plan's) on the device its planner settings name: the run's own decisions,
        those that depend on the device taken for that one (for_device)."""
        settings = run.planner
        device = planned_device(settings, str(run.trainer["accelerator"]))
        on_cpu = device.kind == "cpu"
        run = for_device(run, on_gpu=not on_cpu)
        path = settings["path"]  # plan_problems: one of PATHS
        precision, options = run.precision, run.forward
        if path == "stock":
            # The public recipe: fp32 weights under bf16 autocast; the stock forward: padded (one sample), sdpa, full
            # logits; checkpointing as the model config says.
            precision = "bf16-mixed"
            options = options.as_stock()
        tokens, tokens_from = _step_tokens(run, settings.get("tokens"))
        if run.strategy.sequence_parallel > 1:  # the group's batch is one packed row (parallel/sequence.py)
            options = replace(options, max_tokens=max(options.max_tokens, tokens))
        media = run.data.samples.media
        return cls(
            model=run.model, parts=run.optim.part_lrs, device=device, engine=engine_from_plan(run.strategy, precision),
            options=replace(options, compile=False), path=path,
            fused_loss=not on_cpu and options.loss == "chunked" and _liger_expected(), tokens=tokens,
            tokens_from=tokens_from, shares=_shares(settings.get("modality"), run.data.recipe), adapter=run.adapter,
            mfu=float(settings["mfu"]), reserve_gib=float(settings["reserve_gib"] or 0.0),
            image=media.image, video=media.video, reference=run.preference.reference if run.preference else None,
        )


def _liger_expected() -> bool:
    """On a GPU machine, whether training's loss finds Liger there; elsewhere the GPU image's answer: it ships
    liger-kernel."""
    return fused_available(torch.device("cuda")) if torch.cuda.is_available() else True


def _code_version() -> str:
    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for name in TRACED_SOURCES:
        digest.update((CODE / name).read_bytes())
    return digest.hexdigest()[:16]


def step_samples(setup: Setup, geometry: VisionGeometry) -> list[Sample]:
    """What one device traces: the step's samples, or its rank's share of its sequence-parallel group's."""
    samples = rank_share(setup.samples(geometry), setup.engine.sequence_parallel, geometry)
    if setup.path == "stock":
        # Batch 1 with accumulation: one sample per forward; the longest sets the peak.
        return [max(samples, key=lambda s: (s.tokens, sum(s.crops)))]
    return samples


def cached_trace(setup: Setup, model, samples: list[Sample]) -> tuple[Trace, bool]:
    """The step's trace and whether it came from the cache (under the cache dir, keyed by all it depends on:
    code, geometry, samples, forward options, compute dtype, loss kernel, trainable parts)."""
    key = {
        "code": _code_version(), "geometry": model.config.to_json_string(use_diff=False), "path": setup.path,
        "samples": [asdict(s) for s in samples], "options": asdict(setup.options), "compute": setup.engine.compute,
        "fused_loss": setup.fused_loss, "parts": sorted(p for p, lr in setup.parts.items() if lr and lr > 0),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    file = cache_dir() / "planner" / f"trace-{digest}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{file}.lock"):  # ranks started together trace once
        if file.exists():
            return Trace(**json.loads(file.read_text())), True
        try:
            trace = trace_step(model, setup.parts, samples, setup.options, setup.engine.compute, setup.path, setup.fused_loss)
        except (RuntimeError, TypeError, ValueError) as err:  # the step itself fails: it would on the device too
            raise PlanError(f"the traced training step fails ({setup.engine.compute} compute, attention "
                            f"{setup.options.attention()}): {type(err).__name__}: {err}") from err
        partial = file.with_suffix(".partial")
        partial.write_text(json.dumps(trace.to_dict()))
        partial.replace(file)  # whole or absent
    return trace, False


def _gib(value: float) -> float:
    return _significant(value / GIB)


def _significant(value: float) -> float:
    return float(f"{value:.4g}")


def evaluate(setup: Setup, trace: Trace, counts: Counts, work: TokenCounts, flops: float) -> dict:
    """The plan's numbers (see the module docstring), as the JSON the CLI prints."""
    e = setup.engine
    state = model_state(counts, e)
    ref_bytes, _, ref_note = reference_state(counts, e, setup.reference)
    if ref_note:
        state = replace(state, reference=ref_bytes, notes=(*state.notes, ref_note))
    # Full gradients already held when the step starts: accumulation, the stock path's batch-1 accumulation, and
    # adapters (the trace's gradients are the full model's, its own are the adapters').
    held = e.accumulate > 1 or setup.path == "stock" or counts.adapters > 0
    if e.grads_traced and not held:
        transient = trace.activations_with_gradients
    else:
        transient = trace.activations + state.gradients
    forward_backward = state.resident + transient
    step = state.resident + state.gradients + state.step_working_set
    peak = max(forward_backward, step)
    usable = setup.device.memory_gib - setup.reserve_gib
    sp = e.sequence_parallel
    flops = flops / sp  # a sequence-parallel group's ranks share its step's work
    seconds = flops / (setup.mfu * setup.device.peak_tflops * 1e12) if setup.device.peak_tflops else None
    return {
        "fits": peak / GIB <= usable,
        "peak_gib": _gib(peak),
        "device_gib": setup.device.memory_gib,
        "usable_gib": round(usable, 2),
        "device": setup.device.kind,
        "device_name": setup.device.name,
        "devices": e.world,
        "strategy": e.label,
        "precision": e.precision,
        "compute": e.compute,
        "path": setup.path,
        "model": setup.model.name,
        "parameters": counts.total,
        "trainable_parameters": counts.trainable,
        "adapter": setup.adapter and {"kind": setup.adapter.kind, "r": setup.adapter.r},
        "weights_gib": _gib(state.weights),
        "gradients_gib": _gib(state.gradients),
        "masters_gib": _gib(state.masters),
        "optimizer_gib": _gib(state.optimizer),
        "buffers_gib": _gib(state.buffers),
        "activations_gib": _gib(trace.activations),
        "loss_gib": _gib(trace.loss),
        "optimizer_step_gib": _gib(state.step_working_set),
        "forward_backward_peak_gib": _gib(forward_backward),
        "optimizer_step_peak_gib": _gib(step),
        "host_gib": _gib(state.host),
        "reference": setup.reference,
        "reference_gib": _gib(state.reference),
        "tokens": int(work.tokens),
        "tokens_from": setup.tokens_from,
        "sequence_parallel": sp,
        "data_parallel": e.world // sp,
        "max_frames": setup.video.max_frames,
        "video_pool": setup.video.pool,
        "video_newline": setup.video.newline,
        "crops_and_frames": int(work.images),
        "rows": trace.rows,
        "row_tokens": trace.row_tokens,
        "attention": setup.options.attention(),
        "loss_kernel": "full logits" if setup.options.loss == "full"
        else ("liger fused" if setup.fused_loss else f"chunked ({setup.options.loss_chunk} rows)"),
        "activation_checkpointing": list(setup.options.activation_checkpointing),
        "flops_per_step": flops,
        "mfu": setup.mfu,
        "peak_tflops": setup.device.peak_tflops,
        "step_time_s": None if seconds is None else _significant(seconds),
        "tokens_per_s": None if seconds is None else round(work.tokens / sp / seconds),
        "notes": list(state.notes),
    }


def plan_setup(setup: Setup) -> dict:
    """Trace (or read the cached trace of) the step and evaluate it."""
    from ov_train.model.parts import apply_stage

    model = meta_model(setup.model)
    apply_to_model_config(model.config, MediaSettings(setup.image))  # the stage's anyres N and grid, as training
    geometry = VisionGeometry.from_model_config(model.config)
    all_samples = setup.samples(geometry)
    # Parts the adapter config freezes train nothing (setup.parts has them at 0); adapted parts' own weights are
    # frozen in count().
    apply_stage(model, setup.parts)
    counts = count(model, setup.adapter)
    work = TokenCounts(
        images=sum(sum(s.crops) for s in all_samples), tokens=sum(s.tokens for s in all_samples),
        pairs=sum(s.tokens * (s.tokens + 1) / 2 for s in all_samples),
    )
    # Adapted parts compute no gradients of their own weights (a trained copy does).
    trains = {p for p in counts.trainable_parts if not (setup.adapter and setup.adapter.modes[p] == ADAPTED)}
    model_flops = ModelFlops.from_config(model.config)
    flops = model_flops.train_step(work, trains)
    # A preference stage's reference: forwards without gradients beside the training step.
    flops += reference_state(counts, setup.engine, setup.reference)[1] * sum(
        m + a for m, a in model_flops.forward(work).values())
    trace, cached = cached_trace(setup, model, step_samples(setup, geometry))
    out = evaluate(setup, trace, counts, work, flops)
    out["samples"] = {m: sum(s.modality == m for s in all_samples) for m in ("video", "multi_image", "single_image", "text")}
    out["trace_s"] = 0.0 if cached else trace.seconds
    return out


def with_sequence_parallel(setup: Setup, degree: int) -> Setup:
    """The same run with `degree` ranks sharing each packed row (its whole batch one row under sequence parallelism)."""
    options = setup.options
    if degree > 1:
        options = replace(options, max_tokens=max(options.max_tokens, setup.tokens))
    return replace(setup, engine=replace(setup.engine, sequence_parallel=degree), options=options)


def sequence_parallel_search(setup: Setup) -> list[dict]:
    """Every sequence-parallel degree the LLM's heads and the world allow, smallest first, planned until one fits:
    the last entry is the degree the step needs (or the largest, which does not fit either)."""
    text = meta_model(setup.model).config.text_config
    out = []
    for degree in allowed_degrees(text.num_attention_heads, text.num_key_value_heads):
        if setup.engine.world % degree:
            continue
        result = plan_setup(with_sequence_parallel(setup, degree))
        out.append({"degree": degree, "peak_gib": result["peak_gib"], "fits": result["fits"],
                    "activations_gib": result["activations_gib"], "step_time_s": result["step_time_s"]})
        if result["fits"]:
            break
    return out


def suggestions(setup: Setup) -> list[dict]:
    """Changes that would bring a configuration under the device's memory, each one planned: activation
    checkpointing, ZeRO-3, more devices, a shorter step, one at a time; when none is enough alone, the same
    changes one on top of the other until it fits."""
    from ov_train.planner.state import Engine

    def planned(changes: list[str], changed: Setup) -> dict:
        result = plan_setup(changed)
        return {"change": " + ".join(changes), "peak_gib": result["peak_gib"], "fits": result["fits"]}

    def checkpointed(s: Setup) -> Setup | None:
        if set(s.options.activation_checkpointing) == {"vision", "llm"}:
            return None
        return replace(s, options=replace(s.options, activation_checkpointing=("vision", "llm"), checkpoint_every=1))

    def zero3(s: Setup) -> Setup | None:
        e = s.engine
        if e.name == "fsdp2" or (e.name == "zero" and e.zero_stage == 3):
            return None
        precision = "bf16-mixed" if e.precision == "bf16-true" else e.precision
        return replace(s, engine=Engine("zero", e.world, precision, 3, accumulate=e.accumulate,
                                        sequence_parallel=e.sequence_parallel))

    def search(s: Setup, changes: list[str], what: str, variants) -> tuple[dict | None, Setup | None]:
        """The first variant that fits, else the last one tried."""
        result = last = None
        for label, variant in variants(s):
            result, last = planned([*changes, label], variant), variant
            if result["fits"]:
                break
        return result, last

    def more_devices(s: Setup):
        e = s.engine
        if e.name not in ("fsdp2", "zero") or e.zero_stage < 2:
            return
        world = e.world * 2
        while world <= 1024:
            yield f"{world} devices (trainer.devices x trainer.num_nodes)", replace(s, engine=replace(e, world=world))
            world *= 2

    def shorter(s: Setup):
        tokens = s.tokens // 2
        while tokens >= 2048:
            options = replace(s.options, max_tokens=min(s.options.max_tokens, tokens))
            yield f"data.max_tokens_per_batch={tokens}", replace(s, tokens=tokens, options=options)
            tokens //= 2

    out = []
    steps = [
        ("model.activation_checkpointing=[vision,llm]", checkpointed),
        ("strategy=deepspeed_zero3", zero3),
    ]
    for label, change in steps:
        changed = change(setup)
        if changed is not None:
            out.append(planned([label], changed))
    for variants in (more_devices, shorter):
        result, _ = search(setup, [], "", variants)
        if result is not None:
            out.append(result)
    if any(s["fits"] for s in out):
        return [s for s in out if s["fits"]]
    # Nothing alone: stack them.
    current, changes = setup, []
    for label, change in steps:
        changed = change(current)
        if changed is not None:
            current, changes = changed, [*changes, label]
    for variants in (more_devices, shorter):
        result, last = search(current, changes, "", variants)
        if result is None:
            continue
        if result["fits"]:
            return out + [result]
        current, changes = last, result["change"].split(" + ")
    return out + [planned(changes, current)]
