"""The training loss: next-token cross-entropy over the real targets, with the routing sums of its forward pass.

By default the model runs only to its last hidden state, and the final head
and the cross-entropy run in chunks of tokens (``chunked_cross_entropy``): each
chunk's logits are recomputed in the backward pass and the chunks run one after
another, so what the loss holds is a chunk's worth of logits and their
gradient instead of every token's (at a 151,936-token vocabulary, 1.6 MB per
token in float32). The loss and its gradients are the plain loss's to float32
rounding. Where a model's head cannot be split off (``lora/head.py``), with
``loss_chunk_size`` 0, or for a batch of at most ``CHUNKS_THAT_PAY`` chunks
(where the plain loss holds less), the loss is the plain one.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from ..lora.handle import DRLoRA
    from ..lora.head import Head

# Logits per chunk when loss_chunk_size is not given: 8M (32 MB in float32).
LOGITS_PER_CHUNK = 1 << 23
# MLX keeps about ten chunk-sized arrays of the head's backward in flight, the plain loss about four
# batch-sized ones (measured at vocabulary 151,936 and 32,768), so chunks pay only from more than
# CHUNKS_THAT_PAY of them on: a smaller batch takes the plain loss.
CHUNKS_THAT_PAY = 3


def loss_mask(lengths: mx.array, width: int) -> mx.array:
    """Which of the ``width`` next-token targets of each row count: those that
    predict a real token after the prompt. ``lengths`` is (rows, 2): the
    prompt offset and the token count. Target t predicts token t + 1, so a row
    of n tokens has real targets 0 .. n - 2 (mlx-lm's trainer also counts
    target n - 1, which predicts the first padding token)."""
    steps = mx.arange(1, width + 1)
    return mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])


def chunk_tokens(vocab: int, size: int | None) -> int:
    """Tokens per chunk: ``size`` (0: no chunks, the plain loss), or by default as many as
    LOGITS_PER_CHUNK logits make (at least 16)."""
    return max(16, LOGITS_PER_CHUNK // vocab) if size is None else size


def in_chunks(rows: int, tokens: int) -> bool:
    """Whether a batch of ``rows`` target tokens takes the chunked loss at ``tokens`` a chunk (0:
    never): only with more than ``CHUNKS_THAT_PAY`` chunks."""
    return tokens > 0 and rows > CHUNKS_THAT_PAY * tokens


def chunked_cross_entropy(head: Head, tokens: int):
    """``ce(hidden, targets, weights)``: the sum over positions of weight x cross-entropy of
    ``head.logits(hidden)``, for hidden (1, N, H), targets (1, N) and float weights (1, N),
    ``tokens`` positions at a time, one chunk after another in the forward and the backward pass."""

    def spans(n: int) -> list[tuple[int, int]]:
        return [(a, min(a + tokens, n)) for a in range(0, n, tokens)]

    def after(x: mx.array, previous: mx.array | None) -> mx.array:
        # a chunk starts when the one before it is done, so their logits are never alive together
        return x if previous is None else mx.depends(x, previous)

    @mx.custom_function
    def ce(hidden, targets, weights):
        total = None
        for a, b in spans(hidden.shape[1]):
            logits = head.logits(after(hidden[:, a:b], total)).astype(mx.float32)
            picked = mx.take_along_axis(logits, targets[:, a:b, None], axis=-1)[..., 0]
            part = ((mx.logsumexp(logits, axis=-1) - picked) * weights[:, a:b]).sum()
            total = part if total is None else total + part
        return total

    @ce.vjp
    def ce_vjp(primals, cotangent, output):
        hidden, targets, weights = primals
        grads = []
        for a, b in spans(hidden.shape[1]):
            h = after(hidden[:, a:b], grads[-1] if grads else None)
            logits = head.logits(h)
            scores = logits.astype(mx.float32)
            target = targets[:, a:b, None]
            w = (weights[:, a:b] * cotangent)[..., None]
            # d/dlogits of w x (logsumexp - picked): w x (softmax - one-hot)
            d = mx.exp(scores - mx.logsumexp(scores, axis=-1, keepdims=True)) * w
            d = mx.put_along_axis(d, target, mx.take_along_axis(d, target, axis=-1) - w, axis=-1)
            grads.append(mx.vjp(head.logits, [h], [d.astype(logits.dtype)])[1][0])
        return mx.concatenate(grads, axis=1), mx.zeros_like(targets), mx.zeros_like(weights)

    return ce


def make_loss(drlora: DRLoRA, record: bool = True, chunk_size: int | None = None):
    """The masked next-token cross-entropy as a *sum* over the loss tokens
    (``loss_mask``) times ``scale``, with the loss-token count and the batch's
    routing sums (zeros when ``record`` is False: uniform LoRA needs no statistics).
    ``chunk_size``: tokens per chunk of the head and cross-entropy (None: by the
    vocabulary; 0: the plain loss, every token's logits at once); a batch of at
    most ``CHUNKS_THAT_PAY`` chunks takes the plain loss, which then holds less.

    Gradients of the sum, added over micro-batches and processes and divided by
    the total token count, are the token-weighted mean over the whole
    optimizer step, however it is split; when the batch is the whole step,
    ``scale`` = 1 / its token count gives that mean directly.
    """
    head = drlora.head
    tokens = chunk_tokens(head.vocab, chunk_size) if head is not None else 0
    chunked = chunked_cross_entropy(head, tokens) if tokens else None

    def loss(model, batch, lengths, scale=1.0):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        mask = loss_mask(lengths, targets.shape[1])
        rows = targets.size
        chunks = in_chunks(rows, tokens)  # (shapes are known when traced)
        with drlora.recorder.capture(mask) if record else nullcontext():
            out = head.hidden(inputs) if chunks else model(inputs)
            routing = drlora.recorder.sums() if record else mx.zeros((drlora.n_layers, drlora.n_experts))
        if chunks:
            ce = chunked(out.reshape(1, rows, -1), targets.reshape(1, rows), mask.reshape(1, rows).astype(mx.float32))
        else:
            ce = (nn.losses.cross_entropy(out, targets) * mask).astype(mx.float32).sum()
        return ce * scale, mask.sum(), routing

    return loss
