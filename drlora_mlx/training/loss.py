"""The training loss: next-token cross-entropy over the real targets, with the routing sums of its forward pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from ..lora.handle import DRLoRA


def loss_mask(lengths: mx.array, width: int) -> mx.array:
    """Which of the ``width`` next-token targets of each row count: those that
    predict a real token after the prompt. ``lengths`` is (rows, 2): the
    prompt offset and the token count. Target t predicts token t + 1, so a row
    of n tokens has real targets 0 .. n - 2 (mlx-lm's trainer also counts
    target n - 1, which predicts the first padding token)."""
    steps = mx.arange(1, width + 1)
    return mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])


def make_loss(drlora: DRLoRA, record: bool = True):
    """The masked next-token cross-entropy as a *sum* over the loss tokens
    (``loss_mask``) times ``scale``, with the loss-token count and the batch's
    routing sums (zeros when ``record`` is False: uniform LoRA needs no statistics).

    Gradients of the sum, added over micro-batches and processes and divided by
    the total token count, are the token-weighted mean over the whole
    optimizer step, however it is split; when the batch is the whole step,
    ``scale`` = 1 / its token count gives that mean directly.
    """

    def loss(model, batch, lengths, scale=1.0):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        mask = loss_mask(lengths, targets.shape[1])
        if record:
            with drlora.recorder.capture(mask):
                logits = model(inputs)
                routing = drlora.recorder.sums()
        else:
            logits = model(inputs)
            routing = mx.zeros((drlora.n_layers, drlora.n_experts))
        ce_sum = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
        return ce_sum * scale, mask.sum(), routing

    return loss
