"""The mlx-lm MoE families drlora-mlx supports, one table entry each.

Experts and MoE blocks are found by type (every mlx-lm MoE family keeps its
routed experts in a ``SwitchGLU`` or ``SwitchMLP``); the table says only what
differs: the attribute of the block that holds the router, how the block turns
the router's output into the routing weights it applies, and where a shared
expert sits. A new family is a new entry.

A routing-weight rule gets (router output, the expert indices the block passed
to its experts, the block) and returns the weight the block applies to each of
those experts, shaped like the indices. It reads the router's own output and
the block's own settings, so it follows what the model computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx

from .errors import InputError


def softmax_then_topk(renorm_attr: Optional[str] = None) -> Callable:
    """Softmax over all experts, keep the chosen k; renormalised over the k
    when the block's ``renorm_attr`` setting is true (Qwen-MoE, OLMoE)."""

    def weights(logits, indices, block):
        probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
        chosen = mx.take_along_axis(probs, indices, axis=-1)
        if renorm_attr is not None and getattr(block, renorm_attr):
            chosen = chosen / chosen.sum(axis=-1, keepdims=True)
        return chosen

    return weights


def topk_then_softmax(logits, indices, block):
    """Softmax over the chosen k logits only (Mixtral, gpt-oss)."""
    chosen = mx.take_along_axis(logits.astype(mx.float32), indices, axis=-1)
    return mx.softmax(chosen, axis=-1, precise=True)


def router_scores(output, indices, block):
    """The router returns (indices, weights) itself (DeepSeek, GLM4-MoE, Granite)."""
    return output[1].astype(mx.float32)


@dataclass(frozen=True)
class Family:
    """What drlora-mlx needs to know about one mlx-lm MoE family."""

    router: str
    weights: Optional[Callable] = None  # None: only the ``count`` signal
    shared_experts: tuple[str, ...] = ()
    frozen_router_params: tuple[str, ...] = ()
    note: str = ""


_NOAUX_ROUTER = Family(
    router="gate",
    weights=router_scores,
    shared_experts=("shared_experts",),
    # A selection-only bias, balanced outside gradient descent: never trained.
    frozen_router_params=("e_score_correction_bias",),
)

FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family(router="gate", weights=softmax_then_topk("norm_topk_prob")),
    "qwen2_moe": Family(router="gate", weights=softmax_then_topk(), shared_experts=("shared_expert",)),
    "olmoe": Family(router="gate", weights=softmax_then_topk("norm_topk_prob")),
    "mixtral": Family(router="gate", weights=topk_then_softmax),
    "phimoe": Family(
        router="gate",
        note="sparsemixer routing weights are computed inside the block; routing frequency uses token counts",
    ),
    "deepseek_v2": Family(router="gate", weights=router_scores, shared_experts=("shared_experts",)),
    "deepseek_v3": _NOAUX_ROUTER,
    "glm4_moe": _NOAUX_ROUTER,
    "gpt_oss": Family(router="router", weights=topk_then_softmax, frozen_router_params=("bias",)),
    "granitemoe": Family(router="router", weights=router_scores),
}


class UnsupportedModelError(InputError):
    """The model is not an MoE model drlora-mlx can adapt."""


def family_of(model) -> str:
    """The mlx-lm model family: the name of the module that defines the model
    class (robust to mlx-lm's model_type remapping)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def lookup(model) -> tuple[str, Family]:
    name = family_of(model)
    if name not in FAMILIES:
        raise UnsupportedModelError(
            f"model family {name!r} is not supported; supported MoE families: {', '.join(sorted(FAMILIES))}"
        )
    return name, FAMILIES[name]
