"""The export's README.md: what the model is (stage, recipe, steps, data mix, held-out metrics) and how to load it."""
from __future__ import annotations

from pathlib import Path

FRONT_MATTER = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- llava-onevision
- ov_train
---
"""

USAGE = """## Use

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, LlavaOnevisionForConditionalGeneration

processor = AutoProcessor.from_pretrained("{path}")
# Training resized with PIL; the default torchvision backend is a few pixel levels off it.
processor.image_processor = AutoImageProcessor.from_pretrained("{path}", backend="pil")
model = LlavaOnevisionForConditionalGeneration.from_pretrained("{path}")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What colour is the shape?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=[Image.open("photo.png")], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The chat template renders the `{template}` template this model was trained with, and generation stops at the
token that ends training's replies. From the command line (ov_train installed with torchvision):

```bash
ov-chat {path} --image photo.png "What colour is the shape?"
ov-eval {path} DATA          # an ov-data shard directory or a recipe: predictions.jsonl, metrics.json
python -m lmms_eval --model llava_hf --model_args pretrained={path},device=cpu,device_map=cpu --tasks TASK --batch_size 1
```
"""


def card_facts(metadata: dict) -> dict:
    """The card's facts from a checkpoint's metadata (checkpoints/reading.py: checkpoint_metadata)."""
    info = metadata.get("ov_train") or {}
    return {
        "stage": info.get("stage"),
        "template": info.get("template"),
        "recipe": info.get("recipe"),
        "steps": metadata.get("global_step"),
        "data_mix": info.get("data_mix") or {},
        "metrics": info.get("val_metrics") or {},
    }


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


NO_PROCESSOR = """## Use

This export has no processor files: {refusal}. Continue training from it, e.g.
`ov-train stage=mid model.init_from={path}`.
"""


def model_card(name: str, template: str, facts: dict, path: str | Path = ".", refusal: str | None = None) -> str:
    """README.md text for an export directory; facts missing from `facts` are left out. `refusal`: why the stock
    processor cannot feed it (a single-crop stage), which replaces the usage section."""
    about = [
        ("stage", facts.get("stage")), ("chat template", template), ("recipe", facts.get("recipe")),
        ("optimizer steps", facts.get("steps")),
    ]
    parts = [
        FRONT_MATTER,
        f"# {name}\n\nA LLaVA-OneVision model (`LlavaOnevisionForConditionalGeneration`) trained with ov_train.\n",
        _table(("property", "value"), [(k, f"`{v}`" if isinstance(v, str) else _number(v)) for k, v in about if v is not None]),
    ]
    mix = facts.get("data_mix") or {}
    if mix:
        parts.append("## Data mix\n\n" + _table(("source", "share"), [(k, f"{100 * v:.1f}%") for k, v in mix.items()]))
    metrics = facts.get("metrics") or {}
    if metrics:
        rows = [(f"`{k}`", _number(v)) for k, v in sorted(metrics.items())]
        parts.append(
            "## Held-out metrics\n\nAt the last validation: `val/accuracy` counts samples whose every reply token "
            "greedy decoding reproduces.\n\n" + _table(("metric", "value"), rows)
        )
    parts.append(NO_PROCESSOR.format(refusal=refusal, path=path) if refusal else USAGE.format(path=path, template=template))
    return "\n".join(parts)
