"""Turn LLaVA-style conversations into token ids and loss labels.

Every template piece and text span is tokenized on its own and the ids are
concatenated, so the boundary between supervised and unsupervised tokens is
exact: only assistant reply tokens (and the token closing the reply) carry labels. Under `labels="reference"` the
labels are the public LLaVA-NeXT `preprocess_qwen`'s instead, and `plain_newline="joined"` tokenizes a `plain`
caption with its newline, as the public `preprocess_plain` (config/reproduce.py: stage.labels, stage.plain_newline).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ov_train.config.reproduce import CHOICES
from ov_train.constants import IGNORE_INDEX, MEDIA_TOKENS, PLACEMENTS, TEMPLATES

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_MEDIA_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in MEDIA_TOKENS) + ")")


class TemplateError(ValueError):
    """A conversation that cannot be encoded (bad structure or media mismatch)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss; otherwise the (unshifted) token id


def encode_conversation(
    tokenizer, conversations: list[dict], template: str, visual_tokens: list[int], placement: str = "as_is",
    labels: str = "replies", plain_newline: str = "apart",
) -> Encoded:
    """Encode one conversation.

    `visual_tokens[k]` is the number of embedding slots of the k-th `<image>` /
    `<video>` placeholder (in order of appearance); each placeholder becomes that
    many copies of its token id. `placement` (constants.PLACEMENTS) may first move a turn's single
    placeholder to its start. `labels`: `replies` (ov_train's) or `reference` (the public code's masks);
    `plain_newline`: `apart` or `joined` (config/reproduce.py). No truncation happens here.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown media placement {placement!r}; expected one of {PLACEMENTS}")
    for name, value in (("labels", labels), ("plain_newline", plain_newline)):
        if value not in CHOICES[name]:
            raise ValueError(f"unknown {name} {value!r}; expected one of {CHOICES[name]}")
    system, turns = _parse_turns(conversations)
    if placement == "front":
        turns = [(role, media_first(text)) for role, text in turns]
    _check_media(system, turns, template, visual_tokens)

    seq = _Sequence(tokenizer, visual_tokens)
    if template == "plain":
        _encode_plain(seq, turns, joined=plain_newline == "joined")
    else:
        _encode_qwen_1_5(seq, system, turns, whole_message=labels == "reference")
    if labels == "reference":
        _unmask_template_tokens(seq)
    return Encoded(seq.input_ids, seq.labels)


def _parse_turns(conversations: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate the turn structure; return the optional system prompt and (role, text) turns."""
    if not conversations:
        raise TemplateError("conversation is empty")
    system = None
    turns = []
    for i, turn in enumerate(conversations):
        speaker = turn.get("from")
        role = ROLES.get(speaker)
        if role is None:
            raise TemplateError(f"turn {i}: unknown speaker {speaker!r}; expected human/gpt/system")
        text = turn.get("value")
        if not isinstance(text, str):
            raise TemplateError(f"turn {i}: 'value' must be a string, got {type(text).__name__}")
        if role == "system":
            if i != 0:
                raise TemplateError(f"turn {i}: a system turn is only allowed first")
            system = text
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise TemplateError(
                f"turn {i}: got a {speaker!r} turn where a "
                f"{'human' if expected == 'user' else 'gpt'} turn was expected; "
                "turns must alternate human/gpt starting with human"
            )
        turns.append((role, text))
    if not any(role == "assistant" for role, _ in turns):
        raise TemplateError("conversation has no gpt (assistant) turn")
    return system, turns


def _check_media(
    system: str | None, turns: list[tuple[str, str]], template: str, visual_tokens: list[int]
) -> None:
    """Placeholders must sit where the template expands them and match the given media one to one."""
    if system is not None and _count_media(system):
        raise TemplateError("media placeholder in the system turn; only human turns may hold media")
    total = 0
    for i, (role, text) in enumerate(turns):
        count = _count_media(text)
        if count and role != "user":
            raise TemplateError(f"gpt turn {i} holds {count} media placeholder(s); only human turns may")
        if count and template == "plain" and i != 0:
            raise TemplateError("the plain template only uses media of the first human turn")
        total += count
    if total != len(visual_tokens):
        raise TemplateError(
            f"conversation has {total} <image>/<video> placeholder(s) "
            f"but {len(visual_tokens)} media were given"
        )
    if any(not isinstance(n, numbers.Integral) or n < 1 for n in visual_tokens):
        raise TemplateError(f"visual token counts must be positive integers, got {list(visual_tokens)}")


def _count_media(text: str) -> int:
    return len(_MEDIA_SPLIT.findall(text))


def media_first(text: str) -> str:
    """A turn with exactly one placeholder not already leading: the placeholder, "\n", then the rest of the
    text stripped (the public code strips the whole turn too); any other turn unchanged."""
    found = _MEDIA_SPLIT.findall(text)
    if len(found) != 1 or text.startswith(found[0]):
        return text
    rest = text.replace(found[0], "").strip()
    return (found[0] + "\n" + rest).strip()


def _encode_plain(seq: _Sequence, turns: list[tuple[str, str]], joined: bool = False) -> None:
    """Alignment pretraining: first human turn's media, then the first reply and "\\n" (tokenized with it when
    `joined`, as the public code does: "." + "\\n" is then one token)."""
    seq.user_content(turns[0][1], keep_text=False)
    if joined:
        seq.text(turns[1][1] + "\n", labelled=True)
        return
    seq.text(turns[1][1], labelled=True)
    seq.text("\n", labelled=True)


def _unmask_template_tokens(seq: _Sequence) -> None:
    """The public preprocess_qwen's leak: every <|im_start|>, <|im_end|> and standalone newline token is labelled,
    wherever it stands (system and user turns included)."""
    newline = seq.tokenizer.encode("\n", add_special_tokens=False)
    leaked = {seq.token_id("<|im_start|>"), seq.token_id("<|im_end|>"), *newline[:1]}
    seq.labels = [t if t in leaked else label for t, label in zip(seq.input_ids, seq.labels)]


def _encode_qwen_1_5(seq: _Sequence, system: str | None, turns: list[tuple[str, str]],
                     whole_message: bool = False) -> None:
    """`whole_message`: an assistant turn is labelled whole, its <|im_start|>assistant\\n and closing newline too
    (the public code's masks); otherwise its reply and <|im_end|> only."""
    seq.special("<|im_start|>")
    seq.text("system\n")
    seq.text(DEFAULT_SYSTEM_PROMPT if system is None else system)
    seq.special("<|im_end|>")
    seq.text("\n")
    for role, text in turns:
        whole = whole_message and role == "assistant"
        seq.special("<|im_start|>", labelled=whole)
        seq.text(role + "\n", labelled=whole)
        if role == "user":
            seq.user_content(text, keep_text=True)
            seq.special("<|im_end|>")
        else:
            # The model must learn to end its reply, so <|im_end|> is supervised too.
            seq.text(text, labelled=True)
            seq.special("<|im_end|>", labelled=True)
        seq.text("\n", labelled=whole)


class _Sequence:
    """Accumulates ids and labels; media placeholders consume `visual_tokens` in order."""

    def __init__(self, tokenizer, visual_tokens: list[int]):
        self.tokenizer = tokenizer
        self._added_vocab = tokenizer.get_added_vocab()
        self._visual_tokens: Iterator[int] = iter(visual_tokens)
        self.input_ids: list[int] = []
        self.labels: list[int] = []

    def text(self, text: str, labelled: bool = False) -> None:
        if not text:
            return
        # Special-token strings inside data text (e.g. a literal "<|im_end|>") stay plain
        # text, so data can never inject template or media tokens.
        ids = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        self._append(ids, labelled)

    def special(self, token: str, labelled: bool = False) -> None:
        self._append([self.token_id(token)], labelled)

    def user_content(self, text: str, keep_text: bool) -> None:
        """Expand each placeholder to its visual slots; keep the surrounding text only if asked."""
        for piece in _MEDIA_SPLIT.split(text):
            if piece in MEDIA_TOKENS:
                self._append([self.token_id(piece)] * next(self._visual_tokens), labelled=False)
            elif keep_text:
                self.text(piece)

    def token_id(self, token: str) -> int:
        if token not in self._added_vocab:
            raise ValueError(f"tokenizer lacks special token {token!r}; call ensure_special_tokens first")
        return self._added_vocab[token]

    def _append(self, ids: list[int], labelled: bool) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(ids if labelled else [IGNORE_INDEX] * len(ids))
