"""`python -m ov_train.bench --tiny --pairs` runs DPO steps on CPU both ways and prints figures that parse: the same
pairs, each pair's crops and frames through the tower once against twice, fewer model FLOPs."""
import re

import pytest

from ov_train.cli.bench import main

LINE = re.compile(r"^(pairs/once|pairs/twice|ratio)\s+tokens/s ([\d.]+)x?\s+peak memory ([\d.]+)(?: GiB|x)\s+"
                  r"tower crops\+frames/step ([\d.]+)x?\s+model TFLOP/step ([\d.e-]+)x?$")


@pytest.mark.slow
def test_tiny_pair_bench_prints_both_paths(capsys):
    results = main(["--tiny", "--pairs", "--samples", "2", "--steps", "1", "--warmup", "0"])
    lines = {m.group(1): [float(x) for x in m.groups()[1:]] for m in map(LINE.match, capsys.readouterr().out.splitlines()) if m}
    assert set(lines) == {"pairs/once", "pairs/twice", "ratio"}
    assert all(x > 0 for figures in lines.values() for x in figures)
    once, twice = results
    assert (once["name"], twice["name"]) == ("pairs/once", "pairs/twice")
    assert twice["tower_inputs_per_step"] == 2 * once["tower_inputs_per_step"] > 0
    assert lines["ratio"][2] == 0.5 and once["tflops_per_step"] < twice["tflops_per_step"]
