"""Rank importance (docs/METHOD.md, section 4: Eq. 6-8), from the gradients the step already has.

For rank j of one expert's module, with a_j row j of A and b_j column j of B:

    s_j = || dL/da_j * a_j ||_1  x  || dL/db_j * b_j ||_1
    g_j <- beta g_j + (1 - beta) s_j

The module's importance is the mean of g_j over its active ranks (see
``saliency.module_importance``). No extra backward pass: the trainer calls
``update_importance`` inside the compiled step with the accumulated gradients.
"""

from __future__ import annotations

import mlx.core as mx


def row_sums(x: mx.array) -> mx.array:
    """``x`` summed over its last axis, as a float32 product with a ones vector:
    on MLX's CPU backend a matrix-vector product reads the array several times
    faster than a sum reduction does (and a NaN or infinity still propagates)."""
    x = x.astype(mx.float32)
    return x @ mx.ones((x.shape[-1],), mx.float32)


def row_scores(a_rows: mx.array, b_rows: mx.array, grad_a_rows: mx.array, grad_b_rows: mx.array) -> mx.array:
    """s_j of every rank j whose A row and B column are rows j of ``a_rows`` and
    ``b_rows`` (with their gradients): ||dL/da_j * a_j||_1 x ||dL/db_j * b_j||_1."""
    return row_sums(mx.abs(grad_a_rows * a_rows)) * row_sums(mx.abs(grad_b_rows * b_rows))


def rank_scores(lora_a: mx.array, lora_b: mx.array, grad_a: mx.array, grad_b: mx.array) -> mx.array:
    """s_j for every expert and rank: (E, r_max) from A (E, r, in) and B (E, out, r)."""
    return row_scores(lora_a, lora_b.swapaxes(-1, -2), grad_a, grad_b.swapaxes(-1, -2))


def update_importance(module, grad_a: mx.array, grad_b: mx.array, beta: float) -> None:
    """One EMA step of the module's per-rank importance (Eq. 7)."""
    scores = rank_scores(module.lora_a, module.lora_b, grad_a, grad_b)
    module.importance = beta * module.importance + (1.0 - beta) * scores
