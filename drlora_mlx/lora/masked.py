"""Rank-masked LoRA for a bank of MoE experts (docs/METHOD.md, section 2: Eq. 3 and 10).

Each expert e of an mlx-lm ``SwitchLinear`` / ``QuantizedSwitchLinear`` gets
A[e] (r_max x in), B[e] (out x r_max) and a prefix-shaped 0/1 rank mask:

    y = W x + scale * B[e] (m[e] * (A[e] x))

The attribute names match mlx-lm's ``LoRASwitchLinear`` (``linear``,
``lora_a``, ``lora_b``), so parameter paths and adapter keys are mlx-lm's.
Growing a rank changes mask values, never shapes, so a compiled training step
is not retraced. ``width`` (a Python int) limits the LoRA product to the first
``width`` ranks, for layers whose experts all use fewer than r_max.

This is the masked layout: every expert's factors are allocated at r_max. The
pooled layout (``pooled_lora``) keeps only the rank budget; both share
``ExpertLoRA``.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear


def prefix_mask(ranks, r_max: int) -> mx.array:
    """The 0/1 float32 mask whose row i has its first ranks[i] entries set."""
    ranks = np.asarray(ranks, dtype=np.int64)
    return mx.array((np.arange(r_max) < ranks[..., None]).astype(np.float32))


def ranks_of(mask) -> np.ndarray:
    """The active ranks that a prefix mask (..., r_max) encodes."""
    return np.asarray(mx.array(mask).sum(axis=-1)).astype(np.int64)


def dequantized_weight(linear) -> mx.array:
    """The float weight of a (possibly quantized) linear or switch-linear layer."""
    if "scales" not in linear:
        return linear.weight
    return mx.dequantize(
        linear.weight,
        linear.scales,
        linear.get("biases"),
        group_size=linear.group_size,
        bits=linear.bits,
        mode=linear.mode,
    )


class ExpertLoRA(nn.Module):
    """What both layouts of the expert LoRA share: the base switch layer, the
    constant scale, r_max and the LoRA width; the ranks, factors and importance
    come from the layout (``MaskedLoRASwitchLinear``, ``pooled_lora.PooledLoRASwitchLinear``).

    Every layout answers: ``ranks()``, ``set_ranks(ranks)``, ``rank_importance()``
    (E, r_max), ``reset_importance(experts)``, ``masked_factors()`` (A, B with
    inactive ranks zero) and ``load_factors(A, B, ranks)``.
    """

    def __init__(self, linear: nn.Module, r_max: int, scale: float):
        if not isinstance(linear, (SwitchLinear, QuantizedSwitchLinear)):
            raise TypeError(f"expected a SwitchLinear or QuantizedSwitchLinear, got {type(linear).__name__}")
        super().__init__()
        self.linear = linear
        self.scale = scale
        self.r_max = r_max
        self.width = r_max

    @property
    def num_experts(self) -> int:
        return self.linear.num_experts

    @property
    def input_dims(self) -> int:
        return self.linear.input_dims

    @property
    def output_dims(self) -> int:
        return self.linear.output_dims

    def active_mask(self) -> mx.array:
        """The prefix mask (E, r_max) of the active ranks."""
        return prefix_mask(self.ranks(), self.r_max)

    def _widen_for(self, ranks) -> None:
        # A width too narrow for the ranks falls back to r_max (``DRLoRA.fit_width`` narrows it again).
        if int(np.max(ranks)) > self.width:
            self.width = self.r_max

    def delta(self) -> mx.array:
        """scale * B A per expert: (E, out, in)."""
        a, b = self.masked_factors()
        return self.scale * (b @ a)

    def fuse(self, dtype: mx.Dtype | None = None) -> SwitchLinear:
        """The base layer with the update merged in, as a float ``SwitchLinear`` in
        ``dtype`` (default: the base weight's)."""
        linear = self.linear
        weight = dequantized_weight(linear)
        if dtype is not None:
            weight = weight.astype(dtype)  # MXFP4 dequantizes to bfloat16 whatever the model's dtype
        n_experts, out_dims, in_dims = weight.shape
        fused = SwitchLinear(in_dims, out_dims, n_experts, bias="bias" in linear)
        fused.weight = weight + self.delta().astype(weight.dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        return fused


class MaskedLoRASwitchLinear(ExpertLoRA):
    """LoRA on every expert of a switch layer, each with its own active rank,
    every expert's factors allocated at r_max."""

    @staticmethod
    def from_base(linear: nn.Module, r_max: int, rank: int, scale: float) -> "MaskedLoRASwitchLinear":
        return MaskedLoRASwitchLinear(linear, r_max, rank, scale)

    def __init__(self, linear: nn.Module, r_max: int, rank: int, scale: float):
        super().__init__(linear, r_max, scale)
        n_experts, out_dims, in_dims = linear.num_experts, linear.output_dims, linear.input_dims
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(n_experts, r_max, in_dims))
        self.lora_b = mx.zeros((n_experts, out_dims, r_max))
        self.rank_mask = prefix_mask(np.full(n_experts, rank), r_max)
        # Per-rank EMA of the rank importance s_j (Eq. 7), updated by the trainer.
        self.importance = mx.zeros((n_experts, r_max))
        # Only A and B train; the base layer stays as the model had it.
        self.freeze(keys=["rank_mask", "importance"], recurse=False)

    def ranks(self) -> np.ndarray:
        """The active rank of every expert."""
        return ranks_of(self.rank_mask)

    def set_ranks(self, ranks) -> None:
        """Activate the first ranks[e] ranks of every expert e."""
        self.rank_mask = prefix_mask(ranks, self.r_max)
        self._widen_for(ranks)

    def rank_importance(self) -> mx.array:
        """The importance EMA of every expert's ranks: (E, r_max)."""
        return self.importance

    def set_rank_importance(self, importance: mx.array) -> None:
        self.importance = importance

    def reset_importance(self, experts) -> None:
        """Zero the importance EMAs of the experts marked in ``experts`` (E,) bool."""
        keep = mx.array(~np.asarray(experts, dtype=bool))[:, None]
        self.importance = mx.where(keep, self.importance, 0.0)

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        a, b, mask = self.lora_a, self.lora_b, self.rank_mask
        if self.width < self.r_max:
            a, b, mask = a[:, : self.width], b[..., : self.width], mask[:, : self.width]
        z = mx.gather_mm(x, a.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        z = z * mx.expand_dims(mask[indices], -2).astype(z.dtype)
        z = mx.gather_mm(z, b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(x.dtype)

    def load_factors(self, lora_a: mx.array, lora_b: mx.array, ranks) -> None:
        """Set the active ranks and their A, B (e.g. from a saved adapter, whose
        inactive ranks are zero); inactive rows of A keep their initial values,
        so that ranks activated later can still learn."""
        self.set_ranks(ranks)
        mask = self.rank_mask[..., None] > 0
        self.lora_a = mx.where(mask, lora_a.astype(self.lora_a.dtype), self.lora_a)
        self.lora_b = lora_b.astype(self.lora_b.dtype) * self.rank_mask[:, None, :]

    def masked_factors(self) -> tuple[mx.array, mx.array]:
        """(A, B) with inactive ranks zeroed: the adapter as mlx-lm's
        ``LoRASwitchLinear`` at rank r_max would hold it."""
        m = self.rank_mask
        return self.lora_a * m[..., None], self.lora_b * m[:, None, :]
