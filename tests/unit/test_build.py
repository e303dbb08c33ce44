"""build_model: every geometry config, the SigLIP + Qwen2 route, the OneVision checkpoint routes, errors."""
from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ov_train.config.media import MediaSettings
from ov_train.config.run_plan import ConfigError, model_plan, resolve_plan
from ov_train.data.samples import SampleProcessor, collate
from ov_train.model.build import build_model, onevision_config
from ov_train.text.tokenizer import build_tiny_tokenizer
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from tests.conftest import compose_config
from tests.helpers import noise_png, raw_sample

REAL = ("ov_qwen2_0_5b", "ov_qwen2_7b", "ov_qwen2_72b")


def _sd(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _vit(tower):
    """The SigLIP vision transformer inside a SiglipVisionModel (nested as .vision_model in older transformers)."""
    return getattr(tower, "vision_model", tower)


def _vit_sd(siglip) -> dict[str, torch.Tensor]:
    """State dict of a SiglipVisionModel or SiglipModel's vision part, keyed relative to the vision transformer."""
    out = {}
    for k, v in siglip.state_dict().items():
        if isinstance(siglip, SiglipModel) and not k.startswith("vision_model."):
            continue
        out[k.removeprefix("vision_model.")] = v.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. Geometry configs


def _shrink(cfg, model_name: str) -> dict:
    """Shrink the geometry in place, keeping its structure (GQA ratio, tying, rope, patch size); return the yaml."""
    yaml = {"vision": dict(cfg.model.vision), "text": dict(cfg.model.text)}
    ratio = yaml["text"]["num_attention_heads"] // yaml["text"]["num_key_value_heads"]
    with open_dict(cfg):
        v, t = cfg.model.vision, cfg.model.text
        v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads = 32, 64, 2, 2
        if model_name != "tiny":
            v.image_size = 28  # 2 x 2 patches of 14
        t.num_key_value_heads = 1
        t.num_attention_heads = ratio
        t.hidden_size = 8 * ratio
        t.intermediate_size = 48
        t.num_hidden_layers = 2
        if t.vocab_size is not None:
            t.vocab_size = 1100  # larger than the tiny tokenizer, so it must be kept as given
        cfg.model.random_init = True
    return yaml


@pytest.mark.parametrize("model_name", ("tiny",) + REAL)
def test_every_geometry_config_builds_shrunk(model_name, _offline_cache):
    cfg = compose_config([f"model={model_name}"])
    yaml = _shrink(cfg, model_name)
    torch.manual_seed(0)
    model, tokenizer = build_model(model_plan(cfg.model), _offline_cache)

    assert type(model) is LlavaOnevisionForConditionalGeneration
    c, vc, tc = model.config, model.config.vision_config, model.config.text_config
    # Shrunk fields took effect...
    assert (vc.hidden_size, vc.num_hidden_layers, tc.hidden_size, tc.num_hidden_layers) == (32, 2, 8 * tc.num_attention_heads, 2)
    assert len(_vit(model.model.vision_tower).encoder.layers) == 2
    assert len(model.model.language_model.layers) == 2
    # ...and every field that was not shrunk keeps the yaml's value.
    assert vc.patch_size == yaml["vision"]["patch_size"] == (8 if model_name == "tiny" else 14)
    assert vc.image_size == (32 if model_name == "tiny" else 28)
    assert tc.rope_parameters["rope_theta"] == yaml["text"]["rope_theta"]
    assert tc.max_position_embeddings == yaml["text"]["max_position_embeddings"]
    assert c.tie_word_embeddings == tc.tie_word_embeddings == yaml["text"]["tie_word_embeddings"]
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == yaml["text"]["tie_word_embeddings"]
    assert tc.num_attention_heads // tc.num_key_value_heads == (
        yaml["text"]["num_attention_heads"] // yaml["text"]["num_key_value_heads"]
    )
    if yaml["text"]["rms_norm_eps"] is not None:
        assert tc.rms_norm_eps == pytest.approx(1e-6)
    # The real geometries' ratios: 14/2 (0.5B), 28/4 (7B), 64/8 (72B).
    assert tc.num_attention_heads == {"tiny": 2, "ov_qwen2_0_5b": 7, "ov_qwen2_7b": 7, "ov_qwen2_72b": 8}[model_name]
    # Vocabulary: the yaml's size when it covers the tokenizer, else the tokenizer's length.
    rows = 1100 if yaml["text"]["vocab_size"] is not None else len(tokenizer)
    assert tc.vocab_size == rows == model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0]
    # OneVision wiring.
    assert c.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == c.image_token_index
    assert c.video_token_id == tokenizer.convert_tokens_to_ids("<video>") == c.video_token_index
    assert c.image_token_id != c.video_token_id
    assert tokenizer.convert_ids_to_tokens([c.image_token_id, c.video_token_id]) == ["<image>", "<video>"]
    assert c.vision_aspect_ratio == "anyres_max_9"
    assert c.vision_feature_layer == -1
    assert c.vision_feature_select_strategy == "full"
    assert [tuple(p) for p in c.image_grid_pinpoints] == list(default_pinpoints(vc.image_size))
    assert not any(".head." in n for n, _ in model.named_parameters())  # no SigLIP pooling head
    assert model.model.multi_modal_projector.linear_1.weight.shape == (tc.hidden_size, vc.hidden_size)
    # A text-only forward runs with the built shapes.
    ids = torch.tensor([tokenizer("the red circle")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], rows) and torch.isfinite(logits).all()


def _params_formula(v: dict, t: dict) -> dict[str, int]:
    """Parameter counts of OneVision = SigLIP (no head) + 2-layer MLP projector + image_newline + Qwen2, by hand."""
    h, inter = v["hidden_size"], v["intermediate_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    embed = 3 * v["patch_size"] ** 2 * h + h + patches * h
    layer = 4 * (h * h + h) + (h * inter + inter) + (inter * h + h) + 2 * 2 * h
    vision = embed + v["num_hidden_layers"] * layer + 2 * h  # + post_layernorm
    d, kv_dim = t["hidden_size"], t["hidden_size"] // t["num_attention_heads"] * t["num_key_value_heads"]
    attn = (d * d + d) + 2 * (d * kv_dim + kv_dim) + d * d  # q, k, v with bias; o without
    llm_layer = attn + 3 * d * t["intermediate_size"] + 2 * d
    llm = t["vocab_size"] * d + t["num_hidden_layers"] * llm_layer + d
    lm_head = 0 if t["tie_word_embeddings"] else t["vocab_size"] * d
    projector = (h * d + d) + (d * d + d) + d  # linear_1, linear_2, image_newline
    return {"vision": vision, "projector": projector, "llm": llm + lm_head, "total": vision + projector + llm + lm_head}


# Exact totals of the unshrunk yaml geometries (SigLIP so400m 26 layers + projector + Qwen2).
EXPECTED_PARAMS = {
    "ov_qwen2_0_5b": 893_618_208,  # 397.7M SigLIP + 1.8M projector + 494.0M Qwen2-0.5B (tied)
    "ov_qwen2_7b": 8_030_348_832,  # 397.7M + 17.0M + 7,615.6M Qwen2-7B
    "ov_qwen2_72b": 73_180_522_016,  # 397.7M + 76.6M + 72,706.2M Qwen2-72B
}


@pytest.mark.parametrize("model_name", REAL)
def test_real_geometry_parameter_counts_on_meta(model_name, _offline_cache):
    cfg = compose_config([f"model={model_name}"]).model
    tokenizer = build_tiny_tokenizer(_offline_cache / "tokenizer")
    plan = model_plan(cfg)
    vision = SiglipVisionConfig(vision_use_head=False, **plan.vision)
    text = Qwen2Config(**plan.text)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(onevision_config(vision, text, tokenizer, cfg.vision_aspect_ratio))
    assert all(p.is_meta for p in model.parameters())
    counts = {
        "vision": sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.vision_tower.")),
        "projector": sum(
            p.numel() for n, p in model.named_parameters() if n.startswith(("model.multi_modal_projector.", "model.image_newline"))
        ),
        "llm": sum(p.numel() for n, p in model.named_parameters() if n.startswith(("model.language_model.", "lm_head."))),
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    assert counts == _params_formula(dict(cfg.vision), dict(cfg.text))
    assert counts["total"] == EXPECTED_PARAMS[model_name]
    assert counts["vision"] == 397_747_744  # SigLIP so400m/14-384 without its last layer and pooling head
    billions = counts["total"] / 1e9
    lo, hi = {"ov_qwen2_0_5b": (0.89, 0.90), "ov_qwen2_7b": (8.0, 8.1), "ov_qwen2_72b": (73.1, 73.3)}[model_name]
    assert lo < billions < hi
    if model_name == "ov_qwen2_0_5b":
        assert counts["llm"] == 494_032_768  # Qwen2-0.5B, embeddings tied with lm_head
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------------------------
# 2. SigLIP + Qwen2 route

BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # a Qwen2 tokenizer has no <image>/<video>


def _base_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["What colour is the circle in the image? The circle is red.", "Which way does it move? left"] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=BASE_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _tiny_siglip_vision_config(**kw) -> dict:
    return dict(image_size=32, patch_size=8, num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(1)
    siglip = SiglipVisionModel(SiglipVisionConfig(**_tiny_siglip_vision_config()))
    siglip.save_pretrained(root / "siglip")
    full = SiglipModel(
        SiglipConfig(
            vision_config=_tiny_siglip_vision_config(),
            text_config={
                "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "max_position_embeddings": 16, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": None,
            },
        )
    )
    full.save_pretrained(root / "siglip_full")
    tokenizer = _base_tokenizer()
    assert not {"<image>", "<video>"} & set(tokenizer.get_vocab())
    llms = {}
    for tie in (False, True):
        qwen = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, rope_theta=12345.0,
            )
        )
        path = root / f"qwen_tie{int(tie)}"
        qwen.save_pretrained(path)
        tokenizer.save_pretrained(path)
        llms[tie] = (path, qwen)
    return {"siglip": (root / "siglip", siglip), "siglip_full": (root / "siglip_full", full), "llms": llms, "vocab": len(tokenizer)}


def _image_batch(model, tokenizer):
    geom = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geom, "qwen_1_5", MediaSettings.of("anyres_max_9", 4), max_length=512)
    raws = [raw_sample("a", "<image>\nWhat colour?", "red", [noise_png(40, 70, 3)])]
    examples = [process(r) for r in raws]
    return examples, collate(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize(
    "tower,tie", [("siglip", False), ("siglip", True), ("siglip_full", False)], ids=["vision-untied", "vision-tied", "full-siglip"]
)
def test_siglip_qwen2_compose(checkpoints, tower, tie, _offline_cache):
    tower_dir, siglip = checkpoints[tower]
    llm_dir, qwen = checkpoints["llms"][tie]
    old_vocab = checkpoints["vocab"]
    cfg = compose_config([f"model.vision_tower={tower_dir}", f"model.llm={llm_dir}", "model.random_init=false"])
    resolve_plan(cfg)
    torch.manual_seed(2)
    model, tokenizer = build_model(model_plan(cfg.model), _offline_cache)

    # Vision tower: 3-layer checkpoint -> 2 layers, bit-identical weights, no head, no layer 2.
    vit = _vit(model.model.vision_tower)
    assert model.config.vision_config.num_hidden_layers == 2 and len(vit.encoder.layers) == 2
    ckpt = _vit_sd(siglip)
    assert any(k.startswith("head.") for k in ckpt) and any(k.startswith("encoder.layers.2.") for k in ckpt)
    expected = {k: v for k, v in ckpt.items() if not k.startswith(("head.", "encoder.layers.2."))}
    got = vit.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert any(k.startswith("embeddings.") for k in expected) and any(k.startswith("encoder.layers.1.") for k in expected)
    # The features OneVision reads (last kept layer) are the checkpoint's second-to-last hidden states.
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vision_ckpt = siglip.vision_model if isinstance(siglip, SiglipModel) else siglip
    with torch.no_grad():
        ref = vision_ckpt(pixels, output_hidden_states=True).hidden_states[-2]
        ours = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
    assert torch.equal(ours, ref)

    # Language model: every tensor equal, embeddings grown by exactly the added <image>/<video> rows.
    added = len(tokenizer) - old_vocab
    assert added == 2
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [old_vocab, old_vocab + 1]
    assert (model.config.image_token_id, model.config.video_token_id) == (old_vocab, old_vocab + 1)
    lm = model.model.language_model.state_dict()
    ref_lm = qwen.model.state_dict()
    assert set(lm) == set(ref_lm)
    for k, v in ref_lm.items():
        if k == "embed_tokens.weight":
            assert lm[k].shape == (old_vocab + added, v.shape[1])
            assert torch.equal(lm[k][:old_vocab], v)
        else:
            assert torch.equal(lm[k], v), k
    assert model.lm_head.weight.shape == (old_vocab + added, qwen.config.hidden_size)
    assert model.config.text_config.vocab_size == old_vocab + added
    assert model.config.tie_word_embeddings == tie
    if tie:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    else:
        assert torch.equal(model.lm_head.weight[:old_vocab], qwen.lm_head.weight)
    assert model.config.text_config.rope_parameters["rope_theta"] == 12345.0
    assert torch.isfinite(model.get_input_embeddings().weight[old_vocab:]).all()

    # Projector: present with the right shapes, freshly initialised (N(0, 0.02) weights, zero biases).
    proj = model.model.multi_modal_projector
    assert proj.linear_1.weight.shape == (48, 32) and proj.linear_2.weight.shape == (48, 48)
    for lin in (proj.linear_1, proj.linear_2):
        assert 0.01 < lin.weight.std().item() < 0.03
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    assert model.model.image_newline.shape == (48,) and model.model.image_newline.abs().sum() > 0

    # The stock transformers forward runs on an anyres image sample.
    examples, batch = _image_batch(model, tokenizer)
    assert (batch["input_ids"] == model.config.image_token_id).sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"][None],
            image_sizes=batch["image_sizes"],
            labels=batch["labels"],
        )
    assert out.logits.shape == (*batch["input_ids"].shape, old_vocab + added)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------
# 3. OneVision checkpoint routes


@pytest.fixture(scope="module")
def onevision_checkpoint(tmp_path_factory, _offline_cache):
    torch.manual_seed(3)
    model, tokenizer = build_model(model_plan(compose_config([]).model), _offline_cache)
    path = tmp_path_factory.mktemp("onevision")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, _sd(model), model.config, tokenizer


@pytest.mark.parametrize("route", ["pretrained", "init_from"])
def test_onevision_checkpoint_routes(onevision_checkpoint, route, _offline_cache):
    path, ref, ref_config, ref_tok = onevision_checkpoint
    cfg = compose_config([f"model.{route}={path}"])
    resolve_plan(cfg)
    model, tokenizer = build_model(model_plan(cfg.model), _offline_cache)
    assert type(model) is LlavaOnevisionForConditionalGeneration
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], v), k
    assert tokenizer.get_vocab() == ref_tok.get_vocab() and len(tokenizer) == len(ref_tok)
    assert model.config.image_token_id == ref_config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.video_token_id == ref_config.video_token_id == tokenizer.convert_tokens_to_ids("<video>")
    assert model.config.vision_config.num_hidden_layers == ref_config.vision_config.num_hidden_layers
    assert not any(".head." in k for k in got)


def test_init_from_takes_precedence_over_pretrained(onevision_checkpoint, tmp_path, _offline_cache):
    path, ref, _, _ = onevision_checkpoint
    torch.manual_seed(4)
    other, tok = build_model(model_plan(compose_config([]).model), _offline_cache)
    other.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert not torch.equal(other.lm_head.weight, ref["lm_head.weight"])
    cfg = compose_config([f"model.init_from={path}", f"model.pretrained={tmp_path}"])
    model, _ = build_model(model_plan(cfg.model), _offline_cache)
    assert torch.equal(model.lm_head.weight, ref["lm_head.weight"])


# ---------------------------------------------------------------------------------------------------------------
# 4. Errors


def test_validate_accepts_default_config():
    resolve_plan(compose_config([]))


def test_missing_pretrained_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    cfg = compose_config([f"model.pretrained={missing}"])
    with pytest.raises(ConfigError, match=r"model\.pretrained") as err:
        resolve_plan(cfg)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)


@pytest.mark.parametrize("model_name", REAL)
def test_real_geometry_without_weights_names_the_options(model_name, _offline_cache):
    cfg = compose_config([f"model={model_name}"])
    assert cfg.model.random_init is False
    options = ("model.pretrained=DIR", "model.vision_tower=DIR model.llm=DIR", "model.init_from=DIR", "model.random_init=true")
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    assert all(o in str(err.value) for o in options) and f"model={model_name}" in str(err.value)


def test_half_of_the_compose_route_is_refused(checkpoints, _offline_cache):
    cfg = compose_config([f"model.vision_tower={checkpoints['siglip'][0]}"])
    with pytest.raises(ConfigError, match="model.vision_tower and model.llm"):
        resolve_plan(cfg)
