"""Parquet sources in the released OneVision layout, trained without conversion: the same checks, modality and
token accounting as `ov-data convert` (an index, built ahead by `ov-data index` or on first read), rows
read from any entry (exact resume), local or on S3."""
import itertools
import json

import pytest

from ov_train.cli.data import main
from ov_train.data.convert import convert
from ov_train.data.parquet_source import source_index, with_indexes
from ov_train.data.recipe import RecipeError, load_recipe
from ov_train.data.samples import SampleError
from ov_train.data.sources import samples
from ov_train.data.stream import MixedStream, read_tar
from tests.fixtures_data import conversation, image_bytes, write_parquet
from tests.servers import s3_server, upload_tree


def released_rows(prefix: str, n: int, bad: tuple[int, ...] = (), size: tuple[int, int] = (480, 640)) -> list[dict]:
    """Rows as the released data has them: image {bytes, path}, conversations, id, data_source; some text-only."""
    png = image_bytes(*size, "PNG")
    rows = []
    for i in range(n):
        if i in bad:
            image = {"bytes": b"not an image", "path": f"{i}.png"}
        elif i % 3 == 2:
            image = None
        else:
            image = {"bytes": png, "path": f"{i}.png"}
        human = "<image>\nWhat is shown?" if image else "Say something."
        rows.append({"id": f"{prefix}{i}", "conversations": conversation(human, f"answer {i}"),
                     "data_source": "charts", "image": image})
    return rows


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    write_parquet(root / "charts" / "train-00000-of-00002.parquet", released_rows("c", 5, bad=(1,)), row_group_size=2)
    write_parquet(root / "charts" / "train-00001-of-00002.parquet", released_rows("d", 4), row_group_size=2)
    write_parquet(root / "heldout" / "val-00000-of-00001.parquet", released_rows("v", 3))
    (root / "recipe.yaml").write_text("sources:\n  - {name: charts, path: charts, val: heldout, format: parquet,"
                                      " category: charts, weight: 1}\n")
    return root


def test_rows_are_the_samples_convert_writes_and_start_at_any_row(parquet_dir, tmp_path):
    path = parquet_dir / "charts" / "train-00000-of-00002.parquet"
    rows = list(samples("parquet", str(path)))
    assert [row for row, _ in rows] == [0, 1, 2, 3, 4]
    assert rows[1][1]["__skip__"] == "corrupt_image"  # the check convert rejects it with
    convert(path, tmp_path / "out", workers=1)
    converted = {json.loads(s["json"])["id"]: s for shard in sorted((tmp_path / "out").glob("train-*.tar"))
                 for s in read_tar(str(shard))}
    assert len(converted) == 4
    for _, sample in (r for r in rows if "__skip__" not in r[1]):
        meta = json.loads(sample["json"])
        twin = converted[meta["id"]]
        assert meta == json.loads(twin["json"]) and sample.keys() - {"__key__"} == twin.keys() - {"__key__", "__url__"}
        assert all(sample[f] == twin[f] for f in sample if f.startswith("img"))
    # From row 3 (the second row group) on, and every other row: what a resumed or strided reader asks for.
    assert [row for row, _ in samples("parquet", str(path), first=3)] == [3, 4]
    assert [row for row, _ in samples("parquet", str(path), first=1, wanted=lambda r: r % 2 == 0)] == [2, 4]


def test_ov_data_index_counts_like_convert_and_training_finds_it(parquet_dir, tmp_path, capsys, tokenizer):
    assert main(["index", str(parquet_dir / "charts")]) == 0
    printed = capsys.readouterr().out
    assert "index of 2 parquet file(s)" in printed and "single_image" in printed
    index = json.loads((parquet_dir / "charts" / "index.json").read_text())
    converted = convert(parquet_dir / "charts" / "train-00000-of-00002.parquet", tmp_path / "c0", workers=1)
    first = [s for s in index["samples"] if s["shard"].endswith("00000-of-00002.parquet")]
    assert sum(s["visual_tokens"] for s in first) == converted["visual_tokens"] == 3 * 2929
    assert index["totals"]["by_modality"] == {"single_image": 6, "multi_image": 0, "video": 0, "text": 2}
    assert index["totals"]["rejects"] == {"corrupt_image": 1}
    assert main(["inspect", str(parquet_dir / "charts" / "index.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_modality"]["single_image"] == 6
    # Training uses the index beside the files: nothing is built in the run's index_dir.
    recipe = load_recipe(str(parquet_dir / "recipe.yaml"), parquet_dir)
    charts = recipe.sources[0]
    assert [p.rsplit("/", 1)[-1] for p in charts.train_shards] == ["train-00000-of-00002.parquet",
                                                                   "train-00001-of-00002.parquet"]
    assert source_index(charts, list(charts.train_shards), tmp_path / "idx", tokenizer) == index
    assert not (tmp_path / "idx").exists()
    # An index of other files (or of older versions of them) is not used: the run builds its own.
    other = write_parquet(tmp_path / "charts" / "train-00000-of-00002.parquet", released_rows("x", 2))
    (tmp_path / "charts" / "index.json").write_text(json.dumps(index))
    rebuilt = source_index(charts, [str(other)], tmp_path / "idx", tokenizer)
    assert rebuilt["totals"]["samples"] == 2 and len(list((tmp_path / "idx").glob("charts-*.json"))) == 1
    (parquet_dir / "charts" / "index.json").unlink()


def test_the_index_is_built_on_first_read_once_and_rejects_skip_without_decoding(parquet_dir, tmp_path, tokenizer):
    recipe = with_indexes(load_recipe(str(parquet_dir / "recipe.yaml"), parquet_dir), tmp_path / "idx", tokenizer)
    built = sorted((tmp_path / "idx").glob("charts-*.json"), key=lambda p: p.stat().st_size)
    assert len(built) == 2  # one per folder: the train files' and the held-out one's
    held, train = (json.loads(p.read_text()) for p in built)
    assert train["totals"]["samples"] == 8 and train["totals"]["rejects"] == {"corrupt_image": 1}
    assert held["totals"]["samples"] == 3 and held["totals"]["rejects"] == {}
    charts = recipe.sources[0]
    assert {f.rsplit("/", 1)[-1]: rows for f, rows in charts.rejects.items() if rows} == {
        "train-00000-of-00002.parquet": {1: "corrupt_image"}}
    mtimes = [p.stat().st_mtime_ns for p in built]
    with_indexes(load_recipe(str(parquet_dir / "recipe.yaml"), parquet_dir), tmp_path / "idx", tokenizer)
    assert [p.stat().st_mtime_ns for p in built] == mtimes  # reused, not rebuilt

    def process(raw):
        if "__skip__" in raw:
            raise SampleError(raw["__skip__"], "rejected")
        return {"key": json.loads(raw["json"])["id"]}

    stream = MixedStream(recipe.sources, process, seed=0, shuffle_buffer=3)
    examples = list(itertools.islice(iter(stream), 8))
    assert sorted(e["key"] for e in examples) == sorted([f"c{i}" for i in (0, 2, 3, 4)] + [f"d{i}" for i in range(4)])
    assert sum(e["skipped"].get("corrupt_image", 0) for e in examples) == 1
    resumed = MixedStream(recipe.sources, process, seed=0, shuffle_buffer=3, state=stream.state())
    assert [e["key"] for e in itertools.islice(iter(resumed), 5)] == [e["key"] for e in itertools.islice(iter(stream), 5)]


def test_parquet_sources_on_s3_and_their_problems(parquet_dir, tmp_path, tokenizer, capsys):
    (tmp_path / "r.yaml").write_text("sources:\n  - {name: charts, path: charts, format: parquet, category: c, weight: 1}\n"
                                     "  - {name: none, path: empty, format: parquet, category: c, weight: 1}\n")
    with s3_server() as (_, fs):
        fs.makedirs("ovdata", exist_ok=True)  # moto keeps buckets process-wide, across servers
        upload_tree(fs, parquet_dir / "charts", "ovdata/data/charts")
        with pytest.raises(RecipeError, match=r"sources\[1\] \(none\): no \*.parquet files under s3://ovdata/data/empty"):
            load_recipe(str(tmp_path / "r.yaml"), "s3://ovdata/data")
        recipe = load_recipe(str(tmp_path / "r.yaml"), "s3://ovdata/data", require_shards=False)
        charts = with_indexes(recipe, tmp_path / "idx", tokenizer).sources[0]
        assert charts.train_shards[0] == "s3://ovdata/data/charts/train-00000-of-00002.parquet"
        rows = [(r, s.get("__skip__")) for r, s in samples("parquet", charts.train_shards[0], first=1)]
        # `ov-data index` on the bucket writes index.json beside the files; inspect reads it there.
        assert main(["index", "s3://ovdata/data/charts"]) == 0
        assert fs.exists("ovdata/data/charts/index.json")
        assert main(["inspect", "s3://ovdata/data/charts/index.json", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["rejects"] == {"corrupt_image": 1}
        assert source_index(charts, list(charts.train_shards), None, tokenizer)["totals"]["samples"] == 8
    assert rows == [(1, "corrupt_image"), (2, None), (3, None), (4, None)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[1]


def test_a_parquet_file_that_stays_unreadable_while_indexing_is_named(parquet_dir, tokenizer, capsys, monkeypatch):
    """Indexing reads every row: a connection dropped half-way or a server that never answers is retried, then
    refused with the file named (not a bare client error such as an empty FSTimeoutError); a first failed request
    is retried and indexes like the local file."""
    import time

    from ov_train.config.options import IOSettings
    from ov_train.data.parquet_source import ParquetIndexError, build_index
    from tests.servers import http_server

    io = IOSettings(retries=1, backoff_s=0.05, timeout_s=1.0)
    name = "charts/train-00000-of-00002.parquet"
    local = build_index([str(parquet_dir / name)], tokenizer, io)
    with http_server(parquet_dir) as server:
        flaky = build_index([f"{server.url}/flaky/{name}"], tokenizer, io)
        assert [s["id"] for s in flaky["samples"]] == [s["id"] for s in local["samples"]]
        for fault in ("drop", "hang"):
            start = time.monotonic()
            with pytest.raises(ParquetIndexError) as err:
                build_index([f"{server.url}/{fault}/{name}"], tokenizer, io)
            assert str(err.value).startswith(f"{server.url}/{fault}/{name}: unreadable after 2 attempt(s)"), err.value
            assert time.monotonic() - start < 10
        # ov-data index says the same and exits 1 (its reads use the default data.io settings: no backoff here).
        import types

        from ov_train.data import remote
        monkeypatch.setattr(remote, "time", types.SimpleNamespace(sleep=lambda s: None))
        assert main(["index", f"{server.url}/drop/{name}"]) == 1
        assert f"ov-data index: error: {server.url}/drop/{name}: unreadable after" in capsys.readouterr().err
