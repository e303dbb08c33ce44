"""Jinja chat templates that render, for the stock processor, the text training encodes (text/template.py).

Messages come as transformers' processors take them: `content` a string (LLaVA's own form, e.g.
"<image>\\nWhat colour is it?", rendered as it is) or a list of `{"type": "text", "text": ...}`,
`{"type": "image"}` and `{"type": "video"}` parts. A media part renders as its placeholder followed by
"\\n", the LLaVA convention training data follows ("<image>\\n<image>\\nWhich one?"). The stock processor
then expands each placeholder to its visual tokens, so the ids equal training's token for token
(tests/unit/test_chat_template.py).
"""
from __future__ import annotations

from ov_train.text.template import DEFAULT_SYSTEM_PROMPT, TEMPLATES

EOS_TOKEN = "<|im_end|>"

# The text of a content: a string as it is, parts joined; `media` says what a media part becomes.
_RENDER = (
    "{%- macro render(content, media) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ('image', 'video') -%}{{ media.replace('TYPE', part['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

QWEN_1_5 = _RENDER + (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{- render(message['content'], '' if message['role'] == 'system' else '<TYPE>\\n') -}}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Alignment pretraining: the first user turn's media alone (its text is dropped), then the first reply and
# "\n"; nothing else exists for this template, so later turns render nothing.
PLAIN = _RENDER + (
    "{%- macro media_only(content) -%}"
    "{%- if content is string -%}"
    "{%- for piece in content.split('<') -%}"
    "{%- if piece.startswith('image>') -%}{{ '<image>' }}{%- elif piece.startswith('video>') -%}{{ '<video>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ render(content | selectattr('type', 'in', ['image', 'video']) | list, '<TYPE>') }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(turn=0) -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if ns.turn == 0 and message['role'] == 'user' -%}{{ media_only(message['content']) }}"
    "{%- elif ns.turn == 1 and message['role'] == 'assistant' -%}{{ render(message['content'], '') + '\\n' }}"
    "{%- endif -%}"
    "{%- set ns.turn = ns.turn + 1 -%}"
    "{%- endfor -%}"
)

_TEMPLATES = {"qwen_1_5": QWEN_1_5, "plain": PLAIN}


def chat_template(template: str) -> str:
    """The Jinja chat template that renders training's `template` (`qwen_1_5` or `plain`)."""
    if template not in _TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    return _TEMPLATES[template]


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """The ids a reply ends with in training, i.e. where generation must stop: `<|im_end|>` for qwen_1_5; for
    plain, the "\\n" training appends to each reply (and `<|im_end|>`, which never follows a plain reply)."""
    chat_template(template)  # checks the name
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if template == "qwen_1_5":
        return [eos]
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) != 1:
        raise ValueError(f"the tokenizer encodes '\\n' as {len(newline)} tokens; a plain reply's end needs one")
    return [newline[0], eos]
