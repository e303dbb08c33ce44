"""Every number of the paper's settings (conf/shared/paper/*.yaml, conf/experiment/ov_qwen2_*/*.yaml) cites where it
comes from: a public script's line (`finetune_si.sh:58`, `train.py:131`), or the paper's Table 1 where no public
script has it (its 0.5B batch, its stage-1.5 batch)."""
import re

import pytest

from ov_train.resources import CONF_DIR

# Beyond the paper: long_video's frames, pooling and sequence parallelism are this repository's (README, "Long video").
BEYOND_THE_PAPER = {"long_video.yaml"}
FILES = sorted([*(CONF_DIR / "shared" / "paper").glob("*.yaml"),
                *(p for p in CONF_DIR.glob("experiment/ov_qwen2_*/*.yaml") if p.name not in BEYOND_THE_PAPER)])
NUMBER = re.compile(r"^\s*[\w.]+:\s*(\{.*\d.*\}|[-+]?\d[\d.e+-]*)\s*(#.*)?$")
SCRIPT_LINE = re.compile(r"(\.sh|train\.py):\d+")
CITATION = re.compile(SCRIPT_LINE.pattern + r"|Table 1")


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_number_cites_its_source(path):
    lines = path.read_text().splitlines()
    numbers = 0
    for i, line in enumerate(lines):
        if not NUMBER.match(line):
            continue
        numbers += 1
        block = [line]
        # The comment right above it, or above the uncommented numbers it is grouped with.
        for above in reversed(lines[:i]):
            grouped = NUMBER.match(above) and "#" not in above and not block[1:]
            if not (above.strip().startswith("#") or grouped):
                break
            block.append(above)
        assert CITATION.search(" ".join(block)), f"{path.name}: {line.strip()!r} cites no source"
    if path.parent.name == "paper":
        assert numbers and SCRIPT_LINE.search(path.read_text())
