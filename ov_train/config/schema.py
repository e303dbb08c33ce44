"""The config schema: typed dataclasses registered as Hydra structured configs.

Hydra merges every YAML of `ov_train/conf` (and every command-line override) onto these types while it
composes, so an unknown key (`trainer.max_step=2`), a wrong type (`data.batch_size=many`) or a key of
another option (`strategy.stage=3` under `strategy=ddp`) stops the run at composition, with the full key
named, before anything is built. Values (a learning rate below 0, a template that does not exist) are
checked afterwards, all at once, by `ov_train.config.run_plan.resolve_plan`.

Groups whose options carry different keys (strategy, data, logger, adapter) have one class per option, each a
subclass of the group's base; an option's YAML names its class in its defaults list (`schema_ddp`).
Lightning Trainer arguments the schema does not list pass through with `+trainer.NAME=VALUE`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PreferenceConfig:
    """`stage.preference`: the stage trains on preference pairs (config/preference.py checks the values)."""

    # sigmoid (DPO), ipo, hinge, or sigmoid_sft (DPO plus sft_weight x the chosen replies' NLL: the MPO-style mix).
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 1.0
    # auto (adapters_off with adapters, else frozen), adapters_off, frozen or precomputed.
    reference: str = "auto"
    # A run from random weights (the embedded tiny model) first trains this many steps of warm_start_stage on the
    # same data's chosen replies, in RUN/warm_start, and starts from that export; 0: none.
    warm_start_steps: int = 0
    warm_start_stage: str = "onevision"


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
    preference: Optional[PreferenceConfig] = None


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
    name: str = MISSING
    pretrained: Optional[str] = None
    vision_tower: Optional[str] = None
    llm: Optional[str] = None
    init_from: Optional[str] = None
    tokenizer: Optional[str] = None
    random_init: bool = False
    lr_scale: float = 1.0
    vision_aspect_ratio: str = "anyres_max_9"
    packing: bool = True
    max_tokens: int = 16384
    loss: str = "chunked"
    loss_chunk: int = 2048
    attn_implementation: str = "auto"
    activation_checkpointing: list[str] = field(default_factory=list)
    checkpoint_every: int = 1
    compile: bool = False
    vision: VisionTowerConfig = MISSING
    text: LanguageModelConfig = MISSING


@dataclass
class IOConfig:
    """Reads of shards and parquet files: attempts after a failed one, the first backoff, a request's timeout."""

    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 60.0


@dataclass
class DataConfig:
    name: str = MISSING
    recipe: str = MISSING
    # Where the recipe's relative source paths start (a folder or URL); needed only when some path is relative.
    root: Optional[str] = None
    # Let the recipe file's `pipe:` paths run: they are shell commands, so a recipe from elsewhere (or a run
    # directory's config) runs none unless the user says so here. A `pipe:` data.root is the user's own.
    allow_pipe: bool = False
    batch_size: Optional[int] = None
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
    shuffle_buffer: int = 256
    max_skips_in_a_row: int = 1000
    io: IOConfig = field(default_factory=IOConfig)
    # Where parquet sources' indexes are built on first read (null: nowhere; they must have one).
    index_dir: Optional[str] = None
    val_samples: Optional[int] = None
    record_keys: bool = False


@dataclass
class SyntheticSettings:
    train_per_subset: int = 2000
    val_per_subset: int = 200
    image_px: int = 32


@dataclass
class SyntheticDataConfig(DataConfig):
    root: Optional[str] = None  # a cache directory per setting
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)


@dataclass
class StrategyConfig:
    name: str = MISSING
    # Ranks sharing one packed row (Ulysses sequence parallelism, config/parallel.py): data parallel over world / N
    # groups; N divides the world and the LLM's heads; ddp or fsdp2. 1: none.
    sequence_parallel: int = 1


@dataclass
class DistributedStrategyConfig(StrategyConfig):
    process_group_backend: Optional[str] = None


@dataclass
class DDPConfig(DistributedStrategyConfig):
    find_unused_parameters: bool = False
    bucket_cap_mb: Optional[int] = None


@dataclass
class DeepSpeedConfig(DistributedStrategyConfig):
    stage: int = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    pin_memory: bool = True
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    param_persistence_threshold: int = 100_000


@dataclass
class FSDP2Config(DistributedStrategyConfig):
    reshard_after_forward: bool = True
    save_distributed_checkpoint: bool = True


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments, passed through as they are (`precision: null` is resolved by the plan)."""

    max_steps: int = MISSING
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: Optional[str] = None
    # Not handed to the Trainer: steps are taken by hand (training/step.py), which clips to this norm (null or 0: off).
    gradient_clip_val: Optional[float] = 1.0
    # Refused unless 1 (config/checks.py): data.samples_per_step makes a larger optimizer step.
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
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
    name: str = MISSING


@dataclass
class WandbLoggerConfig(LoggerConfig):
    mode: str = "offline"
    project: str = "ov_train"
    group: Optional[str] = None


@dataclass
class MLflowLoggerConfig(LoggerConfig):
    tracking_uri: Optional[str] = None
    experiment: str = "ov_train"
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
    alpha: float = 32.0
    dropout: float = 0.05
    targets: AdapterTargets = field(default_factory=AdapterTargets)


@dataclass
class QLoraConfig(LoraConfig):
    """`adapter=qlora`: LoRA on an LLM whose linear layers are 4-bit (bitsandbytes)."""

    quant_type: str = "nf4"
    double_quant: bool = True


@dataclass
class CheckpointConfig:
    every_n_steps: Optional[int] = 500
    every_minutes: Optional[float] = 60.0
    keep: int = 0
    trust: bool = False


@dataclass
class MetricsConfig:
    # null: the peak of the device the run finds (ov_train/devices.py).
    peak_tflops: Optional[float] = None
    predictions: int = 8


@dataclass
class EvalConfig:
    """Greedy generation for the validation table (ov_train/training/metrics.py)."""

    generate: bool = False
    max_new_tokens: int = 32


@dataclass
class PlanConfig:
    """The memory and time planner (`ov-train plan`, the preflight); ov_train/planner checks the values."""

    device: Optional[str] = None
    enforce: bool = True
    path: str = "ov_train"
    mfu: float = 0.4
    tokens: Optional[int] = None
    modality: Optional[str] = None
    reserve_gib: float = 2.0
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
    seed: int = 0
    ckpt_path: Optional[str] = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: Optional[str] = None
    export: bool = True
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
