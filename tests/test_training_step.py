"""The compiled training step: importance, frequency, masked ranks, traces."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from drlora_mlx.config.settings import TrainingArgs
from drlora_mlx.lora import codec
from drlora_mlx.training.trainer import NonFiniteError, Trainer

from .helpers import (
    SHAPE,
    attached,
    heterogeneous_ranks,
    padded_batch,
    randomize_b,
    reference_sums,
)
from .reference import Reference, rank_scores


def _trainer(model, drlora, **kw):
    args = dict(iters=40, batch_size=3, learning_rate=1e-2, steps_per_report=1000, steps_per_eval=1000)
    args.update(kw)
    return Trainer(model, drlora, TrainingArgs(**args))


def _np(x):
    return np.asarray(x, dtype=np.float64)


@pytest.mark.parametrize("layout", ["pooled", "masked"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_importance_and_frequency_equal_float64_recomputation(tiny_models, family, layout):
    """Two optimizer steps of two micro-batches each: the importance EMA (Eq. 6-7)
    and the routing frequency EMA (Eq. 5) against gradients from an independent
    float64 model and loss, and routing weights read from the blocks themselves."""
    beta = 0.8
    model, _, drlora = attached(tiny_models, family, ema_beta=beta, train_router="never", lora_layout=layout)
    heterogeneous_ranks(drlora, seed=1)
    randomize_b(drlora, seed=1)
    reference = Reference(tiny_models(family, shape=SHAPE), drlora)
    trainer = _trainer(model, drlora, grad_accumulation_steps=2, iters=400)  # no growth event in these steps
    masks = {path: _np(m.active_mask()) for path, m in drlora.expert_modules()}
    importance = {path: 0.0 for path in masks}
    frequency = None
    for step, seeds in enumerate([(10, 11), (12, 13)]):
        batches = [padded_batch(384, seed=s) for s in seeds]
        reference.sync()
        before = {path: tuple(_np(f) for f in m.masked_factors()) for path, m in drlora.expert_modules()}
        grads, tokens, routing = [], 0, 0.0
        for b, l in batches:
            _, n, g = reference.loss_and_grads(b, l)
            grads.append(g)
            tokens += n
            routing = routing + reference_sums(model, drlora, b, l, "weight")[0]
        for b, l in batches:
            trainer.train_step(b, l)
        for path, m in drlora.expert_modules():
            # The step's gradient: the token-weighted mean over both micro-batches.
            ga = (grads[0][path][0] + grads[1][path][0]) / tokens
            gb = (grads[0][path][1] + grads[1][path][1]) / tokens
            importance[path] = beta * importance[path] + (1 - beta) * rank_scores(*before[path], ga, gb)
            assert np.allclose(_np(m.rank_importance()), importance[path], rtol=1e-3, atol=1e-12), (step, path)
            assert (importance[path][masks[path] == 0] == 0).all() and importance[path].max() > 0
        observed = routing / tokens
        frequency = observed if frequency is None else beta * frequency + (1 - beta) * observed
        assert np.allclose(_np(drlora.routing.frequency), frequency, rtol=1e-4, atol=1e-6), step


def test_frequency_is_an_ema_after_the_first_step(tiny_models):
    beta = 0.9
    model, _, drlora = attached(tiny_models, "mixtral", ema_beta=beta, train_router="never")
    trainer = _trainer(model, drlora)
    expected = None
    for seed in (20, 21, 22):
        b, l = padded_batch(384, seed=seed)
        sums, n = reference_sums(model, drlora, b, l, "weight")
        w = sums / n
        expected = w if expected is None else beta * expected + (1 - beta) * w
        trainer.train_step(b, l)
    assert np.allclose(_np(drlora.routing.frequency), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_optimizer_never_changes_a_masked_rank(tiny_models, weight_decay):
    model, _, drlora = attached(tiny_models, "qwen3_moe", train_router="never", lora_layout="masked")
    heterogeneous_ranks(drlora, seed=2)
    before = {p: (_np(m.lora_a), _np(m.lora_b), _np(m.rank_mask)) for p, m in drlora.expert_modules()}
    trainer = _trainer(model, drlora, weight_decay=weight_decay, iters=1000)  # no growth within 5 steps
    for seed in range(5):
        trainer.train_step(*padded_batch(384, seed=seed))
    changed_active = 0.0
    for path, m in drlora.expert_modules():
        a0, b0, mask = before[path]
        a1, b1 = _np(m.lora_a), _np(m.lora_b)
        inactive = mask == 0
        assert np.array_equal(a1[inactive], a0[inactive])
        assert np.array_equal(b1.transpose(0, 2, 1)[inactive], b0.transpose(0, 2, 1)[inactive])
        changed_active += np.abs(b1 - b0).sum()
    assert changed_active > 0


def test_activating_ranks_keeps_logits_bit_identical(tiny_models):
    model, _, drlora = attached(tiny_models, "olmoe", train_router="never")
    trainer = _trainer(model, drlora, iters=1000)
    for seed in range(4):
        trainer.train_step(*padded_batch(384, seed=seed))
    x = padded_batch(384, seed=99)[0]
    before = model(x)
    ranks = drlora.ranks()
    drlora.set_ranks(np.minimum(ranks + np.arange(ranks.size).reshape(ranks.shape) % 7, drlora.r_max))
    assert (drlora.ranks() > ranks).any()
    assert mx.array_equal(model(x), before)


@pytest.mark.parametrize("layout", ["pooled", "masked"])
def test_trainable_parameters_are_the_adapters_and_the_router_when_on(tiny_models, layout):
    model, _, drlora = attached(tiny_models, "deepseek_v3", train_router="after-warmup", lora_layout=layout)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    if layout == "masked":  # A and B of every module
        assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)
        assert len(names) == 2 * len(list(drlora.expert_modules()))
    else:  # the two sides of every layer's pool
        assert names == [f"{layer.pool_path}.{side}" for layer in drlora.layers for side in ("hidden", "inner")]
    drlora.set_router_trainable(True)
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    routers = {k for k in names if ".gate." in k}
    assert routers == {f"{layer.path}.gate.weight" for layer in drlora.layers}  # not the correction bias


class _FixedLength:
    """Examples of one length, so every batch has one shape."""

    def __init__(self, n=24, length=20, vocab=384, seed=0):
        rng = np.random.default_rng(seed)
        self.rows = [(list(rng.integers(3, vocab, size=length)), 0) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.mark.parametrize("train_router,phases", [("never", 1), ("always", 1), ("after-warmup", 2)])
@pytest.mark.parametrize("active_width", [False, True])
def test_growth_events_do_not_retrace(tiny_models, train_router, phases, active_width):
    model, _, drlora = attached(tiny_models, "qwen3_moe", train_router=train_router, active_width=active_width)
    trainer = _trainer(model, drlora, iters=40, batch_size=4)
    result = trainer.run(_FixedLength())
    assert len(result.events) >= 10
    assert drlora.ranks().mean() == drlora.config.r_target
    # Widths 8, 16, 32 for r_init 8, r_max 32: at most log2(32 / 8) + 1 = 3 shapes per router phase.
    width_shapes = 3 if active_width else 1
    # One compiled step per (router phase, width), never one per event.
    assert result.traces == len(trainer.steps)
    assert phases <= len(trainer.steps) <= phases * width_shapes
    assert {max(key[1]) for key in trainer.steps} == ({8, 16, 32} if active_width else {32})


def test_gradient_accumulation_traces_are_bounded(tiny_models):
    model, _, drlora = attached(tiny_models, "qwen3_moe", train_router="never")
    trainer = _trainer(model, drlora, iters=40, batch_size=4, grad_accumulation_steps=4)
    result = trainer.run(_FixedLength())
    assert len(result.events) >= 3
    # Per (router phase, width): the first micro-batch, the later ones, the update.
    assert result.traces == len(trainer.steps) == 3 * len({key[:2] for key in trainer.steps})


def _everything(trainer):
    """Every array a step can change: trainable parameters, optimizer state, statistics."""
    arrays = {f"param.{k}": v for k, v in tree_flatten(trainer.model.trainable_parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(trainer.optimizer.state)})
    arrays.update({f"state.{k}": v for k, v in codec.encode(trainer.drlora).items()})
    return {k: np.array(v) for k, v in arrays.items()}


def _poisoned(model):
    """A NaN embedding (a frozen weight): the loss and every gradient go non-finite, no trained array changes."""
    embedding = next(m for _, m in model.named_modules() if isinstance(m, nn.Embedding))
    kept = embedding.weight
    embedding.weight = kept * float("nan")
    return lambda: setattr(embedding, "weight", kept)


@pytest.mark.parametrize("layout", ["pooled", "masked"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_nonfinite_step_leaves_weights_optimizer_and_statistics_untouched(tiny_models, layout, accumulation):
    model, _, drlora = attached(tiny_models, "qwen3_moe", lora_layout=layout, train_router="always")
    trainer = _trainer(model, drlora, iters=1000, grad_accumulation_steps=accumulation, weight_decay=0.1,
                       skip_nonfinite=1)
    for seed in range(2 * accumulation):  # some history: moments, EMAs and the step count are not zero
        trainer.train_step(*padded_batch(384, seed=seed))

    snapshots = []

    def bad_last_batch(seed):
        """Good micro-batches, then a non-finite one that ends the accumulation cycle."""
        for s in range(accumulation - 1):
            trainer.train_step(*padded_batch(384, seed=seed + s))
        snapshots.append(_everything(trainer))
        restore = _poisoned(model)
        try:
            loss, _, _ = trainer.train_step(*padded_batch(384, seed=seed + 9))
            assert not np.isfinite(loss)
        finally:
            restore()

    bad_last_batch(10)  # skipped: the budget allows one
    assert trainer.skipped == 1
    if accumulation == 1:  # nothing else in the step: nothing applied
        after = _everything(trainer)
        assert after.keys() == snapshots[0].keys()
        for k in after:
            assert np.array_equal(after[k], snapshots[0][k]), k
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient at iteration"):
        bad_last_batch(20)  # over the budget: the run stops, even the good micro-batches unapplied
    after = _everything(trainer)
    assert after.keys() == snapshots[1].keys()
    for k in after:
        assert np.array_equal(after[k], snapshots[1][k]), k


@pytest.mark.parametrize("layout", ["pooled", "masked"])
def test_a_bad_last_micro_batch_leaves_the_step_to_the_others(tiny_models, layout):
    """With gradient accumulation, a skipped last micro-batch: the update is the earlier
    micro-batches' alone, exactly as if the bad one had had no loss tokens."""
    runs = []
    for bad in (True, False):
        model, _, drlora = attached(tiny_models, "qwen3_moe", lora_layout=layout, train_router="always")
        trainer = _trainer(model, drlora, iters=1000, grad_accumulation_steps=2, skip_nonfinite=1)
        for seed in range(4):
            trainer.train_step(*padded_batch(384, seed=seed))
        trainer.train_step(*padded_batch(384, seed=5))
        batch, lengths = padded_batch(384, seed=6)
        if bad:
            restore = _poisoned(model)
            trainer.train_step(batch, lengths)
            restore()
        else:  # no loss tokens: nothing added to the step
            trainer.train_step(batch, np.tile(np.asarray(lengths)[:, 1:], (1, 2)))
        runs.append(_everything(trainer))
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), k


def test_one_compiled_call_per_iteration(tiny_models):
    model, _, drlora = attached(tiny_models, "qwen3_moe")
    trainer = _trainer(model, drlora, iters=1000, grad_accumulation_steps=2)
    calls = []
    compiled = trainer._compiled

    def counted(update):
        step = compiled(update)
        return lambda *a: calls.append(update) or step(*a)

    trainer._compiled = counted
    for seed in range(6):
        trainer.train_step(*padded_batch(384, seed=seed))
    assert calls == [False, True] * 3
