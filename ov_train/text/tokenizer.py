"""Tokenizers: a tiny offline byte-level BPE for tests/smoke runs, and loading real ones.

The tiny tokenizer mirrors Qwen2's special tokens and chat format so the rest of
the framework cannot tell it from a real Qwen2 tokenizer, but it is trained
locally from a built-in corpus (no hub access) in a few milliseconds.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ov_train.constants import MEDIA_TOKENS
from ov_train.text.chat_template import QWEN_1_5

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *MEDIA_TOKENS)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
# Upper bound for BPE training; the built-in corpus runs out of frequent pairs at ~1,030 entries.
VOCAB_SIZE = 1500

# The qwen_1_5 chat format, as training renders it (text/chat_template.py); exports set their stage's.
CHAT_TEMPLATE = QWEN_1_5

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle")
_NUMBERS = ("one", "two", "three", "four", "five")
_ORDINALS = ("first", "second", "third")
_DIRECTIONS = ("left", "right", "up", "down")
_COMMON = (
    "what", "which", "is", "the", "image", "video", "shape", "colour", "color", "how", "many",
    "are", "there", "does", "move", "way", "describe", "repeat", "word", "a", "an", "of", "in",
    "and", "you", "helpful", "assistant", "system", "user",
)  # fmt: skip
# General English filler so the vocabulary reaches a realistic size (~1,000 entries).
_FILLER = (
    "about", "above", "after", "again", "all", "also", "always", "animal", "answer", "apple",
    "around", "back", "ball", "be", "because", "before", "behind", "below", "between", "big",
    "bird", "black", "book", "both", "box", "bread", "brown", "but", "by", "can", "car", "cat",
    "center", "chair", "change", "child", "city", "close", "cloud", "come", "corner", "could",
    "count", "cup", "dark", "day", "dog", "door", "each", "early", "edge", "end", "every", "face",
    "far", "fast", "few", "find", "fish", "floor", "for", "frame", "from", "front", "give", "go",
    "good", "grey", "ground", "hand", "happy", "has", "have", "he", "her", "here", "his", "house",
    "inside", "it", "its", "just", "keep", "kind", "know", "large", "last", "light", "like", "line",
    "little", "long", "look", "make", "man", "me", "middle", "more", "most", "near", "never", "new",
    "next", "no", "not", "now", "object", "old", "on", "only", "other", "our", "out", "over",
    "part", "people", "picture", "place", "point", "put", "question", "quickly", "read", "river",
    "room", "round", "same", "scene", "see", "she", "show", "side", "size", "slow", "small", "so",
    "some", "stand", "still", "stone", "street", "sun", "table", "take", "tell", "than", "that",
    "their", "them", "then", "these", "they", "thing", "this", "time", "to", "top", "train", "tree",
    "turn", "under", "very", "wall", "want", "was", "water", "we", "well", "were", "when", "where",
    "white", "who", "why", "will", "window", "with", "woman", "would", "yes", "your",
)  # fmt: skip


def _corpus() -> list[str]:
    """Fixed synthetic sentences; every key word appears often both after a space and line-initially."""
    lines = []
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines += [
            f"What colour is the {shape} in the image? The {shape} is {colour}.",
            f"Which color does the {shape} have? {colour}",
            f"{colour} {shape}",
        ]
    for number, shape in itertools.product(_NUMBERS, _SHAPES):
        lines += [
            f"How many {shape} shapes are there in the image? There are {number}.",
            f"{number} {shape} and {number} {shape}",
        ]
    for ordinal, colour, shape in itertools.product(_ORDINALS, _COLOURS, _SHAPES):
        lines.append(f"What is the {ordinal} shape? The {ordinal} shape is a {colour} {shape}.")
    for ordinal in _ORDINALS:
        lines += [f"{ordinal} of the shapes", f"Which shape is {ordinal} in the video? {ordinal}"]
    for direction, colour, shape in itertools.product(_DIRECTIONS, _COLOURS, _SHAPES):
        lines.append(f"Which way does the {colour} {shape} move in the video? It moves {direction}.")
    for direction in _DIRECTIONS:
        lines += [f"{direction} and {direction}", f"The way is {direction}."]
    for word in _COLOURS + _SHAPES + _NUMBERS + _ORDINALS + _DIRECTIONS + _COMMON + _FILLER:
        lines += [f"Repeat the word {word}.", word, f"{word} is a word.", f"{word.capitalize()} {word}s"]
    for a, b, c in zip(_FILLER, _FILLER[1:] + _FILLER[:1], _FILLER[2:] + _FILLER[:2]):
        lines += [f"{a} {b} {c}.", f"Tell me what {a} is, which {b} is {c}, and how many {c}."]
        lines.append(f"Please describe {a}, then repeat {b} and {c}.")
    lines += [
        "You are a helpful assistant.",
        "The system is a helpful assistant and the user is you.",
        "Describe the image. Describe the video. Describe an image of a shape.",
        "Does the shape move? How many are there? What is in the video?",
    ]
    return lines


def _train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols up front so any unicode text round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        chat_template=CHAT_TEMPLATE,
        # Keep decode an exact inverse of encode (no " ." -> "." cleanup).
        clean_up_tokenization_spaces=False,
    )


def build_tiny_tokenizer(cache_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Return the tiny tokenizer, training and saving it into `cache_dir` on first use."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / "tokenizer.json").is_file():
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        # Publish atomically so concurrent ranks never read a half-written directory.
        tmp_dir = tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent)
        try:
            _train_tiny_tokenizer().save_pretrained(tmp_dir)
            os.replace(tmp_dir, cache_dir)
        except OSError:
            # Another process may have published first; its (identical) copy is fine.
            if not (cache_dir / "tokenizer.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(cache_dir)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a saved tokenizer and make sure it has every token the framework relies on."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_special_tokens(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register missing chat/media tokens as never-split special tokens.

    Returns the number of new vocabulary entries, i.e. how far the model's
    embeddings must grow (`resize_token_embeddings(len(tokenizer))`).
    """
    present = tokenizer.get_added_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in present]
    if not missing:
        return 0
    return tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
