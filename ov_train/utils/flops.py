"""Model FLOPs of a training step, from the model config and the batch's actual token counts.

Only matrix products count (2 FLOPs per multiply-add); norms, activations, RoPE, pooling and the
embedding lookup are left out, as in the usual MFU convention. Per forward pass:

  vision tower, per crop or video frame, with n = (image_size / patch_size)^2 patches, width d,
  MLP width f and L layers (those up to the feature layer: ov_train's forward runs no later ones):
      patch embedding  2 n (3 p^2) d
      per layer        n (8 d^2 + 4 d f)     q, k, v, o projections and the two MLP matrices
                       + 4 n^2 d             scores (Q K^T) and weighted sum (A V), bidirectional
  projector, per patch feature (every patch of every crop/frame, before video pooling):
      2 (d_vision d_llm + d_llm^2)
  LLM, per token, with width d, MLP width f, H query / K key-value heads of size h, L layers, vocab V:
      L (2 d H h + 4 d K h + 2 H h d + 6 d f) + 2 d V      (q, k, v, o, gate/up/down; LM head)
      The head counts for every token, as in the usual 6 x params convention and the recipe's MFU
      column, whether or not the loss computes logits for unsupervised positions.
  LLM attention, per (query, key) pair that causal attention visits, i.e. l (l + 1) / 2 pairs for a
  sample of l tokens (padding excluded):
      4 H h L

A training step multiplies each part's forward FLOPs: the backward pass costs one forward for the
activation gradients when a gradient must flow through the part (it trains, or a part before it in
the forward order does) and one more for the weight gradients when the part trains. Attention has
no weights; its backward costs two forwards. A fully trained model thus counts 3x forward (the
familiar 6 x params per token); a frozen tower in front of a trainable projector counts 1x.
Recomputation for activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

from dataclasses import dataclass

from ov_train.constants import PARTS


@dataclass(frozen=True)
class TokenCounts:
    """What some batches fed the model; FLOPs are linear in these, so the counts of several batches add up."""

    images: float  # crops and video frames through the tower
    tokens: float  # LLM tokens, padding excluded
    pairs: float  # causal (query, key) pairs: sum of l (l + 1) / 2 over samples of l tokens


@dataclass(frozen=True)
class ModelFlops:
    vision_per_image: float  # one crop or frame through the tower's weight matrices
    vision_attention_per_image: float  # its patches attending to each other, all layers
    projector_per_image: float  # its patch features through the projector
    llm_per_token: float  # every linear layer of the LLM and the LM head, for one token
    llm_per_pair: float  # attention scores and weighted sum, for one (query, key) pair, all layers

    @classmethod
    def from_config(cls, config) -> ModelFlops:
        """Forward FLOPs of a LlavaOnevisionConfig's parts."""
        v, t = config.vision_config, config.text_config
        patches = (v.image_size // v.patch_size) ** 2
        embed = 2 * patches * v.num_channels * v.patch_size**2 * v.hidden_size
        per_layer = patches * (8 * v.hidden_size**2 + 4 * v.hidden_size * v.intermediate_size)
        layers = config.vision_feature_layer % (v.num_hidden_layers + 1)  # hidden_states[0] is the embedding
        # The "default" strategy drops the first token before projecting; "full" projects every patch.
        features = patches - 1 if config.vision_feature_select_strategy == "default" else patches
        projector = features * 2 * (v.hidden_size * t.hidden_size + t.hidden_size**2)

        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        q_width, kv_width = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
        llm_layer = 2 * t.hidden_size * (2 * q_width + 2 * kv_width) + 6 * t.hidden_size * t.intermediate_size
        return cls(
            vision_per_image=embed + layers * per_layer,
            vision_attention_per_image=layers * 4 * patches**2 * v.hidden_size,
            projector_per_image=projector,
            llm_per_token=t.num_hidden_layers * llm_layer + 2 * t.hidden_size * t.vocab_size,
            llm_per_pair=4 * q_width * t.num_hidden_layers,
        )

    def forward(self, counts: TokenCounts) -> dict[str, tuple[float, float]]:
        """Forward FLOPs per part as (weight matmuls, attention)."""
        return {
            "vision_tower": (counts.images * self.vision_per_image, counts.images * self.vision_attention_per_image),
            "projector": (counts.images * self.projector_per_image, 0.0),
            "llm": (counts.tokens * self.llm_per_token, counts.pairs * self.llm_per_pair),
        }

    def train_step(self, counts: TokenCounts, trainable: set[str]) -> float:
        """Forward + backward FLOPs of training on `counts` with the parts in `trainable` learning."""
        total, grad_flows = 0.0, False
        forward = self.forward(counts)
        for part in PARTS:  # in forward order
            trains = part in trainable
            grad_flows = grad_flows or trains
            matmuls, attention = forward[part]
            total += matmuls * (1 + grad_flows + trains) + attention * (1 + 2 * grad_flows)
        return total
