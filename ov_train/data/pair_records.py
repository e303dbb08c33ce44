"""Preference records (formats.is_preference) -> what `ov-data convert` checks and stores: the conversation of the
prompt's turns followed by the chosen reply, and the rejected reply (the shard json's `rejected`, read by
data/pairs.py).

Two layouts:
- LLaVA-NeXT's DPO JSON / JSONL (its docs/LLaVA_OneVision_Chat.md): `prompt`, `chosen` and `rejected` strings, with
  `image` (a path or a list) or `video`. A prompt with no <image>/<video> gets one per image (or a <video>) in
  front, as LLaVA-NeXT's DPO dataset puts "<image>\\n" before every prompt.
- Hugging Face's preference layout (TRL's dataset formats; JSON, JSONL or parquet with the images' bytes in an
  `images` or `image` column): `chosen` and `rejected` are message lists ({"role", "content"}), the prompt is the
  messages both lists begin with (some sets repeat the prompt there), else `prompt` (messages, or a string). A
  message's content is a string or a list of parts: {"type": "text", "text"}, {"type": "image"}, {"type":
  "video"}, the media parts in the order of the record's images. Plain strings in `chosen` / `rejected` (the
  standard layout) are read too.

Each reply is one assistant turn holding no media, and the two differ: anything else is rejected by reason.
"""
from __future__ import annotations

from ov_train.constants import IMAGE_TOKEN, MEDIA_TOKENS, VIDEO_TOKEN
from ov_train.data.formats import Reject

REJECTED = "rejected"  # the rejected reply, in records and in the shard json alike
_SPEAKERS = {"user": "human", "assistant": "gpt", "system": "system"}
_PART_TEXT = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}


def preference_turns(record: dict, n_images: int, has_video: bool) -> tuple[list[dict], str]:
    """(LLaVA turns: the prompt's, then the chosen reply as a gpt turn; the rejected reply's text) of a preference
    record whose media are `n_images` images or a video; Reject when it is not a usable pair."""
    chosen, rejected, prompt = record.get("chosen"), record.get(REJECTED), record.get("prompt")
    for side, value in (("chosen", chosen), (REJECTED, rejected)):
        if value is None or value == "" or value == []:
            raise Reject("missing_reply", f"no {side!r} reply")
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0  # the messages both conversations begin with: the prompt (a `prompt` beside them repeats it)
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared:
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not prompt:
        raise Reject("missing_prompt", "no 'prompt', and the chosen and rejected conversations share no first turns")
    turns = _prompt_turns(prompt, n_images, has_video)
    replies = [_reply(chosen, "chosen"), _reply(rejected, REJECTED)]
    if replies[0].strip() == replies[1].strip():
        raise Reject("identical_replies", "the chosen and the rejected reply are the same text")
    return [*turns, {"from": "gpt", "value": replies[0]}], replies[1]


def preference_texts(record: dict) -> list[str]:
    """Every text of a preference record (turns and both replies); none when it is not a usable pair."""
    try:
        turns, rejected = preference_turns(record, 0, False)
    except Reject:
        return []
    return [t["value"] for t in turns] + [rejected]


def _prompt_turns(prompt, n_images: int, has_video: bool) -> list[dict]:
    if isinstance(prompt, str):
        turns = [{"from": "human", "value": prompt}]
    elif isinstance(prompt, list):
        turns = [_turn(m, i) for i, m in enumerate(prompt)]
    else:
        raise Reject("malformed_record", f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    if turns[-1]["from"] != "human":
        raise Reject("malformed_conversation", "the prompt must end with a user turn")
    if not any(token in t["value"] for t in turns for token in MEDIA_TOKENS) and (n_images or has_video):
        first = next(i for i, t in enumerate(turns) if t["from"] == "human")
        marks = VIDEO_TOKEN + "\n" if has_video else (IMAGE_TOKEN + "\n") * n_images
        turns[first] = {**turns[first], "value": marks + turns[first]["value"]}
    return turns


def _turn(message, i: int) -> dict:
    if not isinstance(message, dict) or message.get("role") not in _SPEAKERS:
        raise Reject("malformed_conversation", f"message {i} needs a 'role' of {sorted(_SPEAKERS)}")
    return {"from": _SPEAKERS[message["role"]], "value": _content(message.get("content"), i)}


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise Reject("malformed_conversation", f"message {i}: 'content' must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _PART_TEXT:
            pieces.append(_PART_TEXT[kind])
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise Reject("malformed_conversation", f"message {i}: parts are text, image or video, got {part!r:.80}")
    return "\n".join(pieces)


def _reply(reply, side: str) -> str:
    """The text of a reply: a string, or a list of exactly one assistant message."""
    if isinstance(reply, list):
        if len(reply) != 1 or not isinstance(reply[0], dict) or reply[0].get("role") != "assistant":
            raise Reject("malformed_reply", f"{side!r} must end in exactly one assistant message after the prompt")
        reply = _content(reply[0].get("content"), 0)
    if not isinstance(reply, str):
        raise Reject("malformed_record", f"{side!r} must be a string or a list of messages, got {type(reply).__name__}")
    if not reply.strip():
        raise Reject("missing_reply", f"{side!r} is empty")
    if any(token in reply for token in MEDIA_TOKENS):
        raise Reject("placeholder_in_reply", f"{side!r} holds a media placeholder; media belong to the prompt")
    return reply
