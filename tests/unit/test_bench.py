"""`python -m ov_train.bench --tiny` runs on CPU and prints figures that parse and are positive."""
import re

from ov_train.bench import main

FIGURES = re.compile(r"^(stock|ov_train|ratio)\s+tokens/s ([\d.]+)x?\s+MFU ([\d.]+)[%x]\s+peak memory ([\d.]+)(?: GiB|x)$")


def test_tiny_bench_prints_positive_figures(capsys):
    results = main(["--tiny", "--samples", "3", "--steps", "1", "--warmup", "1"])
    lines = [m.groups() for m in map(FIGURES.match, capsys.readouterr().out.splitlines()) if m]
    assert [name for name, *_ in lines] == ["stock", "ov_train", "ratio"]
    for _, *figures in lines:
        assert all(float(f) > 0 for f in figures)
    assert [r["name"] for r in results] == ["stock", "ov_train"]
