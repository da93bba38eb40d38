"""Routing-weight rules: the weight an MoE block applies to each chosen expert.

A rule gets the router's output, the expert indices the block passed to its
experts, the block and the experts' input, and returns the weight of every
(token, slot), shaped like the indices. It reads the router's own output and
the block's own settings, so it follows what the model computed; ``attach``
checks it against what the block really applies (``probe``) and falls back to
token counts when they differ.

Block settings are named by attribute path ("norm_topk_prob",
"args.routed_scaling_factor"); a setting that is a plain value is used as is.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx


def setting(block, spec):
    """A block setting: ``spec`` is a value, or a dotted attribute path of the block."""
    if not isinstance(spec, str):
        return spec
    value = block
    for part in spec.split("."):
        value = getattr(value, part)
    return value


def gated(score: str = "softmax", renorm=False, eps: float = 0.0, floor: float = 0.0, scale=None,
          renorm_single: bool = True) -> Callable:
    """The usual rules, from the router's logits:

    - ``score``: "softmax" (over all experts, then the chosen k), "sigmoid"
      (of each chosen logit), "chosen_softmax" (softmax over the chosen k
      logits only), or a block setting naming one of "softmax" / "sigmoid";
    - ``renorm``: divide by the sum over the chosen k (plus ``eps``, at least
      ``floor``) when this setting is true; ``renorm_single=False`` skips it
      for top-1 blocks;
    - ``scale``: a setting multiplying the result (routed_scaling_factor).
    """

    def weights(logits, indices, block, x=None):
        kind = score if score in ("softmax", "sigmoid", "chosen_softmax") else setting(block, score)
        logits = logits.astype(mx.float32)
        if kind == "softmax":
            chosen = mx.take_along_axis(mx.softmax(logits, axis=-1, precise=True), indices, axis=-1)
        elif kind == "sigmoid":
            chosen = mx.sigmoid(mx.take_along_axis(logits, indices, axis=-1))
        elif kind == "chosen_softmax":
            chosen = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
        else:
            raise ValueError(f"unknown routing score {kind!r}")
        if setting(block, renorm) and (renorm_single or indices.shape[-1] > 1):
            chosen = chosen / mx.maximum(chosen.sum(axis=-1, keepdims=True) + eps, floor)
        if scale is not None:
            chosen = chosen * setting(block, scale)
        return chosen

    return weights


def softmax_then_topk(renorm_attr: Optional[str] = None) -> Callable:
    """Softmax over all experts, keep the chosen k; renormalised over the k
    when the block's ``renorm_attr`` setting is true (Qwen-MoE, OLMoE)."""
    return gated("softmax", renorm=renorm_attr or False)


topk_then_softmax = gated("chosen_softmax")  # Mixtral, gpt-oss, Granite


def router_scores(output, indices, block, x=None):
    """The router returns (indices, weights) itself (DeepSeek, GLM, Granite, ...)."""
    return output[1].astype(mx.float32)


def scaled(rule: Callable, scale) -> Callable:
    """``rule`` times a block setting (a block that scales the routed output after summing)."""

    def weights(output, indices, block, x=None):
        return rule(output, indices, block, x) * setting(block, scale)

    return weights


def real_experts(output, indices, block):
    """Which (token, slot) pairs went to a real expert: LongCat's router can
    choose "zero experts" (index >= routed experts) that the block computes as
    the identity; their slots reach the experts as expert 0 with weight 0."""
    return output[0] < block.n_routed_experts
