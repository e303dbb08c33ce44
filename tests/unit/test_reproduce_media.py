"""stage.reproduce=public_code, media side: the public code's truncating unpad (counts in convert, planner, data and
the model's packing) and the stage-1.5 grid's tie order, each against tests/public_code.py's port of the public
functions; ov_train's defaults (transformers' rounding, the paper's grid order) unchanged."""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers import LlavaOnevisionConfig
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from ov_train.config.media import ImageSettings, MediaSettings, read_media
from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.data.convert import TokenGeometry
from ov_train.model.forward import _pack_anyres, image_features
from ov_train.planner.estimate import Setup, meta_model
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.settings import apply_to_model_config
from ov_train.vision.tokens import anyres_layout, anyres_tokens, best_resolution
from tests import public_code
from tests.conftest import compose_config, plan_of

REAL = VisionGeometry(384, 14, default_pinpoints(384))
TRUNCATING = dataclasses.replace(REAL, rounding="truncate")
SI_GRID = "(1x1),...,(6x6)"  # finetune_si.sh / finetune_ov.sh --image_grid_pinpoints
A4_GRID = "[(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]"  # direct_finetune_siglip_a4.sh:38
# The issue's cases (height x width): transformers' count, the public code's.
NAMED = {(47, 423): (1114, 1004), (1125, 1375): (7209, 8748)}
SIZES = [(h, w) for h in range(20, 4000, 53) for w in range(20, 4000, 59)]


def _model_geometry(image: ImageSettings, crop: int = 384, patch: int = 14) -> VisionGeometry:
    """What a model's config says after training applied the stage's image settings (run.py, the planner)."""
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=crop, patch_size=patch),
                             vision_aspect_ratio="anyres_max_9",
                             image_grid_pinpoints=[list(p) for p in default_pinpoints(crop)])
    apply_to_model_config(config, MediaSettings(image))
    return VisionGeometry.from_model_config(config)


def test_truncation_counts_the_public_codes_tokens_and_rounding_stays_transformers():
    for (h, w), (stock, public) in NAMED.items():
        assert anyres_tokens(h, w, REAL) == stock
        assert public_code.anyres_tokens((w, h), SI_GRID, "anyres_max_9") == public == anyres_tokens(h, w, TRUNCATING)
    # Elsewhere (the two part on 370 of the 36M sizes up to 6000 px) truncation still counts as the public code.
    for h, w in SIZES:
        assert anyres_tokens(h, w, TRUNCATING) == public_code.anyres_tokens((w, h), SI_GRID, "anyres_max_9"), (h, w)


def test_the_switch_sets_truncation_in_data_planner_and_convert():
    for overrides, rounding in (([], "round"), (["stage.reproduce=public_code"], "truncate"),
                                (["stage.token_rounding=truncate"], "truncate"),
                                (["stage.reproduce=public_code", "stage.token_rounding=round"], "round")):
        plan = plan_of(["stage=final_image", *overrides])
        assert plan.data.samples.media.image.rounding == rounding, overrides
        assert plan.data.samples.media.to_dict()["token_rounding"] == rounding
        # Data and model read the geometry from the model config training wrote the settings into.
        assert _model_geometry(plan.data.samples.media.image).rounding == rounding
    # The planner's model gets the stage's settings as training's does.
    cfg = compose_config(["model=ov_qwen2_0_5b", "plan.device=h100", "stage.reproduce=public_code"])
    setup = Setup.of(resolve_plan(cfg, machine=False))
    model = meta_model(setup.model)
    apply_to_model_config(model.config, MediaSettings(setup.image))
    geometry = VisionGeometry.from_model_config(model.config)
    assert [anyres_tokens(h, w, geometry) for h, w in NAMED] == [public for _, public in NAMED.values()]
    # ov-data convert --reproduce public_code counts its index alike.
    tokens = TokenGeometry.of_configs(reproduce="public_code")
    assert tokens.index_fields()["token_rounding"] == "truncate"
    assert [anyres_tokens(h, w, tokens.vision) for h, w in NAMED] == [public for _, public in NAMED.values()]
    assert TokenGeometry.of_configs().vision.rounding == "round"


def _packer(rounding: str | None):
    """A stand-in for the model with the stock packing and a recorded rounding (forward.image_features' needs)."""
    config = LlavaOnevisionConfig()
    if rounding:
        config.ov_train_media = {"token_rounding": rounding}
    core = SimpleNamespace(config=config, image_newline=torch.randn(3, generator=torch.Generator().manual_seed(1)))
    core.pack_image_features = partial(LlavaOnevisionModel.pack_image_features, core)
    return SimpleNamespace(config=config, model=core)


@pytest.mark.parametrize("size", [*NAMED, (700, 1080), (384, 384), (90, 3300)])
def test_model_packs_features_as_the_public_unpad_under_truncation(size):
    h, w = size
    model = _packer("truncate")
    layout = anyres_layout(h, w, REAL)
    crops = 1 + layout.rows * layout.cols
    feats = torch.randn(crops, 729, 3, generator=torch.Generator().manual_seed(h * w))
    newline = model.model.image_newline
    (ours,) = image_features(model, feats, [crops], torch.tensor([[h, w]]), [True])
    public = public_code.pack_anyres(feats, (w, h), SI_GRID, "anyres_max_9", newline)
    assert ours.shape[0] == anyres_tokens(h, w, TRUNCATING)
    torch.testing.assert_close(ours, public, rtol=0, atol=0)
    # Under transformers' rounding the same packing is the stock one, value for value.
    stock_model = _packer(None)
    (stock,) = image_features(stock_model, feats, [crops], torch.tensor([[h, w]]), [True])
    torch.testing.assert_close(_pack_anyres(feats, [h, w], newline, REAL), stock, rtol=0, atol=0)


def test_stage_one_and_a_half_ties_go_to_2x1_as_the_public_a4_script():
    default = plan_of(["stage=mid"]).data.samples.media.image
    public = plan_of(["stage=mid", "stage.reproduce=public_code"]).data.samples.media.image
    assert default.grid == ((2, 2), (1, 2), (1, 3), (2, 1), (3, 1))  # the paper's listing, unchanged
    assert sorted(public.grid) == sorted(default.grid)
    ours, theirs = _model_geometry(default), _model_geometry(public)
    pinpoints = public_code.pinpoint_list(A4_GRID)
    small = [(h, w) for h in range(1, 385, 11) for w in range(1, 385, 13)] + [(384, 384), (1, 384), (384, 1)]
    for h, w in small:
        across, down = public_code.get_anyres_image_grid_shape((w, h), A4_GRID, 384)
        assert (down, across) == (2, 1) == tuple(d // 384 for d in best_resolution(h, w, theirs)), (h, w)
        assert tuple(d // 384 for d in best_resolution(h, w, ours)) == (1, 2), (h, w)
        # The a4 script's anyres (no shrink) and the stage's anyres_max_4 (never over 4 crops) count alike.
        truncating = dataclasses.replace(theirs, rounding="truncate")
        assert anyres_tokens(h, w, truncating) == public_code.anyres_tokens((w, h), pinpoints, "anyres"), (h, w)
    # Beyond the ties the two orders agree.
    for h, w in SIZES[::7]:
        assert best_resolution(h, w, ours) == best_resolution(h, w, theirs) or max(h, w) <= 384


def test_reproduce_keys_are_checked_by_name():
    with pytest.raises(ConfigError) as err:
        plan_of(["stage.reproduce=paper", "stage.labels=all", "stage.token_rounding=floor",
                 "stage.warmup_schedule=hf", "stage.plain_newline=merged"])
    for key in ("stage.reproduce='paper'", "stage.labels='all'", "stage.token_rounding='floor'",
                "stage.warmup_schedule='hf'", "stage.plain_newline='merged'"):
        assert key in str(err.value)
    _, problems = read_media(compose_config(["stage=mid", "stage.public_image_grid=[2x2,1x2]"]).stage)
    assert any(p.startswith("stage.public_image_grid=") and "stage.image_grid" in p for p in problems)


def test_a_truncating_run_feeds_the_model_what_it_packs(tiny_model_and_tokenizer):
    """End to end on the tiny model: the data side counts an image's slots at the rounding the model config records,
    and the forward packs exactly that many features (it refuses a mismatch); 88x110 is a size where the two
    roundings part at the tiny geometry."""
    import copy

    from ov_train.data.samples import SampleProcessor, collate
    from ov_train.model.forward import embed_inputs
    from tests.helpers import noise_png, raw_sample

    base, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(base)
    media = plan_of(["stage.reproduce=public_code"]).data.samples.media
    apply_to_model_config(model.config, media)
    geometry = VisionGeometry.from_model_config(model.config)
    rounded = dataclasses.replace(geometry, rounding="round")
    assert anyres_tokens(88, 110, geometry) != anyres_tokens(88, 110, rounded)
    process = SampleProcessor(tokenizer, geometry, "qwen_1_5", media, max_length=4096)
    example = process(raw_sample("a", "<image>\nWhat colour?", "red", [noise_png(88, 110, 1)]))
    assert example["visual_tokens"] == [anyres_tokens(88, 110, geometry)]
    with torch.no_grad():
        embeds = embed_inputs(model, collate([example], tokenizer.pad_token_id))
    assert embeds.shape[1] == example["input_ids"].shape[0]


def test_ov_data_convert_reproduce_counts_the_index_as_the_public_code(tmp_path):
    from ov_train.cli.data import main
    from tests.fixtures_data import conversation, write_image, write_jsonl

    write_image(tmp_path / "media" / "wide.png", 47, 423, "PNG")
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "image": "wide.png",
                                                   "conversations": conversation("<image>\nWhat is it?")}])
    counts = {}
    for reproduce in ("ov_train", "public_code"):
        out = tmp_path / reproduce
        assert main(["convert", str(source), "--media-root", str(tmp_path / "media"), "--out", str(out),
                     "--workers", "1", "--reproduce", reproduce]) == 0
        index = json.loads((out / "index.json").read_text())
        counts[index["geometry"]["token_rounding"]] = [s["visual_tokens"] for s in index["samples"]]
    assert counts == {"round": [NAMED[47, 423][0]], "truncate": [NAMED[47, 423][1]]}
