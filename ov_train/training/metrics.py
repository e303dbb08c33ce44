"""Dashboard callbacks: throughput, MFU, gradient norms and GPU memory; a table of held-out predictions.

Everything goes through LightningModule.log (or, for the table, the W&B logger and a file), so the
W&B and CSV loggers receive the same keys.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import wandb
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.tensor import DTensor

from ov_train import devices
from ov_train.constants import IGNORE_INDEX
from ov_train.eval.inference import generate_replies
from ov_train.model.forward import embed_inputs
from ov_train.model.layout import part_of
from ov_train.text.chat_template import stop_token_ids
from ov_train.text.tokenizer import load_tokenizer
from ov_train.utils.flops import ModelFlops, TokenCounts
from ov_train.utils.logging import get_logger
from ov_train.vision.geometry import VisionGeometry

log = get_logger(__name__)


def batch_counts(batch: dict) -> torch.Tensor:
    """[images, tokens, causal pairs, samples] of a collated batch (or a step bundle's micro-batches), on the batch's device."""
    if "micro_batches" in batch:
        return torch.stack([batch_counts(mb) for mb in batch["micro_batches"]]).sum(0)
    lengths = batch["attention_mask"].sum(1).double()
    images = sum(batch[k].shape[0] for k in ("pixel_values", "video_frames") if batch.get(k) is not None)
    counts = [images, lengths.sum(), (lengths * (lengths + 1) / 2).sum(), len(lengths)]
    return torch.stack([torch.as_tensor(c, dtype=torch.float64, device=lengths.device) for c in counts])


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(tensors)
    # FSDP2 gradients are DTensors, whose norm is a partial result until reduced over the shards.
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def remaining_time(elapsed: float, done: int, left: int) -> str:
    """The time `left` more steps take at the pace of the `done` ones so far, as 1h02m, 4m05s or 12s."""
    if done <= 0:
        return "?"
    seconds = round(elapsed / done * left)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def logs_at(trainer, step: int) -> bool:
    """Whether Lightning writes the logged values of this optimizer step (1-based) to the loggers."""
    return step % trainer.log_every_n_steps == 0


def rank_imbalance(step_flops: torch.Tensor) -> torch.Tensor:
    """Per step, the slowest rank's predicted cost over the ranks' mean (1: balanced), from [ranks, steps] FLOPs."""
    return step_flops.max(0).values / step_flops.mean(0).clamp_min(1e-30)


class TrainingMetrics(Callback):
    """At each logging step: tokens/s and samples/s (all ranks, padding excluded), MFU, achieved TFLOP/s per
    device, gradient norms before clipping (total and per part) and, on CUDA, peak allocated memory.

    Rank balance, predicted from FLOPs: each optimizer step's cost per rank (utils/flops.py on the step's batches)
    is kept, and at a logging step gathered from all ranks: `perf/rank_imbalance` is the slowest rank's cost over
    the mean (1.0: balanced; data.batching=compute aims there), the mean over the steps since the last logging
    step, with their worst as `perf/rank_imbalance_max` and `perf/rank_idle` the share of device time ranks would
    spend waiting for the slowest (1 - mean / max).

    Rates cover the optimizer steps since the previous logging step, validation time excluded. The
    counts stay on the device between logging steps, so measuring adds no per-step synchronisation.
    """

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops  # per device; None: the table's figure for the device found at setup

    def setup(self, trainer, pl_module, stage):
        peak = self.peak_tflops
        if peak is None and pl_module.device.type != "cuda":
            # The peak table holds GPUs: a CPU's MFU against an H100's peak means nothing, so there is none.
            log.info("MFU: n/a off GPU (metrics.peak_tflops=<this CPU's TFLOP/s> gives one)")
        elif peak is None:
            name = torch.cuda.get_device_name(pl_module.device)
            memory = torch.cuda.get_device_properties(pl_module.device).total_memory / 2**30
            peak, kind = devices.peak_tflops(name, memory)
            log.info("MFU against %s: %.0f TFLOP/s per device (%s peak; metrics.peak_tflops overrides)", name, peak, kind)
        self.peak_flops = peak * 1e12 if peak else None
        model = pl_module.model
        self.flops = ModelFlops.from_config(model.config)
        self.trainable = {part_of(name) for name, p in model.named_parameters() if p.requires_grad}
        self._counts = None
        self._start = None
        self._grad_norms: dict[str, torch.Tensor] = {}
        self._step_flops: list[torch.Tensor] = []  # this rank's predicted cost of each step since the last logging step
        self._step_open = 0.0
        unit = (TokenCounts(1, 0, 0), TokenCounts(0, 1, 0), TokenCounts(0, 0, 1))
        self._coef = [float(self.flops.train_step(c, self.trainable)) for c in unit] + [0.0]  # per image, token, pair, sample

    def _cost_of(self, device) -> torch.Tensor:
        if not isinstance(self._coef, torch.Tensor) or self._coef.device != device:
            self._coef = torch.tensor(self._coef, dtype=torch.float64, device=device)
        return self._coef

    def on_train_start(self, trainer, pl_module):
        self._seen_step = trainer.global_step
        self._run_start, self._run_first_step = time.perf_counter(), trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._start is None:
            self._start = time.perf_counter()

    def on_validation_start(self, trainer, pl_module):
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._start is not None and not trainer.sanity_checking:
            self._start += time.perf_counter() - self._paused

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not logs_at(trainer, trainer.global_step + 1):
            return
        grads: dict[str, list[torch.Tensor]] = {}
        for name, p in pl_module.model.named_parameters():
            if p.grad is not None:
                grads.setdefault(part_of(name), []).append(p.grad)
        norms = {part: total_norm(g) for part, g in grads.items()}
        # DeepSpeed ZeRO keeps gradients in its own buffers, leaving nothing to measure here.
        if norms:
            total = torch.linalg.vector_norm(torch.stack(list(norms.values())))
            self._grad_norms = {"grad_norm/total": total, **{f"grad_norm/{p}": n for p, n in norms.items()}}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        counts = batch_counts(batch)
        self._counts = counts if self._counts is None else self._counts + counts
        # FLOPs are linear in the counts: a dot product on the device, no synchronisation per step.
        self._step_open = self._step_open + (counts * self._cost_of(counts.device)).sum()
        stepped, self._seen_step = trainer.global_step != self._seen_step, trainer.global_step
        if stepped:  # gradient accumulation: a step's cost is that of all its batches
            self._step_flops.append(self._step_open)
            self._step_open = 0.0
        if not stepped or not logs_at(trainer, trainer.global_step):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        seconds = time.perf_counter() - self._start
        # A sequence-parallel group's ranks all count the batch they share: counted once per group.
        group = getattr(getattr(pl_module, "sequence_parallel", None), "size", 1)
        images, tokens, pairs, samples = (trainer.strategy.reduce(self._counts, reduce_op="sum") / group).tolist()
        flops = self.flops.train_step(TokenCounts(images, tokens, pairs), self.trainable)
        metrics = {
            "perf/tokens_per_s": tokens / seconds,
            "perf/samples_per_s": samples / seconds,
            "perf/tflops_per_device": flops / seconds / trainer.world_size / 1e12,
            **{k: float(v) for k, v in self._grad_norms.items()},
        }
        if self.peak_flops:
            metrics["perf/mfu"] = flops / seconds / trainer.world_size / self.peak_flops
        if pl_module.device.type == "cuda":
            metrics["perf/max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        metrics.update(self._balance(pl_module))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        loss = trainer.callback_metrics.get("train/loss")
        shown = ({"train/loss": float(loss)} if loss is not None else {}) | metrics
        # One line per logging step: readable in SLURM logs, where progress bars are not.
        values = "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
        eta = remaining_time(time.perf_counter() - self._run_start, trainer.global_step - self._run_first_step,
                             trainer.max_steps - trainer.global_step)
        log.info("step %d/%d (eta %s)  %s", trainer.global_step, trainer.max_steps, eta, values)
        self._counts, self._grad_norms, self._start = None, {}, time.perf_counter()


    def _balance(self, pl_module) -> dict[str, float]:
        if not self._step_flops:
            return {}
        steps = torch.stack([torch.as_tensor(f, dtype=torch.float64, device=pl_module.device) for f in self._step_flops])
        self._step_flops = []
        gathered = pl_module.all_gather(steps)  # [ranks, steps]; one process: [steps]
        ratio = rank_imbalance(gathered.view(-1, steps.numel()))
        idle = 1 - 1 / ratio
        return {"perf/rank_imbalance": float(ratio.mean()), "perf/rank_imbalance_max": float(ratio.max()),
                "perf/rank_idle": float(idle.mean())}


class ValidationPredictions(Callback):
    """At each validation, the first `per_modality` held-out samples of each modality (rank 0's) as a table:
    prompt (its end, visual placeholders collapsed), reference answer (every supervised token), the greedy
    prediction of each of those tokens (teacher-forced, so it aligns with the reference) and whether they all
    match. Written to `out_dir/step_<N>.jsonl` and, with W&B, logged as a table.

    With `generate` (eval.generate=true), each row also gets the free-running greedy reply to its last turn
    (`generated`: the stock generate, ending where training's replies end, as ov-eval runs it) and, in W&B,
    the sample's first image or video frame. Sharded strategies (FSDP2, ZeRO-3) leave it off: rank 0 alone
    would wait on the other ranks' shards.
    """

    COLUMNS = ("step", "modality", "prompt", "reference", "prediction", "correct")
    GENERATED = ("generated", "image")
    PROMPT_CHARS = 300  # the question sits at the end of the prompt, after the system text and images

    def __init__(self, out_dir: Path, per_modality: int, generate: bool = False, max_new_tokens: int = 32):
        self.out_dir = Path(out_dir)
        self.per_modality = per_modality
        if not isinstance(generate, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(
                f"eval.generate={generate!r}, eval.max_new_tokens={max_new_tokens!r}: need true/false and a positive integer"
            )
        self.generate = generate
        self.max_new_tokens = max_new_tokens
        self.rows: list[dict] = []
        self.images: list = []

    def setup(self, trainer, pl_module, stage):
        self.tokenizer = load_tokenizer(pl_module.tokenizer_dir)
        config = pl_module.model.config
        self.media = {config.image_token_id, config.video_token_id}
        if self.generate and sharded(trainer.strategy):
            log.warning("eval.generate: off under %s, whose weights no single rank holds", type(trainer.strategy).__name__)
            self.generate = False
        if self.generate:
            self.stops = stop_token_ids(self.tokenizer, pl_module.template)
            self.geometry = VisionGeometry.from_model_config(config)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.rows, self.images = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # Nothing comes back for padding repeats, which only keep the ranks in step (training/held_out.py), nor for
        # held-out preference pairs, scored by their rewards, not by predictions.
        if outputs is None:
            return
        chosen = []
        for i, modality in enumerate(batch["modality"]):
            if sum(row["modality"] == modality for row in self.rows) < self.per_modality:
                self.rows.append(self._row(trainer.global_step, batch, outputs, i))
                chosen.append(i)
        if self.generate and chosen and trainer.is_global_zero and not trainer.sanity_checking:
            embeds = embed_inputs(pl_module.model, batch)
            for row, i in zip(self.rows[-len(chosen):], chosen):
                start = reply_start(batch["labels"][i].tolist())
                inputs = {"inputs_embeds": embeds[i : i + 1, :start], "attention_mask": batch["attention_mask"][i : i + 1, :start]}
                ids = generate_replies(pl_module.model, inputs, self.max_new_tokens, self.stops, self.tokenizer.pad_token_id)[0]
                row["generated"] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                self.images.append(first_picture(batch, i, pl_module.model.config.video_token_id, self.geometry))

    def _row(self, step: int, batch: dict, outputs: dict, i: int) -> dict:
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        start = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
        # One placeholder per run of visual tokens: thousands of `<image>` say nothing.
        prompt = [t for k, t in enumerate(ids[:start]) if t not in self.media or k == 0 or ids[k - 1] != t]
        return {
            "step": step,
            "modality": batch["modality"][i],
            "prompt": self.tokenizer.decode(prompt)[-self.PROMPT_CHARS :],
            "reference": self.tokenizer.decode([t for t in labels if t != IGNORE_INDEX]),
            "prediction": self.tokenizer.decode([t for t in outputs["predictions"][i].tolist() if t != IGNORE_INDEX]),
            "correct": bool(outputs["correct"][i]),
        }

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero or not self.rows:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns = list(self.COLUMNS) + (list(self.GENERATED) if self.generate else [])
                data = [[row[c] for c in self.COLUMNS] for row in self.rows]
                if self.generate:
                    pictures = [None if p is None else wandb.Image(p) for p in self.images]
                    data = [d + [row["generated"], p] for d, row, p in zip(data, self.rows, pictures)]
                logger.log_table("val/predictions", columns=columns, data=data, step=trainer.global_step)


def sharded(strategy) -> bool:
    """Whether no rank holds the whole model (FSDP / FSDP2, DeepSpeed ZeRO-3)."""
    if isinstance(strategy, (ModelParallelStrategy, FSDPStrategy)):
        return True
    config = getattr(strategy, "config", None)
    return isinstance(config, dict) and config.get("zero_optimization", {}).get("stage", 0) == 3


def reply_start(labels: list[int]) -> int:
    """Where the last reply starts: the prompt a reply to the last turn is generated from ends there."""
    return max(k for k, label in enumerate(labels) if label != IGNORE_INDEX and (k == 0 or labels[k - 1] == IGNORE_INDEX))


def first_picture(batch: dict, i: int, video_token: int, geometry: VisionGeometry):
    """uint8 [H, W, 3] of sample i's first image (its whole-image crop) or first video frame; None for text."""
    if batch.get("pixel_values") is not None and batch["images_per_sample"][i]:
        image = sum(batch["images_per_sample"][:i])
        pixels = batch["pixel_values"][sum(batch["crops_per_image"][:image])]
    elif batch.get("video_frames") is not None and batch["input_ids"][i].eq(video_token).any():
        # Videos are concatenated in sample order; a sample holds one when its ids hold the video token.
        videos = [bool(row.eq(video_token).any()) for row in batch["input_ids"][:i]]
        pixels = batch["video_frames"][sum(batch["frames_per_video"][: sum(videos)])]
    else:
        return None
    mean = torch.tensor(geometry.image_mean).view(3, 1, 1)
    std = torch.tensor(geometry.image_std).view(3, 1, 1)
    return ((pixels.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
