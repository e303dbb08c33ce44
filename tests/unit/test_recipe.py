"""Recipes: the shipped mixtures, path resolution, and every problem of a bad recipe named at once."""
from pathlib import Path

import pytest

from ov_train.config.recipe import RecipeError, normalised
from ov_train.data.recipe import load_recipe
from ov_train.data.shard_writer import ShardWriter
from tests.conftest import compose_config

STAGES = ("pretrain", "mid", "final_image", "onevision")


def percent(shares: dict) -> dict:
    return {k: round(100 * v, 1) for k, v in shares.items()}


def test_real_recipes_mirror_the_paper_mixtures(tmp_path):
    recipes = {stage: load_recipe(stage, tmp_path, require_shards=False) for stage in STAGES}
    assert percent(recipes["final_image"].shares("category")) == {
        "general": 36.1, "doc_chart_screen": 20.6, "math_reasoning": 20.1, "general_ocr": 8.9, "language": 14.3,
    }
    assert percent(recipes["onevision"].shares("modality")) == {"single_image": 31.2, "multi_image": 43.0, "video": 25.9}
    assert [s.name for s in recipes["pretrain"]] == ["lcs558k"]
    # Stage 1.5 is given in sample counts: they become weights in proportion.
    mid = recipes["mid"].shares("name")
    assert mid["recap_detailed"] == pytest.approx(3_500_000 / 4_835_000)
    assert all(r.max_tokens_per_batch for r in recipes.values())
    # Placeholder sources live under data.root.
    assert all(not s.train_shards for r in recipes.values() for s in r)


@pytest.mark.parametrize("stage", STAGES)
def test_every_synthetic_recipe_loads_with_shards(small_data_root, stage):
    recipe = load_recipe(f"synthetic_{stage}", small_data_root)
    assert recipe.name == f"synthetic_{stage}"
    assert all(s.train_shards and s.val_shards for s in recipe)


def test_recipe_data_config_selects_the_stage_recipe_under_root(tmp_path):
    cfg = compose_config(["data=recipe", "stage=final_image", f"data.root={tmp_path}"])
    assert cfg.data.recipe == "final_image" and cfg.data.root == str(tmp_path)
    assert len(load_recipe(cfg.data.recipe, cfg.data.root, require_shards=False)) == 5


def shards(directory: Path, split: str = "train") -> Path:
    with ShardWriter(directory, split) as writer:
        writer.write({"__key__": "k0", "json": {"conversations": []}})
    return directory


def test_paths_resolve_as_directories_globs_and_absolute(tmp_path):
    root = tmp_path / "root"
    shards(root / "rel")
    shards(root / "rel", "val")
    shards(tmp_path / "elsewhere", "part")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "max_tokens_per_batch: 4096\n"
        "sources:\n"
        "  - {path: rel, modality: single_image, weight: 1}\n"
        f"  - {{name: abs, path: '{tmp_path}/elsewhere/part-*.tar', category: ocr, weight: 3}}\n"
    )
    rel, absolute = load_recipe(str(recipe), root)
    assert rel.name == "rel" and rel.train_shards == (str(root / "rel" / "train-000000.tar"),)
    assert rel.val_shards == (str(root / "rel" / "val-000000.tar"),)
    assert absolute.train_shards == (str(tmp_path / "elsewhere" / "part-000000.tar"),) and absolute.val_shards == ()
    assert (absolute.modality, absolute.category) == (None, "ocr")
    assert load_recipe(str(recipe), root).max_tokens_per_batch == 4096


def test_every_problem_is_named_at_once(tmp_path):
    shards(tmp_path / "ok")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "max_tokens_per_batch: -5\n"
        "shuffle: true\n"
        "sources:\n"
        "  - {name: neg, path: ok, modality: text, weight: -1}\n"
        "  - {name: zero, path: ok, modality: text, weight: 0}\n"
        "  - {name: both, path: ok, modality: text, weight: 1, samples: 10}\n"
        "  - {name: neither, path: ok, modality: text}\n"
        "  - {name: frac, path: ok, modality: text, samples: 2.5}\n"
        "  - {name: gone, path: missing_dir, modality: video, weight: 1}\n"
        "  - {name: noglob, path: 'nothing/*.tar', modality: video, weight: 1}\n"
        "  - {name: unlabelled, path: ok, weight: 1, colour: red}\n"
        "  - {name: neg, path: ok, modality: audio, weight: 1}\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(str(bad), tmp_path)
    message = str(err.value)
    for fragment in (
        "max_tokens_per_batch=-5", "unknown key(s) ['shuffle']",
        "sources[0]: weight=-1 must be a positive, finite number", "sources[1]: weight=0",
        "sources[2]: gives both weight=1 and samples=10", "sources[3]: needs a weight or a sample count",
        "sources[4]: samples=2.5 must be a positive integer",
        f"sources[5] (gone): no train-*.tar shards under {tmp_path / 'missing_dir'}",
        f"sources[6] (noglob): no shards match {tmp_path / 'nothing/*.tar'}",
        "sources[7]: unknown key(s) ['colour']", "sources[7]: needs a modality",
        "sources[8]: modality='audio'", "name 'neg' is used twice",
        "mixes weight and samples across sources",
    ):
        assert fragment in message, fragment



def write_recipe(tmp_path, *weights: str, key: str = "weight") -> str:
    shards(tmp_path / "ok")
    lines = [f"  - {{name: s{i}, path: ok, modality: text, {key}: {w}}}" for i, w in enumerate(weights)]
    path = tmp_path / "r.yaml"
    path.write_text("sources:\n" + "\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("weight", [".inf", ".nan", "-.inf"])
def test_non_finite_weights_are_refused(tmp_path, weight):
    # .inf used to pass, then every share came out NaN and the stream died deep in a loader worker.
    with pytest.raises(RecipeError, match=r"sources\[1\]: weight=(inf|nan|-inf) must be a positive, finite number"):
        load_recipe(write_recipe(tmp_path, "1", weight), tmp_path)


def test_sample_counts_beyond_floats_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"sources\[0\]: samples=1000+ must be a positive integer"):
        load_recipe(write_recipe(tmp_path, "1" + "0" * 400, "5", key="samples"), tmp_path)


def test_weights_whose_sum_overflows_are_refused(tmp_path):
    # Each is finite, their sum is not: shares would all be 0 and the mixing draw would never end.
    with pytest.raises(RecipeError, match="the weights sum to infinity; scale them down"):
        load_recipe(write_recipe(tmp_path, "1.0e+308", "1.0e+308"), tmp_path)


def test_shares_of_extreme_weights_are_normalised_safely(tmp_path):
    assert normalised([1e308, 1e308, 2e307]) == pytest.approx([1 / 2.2, 1 / 2.2, 0.2 / 2.2])
    assert normalised([5e-324, 1e-323]) == pytest.approx([1 / 3, 2 / 3])  # subnormals: their sum is exact
    recipe = load_recipe(write_recipe(tmp_path, "8.0e+307", "2.0e+307"), tmp_path)
    assert recipe.shares("name") == pytest.approx({"s0": 0.8, "s1": 0.2})
    for bad in ([float("inf"), 1.0], [float("nan")], [0.0, 1.0], [-1.0], []):
        with pytest.raises(ValueError, match="finite positive"):
            normalised(bad)


def test_a_recipe_that_is_not_yaml_is_refused_naming_the_file(tmp_path):
    # It used to end the run with the parser's traceback, which names "<unicode string>", not the file.
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("sources:\n  - {name: a, path: shards/train-{000000..000003}.tar, weight: 1}\n")
    with pytest.raises(RecipeError, match=rf"data.recipe='{recipe}': not valid YAML: .*line 2"):
        load_recipe(str(recipe), tmp_path)
