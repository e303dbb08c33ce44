import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ov_train.text import tokenizer as tokenizer_module
from ov_train.text.template import IGNORE_INDEX, encode_conversation
from ov_train.text.tokenizer import (
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    ensure_special_tokens,
    load_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

ANSWER_WORDS = [
    "red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "one", "two", "three", "four",
    "five", "first", "second", "third", "left", "right", "up", "down",
]
COMMON_WORDS = [
    "what", "which", "is", "the", "image", "video", "shape", "colour", "color", "how", "many", "are", "there", "does",
    "move", "way", "describe", "repeat", "word", "a", "an", "of", "in", "and", "you", "helpful", "assistant", "system",
    "user",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tokenizer"
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return build_tiny_tokenizer(tok_dir)


def _model_state(path: Path) -> dict:
    data = json.loads((path / "tokenizer.json").read_text())
    return {"model": data["model"], "added_tokens": data["added_tokens"]}


def test_vocab_size_is_small_but_realistic(tok):
    assert 1000 <= len(tok) <= 2000


@pytest.mark.slow
def test_build_is_deterministic_in_process_and_across_processes(tok_dir, tmp_path):
    build_tiny_tokenizer(tmp_path / "same_process")
    # A fresh interpreter has a different hash seed; ids must still match exactly.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    script = "import sys; from ov_train.text.tokenizer import build_tiny_tokenizer as b; b(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "other_process")],
        check=True,
        env=env,
    )
    reference = _model_state(tok_dir)
    assert _model_state(tmp_path / "same_process") == reference
    assert _model_state(tmp_path / "other_process") == reference


def test_second_call_loads_from_cache_without_training(tmp_path, monkeypatch):
    cache = tmp_path / "tok"
    first = build_tiny_tokenizer(cache)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    def fail():
        raise AssertionError("tokenizer was retrained despite a cache")

    monkeypatch.setattr(tokenizer_module, "_train_tiny_tokenizer", fail)
    second = build_tiny_tokenizer(cache)

    assert second.get_vocab() == first.get_vocab()
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    # The atomic publish leaves no temporary directory behind.
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]


def test_special_tokens_are_single_never_split_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        # Glued to text on both sides it is still one id.
        glued = tok.encode(f"red{token}blue", add_special_tokens=False)
        assert glued.count(token_id) == 1
        assert tok.decode(glued) == f"red{token}blue"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("word", ANSWER_WORDS + COMMON_WORDS)
def test_words_are_single_tokens_with_and_without_leading_space(tok, word):
    assert len(tok.encode(" " + word, add_special_tokens=False)) == 1
    assert len(tok.encode(word, add_special_tokens=False)) == 1


@pytest.mark.parametrize("word", ANSWER_WORDS)
def test_answer_word_is_one_token_at_start_of_reply(tok, word):
    conversation = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": word}]
    encoded = encode_conversation(tok, conversation, "qwen_1_5", [])
    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert len(labelled) == 2
    assert tok.decode(labelled[:1]) == word
    assert labelled[1] == tok.convert_tokens_to_ids("<|im_end|>")


def _random_unicode(seed: int, length: int) -> str:
    rng = random.Random(seed)
    chars = []
    while len(chars) < length:
        code_point = rng.randrange(0x110000)
        if not 0xD800 <= code_point <= 0xDFFF:  # surrogates are not encodable text
            chars.append(chr(code_point))
    return "".join(chars)


@pytest.mark.parametrize(
    "text",
    [
        "The red circle moves left.",
        "  leading and trailing spaces  ",
        "tabs\tand\nnew\r\nlines\n\n",
        "Ünïcödé, 日本語のテキスト, emoji 🤖🎨, combining e\u0301",
        "punctuation ( . , ! ? ) don't isn't",
        "<image>\nWhat is this?<|im_end|>",
        _random_unicode(0, 200),
        _random_unicode(1, 200),
    ],
)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_template_renders_qwen_1_5(tok):
    messages = [
        # A media part renders as its placeholder and "\n", as LLaVA data writes it.
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And now?"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_matches_training_encoding(tok):
    conversation = [
        {"from": "human", "value": "What shape is it?"},
        {"from": "gpt", "value": "A blue square."},
    ]
    messages = [{"role": r, "content": t["value"]} for r, t in zip(("user", "assistant"), conversation)]
    encoded = encode_conversation(tok, conversation, "qwen_1_5", [])
    assert tok.decode(encoded.input_ids) == tok.apply_chat_template(messages, tokenize=False)


def test_load_tokenizer_on_saved_dir(tok, tok_dir):
    loaded = load_tokenizer(tok_dir)
    assert loaded.get_vocab() == tok.get_vocab()
    assert len(loaded) == len(tok)
    assert loaded.pad_token == "<|endoftext|>"
    assert loaded.chat_template == tok.chat_template


def _tokenizer_without_media_tokens() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["hello world"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_ensure_special_tokens_adds_exactly_the_missing_media_tokens():
    tokenizer = _tokenizer_without_media_tokens()
    size = len(tokenizer)
    assert ensure_special_tokens(tokenizer) == 2
    assert len(tokenizer) == size + 2
    for token in ("<image>", "<video>"):
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False).count(
            tokenizer.convert_tokens_to_ids(token)
        ) == 1
    assert ensure_special_tokens(tokenizer) == 0


def test_load_tokenizer_adds_media_tokens_and_pad(tmp_path):
    original = _tokenizer_without_media_tokens()
    assert original.pad_token is None
    original.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<|endoftext|>"
    assert set(SPECIAL_TOKENS) <= set(loaded.get_added_vocab())
    assert len(loaded) == len(original) + 2
