"""The chunked loss: the model run to its last hidden state, then its own head and the
cross-entropy in chunks of tokens, never every token's logits at once. Checked against
the plain loss (mlx's cross-entropy on the model's own logits) for every family."""

import dataclasses

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

from drlora_mlx import DRLoRAConfig, attach
from drlora_mlx.families import FAMILIES
from drlora_mlx.families.mlx_lm_names import model_classes
from drlora_mlx.formats.tiny import family_config
from drlora_mlx.lora.head import Head
from drlora_mlx.training.loss import loss_mask, make_loss

from .helpers import SHAPE, heterogeneous_ranks, padded_batch, randomize_b

WITH_TINY = sorted(n for n, f in FAMILIES.items() if f.tiny is not None)
CONFIG = DRLoRAConfig(r_init=2, r_target=4, r_max=8, train_router="always", attention_rank=2)


def _attached(tiny_models, family):
    model, _ = mlx_lm_load(str(tiny_models(family, shape=SHAPE)))
    drlora = attach(model, CONFIG, seed=0)
    heterogeneous_ranks(drlora, seed=1)
    randomize_b(drlora, seed=1, std=0.3)
    return model, drlora


def _loss_and_grads(model, drlora, chunk_size, batch, lengths):
    step = nn.value_and_grad(model, make_loss(drlora, record=True, chunk_size=chunk_size))
    (ce, count, routing), grads = step(model, batch, lengths)
    return ce.item(), dict(tree_flatten(grads)), routing


@pytest.mark.parametrize("family", WITH_TINY)
def test_the_chunked_loss_equals_the_plain_loss(tiny_models, family):
    model, drlora = _attached(tiny_models, family)
    assert drlora.head is not None, drlora.notes
    batch, lengths = padded_batch(SHAPE.vocab, seed=0)
    ce, grads, routing = _loss_and_grads(model, drlora, 0, batch, lengths)
    scale = max(mx.abs(g).max().item() for g in grads.values())
    # 5 tokens a chunk: uneven chunks across rows; None: the default (at this vocabulary, the plain loss)
    for chunk in (5, None):
        ce_c, grads_c, routing_c = _loss_and_grads(model, drlora, chunk, batch, lengths)
        assert abs(ce_c - ce) <= 1e-5 * abs(ce), (chunk, ce_c, ce)
        assert grads_c.keys() == grads.keys()
        worst = max(mx.abs(grads_c[k] - grads[k]).max().item() for k in grads)
        assert worst <= 1e-5 * scale, (chunk, worst, scale)
        assert mx.array_equal(routing_c, routing)


def _note(drlora):
    notes = [n for n in drlora.notes if "logits at once" in n]
    assert len(notes) == 1 and "\n" not in notes[0], drlora.notes
    return notes[0]


def test_a_head_that_does_not_give_the_models_logits_falls_back_to_the_plain_loss(tiny_models, monkeypatch):
    logits = Head.logits
    monkeypatch.setattr(Head, "logits", lambda self, hidden: 1.001 * logits(self, hidden))  # a wrong head
    model, drlora = _attached(tiny_models, "qwen3_moe")
    assert drlora.head is None
    assert _note(drlora).startswith("qwen3_moe: its head applied to its decoder's output does not give its logits")
    batch, lengths = padded_batch(SHAPE.vocab, seed=0)
    ce, _, _ = _loss_and_grads(model, drlora, None, batch, lengths)
    mask = loss_mask(lengths, batch.shape[1] - 1)
    want = (nn.losses.cross_entropy(model(batch[:, :-1]), batch[:, 1:]) * mask).sum().item()
    assert abs(ce - want) <= 1e-5 * abs(want)


@pytest.mark.parametrize("body,why", [
    ("model.decoder", "the split could not run (KeyError"),
    ("model.layers.1", "trained parameters lie outside its decoder (model.layers.0."),
])
def test_a_family_entry_that_names_a_wrong_body_falls_back_in_one_line(tiny_models, monkeypatch, body, why):
    monkeypatch.setitem(FAMILIES, "qwen3_moe", dataclasses.replace(FAMILIES["qwen3_moe"], body=body))
    _, drlora = _attached(tiny_models, "qwen3_moe")
    assert drlora.head is None
    assert _note(drlora).startswith(f"qwen3_moe: {why}")


def test_the_chunked_loss_never_holds_every_tokens_logits():
    """At a 32,768-token vocabulary and 4 x 128 tokens the logits are 67 MB: the plain loss holds
    them (and their softmax and gradient); the chunked one, 16 tokens a chunk, less than one copy of them."""
    config = family_config("qwen3_moe", dataclasses.replace(SHAPE, vocab=32768))
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    drlora = attach(model, CONFIG, seed=0)
    tokens = mx.array(np.random.default_rng(0).integers(3, 32768, (4, 129)).astype(np.int32))
    lengths = mx.array([[1, 129]] * 4, dtype=mx.int32)
    logits_bytes = 4 * 128 * 32768 * 4

    def peak(chunk_size):
        step = nn.value_and_grad(model, make_loss(drlora, record=False, chunk_size=chunk_size))
        mx.eval(model.parameters())
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(step(model, tokens, lengths))
        return mx.get_peak_memory() - before

    plain, chunked = peak(0), peak(16)
    assert plain > 2 * logits_bytes, plain
    assert chunked < logits_bytes and chunked < plain / 4, (chunked, plain)  # measured: 35 MB against 282 MB
