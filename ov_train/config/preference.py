"""`stage.preference.*`: the preference (DPO) objective of a stage, its values and their checks.

A stage with a `preference` node trains on preference pairs (a prompt, a chosen and a rejected reply); stages
without one train on conversations. Plan floor: model/preference.py computes the losses, training/preference.py
runs them, the planner counts the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "sigmoid_sft")
SMOOTHED = ("sigmoid", "sigmoid_sft")  # the losses label smoothing applies to
# Where the reference log-probabilities come from: `adapters_off` the policy with its adapters switched off (no
# second copy; needs adapters on every trained part), `frozen` a frozen copy of the starting weights, `precomputed`
# one pass of the starting weights over the training pairs before training (stored beside the run), `auto`
# adapters_off with adapters, frozen without.
REFERENCES = ("auto", "adapters_off", "frozen", "precomputed")


@dataclass
class PreferenceSettings:
    """`stage.preference.*` (Hydra's schema for it, config/schema.py, and the run plan's piece: the plan resolves
    `reference` and `warm_start_steps` for the run). Defaults: LLaVA-NeXT's OneVision DPO script
    (scripts/train/dpo_ov7b.sh: sigmoid loss, --beta 0.1, --gamma 0 so no SFT term, no label smoothing)."""

    # sigmoid (DPO), ipo, hinge, or sigmoid_sft (DPO + sft_weight x the chosen replies' NLL: the MPO-style mix;
    # dpo_ov7b.sh's --gamma is that weight, 0 there).
    loss: str = "sigmoid"
    beta: float = 0.1  # how far the policy may move from the reference (IPO's tau)
    label_smoothing: float = 0.0  # cDPO: the probability that a pair's preference is flipped, in [0, 0.5)
    sft_weight: float = 1.0  # sigmoid_sft: weight of the chosen replies' NLL (TRL's MPO example and LLaVA-NeXT's default)
    reference: str = "auto"  # one of REFERENCES (the plan holds the one the run uses: auto made concrete)
    # A run from random weights (the embedded tiny model) first trains this many SFT steps of warm_start_stage on the
    # same data's chosen replies in RUN/warm_start and starts from that export; other runs have none (the plan: 0).
    warm_start_steps: int = 0
    warm_start_stage: str = "onevision"

    def problems(self) -> list[str]:
        out = []
        if self.loss not in PREFERENCE_LOSSES:
            out.append(f"stage.preference.loss={self.loss!r}; allowed: {list(PREFERENCE_LOSSES)}")
        if not self.beta > 0:
            out.append(f"stage.preference.beta={self.beta!r} must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            out.append(f"stage.preference.label_smoothing={self.label_smoothing!r} must be in [0, 0.5)")
        elif self.label_smoothing and self.loss not in SMOOTHED:
            out.append(f"stage.preference.label_smoothing={self.label_smoothing!r} applies to loss {list(SMOOTHED)} only, "
                       f"not {self.loss!r}: set it to 0")
        if self.loss == "sigmoid_sft" and not self.sft_weight > 0:
            out.append(f"stage.preference.sft_weight={self.sft_weight!r} must be positive with loss=sigmoid_sft")
        if self.reference not in REFERENCES:
            out.append(f"stage.preference.reference={self.reference!r}; allowed: {list(REFERENCES)}")
        if self.warm_start_steps < 0:
            out.append(f"stage.preference.warm_start_steps={self.warm_start_steps!r} must be >= 0")
        return out

    def resolved_reference(self, adapted_only: bool | None) -> str:
        """The reference this run uses: `auto` made concrete. `adapted_only`: None without adapters, else whether
        every trained part trains through adapters alone (then switching them off gives the starting weights)."""
        if self.reference != "auto":
            return self.reference
        return "adapters_off" if adapted_only else "frozen"


def reference_problems(settings: PreferenceSettings, adapted_only: bool | None) -> list[str]:
    """What the run's adapters say about stage.preference.reference."""
    if settings.reference != "adapters_off" or adapted_only:
        return []
    why = "adapter=none" if adapted_only is None else "a part trains whole beside the adapters (its starting weights are gone)"
    return [f"stage.preference.reference=adapters_off needs adapters on every trained part, but {why}; "
            "use frozen or precomputed"]
