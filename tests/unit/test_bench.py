"""`python -m ov_train.bench --tiny` (and `--tiny --loader`) runs on CPU and prints figures that parse and are
positive; its FLOPs count what the dashboards count; the loader bench's shards make the onevision recipe; the
goals report reads what `--json` wrote."""
import json
import re

import pytest

from ov_train.bench.mixture import (
    ONEVISION_MIX,
    synthetic_mixture,
    token_counts,
    write_mixture_shards,
)
from ov_train.cli.bench import main
from ov_train.config.media import MediaSettings
from ov_train.data.recipe import load_recipe
from ov_train.data.samples import SampleProcessor, collate
from ov_train.training.metrics import batch_counts
from ov_train.vision.geometry import VisionGeometry

FIGURES = re.compile(
    r"^(stock|ov_train|ratio)\s+tokens/s ([\d.]+)x?\s+MFU ([\d.]+)[%x]\s+peak memory ([\d.]+)(?: GiB|x)(?:\s+rows of (\d+))?$"
)
LOADER = re.compile(r"^loader\s+samples/s ([\d.]+)\s+tokens/s ([\d.]+)\s+workers (\d+)\s+cpus (\d+)$")
LOADER_HTTP = re.compile(r"^loader/http\s+samples/s ([\d.]+)\s+tokens/s ([\d.]+)\s+workers (\d+)\s+cpus (\d+)$")


ADAPTER = re.compile(r"^(ov_train full|lora r=16)\s+trainable\s+([\d,]+)\s+optimizer state ([\d.]+) GiB\s+peak memory ([\d.]+)")


@pytest.mark.slow
def test_tiny_bench_prints_positive_figures(capsys, tmp_path):
    args = ["--tiny", "--samples", "3", "--steps", "1", "--warmup", "1", "--max-tokens", "128,512", "--adapter", "lora"]
    results = main([*args, "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out.splitlines()
    # Torch threads as a training run sizes them (the usable CPUs less its loader workers), set and said.
    import torch

    from ov_train.config.options import cpu_share
    share = cpu_share(None, local_processes=1)
    assert share.describe() in out and torch.get_num_threads() == share.threads
    lines = [m.groups() for m in map(FIGURES.match, out) if m]
    assert [(name, rows) for name, *_, rows in lines] == [
        ("stock", None), ("ov_train", "128"), ("ratio", "128"), ("ov_train", "512"), ("ratio", "512"),
    ]
    for _, *figures, _ in lines:
        assert all(float(f) > 0 for f in figures)
    assert [(r["name"], r.get("max_tokens")) for r in results] == [
        ("stock", None), ("ov_train", 128), ("ov_train", 512), ("lora", 128)]
    assert json.loads((tmp_path / "b.json").read_text())["results"] == results
    # --adapter lora: the same path through LoRA (the LLM's adapters, a trained projector copy, a frozen tower) against
    # full fine-tuning at rows of 128: far fewer trainable parameters, optimizer state in proportion.
    (full, lora) = [m.groups() for m in map(ADAPTER.match, out) if m]
    full_params, lora_params = int(full[1].replace(",", "")), int(lora[1].replace(",", ""))
    assert full_params == results[1]["trainable_params"] and lora_params == results[3]["trainable_params"]
    assert 0 < lora_params < full_params / 5
    # AdamW's state in proportion to the trainable parameters (+ a step counter per tensor).
    expected = results[1]["optimizer_state_gib"] * lora_params / full_params
    assert results[3]["optimizer_state_gib"] == pytest.approx(expected, rel=1e-3)


def test_bench_counts_match_dashboards(tiny_model_and_tokenizer):
    """Same work, same MFU: bench's per-sample counts add up to the dashboards' counts of the batch."""
    model, tokenizer = tiny_model_and_tokenizer
    geometry = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geometry, "qwen_1_5", MediaSettings.of("anyres_max_9", 32), max_length=32768)
    examples = [process(r) for r in synthetic_mixture(6, geometry.image_size, seed=0)]
    counts = [token_counts(e) for e in examples]
    ours = [sum(getattr(c, field) for c in counts) for field in ("images", "tokens", "pairs")]
    assert ours == batch_counts(collate(examples, tokenizer.pad_token_id))[:3].tolist()


@pytest.mark.slow
def test_tiny_loader_bench_prints_positive_figures(capsys):
    """No model: the tiny mixture's shards stream through training's loader, in-process, read from the local disk
    and then over HTTP from a loopback server: both throughputs printed."""
    results = main(["--tiny", "--loader"])
    out = capsys.readouterr().out.splitlines()
    for pattern in (LOADER, LOADER_HTTP):
        (figures,) = [m.groups() for m in map(pattern.match, out) if m]
        samples_per_s, tokens_per_s, workers, cpus = figures
        assert float(samples_per_s) > 0 and float(tokens_per_s) > 0 and int(cpus) > 0 and workers == "0"
    assert [r["name"] for r in results] == ["loader", "loader_http"]


def test_loader_shards_give_every_worker_whole_shards(tmp_path):
    shards = write_mixture_shards(synthetic_mixture(24, 32, seed=0), tmp_path, shards_per_source=2)
    recipe = load_recipe("onevision", tmp_path)
    assert {s.modality for s in recipe} == set(ONEVISION_MIX)
    assert all(len(s.train_shards) >= 2 for s in recipe)
    assert shards == sum(len(s.train_shards) for s in recipe)


def _result(name, tokens_per_s, mfu=0.1, peak_gib=10.0, max_tokens=None):
    r = {"name": name, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_gib": peak_gib}
    return r if max_tokens is None else {**r, "max_tokens": max_tokens}


def test_goals_report_reads_the_json_results(tmp_path, capsys):
    sweep = [_result("stock", 20_000), _result("ov_train", 70_000, 0.46, 30, 8192), _result("ov_train", 64_000, 0.42, 38, 32768)]
    compiled = [_result("stock", 21_000), _result("ov_train", 60_000, 0.40, 45, 32768)]
    (tmp_path / "bench.json").write_text(json.dumps({"results": sweep}))
    (tmp_path / "compile.json").write_text(json.dumps({"results": compiled}))
    goals = {g.name: g for g in main(["--goals", str(tmp_path)])}
    assert goals["tokens/s vs the public recipe"].measured == 3.5 and goals["tokens/s vs the public recipe"].met
    assert goals["MFU"].measured == 0.46 and goals["MFU"].met
    assert goals["peak memory, 32k-token rows"].measured == 38 and goals["peak memory, 32k-token rows"].met
    spread = goals["tokens/s spread, rows of 8k..32k"]
    assert abs(spread.measured - (1 - 64 / 70)) < 1e-12 and spread.met
    assert goals["loader tokens/s / GPU tokens/s"].met is None  # no loader run in the directory
    out = capsys.readouterr().out
    assert "not measured" in out and "3.50x" in out

    (tmp_path / "loader.json").write_text(json.dumps({"results": [{"name": "loader", "tokens_per_s": 84_000}]}))
    goals = {g.name: g for g in main(["--goals", str(tmp_path)])}
    assert goals["loader tokens/s / GPU tokens/s"].measured == 1.2 and goals["loader tokens/s / GPU tokens/s"].met is False
    assert goals["CPU cores per H100, OV-0.5B mix"].met is None and goals["simulated rank idle, 8 ranks"].met is None

    feed = [{"name": "extraction_ov_train_exact", "cores_per_gpu": 3.8, "device": "h100", "model": "ov_qwen2_0_5b"},
            {"name": "extraction_ov_train_exact", "cores_per_gpu": 1.0, "device": "h100", "model": "ov_qwen2_7b"},
            {"name": "balance_ov_qwen2_0_5b_tokens", "idle": 0.29}, {"name": "balance_ov_qwen2_0_5b_compute", "idle": 0.035}]
    (tmp_path / "feed.json").write_text(json.dumps({"results": feed}))
    goals = {g.name: g for g in main(["--goals", str(tmp_path)])}
    assert goals["CPU cores per H100, OV-0.5B mix"].measured == 3.8 and goals["CPU cores per H100, OV-0.5B mix"].met
    assert goals["simulated rank idle, 8 ranks"].measured == 0.035 and goals["simulated rank idle, 8 ranks"].met

    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        main(["--goals", str(tmp_path)])
