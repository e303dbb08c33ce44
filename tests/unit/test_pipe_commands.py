"""`pipe:` is a shell command, not a path: it runs when the user typed it (data.root=pipe:..., ov-eval --root) or
opted in (data.allow_pipe=true, ov-eval --allow-pipe), never because a recipe file or a run directory says so."""
import pytest

from ov_train.config.options import IOSettings
from ov_train.config.run_plan import ConfigError
from ov_train.data import remote
from ov_train.data.prepare import prepare_data
from ov_train.data.recipe import RecipeError, load_recipe
from ov_train.data.sources import ShardUnreadable, samples
from ov_train.data.stream import read_tar
from ov_train.eval.evaluate import eval_sources
from ov_train.run import train
from tests.conftest import compose_config, plan_of
from tests.unit.test_remote import write_tree

ONCE = IOSettings(retries=0, backoff_s=0, timeout_s=2)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("pipe_tree"))


def test_a_recipe_files_commands_run_only_with_the_users_opt_in(tree, tmp_path):
    """A recipe received from someone else with `path: "pipe:touch MARKER; cat ..."` (or a `val:`): training and
    ov-eval refuse it before any work, naming the file, the source, the key and the opt-in; nothing runs."""
    marker = tmp_path / "ran"
    command = f"pipe:touch {marker}; cat {tree}/a/train-000000.tar"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"sources:\n  - {{name: a, path: '{command}', modality: text, weight: 1}}\n"
                      f"  - {{name: b, path: {tree}/b, val: '{command}', modality: text, weight: 1}}\n")
    overrides = ["data=recipe", f"data.recipe={recipe}", "data.num_workers=0", "logger=none", "trainer.max_steps=1"]
    with pytest.raises(ConfigError) as err:
        train(compose_config(overrides, run_dir=tmp_path / "run"))
    message = str(err.value)
    assert f"data.recipe={recipe}: evil.yaml: sources[0] (a): path='pipe:touch {marker}" in message
    assert "is a shell command (pipe:); commands in a recipe file run only with data.allow_pipe=true" in message
    assert "evil.yaml: sources[1] (b): val='pipe:touch" in message
    with pytest.raises(RecipeError, match=r"sources\[0\] \(a\): path=.* run only with --allow-pipe"):
        eval_sources(str(recipe), None)  # ov-eval's route
    assert not marker.exists()
    # Opted in, the user's commands run.
    data = plan_of([*overrides, "data.allow_pipe=true"]).data
    a = prepare_data(data).sources[0]
    assert [s["__key__"] for s in read_tar(a.train_shards[0])] == ["a000", "a001", "a002", "a003"]
    assert marker.exists()
    assert eval_sources(str(recipe), None, allow_pipe=True)[0].shards == (command,)


def test_a_recipe_path_under_a_users_pipe_root_is_a_name_not_a_command(tree, tmp_path):
    """data.root=pipe:... is the user's own command; a recipe's relative path joined onto it goes in as one
    shell-quoted word, so `a/x.tar; touch MARKER` names a file that does not exist instead of running."""
    marker = tmp_path / "ran"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"sources:\n  - {{name: a, path: 'a/train-000000.tar; touch {marker}', modality: text, weight: 1}}\n"
                      "  - {name: b, path: 'b/train-{000000..000001}.tar', modality: text, weight: 1}\n")
    root = f"pipe:cat {tree}"
    a, b = load_recipe(str(recipe), root, require_shards=False).sources
    assert a.train_shards == (f"{root}/'a/train-000000.tar; touch {marker}'",)
    with pytest.raises(ShardUnreadable):
        list(samples("webdataset", a.train_shards[0], io=ONCE))
    assert not marker.exists()
    assert [s["__key__"] for shard in b.train_shards for s in read_tar(shard)] == [f"b{i:03d}" for i in range(8)]


@pytest.mark.parametrize("spelling", [" pipe:", "PIPE:", "\tpipe:"])
def test_only_a_location_spelled_pipe_colon_is_a_command(tmp_path, monkeypatch, spelling):
    """webdataset's dispatch reads ` pipe:` and `PIPE:` as commands (urllib strips and lowercases schemes), so a
    recipe could slip one past a check for `pipe:`; ov_train opens them as the local file names they are."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    with pytest.raises(FileNotFoundError):
        remote.open_stream(f"{spelling}touch {marker}", ONCE)
    assert not marker.exists()
