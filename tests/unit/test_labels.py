import pytest

from ov_train.text.template import IGNORE_INDEX, TemplateError, encode_conversation
from ov_train.text.tokenizer import build_tiny_tokenizer

IMAGE, VIDEO = "<image>", "<video>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny") / "tokenizer")


def _expected(tok, pieces):
    """Build (ids, labels) from (text, labelled) template pieces; media pieces are ("<image>", count)."""
    ids, labels = [], []
    for piece, flag in pieces:
        if piece in (IMAGE, VIDEO):
            piece_ids = [tok.convert_tokens_to_ids(piece)] * flag
            labelled = False
        else:
            piece_ids = tok.encode(piece, add_special_tokens=False)
            labelled = flag
        ids += piece_ids
        labels += piece_ids if labelled else [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


def _labelled_runs(labels):
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs


def _turn(role, *body):
    """Pieces of one qwen_1_5 turn; only an assistant reply and its <|im_end|> are labelled."""
    reply = role == "assistant"
    return [(IM_START, False), (f"{role}\n", False), *body, (IM_END, reply), ("\n", False)]


MULTI_TURN = [
    {"from": "system", "value": "You answer with one word."},
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "Now this one. <image>\nHow many squares are there?"},
    {"from": "gpt", "value": "three"},
    {"from": "human", "value": "Which way does the blue square move?"},
    {"from": "gpt", "value": "It moves left."},
]
REPLIES = ["The circle is red.", "three", "It moves left."]


def test_qwen_multi_turn_labels_token_by_token(tok):
    visual_tokens = [3, 5]
    encoded = encode_conversation(tok, MULTI_TURN, "qwen_1_5", visual_tokens)

    pieces = (
        _turn("system", ("You answer with one word.", False))
        + _turn("user", (IMAGE, 3), ("\nWhat colour is the circle?", False))
        + _turn("assistant", (REPLIES[0], True))
        + _turn("user", ("Now this one. ", False), (IMAGE, 5), ("\nHow many squares are there?", False))
        + _turn("assistant", (REPLIES[1], True))
        + _turn("user", ("Which way does the blue square move?", False))
        + _turn("assistant", (REPLIES[2], True))
    )
    expected_ids, expected_labels = _expected(tok, pieces)
    assert encoded.input_ids == expected_ids
    assert len(encoded.labels) == len(encoded.input_ids)
    for position, (label, want) in enumerate(zip(encoded.labels, expected_labels)):
        assert label == want, f"label mismatch at position {position}"

    assert tok.decode(encoded.input_ids) == (
        "<|im_start|>system\nYou answer with one word.<|im_end|>\n"
        "<|im_start|>user\n" + IMAGE * 3 + "\nWhat colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nThe circle is red.<|im_end|>\n"
        "<|im_start|>user\nNow this one. " + IMAGE * 5 + "\nHow many squares are there?<|im_end|>\n"
        "<|im_start|>assistant\nthree<|im_end|>\n"
        "<|im_start|>user\nWhich way does the blue square move?<|im_end|>\n"
        "<|im_start|>assistant\nIt moves left.<|im_end|>\n"
    )


def test_qwen_only_replies_and_their_im_end_are_labelled(tok):
    encoded = encode_conversation(tok, MULTI_TURN, "qwen_1_5", [3, 5])
    labelled = [(i, label) for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    # Labels are unshifted: each labelled position carries its own input id.
    assert all(encoded.input_ids[i] == label for i, label in labelled)
    assert [tok.decode(run) for run in _labelled_runs(encoded.labels)] == [r + IM_END for r in REPLIES]

    never_labelled = {tok.convert_tokens_to_ids(t) for t in (IM_START, IMAGE, VIDEO)}
    assert never_labelled.isdisjoint(label for _, label in labelled)
    for header in ("assistant", "system", "user"):
        assert tok.convert_tokens_to_ids(header) not in {label for _, label in labelled}

    image_id = tok.convert_tokens_to_ids(IMAGE)
    assert encoded.input_ids.count(image_id) == 3 + 5
    assert all(encoded.labels[i] == IGNORE_INDEX for i, t in enumerate(encoded.input_ids) if t == image_id)


def test_qwen_default_system_prompt_and_user_assistant_names(tok):
    llava = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    chat = [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]
    encoded = encode_conversation(tok, llava, "qwen_1_5", [])
    assert encoded == encode_conversation(tok, chat, "qwen_1_5", [])

    expected_ids, expected_labels = _expected(
        tok,
        _turn("system", ("You are a helpful assistant.", False))
        + _turn("user", ("Hi", False))
        + _turn("assistant", ("Hello", True)),
    )
    assert (encoded.input_ids, encoded.labels) == (expected_ids, expected_labels)


def test_qwen_video_and_image_placeholders_expand_in_order(tok):
    conversation = [
        {"from": "human", "value": "<video>\nWhich way does it move? Compare with <image>"},
        {"from": "gpt", "value": "up"},
    ]
    encoded = encode_conversation(tok, conversation, "qwen_1_5", [7, 2])
    expected_ids, expected_labels = _expected(
        tok,
        _turn("system", ("You are a helpful assistant.", False))
        + _turn("user", (VIDEO, 7), ("\nWhich way does it move? Compare with ", False), (IMAGE, 2))
        + _turn("assistant", ("up", True)),
    )
    assert (encoded.input_ids, encoded.labels) == (expected_ids, expected_labels)
    assert encoded.input_ids.count(tok.convert_tokens_to_ids(VIDEO)) == 7
    assert encoded.input_ids.count(tok.convert_tokens_to_ids(IMAGE)) == 2


def test_special_strings_in_data_stay_plain_text(tok):
    conversation = [
        {"from": "human", "value": "Say <|im_start|>"},
        {"from": "gpt", "value": "Here: <|im_end|> and <|im_start|>"},
    ]
    encoded = encode_conversation(tok, conversation, "qwen_1_5", [])
    im_start, im_end = tok.convert_tokens_to_ids(IM_START), tok.convert_tokens_to_ids(IM_END)
    assert encoded.input_ids.count(im_start) == 3  # system, user, assistant headers only
    labelled = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert labelled.count(im_end) == 1
    assert tok.decode(labelled) == "Here: <|im_end|> and <|im_start|>" + IM_END


def test_plain_labels_only_reply_and_newline(tok):
    conversation = [
        {"from": "human", "value": "Describe the image.\n<image>"},
        {"from": "gpt", "value": "A red circle and a blue square."},
    ]
    encoded = encode_conversation(tok, conversation, "plain", [4])
    expected_ids, expected_labels = _expected(
        tok, [(IMAGE, 4), ("A red circle and a blue square.", True), ("\n", True)]
    )
    assert (encoded.input_ids, encoded.labels) == (expected_ids, expected_labels)
    assert tok.decode(encoded.input_ids) == IMAGE * 4 + "A red circle and a blue square.\n"
    assert tok.decode([t for t in encoded.labels if t != IGNORE_INDEX]) == "A red circle and a blue square.\n"


def test_plain_ignores_system_and_later_turns(tok):
    conversation = [
        {"from": "system", "value": "ignored"},
        {"from": "human", "value": "<video>"},
        {"from": "gpt", "value": "It moves down."},
        {"from": "human", "value": "More?"},
        {"from": "gpt", "value": "No."},
    ]
    encoded = encode_conversation(tok, conversation, "plain", [2])
    expected_ids, expected_labels = _expected(tok, [(VIDEO, 2), ("It moves down.", True), ("\n", True)])
    assert (encoded.input_ids, encoded.labels) == (expected_ids, expected_labels)


@pytest.mark.parametrize("template", ["qwen_1_5", "plain"])
@pytest.mark.parametrize(
    ("conversation", "visual_tokens", "message"),
    [
        ([], [], "empty"),
        ([{"from": "gpt", "value": "red"}, {"from": "human", "value": "?"}], [], "alternate"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], [], "alternate"),
        ([{"from": "human", "value": "What is it?"}], [], "no gpt"),
        ([{"from": "system", "value": "s"}], [], "no gpt"),
        (
            [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "yes"}],
            [5],
            r"2 <image>/<video> placeholder\(s\) but 1 media",
        ),
        (
            [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "red"}],
            [5],
            r"0 <image>/<video> placeholder\(s\) but 1 media",
        ),
        ([{"from": "human", "value": "?"}, {"from": "gpt", "value": "<image>"}], [1], "only human turns"),
        ([{"from": "robot", "value": "?"}, {"from": "gpt", "value": "x"}], [], "unknown speaker"),
        (
            [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
            [0],
            "positive integers",
        ),
    ],
)
def test_bad_conversations_raise_template_error(tok, template, conversation, visual_tokens, message):
    with pytest.raises(TemplateError, match=message):
        encode_conversation(tok, conversation, template, visual_tokens)


def test_plain_rejects_media_outside_first_human_turn(tok):
    conversation = [
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "blue"},
    ]
    with pytest.raises(TemplateError, match="first human turn"):
        encode_conversation(tok, conversation, "plain", [1, 1])


def test_unknown_template_is_rejected(tok):
    with pytest.raises(ValueError, match="unknown template"):
        conversation = [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]
        encode_conversation(tok, conversation, "vicuna", [])
