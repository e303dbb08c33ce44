"""`python -m ov_train.bench --tiny` (and `--tiny --loader`) runs on CPU and prints figures that parse and are
positive; its FLOPs count what the dashboards count; the loader bench's shards make the onevision recipe."""
import re

from ov_train.bench import MIXTURE, main, synthetic_mixture, token_counts, write_mixture_shards
from ov_train.data.recipe import load_recipe
from ov_train.data.samples import SampleProcessor, collate
from ov_train.training.metrics import batch_counts
from ov_train.vision.geometry import VisionGeometry

FIGURES = re.compile(r"^(stock|ov_train|ratio)\s+tokens/s ([\d.]+)x?\s+MFU ([\d.]+)[%x]\s+peak memory ([\d.]+)(?: GiB|x)$")
LOADER = re.compile(r"^loader\s+samples/s ([\d.]+)\s+tokens/s ([\d.]+)\s+workers (\d+)\s+cpus (\d+)$")


def test_tiny_bench_prints_positive_figures(capsys):
    results = main(["--tiny", "--samples", "3", "--steps", "1", "--warmup", "1"])
    lines = [m.groups() for m in map(FIGURES.match, capsys.readouterr().out.splitlines()) if m]
    assert [name for name, *_ in lines] == ["stock", "ov_train", "ratio"]
    for _, *figures in lines:
        assert all(float(f) > 0 for f in figures)
    assert [r["name"] for r in results] == ["stock", "ov_train"]


def test_bench_counts_match_dashboards(tiny_model_and_tokenizer):
    """Same work, same MFU: bench's per-sample counts add up to the dashboards' counts of the batch."""
    model, tokenizer = tiny_model_and_tokenizer
    geometry = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geometry, "qwen_1_5", "anyres_max_9", max_frames=32, max_length=32768)
    examples = [process(r) for r in synthetic_mixture(6, geometry.image_size, seed=0)]
    counts = [token_counts(e) for e in examples]
    ours = [sum(getattr(c, field) for c in counts) for field in ("images", "tokens", "pairs")]
    assert ours == batch_counts(collate(examples, tokenizer.pad_token_id))[:3].tolist()


def test_tiny_loader_bench_prints_positive_figures(capsys):
    """No model: the tiny mixture's shards stream through training's loader, in-process."""
    results = main(["--tiny", "--loader"])
    (figures,) = [m.groups() for m in map(LOADER.match, capsys.readouterr().out.splitlines()) if m]
    samples_per_s, tokens_per_s, workers, cpus = figures
    assert float(samples_per_s) > 0 and float(tokens_per_s) > 0 and int(cpus) > 0
    assert workers == "0" and [r["name"] for r in results] == ["loader"]


def test_loader_shards_give_every_worker_whole_shards(tmp_path):
    shards = write_mixture_shards(synthetic_mixture(24, 32, seed=0), tmp_path, shards_per_source=2)
    recipe = load_recipe("onevision", tmp_path)
    assert {s.modality for s in recipe} == set(MIXTURE)
    assert all(len(s.train_shards) >= 2 for s in recipe)
    assert shards == sum(len(s.train_shards) for s in recipe)
