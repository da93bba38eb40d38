"""Routing statistics against a direct recomputation from each model's own MoE block.

The reference does not use drlora-mlx's rule table: it runs each MoE block on
its recorded input with the experts replaced by a probe that returns one-hot
rows, so the block's output *is* the routing weight it applies to each chosen
expert (minus the shared expert, measured with an all-zero probe).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from drlora_mlx.families import FAMILIES
from drlora_mlx.training.loss import make_loss
from drlora_mlx.training.trainer import grad_checkpoint

from .helpers import attached, padded_batch, reference_sums

WEIGHT_FAMILIES = sorted(n for n, f in FAMILIES.items() if f.weights is not None and f.tiny is not None)


@pytest.mark.parametrize("family", WEIGHT_FAMILIES)
def test_weight_signal_equals_the_blocks_applied_weights(tiny_models, family):
    model, tok, drlora = attached(tiny_models, family, routing_signal="weight")
    batch, lengths = padded_batch(tok.vocab_size if hasattr(tok, "vocab_size") else 384, seed=1)
    _, n_tokens, sums = make_loss(drlora)(model, batch, lengths)
    want, n_want = reference_sums(model, drlora, batch, lengths, "weight")
    assert int(n_tokens.item()) == n_want
    assert np.allclose(np.asarray(sums), want, atol=1e-4, rtol=1e-4)
    assert want.sum() > 0


@pytest.mark.parametrize("family", sorted(n for n, f in FAMILIES.items() if f.tiny is not None))
def test_count_signal_equals_top_k_membership(tiny_models, family):
    model, tok, drlora = attached(tiny_models, family, routing_signal="count")
    batch, lengths = padded_batch(384, seed=2)
    _, n_tokens, sums = make_loss(drlora)(model, batch, lengths)
    want, n_want = reference_sums(model, drlora, batch, lengths, "count")
    assert np.array_equal(np.asarray(sums), want)
    top_k = want.sum(axis=1) / n_want
    if FAMILIES[family].routed is None:
        assert np.allclose(top_k, top_k[0]) and top_k[0] == int(top_k[0])  # K experts per loss token
    else:  # LongCat: some slots go to zero experts, which are not experts
        assert (top_k > 0).all() and (top_k < want.shape[1]).all()


def test_family_without_weight_rule_falls_back_to_count_and_says_so(tiny_models):
    _, _, drlora = attached(tiny_models, "phimoe", routing_signal="weight")
    assert drlora.routing_signal == "count"
    assert "count" in drlora.report() and "sparsemixer" in drlora.report()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("signal", ["weight", "count"])
def test_gradient_checkpointing_counts_once(tiny_models, family, signal):
    model, _, drlora = attached(tiny_models, family, routing_signal=signal)
    batch, lengths = padded_batch(384, seed=3)
    want, _ = reference_sums(model, drlora, batch, lengths, signal)
    grad_checkpoint(model)
    loss_and_grad = nn.value_and_grad(model, make_loss(drlora))
    step = mx.compile(lambda b, l: loss_and_grad(model, b, l), inputs=model.state, outputs=model.state)
    (_, _, sums), grads = step(batch, lengths)
    assert np.allclose(np.asarray(sums), want, atol=1e-4, rtol=1e-4)
