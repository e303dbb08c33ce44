"""The config schema: typed dataclasses registered as Hydra structured configs.

Hydra merges every YAML of `ov_train/conf` (and every command-line override) onto these types while it
composes, so an unknown key (`trainer.max_step=2`), a wrong type (`data.batch_size=many`) or a key of
another option (`strategy.stage=3` under `strategy=ddp`) stops the run at composition, with the full key
named, before anything is built. Values (a learning rate below 0, a template that does not exist) are
checked afterwards, all at once, by `ov_train.config.run_plan.resolve_plan`: each class its own (`problems()`, by
full key), config/checks.py what spans nodes. Each default is written here once (the YAMLs set what differs), and
the run plan holds each node's `OmegaConf.to_object` instance, not a copy of its values.

Groups whose options carry different keys (strategy, data, logger, adapter) have one class per option, each a
subclass of the group's base; an option's YAML names its class in its defaults list (`schema_ddp`).
Lightning Trainer arguments the schema does not list pass through with `+trainer.NAME=VALUE`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ov_train.config import reproduce
from ov_train.config.checks import LOGGERS, STRATEGIES, WANDB_MODES, at_least, missing_package
from ov_train.config.media import anyres_max
from ov_train.config.options import IOSettings
from ov_train.config.preference import PreferenceSettings
from ov_train.constants import (
    ATTENTION,
    BATCHINGS,
    CHECKPOINTABLE,
    DECODES,
    LOSS_WEIGHTINGS,
    LOSSES,
    PARTS,
    PLACEMENTS,
    SYNTHETIC_MIN_PX,
    TEMPLATES,
    VARLEN,
)

try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (only whether it exists matters here)

    HAS_VARLEN = True
except ImportError:
    HAS_VARLEN = False


@dataclass
class StageConfig:
    name: str = MISSING
    # Learning rate per part; a part absent or at 0 is frozen.
    parts: dict[str, float] = field(default_factory=dict)
    template: str = MISSING
    max_length: int = MISSING
    # anyres_max_N (N >= 1), pad (padded square crop + newline) or square (squashed crop, no newline).
    image_strategy: str = MISSING
    # anyres crop grids, RxC: "(1x1),...,(6x6)", "(2x2),(1x2)" or a list [2x2, 1x3]; null: the model config's.
    image_grid: Any = None
    # Video frames (config/media.py): `fps` takes one frame every round(video fps / video_fps), at most max_frames
    # (then spread evenly); `uniform` always takes max_frames, evenly; frame_size decodes at N x N (null: own size).
    video_fps: float = 1.0
    max_frames: int = MISSING
    frame_sampling: str = "fps"
    frame_size: Optional[int] = None
    # Video token compression (config/media.py): each frame's features pooled by this stride (2: 196 tokens a 384 px
    # frame, 3: 81, 4: 49), newlines one_token (after the video), grid (per pooled row), frame or no_token.
    video_pool: int = MISSING
    video_newline: str = MISSING
    # A turn's single <image>/<video>: moved to its start + "\n" (front, as the public code) or left (as_is).
    media_placement: str = "front"
    # The step's loss: token (mean over supervised tokens) or sample (each sample's mean, weighted equally).
    loss_weighting: str = "token"
    weight_decay: float = MISSING
    warmup_ratio: float = MISSING
    recipe: str = MISSING
    # ov_train's defaults or the public LLaVA-NeXT code's (config/reproduce.py): ov_train or public_code. The keys
    # below, null by default, each turn one difference alone (null: as stage.reproduce says).
    reproduce: str = "ov_train"
    labels: Optional[str] = None  # replies | reference (the public preprocess_qwen masks)
    plain_newline: Optional[str] = None  # apart | joined (caption + "\n" tokenized together)
    token_rounding: Optional[str] = None  # round (transformers) | truncate (the public unpad_image)
    warmup_schedule: Optional[str] = None  # ov_train | transformers (the public trainer's)
    # The crop grids in the public script's order, used under stage.reproduce=public_code; null: image_grid.
    public_image_grid: Any = None
    # Preference training (stage=dpo); null: the stage trains on conversations.
    preference: Optional[PreferenceSettings] = None

    def problems(self) -> list[str]:
        """The stage's own values; image_strategy, image_grid and the video keys: config/media.py (read_media)."""
        problems = [f"stage.parts.{part}: no such part; allowed: {sorted(PARTS)}" if part not in PARTS else
                    f"stage.parts.{part}={lr!r}: learning rate must be a number >= 0 (0 freezes the part)"
                    for part, lr in self.parts.items() if part not in PARTS or lr < 0]
        if not any(lr > 0 for lr in self.parts.values()):
            problems.append("stage.parts: no part has a learning rate > 0, so nothing would train")
        for key, allowed in (("template", TEMPLATES), ("media_placement", PLACEMENTS), ("loss_weighting", LOSS_WEIGHTINGS)):
            if getattr(self, key) not in allowed:
                problems.append(f"stage.{key}={getattr(self, key)!r}; allowed: {list(allowed)}")
        if self.max_length < 1:
            problems.append(f"stage.max_length={self.max_length!r} must be a positive integer")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"stage.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        return problems + reproduce.problems(self) + (self.preference.problems() if self.preference else [])


@dataclass
class VisionTowerConfig:
    """SiglipVisionConfig keys of the tower's geometry."""

    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    image_size: int = MISSING
    patch_size: int = MISSING


@dataclass
class LanguageModelConfig:
    """Qwen2Config keys of the LLM's geometry; null leaves Qwen2Config's default (vocab_size: the tokenizer's)."""

    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    vocab_size: Optional[int] = None
    tie_word_embeddings: bool = False
    max_position_embeddings: Optional[int] = None
    rope_theta: Optional[float] = None
    rms_norm_eps: Optional[float] = None


@dataclass
class ModelConfig:
    """`model=`: weights, geometry (model/build.py) and the forward's performance keys (docs/PERFORMANCE.md)."""

    name: str = MISSING
    # Checkpoint routes (local directories): a OneVision checkpoint, or a SigLIP tower + a Qwen2 LLM.
    pretrained: Optional[str] = None
    vision_tower: Optional[str] = None
    llm: Optional[str] = None
    # Start from an earlier stage's export (save_pretrained directory) or Lightning checkpoint.
    init_from: Optional[str] = None
    # Built locally and cached when null.
    tokenizer: Optional[str] = None
    # Random init is allowed only for geometry configs that say so (the tiny model, benchmarks).
    random_init: bool = False
    # Multiplies the stage's learning rates (a random-init model learns from scratch).
    lr_scale: float = 1.0
    # The anyres_max_N a model built here starts with; a stage's anyres_max_N replaces it (the run plan decides).
    vision_aspect_ratio: str = "anyres_max_9"
    # Samples packed without padding into rows of up to max_tokens (auto attention: torch varlen on CUDA,
    # block-diagonal sdpa elsewhere); loss over supervised positions without full logits (chunked: Liger fused on
    # CUDA, else chunks of loss_chunk rows; full: one logits tensor).
    packing: bool = True
    max_tokens: int = 16384
    loss: str = "chunked"
    loss_chunk: int = 2048
    attn_implementation: str = "auto"
    # Any of [vision, llm], every checkpoint_every-th layer.
    activation_checkpointing: list[str] = field(default_factory=list)
    checkpoint_every: int = 1
    # torch.compile each tower and LLM layer (dynamic shapes: packed rows change length every step).
    compile: bool = False

    def problems(self) -> list[str]:
        """What any machine can check (the paths, the weights and the geometry: checks.model_problems; varlen
        attention against trainer.precision: checks.precision_problems)."""
        out = [] if anyres_max(self.vision_aspect_ratio) else [
            f"model.vision_aspect_ratio={self.vision_aspect_ratio!r}; allowed: anyres_max_N (N >= 1)"]
        if self.lr_scale <= 0:
            out.append(f"model.lr_scale={self.lr_scale!r} must be > 0 (it multiplies the stage's learning rates)")
        if self.loss not in LOSSES:
            out.append(f"model.loss={self.loss!r}; allowed: {list(LOSSES)}")
        if self.attn_implementation not in ATTENTION:
            out.append(f"model.attn_implementation={self.attn_implementation!r}; allowed: {list(ATTENTION)}")
        if self.attn_implementation == VARLEN and not self.packing:
            out.append(f"model.attn_implementation={VARLEN} needs model.packing=true")
        if self.attn_implementation == VARLEN and not HAS_VARLEN:
            out.append(f"model.attn_implementation={VARLEN}: this torch has no torch.nn.attention.varlen")
        unknown = sorted(set(self.activation_checkpointing) - set(CHECKPOINTABLE))
        if unknown:
            out.append(f"model.activation_checkpointing has {unknown}; allowed: {list(CHECKPOINTABLE)}")
        return out + [f"model.{key}={getattr(self, key)!r} must be a positive integer"
                      for key in ("max_tokens", "loss_chunk", "checkpoint_every") if getattr(self, key) < 1]

    def attention(self, half_precision: bool = True, on_gpu: bool | None = None) -> str:
        """The attention implementation `auto` stands for when the model computes in bf16/fp16 or not, on a machine
        with GPUs or without (None: this one). The run plan's forward holds it decided (run_plan.py)."""
        if self.attn_implementation != "auto":
            return self.attn_implementation
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        return VARLEN if self.packing and half_precision and on_gpu and HAS_VARLEN else "sdpa"

    @classmethod
    def stock(cls, **changes) -> ModelConfig:
        """The stock forward with this class's defaults for the rest, then `changes` (tests, benchmarks)."""
        return replace(cls().as_stock(), **changes)

    def as_stock(self) -> ModelConfig:
        """The stock forward (transformers' own: a padded batch, sdpa, one logits tensor), the rest as here."""
        return replace(self, packing=False, loss="full", attn_implementation="sdpa")
    vision: VisionTowerConfig = MISSING
    text: LanguageModelConfig = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    recipe: str = MISSING
    # Where the recipe's relative source paths start (a folder or URL, e.g. data.root=/data/onevision); needed only
    # when some path is relative. Synthetic data: data.synthetic says where null puts it.
    root: Optional[str] = None
    # Let the recipe file's `pipe:` paths run: they are shell commands, so a recipe from elsewhere (or a run
    # directory's config) runs none unless the user says so here. A `pipe:` data.root is the user's own.
    allow_pipe: bool = False
    # Most samples per batch (per device); batches also stop at the token budget when there is one.
    batch_size: Optional[int] = None
    # Padded tokens per batch (samples x longest, visual + text); null: the recipe's, if it sets one.
    max_tokens_per_batch: Optional[int] = None
    # What fills a batch (constants.BATCHINGS): `tokens`, padded LLM tokens up to the token budget; `compute`, training
    # FLOPs up to that many LLM tokens' worth, best fit from the next 16 samples (data/compute_batches.py), so that
    # data-parallel ranks' steps cost the same; real tokens count there, not padding.
    batching: str = "tokens"
    # How images are decoded (constants.DECODES): `exact`, in full, PIL's resizes (the stock PIL processor's pixels);
    # `fast`, a JPEG at the smallest DCT scale that still covers what its crops are resized to, and with torchvision
    # installed its JPEG decoder and resizes for images and video frames (vision/pixels.py; pixels differ, tokens do
    # not). Measured (docs/PERFORMANCE.md, "Feeding the GPU"): 2.0 CPU cores per H100 at OV-0.5B against 3.8; crops
    # 0.0025 normalised apart on average; a trained tiny model's held-out accuracy on its held-out images as large
    # JPEGs 0.677 with either (scripts/decode_accuracy.py); tiny runs trained with fast scored 0.777 / 0.788 against
    # 0.700 / 0.725 (two seeds), gaps in modalities whose pixels the setting leaves equal: no cost found.
    decode: str = "exact"
    # A global batch in samples (null: each token-budget batch is a step), split over the ranks into micro-batches.
    samples_per_step: Optional[int] = None
    # Passes over the recipe's sample counts; sets trainer.max_steps (needs samples_per_step).
    epochs: Optional[float] = None
    # Loader processes per rank (0: the main process loads); null: sized from the CPUs the process may use.
    num_workers: Optional[int] = None
    # Raw samples read into each shuffled block, per source and loader worker.
    shuffle_buffer: int = 256
    # Unusable samples (too long, undecodable...) are skipped and counted; this many in a row, from the stream or one
    # source, stop the run with the reasons counted, rather than skip forever.
    max_skips_in_a_row: int = 1000
    io: IOSettings = field(default_factory=IOSettings)
    # Where parquet sources' indexes are built on first read (null: nowhere; they must have one).
    index_dir: Optional[str] = None
    # Held-out samples per source at validation (null: all).
    val_samples: Optional[int] = None
    # Write the sample keys of every consumed batch to RUN/consumed_keys.jsonl (data-order debugging).
    record_keys: bool = False

    def problems(self) -> list[str]:
        """data.root and the recipe: config/recipe.py (which reads it); the step: checks.step_problems."""
        problems = (
            at_least("data.num_workers", self.num_workers, 0,
                     "loader processes per rank; 0 loads in the main one; null: sized from the usable CPUs", True)
            + at_least("data.shuffle_buffer", self.shuffle_buffer, 1, "raw samples per shuffled block")
            + at_least("data.val_samples", self.val_samples, 1, "held-out samples per source; null: all", True)
            + at_least("data.max_skips_in_a_row", self.max_skips_in_a_row, 1, "unusable samples in a row that stop the stream")
            + at_least("data.max_tokens_per_batch", self.max_tokens_per_batch, 1, "padded tokens per batch", True)
            + at_least("data.batch_size", self.batch_size, 1, "samples per batch, with a token budget", True)
        )
        if self.decode not in DECODES:
            problems.append(f"data.decode={self.decode!r}; allowed: {', '.join(DECODES)}")
        if self.batching not in BATCHINGS:
            problems.append(f"data.batching={self.batching!r}; allowed: {', '.join(BATCHINGS)}")
        elif self.batching == "compute" and self.samples_per_step is not None:
            problems.append(f"data.batching=compute fills each batch to a compute budget, data.samples_per_step="
                            f"{self.samples_per_step} fixes a step's samples: set one of them (data.batching=tokens or"
                            " data.samples_per_step=null)")
        return problems + self.io.problems()


@dataclass
class SyntheticSettings:
    """`data.synthetic.*` (ov_train/data/synthetic.py). data.root null: one directory per setting (seed, these, format
    version) under $OV_TRAIN_CACHE (~/.cache/ov_train)/synthetic/, generated once under a lock, shared by the runs
    with that setting; a path: the shards live there (made when empty or absent; one holding others is refused)."""

    train_per_subset: int = 2000
    val_per_subset: int = 200
    image_px: int = 32

    def problems(self) -> list[str]:
        minimums = {"train_per_subset": 1, "val_per_subset": 1, "image_px": SYNTHETIC_MIN_PX}
        return [p for key, least in minimums.items()
                for p in at_least(f"data.synthetic.{key}", getattr(self, key), least, "synthetic data settings")]


@dataclass
class SyntheticDataConfig(DataConfig):
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)

    def problems(self) -> list[str]:
        return super().problems() + self.synthetic.problems()


@dataclass
class StrategyConfig:
    name: str = MISSING
    # Ranks sharing one packed row (Ulysses sequence parallelism, config/parallel.py): data parallel over world / N
    # groups; N divides the world and the LLM's heads; ddp or fsdp2. 1: none.
    sequence_parallel: int = 1

    def problems(self) -> list[str]:
        """The name (a strategy's own keys: its subclass); strategy.sequence_parallel: config/parallel.py."""
        if self.name in STRATEGIES:
            return []
        configs = "auto, ddp, deepspeed_zero2[_offload], deepspeed_zero3[_offload], fsdp2"
        return [f"strategy.name={self.name!r}; allowed: {list(STRATEGIES)} (strategy={configs})"]


@dataclass
class DistributedStrategyConfig(StrategyConfig):
    # null: nccl on GPU, gloo on CPU (DeepSpeed: nccl).
    process_group_backend: Optional[str] = None


@dataclass
class DDPConfig(DistributedStrategyConfig):
    # Every trainable parameter gets a gradient each step (text-only batches run the tower on a zero-weighted dummy
    # crop), so DDP need not search the graph for unused ones.
    find_unused_parameters: bool = False
    # Gradient all-reduce bucket size in MiB (null: PyTorch's default, 25).
    bucket_cap_mb: Optional[int] = None


@dataclass
class DeepSpeedConfig(DistributedStrategyConfig):
    stage: int = 2  # ZeRO stage: 1, 2 or 3
    # Keep the fp32 master weights and optimizer state in CPU memory and step the optimizer there.
    offload_optimizer: bool = False
    # Keep the (stage 3) weight shards in CPU memory between uses.
    offload_parameters: bool = False
    # Pinned CPU buffers for the offloaded tensors (faster copies, more locked host memory).
    pin_memory: bool = True
    # Communication bucket sizes, in elements.
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    # Overlap gradient reduction with the backward pass, and copy gradients into one contiguous buffer.
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    # ZeRO-3: parameters with fewer elements than this stay whole on every rank (no gather for them).
    param_persistence_threshold: int = 100_000

    def problems(self) -> list[str]:
        if self.stage not in (1, 2, 3):
            return super().problems() + [f"strategy.stage={self.stage!r}; allowed: 1, 2, 3 (ZeRO stages)"]
        return super().problems() + ([] if self.stage == 3 or not self.offload_parameters else [
            f"strategy.offload_parameters=true needs strategy.stage=3 (ZeRO-{self.stage} does not shard weights)"])


@dataclass
class FSDP2Config(DistributedStrategyConfig):
    # Free the gathered weights after each unit's forward and gather again for backward (ZeRO-3 style); false keeps
    # them until backward (ZeRO-2 style: more memory, less communication).
    reshard_after_forward: bool = True
    # true: checkpoints are directories with one shard per process (torch.distributed.checkpoint); false: rank 0
    # gathers full weights and optimizer state into one file.
    save_distributed_checkpoint: bool = True


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments, passed through as they are (`precision: null` is resolved by the plan)."""

    max_steps: int = MISSING
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    # null: bf16-true on one GPU (fp32 master weights in the optimizer), bf16-mixed on several (DDP reduces fp32
    # gradients; DeepSpeed and FSDP2 keep fp32 weights), 32-true on CPU (config/options.py default_precision).
    precision: Optional[str] = None
    # Not handed to the Trainer: steps are taken by hand (training/step.py), which clips to this norm (null or 0: off).
    gradient_clip_val: Optional[float] = 1.0
    # Refused unless 1 (config/checks.py): data.samples_per_step makes a larger optimizer step.
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    # Validate every N optimizer steps (or a 'DD:HH:MM:SS' duration); null validates once at the end.
    val_check_interval: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    detect_anomaly: bool = False
    profiler: Optional[str] = None
    overfit_batches: Any = 0.0  # an int counts batches, a float is a fraction (Lightning's reading)


@dataclass
class LoggerConfig:
    """`logger=`: wandb, csv, tensorboard, mlflow or none (training/loggers.py builds it from the plan's LoggerPlan)."""

    name: str = MISSING

    def problems(self) -> list[str]:
        if self.name not in LOGGERS:
            return [f"logger.name={self.name!r}; allowed: {list(LOGGERS)}"]
        if package := missing_package(self.name):
            return [f"logger={self.name} needs the {package} package: pip install 'ov_train[loggers]'"]
        return []


@dataclass
class WandbLoggerConfig(LoggerConfig):
    """Weights & Biases; offline by default (no account needed), `logger.mode=online` to sync."""

    mode: str = "offline"
    project: str = "ov_train"
    # null: the sweep directory in a multirun (jobs of one sweep side by side), else the stage.
    group: Optional[str] = None

    def problems(self) -> list[str]:
        wrong = [] if self.mode in WANDB_MODES else [f"logger.mode={self.mode!r}; allowed: {list(WANDB_MODES)}"]
        return super().problems() + wrong


@dataclass
class MLflowLoggerConfig(LoggerConfig):
    # null: a SQLite store, <run_dir>/mlflow.db (`mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db`); or a
    # server's URL.
    tracking_uri: Optional[str] = None
    experiment: str = "ov_train"
    # null: the sweep directory in a multirun, else the stage; MLflow has no groups: it is the run's `group` tag.
    group: Optional[str] = None


@dataclass
class AdapterConfig:
    """`adapter=none`: every part trains whole or stays frozen, as the stage says."""

    name: str = "none"


@dataclass
class AdapterTargets:
    """Per part: a list of module names that get adapters (inside its layers), `full` (trains whole as the stage
    says) or `frozen` (whatever the stage says). config/adapter.py checks the values."""

    vision_tower: Any = "frozen"
    projector: Any = "frozen"
    llm: Any = "frozen"


@dataclass
class LoraConfig(AdapterConfig):
    """`adapter=lora` / `adapter=dora` (PEFT)."""

    r: int = 16
    alpha: float = 32.0  # adapters are scaled by alpha / r
    dropout: float = 0.05
    targets: AdapterTargets = field(default_factory=AdapterTargets)


@dataclass
class QLoraConfig(LoraConfig):
    """`adapter=qlora`: LoRA on an LLM whose linear layers are 4-bit (bitsandbytes)."""

    # 4-bit data type: nf4 (NormalFloat, the QLoRA paper's) or fp4.
    quant_type: str = "nf4"
    # Quantize the quantization constants too (about 0.4 bit per weight less).
    double_quant: bool = True


@dataclass
class CheckpointConfig:
    """`checkpoint.*` (checkpoints/saving.py writes them, checkpoints/reading.py reads them)."""

    # Write checkpoints/last.ckpt every N optimizer steps and/or every M minutes (null turns either off); the end
    # of training and SIGTERM always write it. Single files are written beside the target and renamed over it.
    every_n_steps: Optional[int] = 500
    every_minutes: Optional[float] = 60.0
    # Also keep the N most recent periodic checkpoints as checkpoints/step=<step>.ckpt (a full extra write each).
    keep: int = 0
    # Checkpoints (ckpt_path, model.init_from, ov-export) are unpickled as tensors and plain data only; true
    # unpickles anything in them, which can run code: only for files you trust.
    trust: bool = False

    def problems(self) -> list[str]:
        problems = []
        if self.every_n_steps is not None and self.every_n_steps < 1:
            problems.append(f"checkpoint.every_n_steps={self.every_n_steps!r} must be a positive integer or null (off)")
        if self.every_minutes is not None and self.every_minutes <= 0:
            problems.append(f"checkpoint.every_minutes={self.every_minutes!r} must be a positive number or null (off)")
        return problems + at_least("checkpoint.keep", self.keep, 0, "earlier checkpoints kept besides last.ckpt")


@dataclass
class MetricsConfig:
    """`metrics.*` (training/metrics.py)."""

    # Peak dense bf16 TFLOP/s of one device, the MFU denominator. null: the datasheet figure of the GPU found
    # (H100 989, H200 989, A100 312, ...: ov_train/devices.py); devices the table lacks (CPUs) use the H100's.
    peak_tflops: Optional[float] = None
    # Held-out samples per modality in the prediction table of each validation (run_dir/predictions/step_<N>.jsonl).
    predictions: int = 8

    def problems(self) -> list[str]:
        peak = self.peak_tflops
        wrong = [] if peak is None or peak > 0 else [
            f"metrics.peak_tflops={peak!r} must be a positive number (the device's peak TFLOP/s) or null"]
        return wrong + at_least("metrics.predictions", self.predictions, 0, "held-out samples shown per modality")


@dataclass
class EvalConfig:
    """`eval.*`: at each validation, also generate the greedy reply of each prediction-table sample (as ov-eval does),
    shown in W&B with its image (training/metrics.py). Off by default: one generate call per sample."""

    generate: bool = False
    max_new_tokens: int = 32

    def problems(self) -> list[str]:
        return at_least("eval.max_new_tokens", self.max_new_tokens, 1, "tokens generated per reply")


@dataclass
class PlanConfig:
    """The memory and time planner: `ov-train plan [overrides] [--json]`, and a preflight before training on GPUs (or
    whenever plan.device is named); ov_train/planner checks the values. docs/PERFORMANCE.md ("Planning memory and
    time") says how it counts."""

    # h100, h100_pcie, h200, b200, a100_80g, a100_40g, l40s, cpu; null: this machine's GPU (or its CPU on a CPU run).
    device: Optional[str] = None
    # Refuse to train when the planned peak exceeds the device's memory less plan.reserve_gib; false: warn and go on.
    enforce: bool = True
    # ov_train, or stock: the public recipe's step (batch 1 with accumulation, fp32 weights under bf16 autocast, full
    # logits), on the same samples.
    path: str = "ov_train"
    # The model FLOPs utilisation the step time is stated at.
    mfu: float = 0.4
    # Tokens in one step's batch per device; null: data.max_tokens_per_batch, else the recipe's budget.
    tokens: Optional[int] = None
    # The batch's samples: null, the recipe's modalities in its proportions; or all video / multi_image / single_image /
    # text. Each modality comes at its largest (32-frame videos, 12-image samples, 1080x1920 anyres images).
    modality: Optional[str] = None
    # Left out of the device's memory: CUDA context, NCCL buffers, allocator fragmentation.
    reserve_gib: float = 2.0
    # The device's memory in GiB, replacing the planner's table (ov_train/planner/devices.py).
    memory_gib: Optional[float] = None


@dataclass
class Config:
    stage: StageConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    strategy: StrategyConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    adapter: AdapterConfig = MISSING
    # Seeds the model, the data streams and the synthetic data.
    seed: int = 0
    # Resume: a checkpoint path; `last` (this run dir's checkpoints/last.ckpt, which must exist); `auto` (that one
    # if it exists, else start fresh: what a requeued job wants). The checkpoint must come from the same stage,
    # model (name and geometry) and trainer.max_steps (the schedule spans it); anything else is refused up front.
    ckpt_path: Optional[str] = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Where the run writes checkpoints/, export/ and summary.json (conf/config.yaml: Hydra's run directory).
    run_dir: Optional[str] = None
    # Write a save_pretrained export at the end of training.
    export: bool = True
    # A non-finite training loss: `skip` the step's update (counted as train/nonfinite_batches; 10 in a row stop
    # the run) or `stop` at once; either way the error names the step and the modality whose loss went non-finite.
    nonfinite: str = "skip"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# Option schemas, named in each option's defaults list.
GROUP_SCHEMAS = {
    "strategy": {"schema_auto": StrategyConfig, "schema_ddp": DDPConfig, "schema_deepspeed": DeepSpeedConfig,
                 "schema_fsdp2": FSDP2Config},
    "data": {"schema_synthetic": SyntheticDataConfig, "schema_recipe": DataConfig},
    "logger": {"schema_logger": LoggerConfig, "schema_wandb": WandbLoggerConfig, "schema_mlflow": MLflowLoggerConfig},
    "adapter": {"schema_adapter": AdapterConfig, "schema_lora": LoraConfig, "schema_qlora": QLoraConfig},
}


def register() -> None:
    """Put the schema into Hydra's ConfigStore (done on import; storing again replaces the same entries)."""
    store = ConfigStore.instance()
    store.store(name="ov_train_schema", node=Config)
    for group, options in GROUP_SCHEMAS.items():
        for name, node in options.items():
            store.store(group=group, name=name, node=node)


register()
