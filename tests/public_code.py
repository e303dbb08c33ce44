"""Ports of the public LLaVA-NeXT training code (github.com/LLaVA-VL/LLaVA-NeXT at df17966), written for the tests
from reading it, to compare ov_train's `stage.reproduce=public_code` against: what each public function returns, in
the public code's own conventions ((width, height) sizes and canvases, one IMAGE_TOKEN_INDEX slot per image).

- preprocess_qwen, preprocess_plain, tokenizer_image_token: llava/train/train.py, llava/mm_utils.py
- select_best_resolution, get_anyres_image_grid_shape: llava/mm_utils.py
- unpad_image and the anyres feature layout of prepare_inputs_labels_for_multimodal: llava/model/llava_arch.py
- the trainer's warmup: transformers' Trainer as the public code pins it (get_warmup_steps, the cosine lambda)
"""
from __future__ import annotations

import ast
import math
import re

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # llava/constants.py
SYSTEM = "You are a helpful assistant."


# ---------------------------------------------------------------- text (llava/train/train.py, llava/mm_utils.py)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def preprocess_qwen(source: list[dict], tokenizer, has_image: bool = True) -> tuple[list[int], list[int]]:
    """One conversation through the public preprocess_qwen: each message rendered by its reset chat template
    ("<|im_start|>" role "\\n" content "<|im_end|>" "\\n"), tokenized on its own, with "<image>" a special token;
    system and user messages masked, assistant messages labelled whole; then every 198 ("\\n"), <|im_start|> and
    <|im_end|> unmasked wherever it stands; <image> becomes IMAGE_TOKEN_INDEX."""
    roles = {"human": "user", "gpt": "assistant"}
    # The public code adds "<image>" as a special token to a deep copy of the tokenizer; ov_train's tokenizers have it
    # already (ensure_special_tokens), so the copy (seconds for Qwen2's) is left out.
    assert not has_image or "<image>" in tokenizer.get_added_vocab()
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    # The public code reads tokenizer.additional_special_tokens_ids, which for Qwen2 are these two.
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    unmask = [198, im_start, im_end]

    def render(role: str, content: str) -> list[int]:
        return _ids(tokenizer, "<|im_start|>" + role + "\n" + content + "<|im_end|>" + "\n")

    if roles[source[0]["from"]] != "user":
        source = source[1:]
    input_id = render("system", SYSTEM)
    target = [IGNORE_INDEX] * len(input_id)
    for turn in source:
        role = roles.get(turn["from"], turn["from"])
        encoded = render(role, turn["value"])
        input_id += encoded
        target += [IGNORE_INDEX] * len(encoded) if role in ("user", "system") else encoded
    for i, token in enumerate(input_id):
        if token in unmask:
            target[i] = token
        if token == image_token:
            input_id[i] = IMAGE_TOKEN_INDEX
    return input_id, target


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """Chunks between "<image>" tokenized apart, IMAGE_TOKEN_INDEX between them (Qwen2 has no BOS to keep)."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    out = list(chunks[0])
    for chunk in chunks[1:]:
        out += [IMAGE_TOKEN_INDEX, *chunk]
    return out


def preprocess_plain(source: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """The public preprocess_plain: "<image>" + caption + "\\n" (the plain template's separator) tokenized as one
    prompt; the image slot masked, everything after it labelled."""
    assert len(source) == 2 and "<image>" in source[0]["value"]
    ids = tokenizer_image_token("<image>" + source[1]["value"] + "\n", tokenizer)
    masked = len(tokenizer_image_token("<image>", tokenizer))
    return ids, [IGNORE_INDEX] * masked + ids[masked:]


# ---------------------------------------------------------------- anyres (llava/mm_utils.py, llava/model/llava_arch.py)


def select_best_resolution(original_size: tuple[int, int], possible_resolutions) -> tuple[int, int]:
    """(width, height) of the canvas keeping the most of the image, then wasting the least; the first wins ties."""
    original_width, original_height = original_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        effective = min(int(original_width * scale) * int(original_height * scale), original_width * original_height)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (width, height), effective, wasted
    return best


def pinpoint_list(grid_pinpoints, patch_size: int = 384) -> list:
    """The scripts' --image_grid_pinpoints as the public code reads it: "(AxB),...,(CxD)" a range whose pairs are
    (width, height) multiples of the crop, first number outer; otherwise a literal list of (width, height)."""
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        matches = re.findall(r"\((\d+)x(\d+)\)", grid_pinpoints)
        (a0, b0), (a1, b1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
        return [[i * patch_size, j * patch_size] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    return grid_pinpoints if isinstance(grid_pinpoints, list) else ast.literal_eval(grid_pinpoints)


def get_anyres_image_grid_shape(image_size: tuple[int, int], grid_pinpoints, patch_size: int) -> tuple[int, int]:
    """(crops across, crops down) of the canvas an image of (width, height) gets."""
    width, height = select_best_resolution(image_size, pinpoint_list(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


def unpad_image(tensor, original_size: tuple[int, int]):
    """The padding rows or columns cut from a [C, H, W] grid feature map of an image of (width, height): the kept
    side truncated with int(), the padding split evenly by floor division."""
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding: current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding: current_width - padding]


class _Shape:
    """A [C, H, W] feature map's shape, for unpad_image without tensors."""

    def __init__(self, height: int, width: int):
        self.shape = (1, height, width)

    def __getitem__(self, index):
        _, rows, cols = index
        height = len(range(self.shape[1])[rows])
        width = len(range(self.shape[2])[cols])
        return _Shape(height, width)


def anyres_grid_size(image_size: tuple[int, int], grid_pinpoints, aspect_ratio: str, crop: int = 384,
                     unit: int = 27) -> tuple[int, int, int, int]:
    """(crops across, crops down, feature rows, feature columns) of an image's grid after the public
    spatial_unpad merge: unpad, then under anyres_max_N the bilinear shrink of grids over 1.1x N crops' worth."""
    across, down = get_anyres_image_grid_shape(image_size, grid_pinpoints, crop)
    kept = unpad_image(_Shape(down * unit, across * unit), image_size)
    _, h, w = kept.shape
    matched = re.match(r"anyres_max_(\d+)", aspect_ratio)
    if matched:
        times = math.sqrt(h * w / (int(matched.group(1)) * unit**2))
        if times > 1.1:
            h, w = int(h // times), int(w // times)
    return across, down, h, w


def anyres_tokens(image_size: tuple[int, int], grid_pinpoints, aspect_ratio: str, crop: int = 384,
                  unit: int = 27) -> int:
    """The public code's features for one single image of (width, height): base crop, then the grid with a newline
    ending each row."""
    _, _, h, w = anyres_grid_size(image_size, grid_pinpoints, aspect_ratio, crop, unit)
    return unit * unit + h * (w + 1)


def pack_anyres(feature, image_size: tuple[int, int], grid_pinpoints, aspect_ratio: str, newline, crop: int = 384):
    """One single image's features as the public spatial_unpad merge lays them out: `feature` [1 + crops, unit^2, C]
    (base crop first), `newline` [C]; returns [tokens, C]."""
    import torch
    import torch.nn.functional as F

    base, grid = feature[0], feature[1:]
    unit = int(math.isqrt(base.shape[0]))
    across, down = get_anyres_image_grid_shape(image_size, grid_pinpoints, crop)
    grid = grid.view(down, across, unit, unit, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    grid = unpad_image(grid, image_size)
    _, h, w = grid.shape
    matched = re.match(r"anyres_max_(\d+)", aspect_ratio)
    if matched:
        times = math.sqrt(h * w / (int(matched.group(1)) * unit**2))
        if times > 1.1:
            grid = F.interpolate(grid[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    grid = torch.cat((grid, newline[:, None, None].expand(*grid.shape[:-1], 1)), dim=-1)
    return torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)


# ---------------------------------------------------------------- the trainer's warmup (transformers' Trainer)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """TrainingArguments.get_warmup_steps with warmup_steps=0: ceil(ratio x T)."""
    return math.ceil(total_steps * warmup_ratio)


def cosine_lr_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """The lr multiplier at optimizer step `step` (0-based) of --lr_scheduler_type cosine."""
    warmup = warmup_steps(total_steps, warmup_ratio)
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
