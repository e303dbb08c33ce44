"""`stage.reproduce` and the per-item keys it sets: where ov_train departs from the public LLaVA-NeXT code on purpose.

ov_train's defaults (`stage.reproduce=ov_train`) are the better or the inference-true choice; `public_code` turns
every difference to what the public training code does (README, "Reproducing the paper"). Each item is also a key of
its own, null by default (then `stage.reproduce` decides), so one difference can be turned alone:

- `stage.labels`: `replies` (the assistant replies and their `<|im_end|>` carry loss) or `reference` (the public
  `preprocess_qwen` masks: the whole assistant message with its `<|im_start|>assistant\\n` and trailing newline, and
  every `<|im_start|>`, `<|im_end|>` and standalone newline token of the system and user turns too).
- `stage.plain_newline`: `apart` (the `plain` template's caption and its closing "\\n" tokenized apart) or `joined`
  (caption + "\\n" tokenized together, as the public `preprocess_plain`: "." + "\\n" becomes one ".\\n" token).
- `stage.token_rounding`: `round` (the anyres unpadding rounds, `int(round(x, 7))`, as transformers and so the stock
  processor at inference) or `truncate` (`int(x)`, as the public `unpad_image`); data, planner and model count alike.
- `stage.warmup_schedule`: `ov_train` (round(ratio x T) warmup steps, the first already at lr / W) or `transformers`
  (ceil(ratio x T) steps at lr x step / W from 0: transformers' cosine schedule, which the public trainer runs).
- `stage.public_image_grid`: the stage's crop grids in the order the public script lists them (its ties between
  equal canvases go to the first), used instead of `stage.image_grid` under `public_code`; null: `stage.image_grid`.

One difference has no key: the public code cuts a sequence at max length after inserting the visual features, where
ov_train skips a sample whose visual tokens the cut would reach (data/samples.py), since the model refuses features
without their slots. The public scripts' ZeRO-3 is the experiments' engine (conf/experiment/ov_qwen2_*).
"""
from __future__ import annotations

from dataclasses import dataclass

REPRODUCE = ("ov_train", "public_code")

# Per key: its value under each stage.reproduce, ov_train's first.
CHOICES = {
    "labels": ("replies", "reference"),
    "plain_newline": ("apart", "joined"),
    "token_rounding": ("round", "truncate"),
    "warmup_schedule": ("ov_train", "transformers"),
}


@dataclass(frozen=True)
class Reproduction:
    """Each difference from the public code, resolved: the key's own value, else what stage.reproduce says."""

    labels: str = "replies"
    plain_newline: str = "apart"
    token_rounding: str = "round"
    warmup_schedule: str = "ov_train"
    public_grid: bool = False  # stage.public_image_grid instead of stage.image_grid (where the stage has one)

    @classmethod
    def from_stage(cls, stage) -> Reproduction:
        """The stage's settings (a config node or a dict; absent keys take ov_train's); problems() checked them."""
        public = _get(stage, "reproduce") == "public_code"
        values = {key: _get(stage, key) or choices[int(public)] for key, choices in CHOICES.items()}
        return cls(**values, public_grid=public)


def _get(stage, key):
    return stage.get(key) if hasattr(stage, "get") else getattr(stage, key, None)


def problems(stage) -> list[str]:
    """stage.reproduce and each per-item key against what it allows, one line each."""
    out = []
    reproduce = _get(stage, "reproduce")
    if reproduce is not None and reproduce not in REPRODUCE:
        out.append(f"stage.reproduce={reproduce!r}; allowed: {list(REPRODUCE)}")
    for key, choices in CHOICES.items():
        value = _get(stage, key)
        if value is not None and value not in choices:
            out.append(f"stage.{key}={value!r}; allowed: {list(choices)} or null (stage.reproduce decides)")
    return out
