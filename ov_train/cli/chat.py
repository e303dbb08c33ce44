"""ov-chat EXPORT [--image PATH]... [--video PATH] [PROMPT]: talk to an export through the stock processor and
LlavaOnevisionForConditionalGeneration.generate (greedy unless --temperature > 0).

With PROMPT, one reply is printed. Without, a multi-turn conversation runs on standard input (an empty line or
end of input ends it); the media belong to the first turn and stay in the conversation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ov_train.cli.eval import device_and_dtype
from ov_train.config.media import VideoSettings
from ov_train.data.video import VideoDecodeError
from ov_train.eval.inference import (
    ExportError,
    check_export,
    export_video,
    generate_replies,
    load_export,
    open_image,
    processor_inputs,
    read_frames,
    sampling_kwargs,
    training_frames,
)


class Chat:
    """A conversation with one export: the media go with the first user turn."""

    def __init__(self, processor, prompts, model, images: list, frames, max_new_tokens: int, **sampling):
        self.processor, self.prompts, self.model = processor, prompts, model
        self.images, self.frames = images, None if frames is None else training_frames(frames, model)
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.messages: list[dict] = []

    def reply(self, text: str) -> str:
        content = [{"type": "text", "text": text}]
        if not self.messages:
            media = [{"type": "image"}] * len(self.images) + ([{"type": "video"}] if self.frames is not None else [])
            content = media + content
        self.messages.append({"role": "user", "content": content})
        prompt = self.prompts(self.messages)
        inputs = processor_inputs(self.processor, self.model, [prompt], [self.images], [self.frames])
        ids = generate_replies(self.model, inputs, self.max_new_tokens, **self.sampling)[0]
        answer = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer


def read_video(path: str, video: VideoSettings):
    """The frames of a video file, sampled as the export's stage sampled them."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise ExportError(f"video not found: {path}") from err
    except OSError as err:
        raise ExportError(f"cannot read video {path}: {err}") from err
    try:
        return read_frames(data, video, path)
    except VideoDecodeError as err:  # its message names the file
        raise ExportError(f"cannot read video: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ov-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="a Hugging Face export (RUN/export, or ov-export's output)")
    parser.add_argument("prompt", nargs="?", help="one question; without it, an interactive conversation")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    parser.add_argument("--video", help="a video file, its frames sampled as the export's stage did (ov_train_media)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="reply length limit (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above: sampling")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --temperature > 0)")
    parser.add_argument("--max-frames", type=int, help="most video frames (default: the export's stage's)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    args = parser.parse_intermixed_args(argv)  # the prompt may follow --image options
    if args.max_new_tokens < 1 or (args.max_frames is not None and args.max_frames < 1):
        parser.error("--max-new-tokens and --max-frames must be positive integers")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p={args.top_p}: must be in (0, 1]")
    # Every input is checked before the model loads.
    try:
        config = json.loads((check_export(args.export) / "config.json").read_text())
        images = [open_image(Path(p), p) for p in args.image]
        frames = read_video(args.video, export_video(config, args.max_frames)) if args.video else None
    except ExportError as err:
        parser.error(str(err))
    device, dtype = device_and_dtype(args.device)
    try:  # the export's chat template too: refused before the model loads, or at any turn it runs over
        processor, prompts, model = load_export(args.export, "ov-chat", device, dtype)
        torch.manual_seed(args.seed)
        chat = Chat(processor, prompts, model, images, frames, args.max_new_tokens,
                    **sampling_kwargs(args.temperature, args.top_p))
        converse(chat, args.prompt)
    except ExportError as err:
        parser.error(str(err))
    return 0


def converse(chat: Chat, prompt: str | None) -> None:
    """One reply to `prompt`, or a conversation on standard input until an empty line or its end."""
    if prompt is not None:
        print(chat.reply(prompt))
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            text = input("you> " if interactive else "")
        except EOFError:
            return
        if not text.strip():
            return
        print(("model> " if interactive else "") + chat.reply(text), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
