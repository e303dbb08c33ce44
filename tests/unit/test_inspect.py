"""`ov-data inspect`: counts, token totals and percentiles, rejects by reason, as a table or JSON."""
import json
import shutil

import pytest

from ov_train.cli.data import main
from ov_train.data.convert import convert
from ov_train.data.inspect import percentiles
from tests.fixtures_data import conversation, make_llava_dataset, write_jsonl


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dataset = make_llava_dataset(tmp_path_factory.mktemp("llava"))
    out = tmp_path_factory.mktemp("converted")
    convert(dataset["input"], out, dataset["media_root"], samples_per_shard=4, workers=1)
    return out


def _inspect_json(capsys, directory) -> dict:
    assert main(["inspect", str(directory), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_fields(converted, capsys):
    stats = _inspect_json(capsys, converted)
    assert stats["samples"] == 9 and stats["shards"] == 3
    assert stats["by_modality"] == {"single_image": 5, "multi_image": 1, "video": 2, "text": 1}
    # The spec's numbers: five single images, three images of 730, 32 + 10 video frames of 196, +1 each.
    assert stats["visual_tokens"] == 1485 + 2929 + 4744 + 7269 + 8019 + 2190 + 6273 + 1961
    index = json.loads((converted / "index.json").read_text())
    assert stats["text_tokens"] == sum(s["text_tokens"] for s in index["samples"]) > 0
    assert stats["tokens_by_modality"]["video"]["visual"] == 6273 + 1961
    assert sum(t["text"] for t in stats["tokens_by_modality"].values()) == stats["text_tokens"]
    assert stats["percentiles"]["visual_tokens"] == {"p50": 2929, "p90": 8019, "p99": 8019, "max": 8019}
    assert set(stats["percentiles"]["text_tokens"]) == {"p50", "p90", "p99", "max"}
    assert stats["rejects"] == {"corrupt_image": 2, "corrupt_video": 1, "empty_conversation": 1, "malformed_line": 2,
                                "missing_image": 1, "missing_video": 1, "one_sided_conversation": 1,
                                "placeholder_mismatch": 2}


def test_rejects_are_counted_from_rejects_jsonl(converted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    with open(out / "rejects.jsonl", "a") as f:
        f.write(json.dumps({"id": "extra", "reason": "missing_video", "detail": "added by hand"}) + "\n")
    assert _inspect_json(capsys, out)["rejects"]["missing_video"] == 2


def test_absent_modalities_are_zero(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": f"t{i}", "conversations": conversation("Hi?", "Hello.")} for i in range(3)])
    convert(path, tmp_path / "out", workers=1)
    stats = _inspect_json(capsys, tmp_path / "out")
    assert stats["by_modality"] == {"single_image": 0, "multi_image": 0, "video": 0, "text": 3}
    assert stats["visual_tokens"] == 0 and stats["rejects"] == {}


def test_human_table(converted, capsys):
    assert main(["inspect", str(converted)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["single_image"][0] == "5" and rows["video"][0] == "2" and rows["text"][2] == "0"
    assert rows["total"] == ["9", rows["total"][1], "34,870"]
    assert rows["visual_tokens"] == ["2,929", "8,019", "8,019", "8,019"]
    assert rows["rejects:"][0] == "11" and rows["corrupt_image"] == ["2"] and rows["malformed_line"] == ["2"]


def test_percentiles_are_nearest_rank():
    assert percentiles(list(range(100, 0, -1))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


def test_not_a_converted_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "index.json" in capsys.readouterr().err
