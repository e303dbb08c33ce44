"""Sources anywhere: shards read over loopback HTTP, from S3 (moto's server) and through pipe: commands equal the
local ones; exact state restore over the network; failed reads retried, dead shards (a connection dropped
mid-shard, a server that never answers) skipped and counted; listing errors named; credentials never shown."""
import itertools
import logging
import time

import pytest

from ov_train.config.options import IOSettings
from ov_train.config.run_plan import ConfigError
from ov_train.data.recipe import RecipeError, Source, load_recipe
from ov_train.data.remote import ServerError, read_bytes, redact, redact_text
from ov_train.data.remote import glob as remote_glob
from ov_train.data.shard_writer import ShardWriter
from ov_train.data.sources import ShardUnreadable, samples
from ov_train.data.stream import MixedStream, ValStream, read_tar
from tests.servers import http_server, s3_server, upload_tree
from tests.unit.test_stream import stub_process

FAST = IOSettings(retries=2, backoff_s=0.1, timeout_s=1.0)


def write_tree(root):
    """Two sources laid out as convert writes them: a/ with 3 train shards of 4 and a val shard, b/ with 2."""
    for name, shards in (("a", 3), ("b", 2)):
        with ShardWriter(root / name, "train", samples_per_shard=4) as writer:
            for i in range(4 * shards):
                writer.write({"__key__": f"{name}{i:03d}", "json": {"tokens": 5 + i}, "img0.jpg": bytes([i]) * 700})
    with ShardWriter(root / "a", "val", samples_per_shard=10) as writer:
        for i in range(3):
            writer.write({"__key__": f"va{i}", "json": {"tokens": 3}})
    (root / "recipe.yaml").write_text(
        "sources:\n  - {name: a, path: a, modality: text, weight: 1}\n  - {name: b, path: b, modality: text, weight: 2}\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("remote_tree"))


@pytest.fixture(scope="module")
def http(tree):
    with http_server(tree) as server:
        yield server


def keys(examples):
    return [e["key"] for e in examples]


def test_a_shard_reads_the_same_over_http_s3_and_pipe_as_locally(tree, http):
    local = list(read_tar(str(tree / "a" / "train-000001.tar")))
    assert [s["__key__"] for s in local] == ["a004", "a005", "a006", "a007"]
    assert local[0]["img0.jpg"] == bytes([4]) * 700 and local[0]["json"] == b'{"tokens": 9}'
    assert list(read_tar(f"{http.url}/a/train-000001.tar")) == local
    assert list(read_tar(f"pipe:cat {tree}/a/train-000001.tar")) == local
    # Entry numbers survive reading from the middle: what a resumed cursor asks for.
    assert [(e, s["__key__"]) for e, s in samples("webdataset", f"{http.url}/a/train-000001.tar", first=2)] == [
        (2, "a006"), (3, "a007")]
    odd = [(e, s["__key__"]) for e, s in samples("webdataset", str(tree / "a" / "train-000001.tar"), 0, lambda e: e % 2)]
    assert odd == [(1, "a005"), (3, "a007")]


@pytest.mark.parametrize("root_kind", ["http", "brace", "pipe"])
def test_recipes_list_remote_folders_brace_patterns_and_pipes(tree, http, root_kind, tmp_path):
    if root_kind == "http":
        recipe = load_recipe(str(tree / "recipe.yaml"), http.url + "/")
        a = recipe.sources[0]
        assert a.train_shards == tuple(f"{http.url}/a/train-00000{i}.tar" for i in range(3))
        assert a.val_shards == (f"{http.url}/a/val-000000.tar",)
        return
    path = (f"{http.url}/a/train-{{000000..000002}}.tar" if root_kind == "brace"
            else f"pipe:cat {tree}/a/train-{{000000..000002}}.tar")
    (tmp_path / "r.yaml").write_text(f"sources:\n  - {{name: a, path: '{path}', val: '{http.url}/a/val-000000.tar',"
                                     " modality: text, weight: 1}\n")
    a = load_recipe(str(tmp_path / "r.yaml"), "/nowhere", allow_pipe=root_kind == "pipe").sources[0]
    assert len(a.train_shards) == 3 and a.val_shards == (f"{http.url}/a/val-000000.tar",)
    first = [s["__key__"] for shard in a.train_shards for s in read_tar(shard)]
    assert first == [f"a{i:03d}" for i in range(12)]


def test_missing_shards_and_unreachable_servers_are_named_before_any_work(tree, http, tmp_path):
    (tmp_path / "r.yaml").write_text(
        f"sources:\n  - {{name: gone, path: '{http.url}/a/train-{{000000..000005}}.tar', modality: text, weight: 1}}\n"
        "  - {name: down, path: 'shards', modality: text, weight: 1}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(tmp_path / "r.yaml"), "http://127.0.0.1:9/data", io=IOSettings(retries=0, timeout_s=2))
    message = str(err.value)
    assert f"sources[0] (gone): 3 of 6 shards of {http.url}/a/train-{{000000..000005}}.tar do not exist" in message
    assert "sources[1] (down): cannot list http://127.0.0.1:9/data/shards" in message


def test_stream_over_http_equals_local_and_restores_exactly(tree, http):
    local = load_recipe(str(tree / "recipe.yaml"), tree).sources
    remote = load_recipe(str(tree / "recipe.yaml"), http.url).sources

    def run(sources, **kw):
        return MixedStream(sources, stub_process, seed=5, shuffle_buffer=3, io=FAST, **kw)

    assert keys(itertools.islice(iter(run(local)), 40)) == keys(itertools.islice(iter(run(remote)), 40))
    straight = run(remote, reader=1, readers=2)
    it = iter(straight)
    list(itertools.islice(it, 11))  # mid-block, mid-shard
    resumed = run(remote, reader=1, readers=2, state=straight.state())
    assert keys(itertools.islice(iter(resumed), 15)) == keys(itertools.islice(it, 15))
    assert keys(ValStream(remote, stub_process, io=FAST)) == ["va0", "va1", "va2"]


def shard_source(url_prefix, tree):
    shards = tuple(f"{url_prefix}/{p}" for p in ("a/train-000000.tar", "a/train-000001.tar"))
    return Source("a", "text", 1.0, shards, ())


@pytest.mark.parametrize("fault", ["drop", "hang"])
def test_a_dead_shard_is_retried_then_skipped_and_counted(tree, http, fault, caplog):
    """A server that drops the connection half-way through a shard, or never answers: the shard is tried
    1 + retries times, then skipped (data/skipped_shard_unreadable) and named; the stream goes on."""
    good = shard_source(http.url, tree)
    dead = Source("a", "text", 1.0, (f"{http.url}/{fault}/a/train-000002.tar", *good.train_shards), ())
    # One epoch: the good shards' 8 samples, and from the dropped one what came before the drop (its first 3).
    epoch = 8 + (3 if fault == "drop" else 0)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        examples = list(itertools.islice(iter(MixedStream([dead], stub_process, seed=0, shuffle_buffer=100, io=FAST)),
                                         epoch))
    assert sorted(keys(examples)) == [f"a{i:03d}" for i in range(epoch)]
    assert sum(e["skipped"].get("shard_unreadable", 0) for e in examples) == 1
    # Tried 1 + retries times (an HTTP client may re-send a request on a connection the server closed).
    retried = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"reading {http.url}/{fault}/a/")]
    assert [m.split("; ")[-1] for m in retried] == ["retry 1 of 2 in 0.1 s", "retry 2 of 2 in 0.2 s"]  # doubling
    assert http.requests[f"/{fault}/a/train-000002.tar"] >= 1 + FAST.retries
    assert time.monotonic() - start < 15  # timeouts, not a hang
    named = [r.getMessage() for r in caplog.records if "setting aside a shard of source a" in r.getMessage()]
    assert len(named) == 1 and f"{http.url}/{fault}/a/train-000002.tar: unreadable after 3 attempt(s)" in named[0]


# How long using the first block's last sample waits for the next block's request: far beyond what a loaded machine
# takes to send it when read-ahead works (a thread already on its way), and only spent when it is broken.
READ_AHEAD_WAIT_S = 20.0


def test_a_slow_source_is_read_ahead_while_the_others_are_drawn(tree, http):
    """Each request to the slow source takes a second. Its next block (here: its next shard) is asked for right
    after the current one arrives, while that block's samples are still being used, not when they run out: using
    the first block's last sample waits for that request to reach the server, which, were the next block read only
    once this one is used up, it never would. Events, not timings: a loaded machine only makes the wait longer."""
    io = IOSettings(retries=0, timeout_s=60)  # the slow second is never a timeout, however loaded the machine
    slow = Source("slow", "text", 1.0, tuple(f"{http.url}/slow/a/train-00000{i}.tar" for i in range(3)), ())
    fast = Source("fast", "text", 1.0, tuple(str(tree / "b" / f"train-00000{i}.tar") for i in range(2)), ())
    slow_used, fast_used, asked = [], [], []

    def slow_shards_asked() -> int:
        return len({path for path, _ in list(http.arrivals) if path.startswith("/slow/")})

    def process(raw):
        if raw["__key__"].startswith("a"):
            slow_used.append(raw["__key__"])
            if len(slow_used) == 4:  # the first block's last sample, still being used
                deadline = time.monotonic() + READ_AHEAD_WAIT_S
                while slow_shards_asked() < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                asked.append(slow_shards_asked())
        else:
            fast_used.append(raw["__key__"])
        time.sleep(0.02)  # the work a real sample costs
        return {"key": raw["__key__"]}

    list(itertools.islice(iter(MixedStream([slow, fast], process, seed=0, shuffle_buffer=4, io=io)), 16))
    assert len(slow_used) >= 4 and len(fast_used) >= 4  # both sources drawn
    # The second shard was asked for before the first block's 4 samples were all used.
    assert asked == [2], f"slow shards asked for while the first block's last sample was used: {asked}"


def test_a_transient_failure_is_retried_and_loses_nothing(tree, http, caplog):
    flaky = f"{http.url}/flaky/b/train-000001.tar"
    with caplog.at_level(logging.WARNING):
        assert [s["__key__"] for _, s in samples("webdataset", flaky, io=FAST)] == ["b004", "b005", "b006", "b007"]
    assert [r.getMessage().split("; ")[-1] for r in caplog.records] == ["retry 1 of 2 in 0.1 s"]
    with pytest.raises(ShardUnreadable, match="missing.tar: unreadable after 1 attempt"):
        list(samples("webdataset", f"{http.url}/a/missing.tar", io=IOSettings(retries=0, backoff_s=0)))


def test_s3_sources_list_read_and_restore_like_local_ones(tree):
    local = load_recipe(str(tree / "recipe.yaml"), tree).sources
    with s3_server() as (_, fs):
        fs.makedirs("shards", exist_ok=True)  # moto keeps buckets process-wide, across servers
        upload_tree(fs, tree, "shards/mix")
        remote = load_recipe(str(tree / "recipe.yaml"), "s3://shards/mix").sources
        assert remote[0].train_shards == tuple(f"s3://shards/mix/a/train-00000{i}.tar" for i in range(3))
        assert remote[0].val_shards == ("s3://shards/mix/a/val-000000.tar",)
        straight = MixedStream(remote, stub_process, seed=1, shuffle_buffer=3, io=FAST)
        it = iter(straight)
        head = keys(itertools.islice(it, 9))
        resumed = MixedStream(remote, stub_process, seed=1, shuffle_buffer=3, io=FAST, state=straight.state())
        tail = keys(itertools.islice(iter(resumed), 9))
    assert head + tail == keys(itertools.islice(iter(MixedStream(local, stub_process, seed=1, shuffle_buffer=3)), 18))


def test_credentials_never_reach_names_logs_or_errors(tree, http, tmp_path, caplog):
    secret = "hunter2-secret"
    assert redact(f"https://user:{secret}@host/a/b.tar?X-Amz-Signature={secret}") == "https://host/a/b.tar"
    assert secret not in redact_text(f"GET https://u:{secret}@h/x.tar?token={secret} failed")
    root = http.url.replace("http://", f"http://me:{secret}@")
    (tmp_path / "r.yaml").write_text(f"sources:\n  - {{path: '{root}/a/train-{{000000..000001}}.tar', modality: text,"
                                     " weight: 1}\n  - {path: nowhere, modality: text, weight: 1}\n")
    with caplog.at_level(logging.DEBUG), pytest.raises(RecipeError) as err:
        load_recipe(str(tmp_path / "r.yaml"), root, io=IOSettings(retries=1, backoff_s=0.01, timeout_s=2))
    assert secret not in str(err.value) and "no train-*.tar shards under http://127.0.0.1" in str(err.value)
    source = load_recipe(str(tmp_path / "r.yaml"), root, require_shards=False).sources[0]
    assert secret not in source.name and source.name.startswith("http://127.0.0.1")
    dead = Source(source.name, "text", 1.0, (f"{root}/drop/a/train-000000.tar", *source.train_shards), ())
    with caplog.at_level(logging.DEBUG):
        list(itertools.islice(iter(MixedStream([dead], stub_process, shuffle_buffer=2, io=FAST)), 11))
    assert "setting aside a shard" in caplog.text and secret not in caplog.text


def test_io_settings_are_checked_by_key():
    from hydra.errors import ConfigCompositionException

    from tests.conftest import compose_config, plan_of

    assert plan_of(["data.io.retries=3", "data.io.backoff_s=0.5", "data.io.timeout_s=10"]).data.config.io == IOSettings(3, 0.5, 10)
    with pytest.raises(ConfigError) as err:
        plan_of(["data.io.retries=-1", "data.io.timeout_s=0", "+data.io.retry=2"])
    problems = str(err.value)
    assert "data.io.retry: no such setting" in problems
    assert "data.io.retries=-1 must be an integer >= 0" in problems
    assert "data.io.timeout_s=0 would fail every request" in problems
    # Types are the schema's, refused while Hydra composes.
    with pytest.raises(ConfigCompositionException, match="data.io.backoff_s"):
        compose_config(["data.io.backoff_s=x"])


def test_gs_and_hf_take_the_fsspec_route_and_their_failures_are_named(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ov_train.data import remote

    opened = []
    fake = SimpleNamespace(open=lambda path, mode, **kw: opened.append(path))
    with monkeypatch.context() as patch:
        patch.setattr(remote, "filesystem", lambda location, io: (fake, location))
        urls = ["s3://b/x.tar", "gs://b/x.tar", "hf://datasets/o/d/x.tar", "https://h/x.tar"]
        for url in urls:
            remote.open_stream(url, FAST)
    assert opened == urls
    # webdataset's own openers for other schemes start curl, gsutil or ais: refused by name, nothing started.
    for url in ("sftp://h/x.tar", "ais://b/x.tar"):
        with pytest.raises(ValueError, match=f"{url}: cannot read .* locations; allowed: local paths, file://"):
            remote.open_stream(url, FAST)
    (tmp_path / "r.yaml").write_text("sources:\n  - {name: g, path: 'gs://bucket/shards', modality: text, weight: 1}\n"
                                     "  - {name: h, path: 'hf://datasets/none/such', modality: text, weight: 1}\n")
    with pytest.raises(RecipeError) as err:  # no gcsfs here, and the hub is offline: each is named, nothing hangs
        load_recipe(str(tmp_path / "r.yaml"), "", io=IOSettings(retries=0, timeout_s=2))
    assert "sources[0] (g): cannot list gs://bucket/shards" in str(err.value)
    assert "sources[1] (h): cannot list hf://datasets/none/such" in str(err.value)


def test_the_dashboards_config_names_urls_without_credentials_the_reads_keep_them():
    from tests.conftest import plan_of

    plan = plan_of(["data.root='http://u:pw@127.0.0.1:1/x?token=pw'"])
    assert plan.config["data"]["root"] == "http://127.0.0.1:1/x"  # what W&B, TensorBoard and MLflow get
    assert plan.data.config.root == "http://u:pw@127.0.0.1:1/x?token=pw"  # what the data reads use


def test_a_server_error_is_named_as_such_and_retried_a_404_stays_not_found(tree, http, caplog):
    """HTTP 500 came out as FileNotFoundError (fsspec's name for any failed request): a server error now says its
    status and the URL, without credentials, and is retried per data.io; a 404 is still a missing file."""
    secret = "s3cret-pw"
    base = http.url.replace("http://", f"http://me:{secret}@")
    shard = f"{http.url}/error/a/train-000000.tar"
    with caplog.at_level(logging.WARNING), pytest.raises(ShardUnreadable) as err:
        list(samples("webdataset", f"{base}/error/a/train-000000.tar", io=FAST))
    assert str(err.value) == (f"{shard}: unreadable after 3 attempt(s): ServerError: server error: HTTP 500 Internal"
                              f" Server Error from {shard}")
    retried = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retried) == FAST.retries and all(f"HTTP 500 Internal Server Error from {shard}" in m for m in retried)
    assert "FileNotFoundError" not in caplog.text and secret not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ServerError, match=f"HTTP 500 .* from {http.url}/error/a/"):
        read_bytes(f"{base}/error/a/index.json", FAST)  # an index, a parquet source's file: after its retries
    assert len(caplog.records) == FAST.retries and secret not in caplog.text
    with pytest.raises(ServerError, match="HTTP 500"):
        remote_glob(f"{base}/error/a/*.tar", FAST)
    with pytest.raises(FileNotFoundError):  # not found, and not retried
        read_bytes(f"{http.url}/a/no-such-index.json", FAST)
    with pytest.raises(ShardUnreadable, match="FileNotFoundError"):
        list(samples("webdataset", f"{http.url}/a/train-999999.tar", io=IOSettings(retries=0)))


def test_a_stalled_shard_is_set_aside_for_the_rest_of_the_run(tree, http, caplog):
    """A shard whose server never answers costs its retries once per run, not once per epoch: it is set aside,
    counted and logged once, and the set is part of the stream state, so a resumed stream skips it too and draws
    what the uninterrupted one draws."""
    io = IOSettings(retries=1, backoff_s=0.05, timeout_s=0.5)
    stalled = f"{http.url}/hang/a/train-000002.tar"
    source = Source("a", "text", 1.0, (stalled, *shard_source(http.url, tree).train_shards), ())

    def run(**kw):
        return MixedStream([source], stub_process, seed=0, shuffle_buffer=3, io=io, **kw)

    straight = run()
    it = iter(straight)
    before = http.requests["/hang/a/train-000002.tar"]  # (the module's server counts for every test)
    with caplog.at_level(logging.WARNING):
        first = list(itertools.islice(it, 2 * 8 + 3))  # two epochs of the good shards' 8 samples, and some
    state = straight.state()
    rest = keys(itertools.islice(it, 2 * 8))
    assert http.requests["/hang/a/train-000002.tar"] - before == 1 + io.retries  # four epochs, one try
    assert sum(e["skipped"].get("shard_unreadable", 0) for e in first) == 1
    assert len([r for r in caplog.records if "setting aside" in r.getMessage()]) == 1
    assert state["set_aside"] == {"a": {stalled: [0, 0]}}
    assert keys(itertools.islice(iter(run(state=state)), 2 * 8)) == rest
    assert http.requests["/hang/a/train-000002.tar"] - before == 1 + io.retries  # nor did the resumed stream try it


def test_resume_in_the_epoch_a_shard_failed_in_reads_what_the_first_run_read(tree, http, caplog):
    """A shard dropped half-way delivered its first 3 samples before it was set aside: a stream resumed from any
    state of that epoch reads it up to there again (and no further, so no retry), then continues as the
    uninterrupted stream did."""
    source = Source("a", "text", 1.0, (f"{http.url}/drop/a/train-000002.tar",
                                       *shard_source(http.url, tree).train_shards), ())

    def run(**kw):
        return MixedStream([source], stub_process, seed=0, shuffle_buffer=2, io=FAST, **kw)

    straight = run()
    it = iter(straight)
    states, drawn = [], []
    for example in itertools.islice(it, 11):  # epoch 0: 8 good samples and 3 from the dropped shard
        drawn.append(example["key"])
        states.append(straight.state())
    drawn += keys(itertools.islice(it, 8))
    assert sorted(drawn[:11]) == [f"a{i:03d}" for i in range(11)] and "a008" not in drawn[11:]
    reread, after_failure = 0, [(k, state) for k, state in enumerate(states, 1) if "set_aside" in state]
    assert after_failure
    for k, state in after_failure:  # (a state from before the failure meets the shard as the first run did)
        caplog.clear()
        before = http.requests["/drop/a/train-000002.tar"]
        with caplog.at_level(logging.WARNING):
            assert keys(itertools.islice(iter(run(state=state)), 19 - k)) == drawn[k:], f"resumed after {k}"
        assert not caplog.records, f"resumed after {k}"  # read no further than before: it did not fail again
        reread += http.requests["/drop/a/train-000002.tar"] - before
    assert reread >= 1  # some resumed block held the dropped shard's first samples, and read them again


def test_a_run_lists_each_source_folder_once(tree, caplog):
    """Before training, a source folder on S3 is listed once (one ListObjectsV2 request, counted at the server):
    its train and held-out shards come from that one listing, and the run's data is the recipe its checks located."""
    from ov_train.data.prepare import locate_shards, prepare_data
    from tests.conftest import plan_of

    with s3_server() as (_, fs):
        fs.makedirs("shards", exist_ok=True)
        upload_tree(fs, tree, "shards/once")
        plan = plan_of(["data=recipe", f"data.recipe={tree / 'recipe.yaml'}", "data.root=s3://shards/once"]).data
        with caplog.at_level(logging.INFO, logger="werkzeug"):
            located, problems = locate_shards(plan)
            recipe = prepare_data(plan, located)
        lists = [r.getMessage() for r in caplog.records if r.name == "werkzeug" and "list-type=2" in r.getMessage()]
    assert problems == [] and recipe is located
    assert recipe.sources[0].train_shards == tuple(f"s3://shards/once/a/train-00000{i}.tar" for i in range(3))
    assert recipe.sources[0].val_shards == ("s3://shards/once/a/val-000000.tar",)
    assert recipe.sources[1].val_shards == ()
    assert len(lists) == 2, lists  # a/ and b/


def test_an_unusable_root_is_said_once_not_once_per_source(tree, tmp_path):
    """A data.root that is missing or unreachable fails every source the same way: one problem names it."""
    import shutil

    from ov_train.config.recipe import read_recipe
    from ov_train.data.recipe import locate

    spec, _ = read_recipe(str(tree / "recipe.yaml"))  # two sources, a/ and b/, relative to the root
    assert locate(spec, tmp_path / "nowhere")[1] == [f"no source's shards: {tmp_path / 'nowhere'}: no such directory, or nothing in it"]
    (unreachable,) = locate(spec, "http://127.0.0.1:1/x", io=IOSettings(retries=0, backoff_s=0, timeout_s=2))[1]
    assert unreachable.startswith("no source's shards: cannot list http://127.0.0.1:1/x: ")
    shutil.copytree(tree / "a", tmp_path / "half" / "a")  # a root that holds one source: the other one is named
    (tmp_path / "empty_dir").mkdir()  # a root that exists: each source says what it did not find there
    assert len(locate(spec, tmp_path / "empty_dir")[1]) == 2
    assert locate(spec, tmp_path / "half")[1] == [f"recipe.yaml: sources[1] (b): no train-*.tar shards under {tmp_path / 'half' / 'b'}"]
