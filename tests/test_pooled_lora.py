"""The pooled layout against the masked one: the same outputs and gradients,
growth that preserves the function, zero unused slots, and a state the size of
the rank budget."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from drlora_mlx.config.settings import TrainingArgs
from drlora_mlx.lora.pooled import PoolFullError
from drlora_mlx.training.trainer import Trainer

from .helpers import attached, budget_ranks, padded_batch, randomize_b


def _np(x):
    return np.asarray(x, dtype=np.float64)


def _pair(tiny_models, family, bits=None, seed=0, **config):
    """The same checkpoint attached masked and pooled, with the same ranks and factors."""
    config = dict(train_router="never", **config)
    masked = attached(tiny_models, family, quantize_bits=bits, lora_layout="masked", **config)
    pooled = attached(tiny_models, family, quantize_bits=bits, lora_layout="pooled", **config)
    ranks = budget_ranks(masked[2], seed=seed)
    masked[2].set_ranks(ranks)
    pooled[2].set_ranks(ranks)
    randomize_b(masked[2], seed=seed)
    for (_, m), (_, p) in zip(masked[2].expert_modules(), pooled[2].expert_modules()):
        p.load_factors(*m.masked_factors(), m.ranks())
    return masked, pooled


def _loss_grads(model, batch, lengths):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    mask = mx.arange(1, targets.shape[1] + 1)[None] < lengths[:, 1:]

    def loss(model):
        return (nn.losses.cross_entropy(model(inputs), targets) * mask).sum()

    return nn.value_and_grad(model, loss)(model)


def _held(table, null):
    return table[table != null]


@pytest.mark.parametrize("family,bits", [("qwen3_moe", None), ("qwen3_moe", 4), ("phixtral", None),
                                         ("deepseek_v3", None)])
def test_pooled_computes_the_masked_outputs_and_gradients(tiny_models, family, bits):
    (mm, _, dm), (mp, _, dp) = _pair(tiny_models, family, bits)
    batch, lengths = padded_batch(384, seed=4, rows=4, width=24)  # 4 x 23 x top-k pairs: the sorted path
    assert np.allclose(_np(mp(batch)), _np(mm(batch)), rtol=1e-4, atol=1e-5)
    vm, gm = _loss_grads(mm, batch, lengths)
    vp, gp = _loss_grads(mp, batch, lengths)
    assert abs(vm.item() - vp.item()) <= 1e-5 * abs(vm.item())
    gm, gp = dict(tree_flatten(gm)), dict(tree_flatten(gp))
    assert not any(k.endswith(("lora_a", "lora_b")) for k in gp)  # the pooled model trains its pools only
    for layer_m, layer_p in zip(dm.layers, dp.layers):
        pool, grads = layer_p.pool, {side: _np(gp[f"{layer_p.pool_path}.{side}"]) for side in ("hidden", "inner")}
        held = np.zeros(pool.capacity + 1, bool)
        for path, module in zip(layer_p.module_paths(), layer_p.modules):
            ga, gb = _np(gm[f"{path}.lora_a"]), _np(gm[f"{path}.lora_b"])
            table = np.array(module.slots)
            e, j = np.nonzero(table != pool.null)
            scale = np.abs(ga).max() + np.abs(gb).max()
            assert np.allclose(grads[module.a_side][table[e, j]], ga[e, j], rtol=1e-3, atol=1e-5 * scale)
            assert np.allclose(grads[module.b_side][table[e, j]], gb[e, :, j], rtol=1e-3, atol=1e-5 * scale)
            assert np.abs(ga[e, j]).sum() > 0 and np.abs(gb[e, :, j]).sum() > 0
            held[table[e, j]] = True
        for side in ("hidden", "inner"):  # the null slot and the free ones: exactly zero
            assert (grads[side][~held] == 0).all()


def test_masked_factors_and_importance_read_back_the_dense_view(tiny_models):
    (_, _, dm), (_, _, dp) = _pair(tiny_models, "qwen3_moe", seed=3)
    for (_, m), (_, p) in zip(dm.expert_modules(), dp.expert_modules()):
        for want, got in zip(m.masked_factors(), p.masked_factors()):
            assert np.array_equal(np.asarray(got), np.asarray(want))
        assert np.array_equal(np.asarray(p.active_mask()), np.asarray(m.rank_mask))
        importance = np.random.default_rng(0).random(m.importance.shape).astype(np.float32) * np.asarray(m.rank_mask)
        p.set_rank_importance(mx.array(importance))
        assert np.array_equal(np.asarray(p.rank_importance()), importance)


def _train(model, drlora, steps=4, **args):
    trainer = Trainer(model, drlora, TrainingArgs(**{"iters": 1000, "batch_size": 3, "learning_rate": 1e-2, **args}))
    for seed in range(steps):
        trainer.train_step(*padded_batch(384, seed=seed))
    return trainer


def _check_pool_invariants(drlora, trainer=None):
    """Every held slot belongs to one rank; the null slot and the free ones are
    zero, in the values, the importance and the optimizer state."""
    optimizer = dict(tree_flatten(trainer.optimizer.state)) if trainer else {}
    for layer in drlora.layers:
        pool = layer.pool
        held = np.concatenate([_held(np.array(m.slots), pool.null) for m in layer.modules])
        assert len(np.unique(held)) == len(held) == int(sum(m.ranks().sum() for m in layer.modules))
        free = np.setdiff1d(np.arange(pool.capacity + 1), held)
        assert pool.null in free
        arrays = {"hidden": pool.hidden, "inner": pool.inner, "importance": pool.importance}
        arrays.update({k: v for k, v in optimizer.items() if k.startswith(layer.pool_path) and v.ndim})
        for name, value in arrays.items():
            assert (np.asarray(value)[free] == 0).all(), name


@pytest.mark.parametrize("optimizer,weight_decay", [("adamw", 0.1), ("muon", 0.0), ("sgd", 0.1),
                                                    ("adafactor", 0.0)])
def test_free_slots_stay_zero_under_every_optimizer(tiny_models, optimizer, weight_decay):
    model, _, drlora = attached(tiny_models, "qwen3_moe", train_router="never")
    drlora.set_ranks(budget_ranks(drlora, seed=5))
    trainer = _train(model, drlora, optimizer=optimizer, weight_decay=weight_decay)
    _check_pool_invariants(drlora, trainer)
    moved = sum(np.abs(np.asarray(layer.pool.inner)).sum() for layer in drlora.layers)
    assert moved > 0  # the held ranks trained


def test_growth_hands_out_fresh_slots_and_keeps_the_logits(tiny_models):
    model, _, drlora = attached(tiny_models, "olmoe", train_router="never")
    trainer = _train(model, drlora)
    x = padded_batch(384, seed=99)[0]
    before_logits = model(x)
    tables = [np.array(m.slots) for _, m in drlora.expert_modules()]
    before = {id(layer.pool): (np.array(layer.pool.hidden), np.array(layer.pool.inner)) for layer in drlora.layers}
    ranks = drlora.ranks()
    grown = np.minimum(ranks + np.arange(ranks.size).reshape(ranks.shape) % 3, drlora.r_max)
    drlora.set_ranks(grown)
    assert np.array_equal(drlora.ranks(), grown) and (grown > ranks).any()
    assert mx.array_equal(model(x), before_logits)
    for (_, m), old in zip(drlora.expert_modules(), tables):
        pool, table = m.pool, np.array(m.slots)
        hidden, inner = before[id(pool)]
        kept = old != pool.null
        assert np.array_equal(table[kept], old[kept])  # a rank keeps its slot
        new = table[(table != pool.null) & ~kept]
        a, b = np.asarray(pool[m.a_side])[new], np.asarray(pool[m.b_side])[new]
        assert (b == 0).all() and (a != 0).all() and np.abs(a).max() <= 1 / np.sqrt(m.input_dims)
        assert (hidden[new] == 0).all() and (inner[new] == 0).all()  # the slots were free
    _check_pool_invariants(drlora, trainer)


def test_new_ranks_are_drawn_from_the_seed(tiny_models):
    pools = []
    for seed in (0, 0, 1):
        _, _, drlora = attached(tiny_models, "qwen3_moe", seed=seed)
        drlora.set_ranks(budget_ranks(drlora, seed=2))
        pools.append([np.asarray(layer.pool.hidden) for layer in drlora.layers])
    assert all(np.array_equal(a, b) for a, b in zip(pools[0], pools[1]))
    assert not any(np.array_equal(a, b) for a, b in zip(pools[0], pools[2]))


def test_the_pool_holds_the_budget_and_refuses_more(tiny_models):
    _, _, drlora = attached(tiny_models, "qwen3_moe", r_init=2, r_target=4, r_max=8)
    layer = drlora.layers[0]
    up = layer.modules[0]
    n_mod = drlora.n_modules
    assert layer.pool.capacity == n_mod * 4
    assert layer.pool.hidden.shape == (n_mod * 4 + 1, up.input_dims)
    assert layer.pool.inner.shape == (n_mod * 4 + 1, up.output_dims)
    assert drlora.parameter_counts()["expert_lora_allocated"] == \
        drlora.n_layers * (n_mod * 4 + 1) * (up.input_dims + up.output_dims)
    full = np.full((drlora.n_layers, n_mod), 4)
    full[0, :n_mod // 2] = 8  # half the modules at r_max: room only if the other half gives ranks back
    full[0, n_mod // 2:] = 0
    drlora.set_ranks(full)
    assert np.array_equal(drlora.ranks(), full)
    _check_pool_invariants(drlora)
    too_many = full.copy()
    too_many[0, -1] = 1
    with pytest.raises(PoolFullError, match=f"MoE layer {layer.index} would hold {n_mod * 4 + 1} active expert "
                                            f"ranks; its pooled LoRA state has room for {n_mod * 4}"):
        drlora.set_ranks(too_many)
    assert np.array_equal(drlora.ranks(), full)  # refused whole
