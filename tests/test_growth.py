"""Growth events on an attached model against the method as docs/METHOD.md writes it,
the budget as a run delivers it, and the loss tokens and learning rates of the step."""

import json

import mlx.core as mx
import numpy as np
import pytest

from drlora_mlx.cli import main
from drlora_mlx.config.settings import TrainingArgs
from drlora_mlx.display.report import event_summary
from drlora_mlx.method.growth import grow, module_saliency
from drlora_mlx.method.schedule import GrowthSchedule, allocate_event
from drlora_mlx.training.loss import loss_mask, make_loss
from drlora_mlx.training.trainer import Trainer

from .helpers import attached, padded_batch, randomize_b

E = 8  # experts of the default tiny shape


def _schedule(n_modules, r_init, r_target, r_max, n_events):
    """A schedule with a growth event at step 1 and ``n_events`` quotas in the budget."""
    s = GrowthSchedule(total_steps=100, n_modules=n_modules, r_init=r_init, r_target=r_target, r_max=r_max,
                       warmup_ratio=0.0, grow_every=40, growth_buffer=100 - 1 - 40 * n_events, grow_fraction=1.0)
    assert s.is_event(1) and s.n_events == n_events
    return s


def _set_statistics(drlora, importance, frequency):
    """Per-module importance (layers x modules, the same value for every rank) and per-expert frequency."""
    for l, layer in enumerate(drlora.layers):
        for p, m in enumerate(layer.modules):
            m.set_rank_importance(mx.array(np.repeat(importance[l, p * E:(p + 1) * E, None], m.r_max, axis=1),
                                           mx.float32))
    drlora.routing.frequency = mx.array(frequency, mx.float32)


def _saliency(frequency, importance, ranks, gamma):
    """Eq. 9 written out per module: S = f[expert] * g / (r + 1) ** gamma, module m = p * E + e."""
    out = np.zeros(ranks.shape)
    for l in range(ranks.shape[0]):
        for m in range(ranks.shape[1]):
            out[l, m] = frequency[l, m % E] * importance[l, m] / (ranks[l, m] + 1) ** gamma
    return out


def test_growth_follows_frequency_times_importance_over_the_rank_penalty(tiny_models):
    """The modules an event grows are the most salient by Eq. 9, with f of the
    module's own expert and the (r + 1) ** gamma penalty of its own rank."""
    model, _, drlora = attached(tiny_models, "qwen3_moe", r_init=2, r_target=6, r_max=8, rank_penalty=1.2)
    rng = np.random.default_rng(0)
    ranks = rng.integers(2, 5, size=(drlora.n_layers, drlora.n_modules))
    drlora.set_ranks(ranks)
    importance = rng.random(ranks.shape) + 0.1
    frequency = rng.random((drlora.n_layers, E)) + 0.1
    _set_statistics(drlora, importance, frequency)
    want = _saliency(frequency, importance, ranks, 1.2)
    scores, blind = module_saliency(drlora)
    assert np.allclose(scores, want, rtol=1e-5) and blind == ()

    s = _schedule(drlora.n_modules, 2, 6, 8, n_events=2)
    quota = s.target_growth(1) - (ranks - 2).sum(axis=1)  # what this event places per layer
    event = grow(drlora, 1, s)
    assert (quota > 0).all() and (event.grown.sum(axis=1) == quota).all()
    for l in range(drlora.n_layers):
        # grow_fraction 1.0: modules in saliency order take all the room they have until the quota is placed.
        expected, left = np.zeros(drlora.n_modules, int), quota[l]
        for m in np.argsort(-want[l], kind="stable"):
            expected[m] = min(8 - ranks[l, m], left)
            left -= expected[m]
        assert np.array_equal(event.grown[l], expected), l


def test_growth_resets_the_importance_of_the_modules_that_grew_only(tiny_models):
    model, _, drlora = attached(tiny_models, "qwen3_moe", r_init=2, r_target=4, r_max=8)
    rng = np.random.default_rng(1)
    _set_statistics(drlora, rng.random((drlora.n_layers, drlora.n_modules)) + 0.1, rng.random((drlora.n_layers, E)))
    before = [np.array(m.rank_importance()) for _, m in drlora.expert_modules()]
    event = grow(drlora, 1, _schedule(drlora.n_modules, 2, 4, 8, n_events=2))
    assert (event.grown > 0).any() and (event.grown == 0).any()
    for i, (_, m) in enumerate(drlora.expert_modules()):
        l, p = divmod(i, len(drlora.targets))
        grew = event.grown[l, p * E:(p + 1) * E] > 0
        now = np.asarray(m.rank_importance())
        assert (now[grew] == 0).all()
        assert np.array_equal(now[~grew], before[i][~grew])


def test_a_layer_without_importance_grows_by_routing_frequency_and_says_so(tiny_models):
    """First event right after warm-up: every B is still zero, so every importance is zero."""
    model, _, drlora = attached(tiny_models, "qwen3_moe", r_init=2, r_target=4, r_max=8, warmup_ratio=0.0,
                                train_router="never")
    trainer = Trainer(model, drlora, TrainingArgs(iters=100, batch_size=3, learning_rate=1e-2))
    assert trainer.schedule.warmup_steps == 1
    _, _, event = trainer.train_step(*padded_batch(384, seed=3))
    frequency = np.asarray(drlora.routing.frequency)
    assert event is not None and event.total > 0 and event.by_frequency == tuple(range(drlora.n_layers))
    assert "importance all zero in L0,L1,L2: ranked by routing frequency" in event_summary(drlora, event)
    for layer in range(drlora.n_layers):
        grown = event.grown[layer].reshape(len(drlora.targets), E).sum(axis=0)  # per expert, both projections
        k = np.count_nonzero(grown)
        assert 0 < k < E
        assert set(np.flatnonzero(grown)) == set(np.argsort(-frequency[layer], kind="stable")[:k])


def test_table_10_by_running_the_allocator():
    """The paper's OLMoE schedule through allocate_event() itself: Table 10's mean ranks."""
    s = GrowthSchedule(total_steps=38000, n_modules=128, r_init=32, r_target=64, r_max=128, warmup_ratio=0.03,
                       grow_every=200, growth_buffer=200, grow_fraction=0.1)
    rng = np.random.default_rng(0)
    ranks = np.full((2, 128), 32)
    means = {}
    for step in range(1, 38001):
        if s.is_event(step):
            ranks = allocate_event(ranks, rng.random(ranks.shape) ** 3, s, step)
        if step in (6000, 12000, 18000, 24000, 30000, 37800):
            means[step] = ranks.mean(axis=1)
    expected = {6000: 36.49, 12000: 41.88, 18000: 47.27, 24000: 52.66, 30000: 58.05, 37800: 64.00}
    for step, mean in expected.items():
        assert np.allclose(np.round(means[step], 2), mean), step


def test_no_padding_target_is_counted():
    lengths = mx.array([[0, 5], [2, 7], [3, 3]])  # (prompt offset, tokens) per row, width 8
    want = np.array([  # target t predicts token t + 1: real when prompt offset <= t + 1 < tokens
        [1, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ], bool)
    assert np.array_equal(np.asarray(loss_mask(lengths, 7)), want)


def test_the_loss_is_the_sum_over_real_targets(tiny_models):
    model, _, drlora = attached(tiny_models, "olmoe")
    batch, lengths = padded_batch(384, seed=4)
    ce_sum, n, _ = make_loss(drlora)(model, batch, lengths)
    logits = np.asarray(model(batch[:, :-1]), np.float64)
    tokens, rows = np.asarray(batch), np.asarray(lengths)
    total, count = 0.0, 0
    for row, (offset, length) in enumerate(rows):
        for t in range(length - 1):  # target t predicts token t + 1 of the row's own tokens
            if t + 1 >= offset:
                z = logits[row, t]
                total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[row, t + 1]]
                count += 1
    assert int(n.item()) == count
    assert np.isclose(ce_sum.item(), total, rtol=1e-5)


def test_plan_agrees_with_a_real_run_event_by_event(tiny_models, capsys):
    model, tokenizer, drlora = attached(tiny_models, "qwen3_moe", r_init=2, r_target=6, r_max=8, grow_every=13,
                                        growth_buffer=2)
    args = TrainingArgs(iters=40, batch_size=3, learning_rate=1e-2, steps_per_report=1000, steps_per_eval=1000)

    class Rows:
        def __init__(self):
            rng = np.random.default_rng(0)
            self.rows = [(list(rng.integers(3, 384, size=20)), 0) for _ in range(12)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    result = Trainer(model, drlora, args).run(Rows())
    main(["plan", "--layers", str(drlora.n_layers), "--experts", str(E), "--r-init", "2", "--r-target", "6",
          "--r-max", "8", "--iters", "40", "--grow-every", "13", "--growth-buffer", "2", "--json"])
    plan = json.loads(capsys.readouterr().out)
    planned = [(g["step"], g["grown"][0]) for g in plan["growth"] if g["grown"][0]]
    ran = [(e.step, set(e.grown.sum(axis=1).tolist())) for e in result.events]
    assert [(s, {g}) for s, g in planned] == ran
    assert (drlora.ranks().mean(axis=1) == 6).all() and plan["mean_rank"]["40"] == 6.0


def test_the_router_trains_at_its_own_learning_rate(tiny_models):
    """AdamW's first step moves every weight with a nonzero gradient by lr * (1 - b1) / sqrt(1 - b2):
    the router's by --router-learning-rate, the LoRA factors' by --learning-rate."""
    model, _, drlora = attached(tiny_models, "mixtral", train_router="always")
    randomize_b(drlora, seed=2)
    args = TrainingArgs(iters=100, batch_size=3, learning_rate=1e-3, router_learning_rate=2e-5, lr_schedule="constant")
    trainer = Trainer(model, drlora, args)
    router_before = np.array(drlora.layers[0].router.weight)
    _, b_module = next(iter(drlora.expert_modules()))
    b_before = np.array(b_module.masked_factors()[1])
    warmup = trainer.schedule.warmup_steps
    trainer.train_step(*padded_batch(384, seed=5))
    step_factor = 0.1 / np.sqrt(0.001) / warmup  # the first warm-up step is peak / warmup_steps
    router_moved = np.abs(np.asarray(drlora.layers[0].router.weight) - router_before).max()
    b_moved = np.abs(np.asarray(b_module.masked_factors()[1]) - b_before).max()
    assert np.isclose(router_moved, 2e-5 * step_factor, rtol=1e-2)
    assert np.isclose(b_moved, 1e-3 * step_factor, rtol=1e-2)
    assert TrainingArgs(model="m", learning_rate=3e-3).router_learning_rate == pytest.approx(9e-4)  # 0.3 x lr
