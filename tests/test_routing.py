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
from drlora_mlx.lora.tree import module_at, replace_module

from .helpers import attached, loss_token_mask, padded_batch

WEIGHT_FAMILIES = sorted(n for n, f in FAMILIES.items() if f.weights is not None and f.tiny is not None)


class _Probe(nn.Module):
    """Stands in for the experts: returns one-hot rows (or zeros) and keeps the indices. Where the
    block scales the experts' input by the routing weight (Llama 4), the rows are scaled alike."""

    def __init__(self, one_hot: bool, block_input=None):
        super().__init__()
        self.one_hot = one_hot
        self.block_input = block_input
        self.indices = None

    def __call__(self, x, indices):
        self.indices = indices
        k, d = indices.shape[-1], x.shape[-1]
        rows = mx.eye(k, d) if self.one_hot else mx.zeros((k, d))
        out = mx.broadcast_to(rows, indices.shape + (d,))
        if self.block_input is not None:
            ref = self.block_input.reshape(x.shape)
            out = out * ((x * ref).sum(-1) / (ref * ref).sum(-1))[..., None, None]
        return out.astype(x.dtype)


def _block_inputs(model, drlora, inputs):
    """The input of every MoE block in a plain forward pass (and the other arguments it was called with:
    for Gemma 4 the block is the decoder layer, called with the attention mask)."""
    seen = {}
    originals = []
    for site, layer in enumerate(drlora.layers):
        cls = type(layer.block)

        def record(self, x, *a, __cls=cls, __site=site, **k):
            seen[__site] = (x, a, k)
            return __cls.__call__(self, x, *a, **k)

        originals.append((layer.block, cls))
        layer.block.__class__ = type("Recording", (cls,), {"__call__": record})
    try:
        mx.eval(model(inputs))
    finally:
        for block, cls in originals:
            block.__class__ = cls
    return seen


def _run_block(layer, family, call, probe):
    """The output of the block (or of the module the family names as its readout) with ``probe`` as experts."""
    x, args, kwargs = call
    experts = module_at(layer.block, layer.experts_name)
    replace_module(layer.block, layer.experts_name, probe)
    try:
        if family.readout is None:
            out = layer.block(x, *args, **kwargs)
        else:
            path, what = family.readout
            target = module_at(layer.block, path)
            cls, seen = type(target), {}

            def call(self, *a, **k):
                seen["out"] = cls.__call__(self, *a, **k)
                return seen["out"]

            target.__class__ = type("Readout", (cls,), {"__call__": call})
            try:
                layer.block(x, *args, **kwargs)
            finally:
                target.__class__ = cls
            out = seen["out"]
    finally:
        replace_module(layer.block, layer.experts_name, experts)
    return np.asarray(out[0] if isinstance(out, tuple) else out, np.float64)


def reference_sums(model, drlora, batch, lengths, signal):
    inputs = batch[:, :-1]
    mask = loss_token_mask(lengths, batch.shape[1])
    seen = _block_inputs(model, drlora, inputs)
    out = np.zeros((drlora.n_layers, drlora.n_experts))
    family = drlora.family
    for site, layer in enumerate(drlora.layers):
        call = seen[site]
        probe = _Probe(one_hot=True, block_input=call[0] if family.input_scaled else None)
        with_scores = _run_block(layer, family, call, probe)
        shared_only = _run_block(layer, family, call, _Probe(one_hot=False))
        idx = np.asarray(probe.indices)
        k = idx.shape[-1]
        idx = idx.reshape(mask.shape + (k,))
        weights = (with_scores - shared_only)[..., :k].reshape(mask.shape + (k,))
        values = weights if signal == "weight" else (weights != 0).astype(np.float64)
        for e in range(drlora.n_experts):
            out[site, e] = (values * (idx == e) * mask[..., None]).sum()
    return out, mask.sum()


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
