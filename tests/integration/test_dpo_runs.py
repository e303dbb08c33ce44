"""stage=dpo runs on the tiny model: SIGTERM then `ckpt_path=auto` ends bit-identical to an uninterrupted run (frozen
and precomputed references); precomputed reference log-probabilities train exactly as the frozen copy does and are
read back, not recomputed, by the resumed run; the adapters-off reference is the starting model (every reward 0 at the
first step); the export is a stock model; a run from random weights trains its warm start once."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.conftest import SMALL_DATA, compose_config
from tests.integration.test_requeue import SigtermAt, checkpoint, consumed, train

pytestmark = pytest.mark.slow

STEPS = 4


def dpo_overrides(data_root, *extra) -> list[str]:
    return [
        "stage=dpo", f"data.root={data_root}", *SMALL_DATA, "stage.preference.warm_start_steps=0",
        f"trainer.max_steps={STEPS}", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
        "data.record_keys=true", "ckpt_path=auto", "export=false", *extra,
    ]


def same_state(a: dict, b: dict) -> bool:
    (state_a,), (state_b,) = a["optimizer_states"], b["optimizer_states"]
    return (a["global_step"] == b["global_step"] and a["state_dict"].keys() == b["state_dict"].keys()
            and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
            and all(torch.equal(v, state_b["state"][i][k]) for i, t in state_a["state"].items() for k, v in t.items()))


def metric_rows(run_dir) -> list[dict]:
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_data_root):
    """Uninterrupted runs, one per reference."""
    out = {}
    for reference in ("frozen", "precomputed"):
        run_dir = tmp_path_factory.mktemp(f"straight_{reference}")
        summary = train(compose_config(dpo_overrides(small_data_root, f"stage.preference.reference={reference}"),
                                       run_dir=run_dir))
        out[reference] = (run_dir, summary)
    return out


def test_precomputed_reference_trains_exactly_as_the_frozen_copy(straight):
    (frozen, s_frozen), (precomputed, s_pre) = straight["frozen"], straight["precomputed"]
    assert same_state(checkpoint(frozen), checkpoint(precomputed))
    assert s_frozen["val_preference_accuracy"] == s_pre["val_preference_accuracy"]
    assert s_frozen["reference"] == "frozen" and s_pre["reference"] == "precomputed"
    stored = torch.load(precomputed / "reference" / "rank0.pt", weights_only=True)
    assert stored["done"] == {"train": STEPS, "val": True}  # every step's pairs, then the held-out ones
    trained = {k for step in consumed(precomputed) for k in step}
    assert trained and trained <= {key.split("/", 1)[1] for key in stored["values"]}
    # The frozen copy is no part of the checkpoint: the policy's tensors only.
    assert not any("frozen" in k or "reference" in k for k in checkpoint(frozen)["state_dict"])


@pytest.mark.parametrize("reference", ["frozen", "precomputed"])
def test_sigterm_then_auto_resume_is_bit_identical(tmp_path, small_data_root, straight, reference):
    cfg = lambda: compose_config(  # noqa: E731 (a fresh copy per run)
        dpo_overrides(small_data_root, f"stage.preference.reference={reference}"), run_dir=tmp_path)
    with pytest.raises(SystemExit):
        train(cfg(), SigtermAt("training", 3))
    assert checkpoint(tmp_path)["global_step"] == 3 and not (tmp_path / "summary.json").exists()
    store = tmp_path / "reference" / "rank0.pt"
    written = store.stat().st_mtime_ns if reference == "precomputed" else None
    summary = train(cfg())
    assert summary["steps"] == STEPS
    uninterrupted = straight[reference][0]
    assert same_state(checkpoint(uninterrupted), checkpoint(tmp_path))
    assert consumed(tmp_path) == consumed(uninterrupted)
    assert summary["val_preference_accuracy"] == straight[reference][1]["val_preference_accuracy"]
    if reference == "precomputed":
        assert store.stat().st_mtime_ns == written  # read back by the resumed run, not computed again


@pytest.mark.parametrize("adapter, reference", [
    ([], "frozen"),
    (["adapter=lora", "adapter.targets.projector=frozen"], "adapters_off"),
])
def test_the_reference_is_the_starting_model_and_the_export_is_stock(tmp_path, small_data_root, adapter, reference):
    """At the first step the policy is the reference (a copy, or the model with its fresh LoRA adapters off, whose B
    is 0): every reward is exactly 0. Later steps move them. The export loads as a stock model."""
    from transformers import LlavaOnevisionForConditionalGeneration

    overrides = [*dpo_overrides(small_data_root, *adapter), "logger=csv", "export=true", "trainer.max_steps=3"]
    summary = train(compose_config(overrides, run_dir=tmp_path))
    assert summary["reference"] == reference and summary["val_pairs"] > 0
    rows = [r for r in metric_rows(tmp_path) if r.get("train/rewards/chosen")]
    first, last = rows[0], rows[-1]
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margin"):
        assert float(first[key]) == 0.0, key
    assert float(first["train/loss"]) == pytest.approx(0.6931471805599453)  # -log sigmoid(0)
    assert float(last["train/rewards/chosen"]) != 0.0
    assert any(k.startswith("train/rewards/accuracy_") for k in first)  # per modality
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in n for n, _ in model.named_parameters())  # adapters merged


def test_a_run_from_random_weights_trains_its_warm_start_once(tmp_path, small_data_root):
    overrides = [*dpo_overrides(small_data_root), "stage.preference.warm_start_steps=2", "trainer.max_steps=2"]
    summary = train(compose_config(overrides, run_dir=tmp_path))
    export = tmp_path / "warm_start" / "export" / "config.json"
    assert export.is_file() and summary["steps"] == 2
    warm = json.loads((tmp_path / "warm_start" / "summary.json").read_text())
    assert warm["stage"] == "onevision" and warm["steps"] == 2
    assert checkpoint(tmp_path)["ov_train"]["run"]["stage"] == "dpo"
    made = export.stat().st_mtime_ns
    # The same command again (a requeue): the warm start is reused, the finished run kept.
    again = train(compose_config(overrides, run_dir=tmp_path))
    assert export.stat().st_mtime_ns == made and again == summary
