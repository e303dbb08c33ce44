"""Model-state memory per device: weights, gradients, fp32 masters and AdamW moments, as each engine keeps them.

Bytes per parameter, for P parameters of which T train, on N devices (frozen parameters get neither gradients
nor optimizer state: ov_train.model.parts):

| engine | weights | gradients | fp32 masters | AdamW moments | buffers |
|---|---|---|---|---|---|
| one device, bf16-true | 2P | 2T | 4T | 8T | |
| one device, 32-true / *-mixed | 4P | 4T | | 8T | |
| DDP | as one device | as one device | | 8T | gradient buckets, one more gradient copy (gradient_as_bucket_view is off) |
| ZeRO-1 / ZeRO-2 (bf16) | 2P | 2T (ZeRO-1), 2T/N (ZeRO-2) | 4T/N | 8T/N | reduce buckets (x2 with overlap_comm) |
| ZeRO-3 (bf16) | 2P/N | 2T/N | 4T/N | 8T/N | reduce buckets; two gathered layers (the one running, the one prefetched) |
| FSDP2 (bf16-mixed) | 4P/N (fp32 shards) | 4T/N (fp32) | | 8T/N | root unit in bf16; two gathered layers; one layer's gradients whole (1) |

(1) the root unit is gathered in bf16 all step; one layer's gradients are unsharded, in bf16 and in fp32 for the
reduce-scatter.

Offloading (`offload_optimizer`) moves masters, moments and ZeRO-2/3 gradient partitions to host memory;
`offload_parameters` (ZeRO-3) the weight shards. ZeRO-3 also gathers the largest layer and the largest module
(embeddings or LM head) at once. The optimizer step needs a working set on top: the fp32 copies of a group's
bf16 gradients that MasterWeightAdamW steps with, and AdamW's foreach intermediate (one fp32 tensor per
parameter of the largest group); ZeRO-1/2 step on an fp32 copy of each group's gradient partition, then
all-gather the weights in buckets; ZeRO-3 on an fp32 copy of one sub-group (10^9 elements) at a time.

Adapters (the run's `adapter` config, ov_train.model.adapters): an adapted part's own weights are frozen and rank-r
adapters train on its listed modules (r x (in + out) parameters each, plus `out` for DoRA's magnitudes); a part
trained whole beside adapters is a trained copy (PEFT's modules_to_save) of its module; a frozen part trains nothing.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ov_train.config.adapter import AdapterPlan
from ov_train.config.run_plan import StrategyPlan
from ov_train.config.schema import DeepSpeedConfig
from ov_train.constants import ADAPTED, COPY
from ov_train.model import layout
from ov_train.model.adapters import target_pattern
from ov_train.model.layout import part_of

LAYER_CLASSES = ("SiglipEncoderLayer", "Qwen2DecoderLayer")  # the units FSDP2Strategy shards (ov_train.strategies)


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a model as a stage (and LoRA) trains it."""

    total: int
    trainable: int
    largest_group: int  # trainable parameters of the largest optimizer group (one per part)
    largest_layer: int  # parameters of the largest SigLIP or Qwen2 layer: one FSDP2 / ZeRO-3 gather
    root: int  # parameters outside those layers: FSDP2's root unit
    largest_other: int  # the largest module outside the layers (embeddings, LM head): a ZeRO-3 gather
    adapters: int = 0  # parameters the adapters add: adapters and trained copies (in total and trainable)
    trainable_parts: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def adapter_parameters(model, adapter: AdapterPlan) -> dict[str, int]:
    """Parameters the adapters add per part: r x (in + out) per adapted linear module (+ out for DoRA's magnitude),
    and the whole copy of a part trained beside adapters."""
    out = dict.fromkeys(adapter.modes, 0)
    pattern = target_pattern(model, adapter)
    for name, module in model.named_modules():
        if pattern and re.fullmatch(pattern, name) and hasattr(module, "in_features"):
            extra = module.out_features if adapter.kind == "dora" else 0
            out[part_of(f"{name}.weight")] += adapter.r * (module.in_features + module.out_features) + extra
    for part, mode in adapter.modes.items():
        if mode == COPY:
            out[part] += sum(p.numel() for p in layout.whole_module(model, part).parameters())
    return out


def count(model, adapter: AdapterPlan | None = None) -> Counts:
    """Counts of `model` with requires_grad as the stage set it (ov_train.model.parts.apply_stage); with `adapter`,
    the adapted parts' own weights frozen and the adapters added."""
    modes = adapter.modes if adapter else {}
    groups: dict[str, int] = {}
    total = trainable = 0
    for name, param in model.named_parameters():
        total += param.numel()
        part = part_of(name)
        if param.requires_grad and modes.get(part) not in (ADAPTED, COPY):
            trainable += param.numel()
            groups[part] = groups.get(part, 0) + param.numel()
    added = adapter_parameters(model, adapter) if adapter else {}
    adapters = sum(added.values())
    for part, n in added.items():
        if n:
            groups[part] = groups.get(part, 0) + n
    layers = [m for m in model.modules() if type(m).__name__ in LAYER_CLASSES]
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    others = [sum(p.numel() for p in m.parameters(recurse=False) if id(p) not in in_layers) for m in model.modules()]
    return Counts(
        total=total + adapters, trainable=trainable + adapters, largest_group=max(groups.values(), default=0),
        largest_layer=max(sizes, default=0), root=total - sum(sizes), largest_other=max(others, default=0),
        adapters=adapters, trainable_parts=tuple(sorted(groups)),
    )


@dataclass(frozen=True)
class Engine:
    """How a run keeps its model state: from the `strategy` and `trainer` config nodes."""

    name: str  # single, ddp, zero, fsdp2
    world: int
    precision: str
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    reshard_after_forward: bool = True
    # Elements; the strategy config's (engine_from_plan), its defaults where the engine is a what-if (suggestions).
    reduce_bucket: int = DeepSpeedConfig.reduce_bucket_size
    allgather_bucket: int = DeepSpeedConfig.allgather_bucket_size
    overlap_comm: bool = True
    sub_group: int = 1_000_000_000  # ZeRO-3 steps the optimizer one sub-group of this many elements at a time
    accumulate: int = 1  # micro-batches per optimizer step
    sequence_parallel: int = 1  # ranks sharing one packed row (strategy.sequence_parallel); model state shards over `world`

    @property
    def label(self) -> str:
        sp = f" + sequence parallel {self.sequence_parallel}" if self.sequence_parallel > 1 else ""
        if self.name == "zero":
            offload = "+offload" if self.offload_optimizer or self.offload_parameters else ""
            return f"ZeRO-{self.zero_stage}{offload}{sp}"
        return {"single": "one device", "ddp": "DDP", "fsdp2": "FSDP2"}[self.name] + sp

    @property
    def compute(self) -> str:
        """How the step computes, which is what the activation trace must follow."""
        if self.precision.startswith("32"):
            return "fp32"
        if self.name in ("zero", "fsdp2") or self.precision.endswith("true"):
            return "bf16"  # DeepSpeed casts the module to bf16; FSDP2 gathers bf16 weights; bf16-true
        return "mixed"  # DDP / one device under bf16-mixed: fp32 weights, autocast

    @property
    def grads_traced(self) -> bool:
        """Whether full gradients build up on the device during backward, as the trace allocates them."""
        return self.name in ("single", "ddp") or (self.name == "zero" and self.zero_stage == 1)


@dataclass(frozen=True)
class ModelState:
    weights: int
    gradients: int
    masters: int
    optimizer: int
    buffers: int  # communication buckets and gathered weights
    step_working_set: int  # what the optimizer step adds
    host: int  # offloaded to host memory
    notes: tuple[str, ...] = field(default=())
    reference: int = 0  # a preference stage's frozen reference copy (reference_state)

    @property
    def resident(self) -> int:
        """Held through the whole step (gradients apart)."""
        return self.weights + self.masters + self.optimizer + self.buffers + self.reference


def reference_state(c: Counts, e: Engine, reference: str | None) -> tuple[int, float, str | None]:
    """What a preference stage's reference model (stage.preference.reference, resolved) costs: (bytes per device,
    forward passes added per step, a note). `frozen` is a whole copy of the weights on every device (no engine
    shards it), in the weights' dtype; `adapters_off` runs the policy once more without gradients and with its
    adapters off; `precomputed` costs one forward pass over the training pairs before training, nothing per step."""
    if reference == "frozen":
        w = 2 if e.precision == "bf16-true" or (e.name in ("zero",) and not e.precision.startswith("32")) else 4
        return w * c.total, 1.0, "the frozen reference: a whole copy of the weights on every device, one forward a step"
    if reference == "adapters_off":
        return 0, 1.0, "the reference is the policy with its adapters off: one more forward a step, no second copy"
    if reference == "precomputed":
        return 0, 0.0, "precomputed reference log-probabilities: one forward pass over the training pairs first"
    return 0, 0.0, None


def model_state(c: Counts, e: Engine) -> ModelState:
    n, P, T, G = e.world, c.total, c.trainable, c.largest_group
    half = not e.precision.startswith("32")
    notes = []
    if e.name in ("single", "ddp"):
        masters_kept = e.precision == "bf16-true"  # bf16 weights: MasterWeightAdamW keeps fp32 masters
        w = 2 if masters_kept else 4
        weights, grads, masters, optimizer = w * P, w * T, 4 * T if masters_kept else 0, 8 * T
        buffers = w * T if e.name == "ddp" else 0
        step = 4 * G + (4 * G if masters_kept else 0)  # foreach intermediate (+ fp32 gradient copies)
        if e.name == "ddp":
            notes.append("DDP keeps its gradient buckets beside the gradients (gradient_as_bucket_view=false)")
        return ModelState(weights, grads, masters, optimizer, buffers, step, 0, tuple(notes))
    if e.name == "zero":
        w = 2 if half else 4
        offload_opt, offload_par = e.offload_optimizer, e.offload_parameters and e.zero_stage == 3
        weights = 0 if offload_par else (w * P if e.zero_stage < 3 else w * P // n)
        grads = w * T if e.zero_stage == 1 else (0 if offload_opt else w * T // n)
        masters, optimizer = (0, 0) if offload_opt else (4 * T // n, 8 * T // n)
        buffers = w * min(e.reduce_bucket, T) * (2 if e.overlap_comm else 1)
        if e.zero_stage == 3:
            buffers += w * (c.largest_layer + max(c.largest_layer, c.largest_other))
            notes.append("ZeRO-3 gathers each module's full weights around its use: the largest layer and the largest"
                         " unit counted (running, prefetched)")
            step = 0 if offload_opt else 4 * min(e.sub_group, T // n)  # steps an fp32 copy of each sub-group's gradients
        else:
            step = 0 if offload_opt else 4 * G // n + w * min(e.allgather_bucket, P)  # per group, then the all-gather
        host = (12 * T // n + (w * T // n if e.zero_stage > 1 else 0) if offload_opt else 0) + (w * P // n if offload_par else 0)
        return ModelState(weights, grads, masters, optimizer, buffers, step, host, tuple(notes))
    if e.name == "fsdp2":
        c_bytes = 2 if half else 4  # bf16 compute under bf16-mixed (MixedPrecisionPolicy), else fp32
        weights, grads, optimizer = 4 * P // n, 4 * T // n, 8 * T // n
        layers = 2 * c.largest_layer if e.reshard_after_forward else P - c.root
        buffers = c_bytes * (c.root + layers) + (c_bytes + 4) * c.largest_layer
        notes.append(
            "FSDP2 holds the root unit (embeddings, projector, LM head) gathered through the step, and "
            + ("two gathered layers (running, prefetched)" if e.reshard_after_forward else "every layer gathered from forward to backward")
        )
        return ModelState(weights, grads, 0, optimizer, buffers, 4 * G // n, 0, tuple(notes))
    raise ValueError(f"unknown engine {e.name!r}")


def engine_from_plan(strategy: StrategyPlan, precision: str, accumulate: int = 1) -> Engine:
    """The Engine of the run plan's strategy on its world of devices."""
    s, world, sp = strategy.settings, strategy.world_size, strategy.sequence_parallel
    if strategy.name == "deepspeed":
        return Engine(
            "zero", world, precision, int(s["stage"]), bool(s["offload_optimizer"]), bool(s["offload_parameters"]),
            reduce_bucket=int(s["reduce_bucket_size"]), allgather_bucket=int(s["allgather_bucket_size"]),
            overlap_comm=bool(s["overlap_comm"]), accumulate=accumulate, sequence_parallel=sp,
        )
    if strategy.name == "fsdp2":
        return Engine("fsdp2", world, precision, reshard_after_forward=bool(s["reshard_after_forward"]), accumulate=accumulate,
                      sequence_parallel=sp)
    # auto: Lightning runs DDP on several devices
    name = "ddp" if strategy.name == "ddp" or world > 1 else "single"
    return Engine(name, world, precision, accumulate=accumulate, sequence_parallel=sp)
