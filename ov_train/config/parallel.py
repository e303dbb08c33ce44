"""strategy.sequence_parallel: how many ranks share one packed row (Ulysses sequence parallelism, parallel/sequence.py;
the frame-parallel tower, parallel/frames.py). Data parallelism then runs over world / N groups of N consecutive ranks.

Checked here, by key, before any work: N divides the world size, the LLM's query heads, and divides or is a multiple
of its key/value heads (each rank attends over heads / N heads of the whole row; DeepSpeed's Ulysses layer repeats
key/value heads when they are fewer than N); the engine is ddp, fsdp2 or deepspeed (ZeRO-2 / ZeRO-3); the row's
attention is sdpa, eager or ov_varlen; data.samples_per_step divides over the data-parallel groups; eval.generate
is off.
"""
from __future__ import annotations

from ov_train.constants import VARLEN

KEY = "strategy.sequence_parallel"
# Engines sequence parallelism composes with: the loss's group all-reduce scales each rank's gradient by N, and their
# mean over all world ranks is then the mean over the world / N groups (FSDP2 and ZeRO shard over the whole world).
# `auto` is left out: on one device there is no group, and on several it should be named.
ENGINES = ("ddp", "fsdp2", "deepspeed")
# Attention implementations the whole row's attention runs in once the heads are exchanged.
ROW_ATTENTION = ("auto", "sdpa", "eager", VARLEN)


def allowed_degrees(heads: int, kv_heads: int) -> list[int]:
    """Sequence-parallel degrees a model with these query and key/value head counts can be split by."""
    return [n for n in range(1, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]


def degree_problems(degree: int, heads: int, kv_heads: int, world: int | None = None) -> list[str]:
    """What keeps `degree` from splitting these heads (and this world), naming the key and what is allowed."""
    problems = []
    allowed = allowed_degrees(heads, kv_heads)
    if degree not in allowed:
        problems.append(
            f"{KEY}={degree}: the LLM's {heads} query / {kv_heads} key-value heads split only by {allowed} (N must"
            " divide the query heads, and divide or be a multiple of the key-value heads)"
        )
    if world is not None and world % degree:
        problems.append(f"{KEY}={degree} does not divide the {world} processes of the run (trainer.num_nodes x"
                        " trainer.devices)")
    return problems


def sequence_parallel_problems(strategy, world: int, model, generate: bool = False) -> list[str]:
    """Every problem of strategy.sequence_parallel in this config, one line each ([] for 1); `generate`:
    eval.generate, whose token-by-token generation has no row to split."""
    degree = strategy.get("sequence_parallel", 1)
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        return [f"{KEY}={degree!r} must be an integer >= 1 (1: no sequence parallelism)"]
    if degree == 1:
        return []
    problems = degree_problems(degree, model.text.num_attention_heads, model.text.num_key_value_heads, world)
    if strategy.name not in ENGINES:
        problems.append(f"{KEY}={degree} runs under strategy=ddp, fsdp2 or deepspeed_zero2/3 (name the engine), not"
                        f" strategy.name={strategy.name}")
    if model.attn_implementation not in ROW_ATTENTION:
        problems.append(f"{KEY}={degree}: the row's attention runs in {list(ROW_ATTENTION)}, not"
                        f" model.attn_implementation={model.attn_implementation}")
    if generate:
        problems.append(f"{KEY}={degree} with eval.generate=true: generation runs one token at a time, which a"
                        " sequence-parallel group cannot split; set eval.generate=false (ov-eval generates on the export)")
    return problems


def data_parallel_size(strategy, world: int) -> int:
    """Ranks that read different data: world / strategy.sequence_parallel (a group shares its batches)."""
    return world // max(1, int(strategy.get("sequence_parallel", 1) or 1))
