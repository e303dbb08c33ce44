"""Training from where data lives, as the README shows it: shards in an S3 bucket (moto's server on loopback,
the real s3fs client) with exact resume; the released parquet layout without conversion; `ov-data convert
--holdout` straight to a bucket, inspected there; a run without held-out data saying so."""
import json
import logging

import pytest
import torch

from ov_train.cli.data import main as ov_data
from ov_train.data import convert as convert_module
from ov_train.run import train
from tests.conftest import compose_config
from tests.fixtures_data import conversation, image_bytes, write_jsonl, write_parquet
from tests.servers import AWS_ENV, http_server, s3_server, upload_tree
from tests.unit.test_parquet_source import released_rows

# Training runs and subprocesses: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

OWN_DATA = ["data=recipe", "data.num_workers=0", "data.batch_size=4", "data.shuffle_buffer=16", "data.val_samples=4",
            "data.io.backoff_s=0.1", "data.io.timeout_s=10", "logger=none", "trainer.enable_progress_bar=false",
            "export=false"]


@pytest.fixture(scope="module")
def bucket(small_data_root):
    """The small synthetic shards in s3://shards/synthetic."""
    with s3_server() as (_, fs):
        fs.makedirs("shards", exist_ok=True)  # moto keeps buckets process-wide, across servers
        upload_tree(fs, small_data_root, "shards/synthetic")
        yield fs


def consumed(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "consumed_keys.jsonl").read_text().splitlines()]


def files_text(run_dir) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in run_dir.rglob("*") if p.is_file())


def test_training_from_an_s3_bucket_resumes_exactly(bucket, tmp_path, caplog):
    overrides = [*OWN_DATA, "data.recipe=synthetic_onevision", "data.root=s3://shards/synthetic", "trainer.max_steps=6",
                 "data.record_keys=true", "data.max_tokens_per_batch=300", "data.batch_size=2", "data.val_samples=1"]
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    with caplog.at_level(logging.INFO):
        summary = train(compose_config(overrides, run_dir=straight))
    train(compose_config([*overrides, "+trainer.limit_train_batches=1", "+trainer.max_epochs=3"], run_dir=first))
    train(compose_config([*overrides, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"], run_dir=resumed))
    assert consumed(straight) == consumed(first) + consumed(resumed)
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert summary["val_samples"] == 3 and summary["steps"] == 6  # data.val_samples per source
    # The client found its credentials in the environment; none reached the logs or the run directory.
    secret = AWS_ENV["AWS_SECRET_ACCESS_KEY"]
    assert secret not in caplog.text and secret not in files_text(straight)


def test_training_on_the_released_parquet_layout(tmp_path, caplog):
    data = tmp_path / "LLaVA-OneVision-Data"
    small = (48, 64)
    write_parquet(data / "charts" / "train-00000-of-00002.parquet", released_rows("c", 6, bad=(1,), size=small))
    write_parquet(data / "charts" / "train-00001-of-00002.parquet", released_rows("d", 6, size=small))
    write_parquet(data / "charts-val" / "val-00000-of-00001.parquet", released_rows("v", 4, size=small))
    recipe = tmp_path / "released.yaml"
    recipe.write_text("sources:\n  - {name: charts, path: charts, val: charts-val, format: parquet,"
                      " modality: single_image, weight: 1}\n")
    run = tmp_path / "run"
    with s3_server() as (_, fs):
        fs.makedirs("onevision", exist_ok=True)  # moto keeps buckets process-wide, across servers
        upload_tree(fs, data, "onevision/LLaVA-OneVision-Data")
        with caplog.at_level(logging.INFO):
            summary = train(compose_config([*OWN_DATA, f"data.recipe={recipe}",
                                            "data.root=s3://onevision/LLaVA-OneVision-Data", "trainer.max_steps=4"],
                                           run_dir=run))
    assert summary["steps"] == 4 and summary["val_samples"] == 4
    assert summary["skipped_samples"] == {"corrupt_image": summary["skipped_samples"]["corrupt_image"]}
    assert summary["skipped_samples"]["corrupt_image"] >= 1  # 4 batches of 4 cross the bad row at least once
    built = sorted((run / "data_index").glob("charts-*.json"))
    assert len(built) == 2 and "charts: 11 usable rows (single_image 7, text 4), 1 rejected (corrupt_image 1)" in caplog.text


def test_convert_holdout_to_a_bucket_then_train_with_and_without_held_out_data(bucket, tmp_path, capsys, caplog,
                                                                               monkeypatch):
    uploads = []
    real_upload = convert_module.upload
    monkeypatch.setattr(convert_module, "upload", lambda local, target, io: (uploads.append(target.rsplit("/", 1)[-1]),
                                                                              real_upload(local, target, io)))
    png = image_bytes(64, 64, "PNG")
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(png)
    records = [{"id": f"r{i}", "image": "a.png", "conversations": conversation("<image>\nWhat is it?", f"thing {i}")}
               for i in range(12)]
    source = write_jsonl(tmp_path / "mine.jsonl", records)
    common = [str(source), "--media-root", str(tmp_path / "media"), "--workers", "1", "--samples-per-shard", "5"]
    assert ov_data(["convert", *common, "--out", "s3://shards/mine", "--holdout", "3"]) == 0
    assert "held out: 3 in val-*.tar" in capsys.readouterr().out
    listed = sorted(p.rsplit("/", 1)[-1] for p in bucket.ls("shards/mine"))
    index = json.loads(bucket.cat_file("shards/mine/index.json"))
    assert listed == sorted(index["shards"] + ["index.json", "rejects.jsonl"])  # whole files only, no temporaries
    assert [n for n in listed if n.startswith("train-")] == [f"train-00000{k}-000000.tar" for k in range(3)]
    assert any(n.startswith("val-") for n in listed) and index["totals"]["splits"] == {"train": 9, "val": 3}
    assert uploads[-2:] == ["rejects.jsonl", "index.json"] and sorted(uploads) == listed  # each file once, index last
    assert ov_data(["inspect", "s3://shards/mine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 12
    held = sorted(e["id"] for e in index["samples"] if e.get("split") == "val")
    assert ov_data(["convert", *common, "--out", str(tmp_path / "again"), "--holdout", "0.25"]) == 0
    again = json.loads((tmp_path / "again" / "index.json").read_text())
    assert sorted(e["id"] for e in again["samples"] if e.get("split") == "val") == held  # deterministic

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("sources:\n  - {name: mine, path: mine, modality: single_image, weight: 1}\n")
    with_val = train(compose_config([*OWN_DATA, f"data.recipe={recipe}", "data.root=s3://shards",
                                     "trainer.max_steps=1", "data.val_samples=null"], run_dir=tmp_path / "with"))
    assert with_val["val_samples"] == 3 and "held_out" not in with_val
    assert ov_data(["convert", *common, "--out", str(tmp_path / "local" / "mine")]) == 0
    with caplog.at_level(logging.WARNING):
        without = train(compose_config([*OWN_DATA, f"data.recipe={recipe}", f"data.root={tmp_path / 'local'}",
                                        "trainer.max_steps=1"], run_dir=tmp_path / "without"))
    assert without["val_accuracy"] is None and without["held_out"].startswith("no held-out data")
    assert json.loads((tmp_path / "without" / "summary.json").read_text())["held_out"] == without["held_out"]
    assert "no held-out data, so no held-out accuracy or val loss" in caplog.text
    assert "held-out accuracy 0.000" not in caplog.text


def test_a_run_completes_past_a_shard_whose_server_drops_the_connection(small_data_root, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources:\n  - {name: images, path: '{drop/,}single_image/train-000000.tar', val:"
                      " single_image/val-000000.tar, modality: single_image, weight: 1}\n")
    with http_server(small_data_root) as server:
        summary = train(compose_config([*OWN_DATA, f"data.recipe={recipe}", f"data.root={server.url}",
                                        "data.io.retries=1", "trainer.max_steps=2", "data.shuffle_buffer=200"],
                                       run_dir=tmp_path / "run"))  # one block holds both shards
    assert summary["steps"] == 2 and summary["skipped_samples"].get("shard_unreadable") == 1
    assert server.requests["/drop/single_image/train-000000.tar"] >= 2


def test_credentials_in_a_url_stay_out_of_the_run_directory_and_the_dashboard(small_data_root, tmp_path):
    """train.py as a user runs it, data.root with user:password@ and a ?token: Hydra's own .hydra/*.yaml and the
    W&B run (its config) carry the location redacted; the run itself reads with the credentials."""
    import sys

    from tests.processes import run_one

    secret = "hunter2-in-url"
    with http_server(small_data_root) as server:
        root = server.url.replace("http://", f"http://me:{secret}@")
        run_one([sys.executable, "train.py", "data=recipe", "data.recipe=synthetic_onevision", f"data.root={root}",
                 "trainer.max_steps=1", "data.num_workers=0", "data.batch_size=4", "data.val_samples=1",
                 "logger=wandb", "trainer.enable_progress_bar=false", "export=false",
                 f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "log", timeout=120, env={"WANDB_MODE": "offline"})
    assert server.requests  # it read through the server
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file() and any((tmp_path / "run" / "wandb").rglob("*.wandb"))
    assert "http://127.0.0.1" in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()
    assert secret not in files_text(tmp_path / "run") and secret not in (tmp_path / "log").read_text()
