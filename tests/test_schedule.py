"""The growth schedule and allocator against the paper and against invariants."""

import json

import numpy as np
import pytest

from drlora_mlx.cli import main
from drlora_mlx.config.settings import DRLoRAConfig
from drlora_mlx.method.saliency import module_importance, saliency
from drlora_mlx.method.schedule import (
    GrowthSchedule,
    ScheduleError,
    allocate,
    allocate_event,
    delivered,
    walk,
)

PAPER = dict(total_steps=38000, n_modules=128, r_init=32, r_max=128, r_target=64,
             warmup_ratio=0.03, grow_every=200, growth_buffer=200, grow_fraction=0.1)


def test_paper_schedule_numbers():
    s = GrowthSchedule(**PAPER)
    assert s.warmup_steps == 1140
    assert s.end_step == 37800
    assert s.n_events == 183
    assert s.quota == 23
    assert s.module_step == 9
    assert s.budget_exhausted_step() == 36740
    expected = {0: 32.00, 6000: 36.49, 12000: 41.88, 18000: 47.27, 24000: 52.66, 30000: 58.05, 37800: 64.00}
    for step, mean in expected.items():
        assert round(s.mean_rank(step), 2) == mean


def test_plan_command_reproduces_table_10(capsys):
    argv = ["plan", "--layers", "16", "--experts", "64", "--r-init", "32", "--r-max", "128", "--r-target", "64",
            "--iters", "38000", "--at", "0,6000,12000,18000,24000,30000,37800", "--json"]
    main(argv)
    out = json.loads(capsys.readouterr().out)
    assert out["quota"] == 23
    assert out["n_events"] == 183
    assert out["cap"] == 128 * 32
    assert out["budget_exhausted_step"] == 36740
    assert out["mean_rank"] == {"0": 32.0, "6000": 36.49, "12000": 41.88, "18000": 47.27, "24000": 52.66,
                                "30000": 58.05, "37800": 64.0}


def _reference_walk(ranks, sal, quota, r_max, module_step):
    """One walk of Algorithm 1 written as a loop over the modules in saliency order."""
    new = ranks.copy()
    left = quota
    for m in sorted(range(len(ranks)), key=lambda i: (-sal[i], i)):
        n = min(module_step, r_max - new[m], left)
        if n > 0:
            new[m] += n
            left -= n
    return new


def test_walk_matches_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 40))
        r_max = int(rng.integers(2, 64))
        ranks = rng.integers(1, r_max + 1, size=n)
        sal = rng.random(n) if rng.random() < 0.7 else rng.integers(0, 3, size=n).astype(float)  # ties too
        quota = int(rng.integers(0, 3 * n))
        step = int(rng.integers(1, 10))
        got = walk(ranks, sal, quota, r_max, step)
        assert np.array_equal(got, _reference_walk(ranks, sal, quota, r_max, step))
        grown = got - ranks
        assert grown.min() >= 0 and grown.max() <= step and got.max() <= r_max
        assert grown.sum() <= quota


def test_allocate_walks_again_until_the_quota_is_placed():
    rng = np.random.default_rng(4)
    for _ in range(2000):
        n = int(rng.integers(1, 40))
        r_max = int(rng.integers(2, 64))
        ranks = rng.integers(1, r_max + 1, size=n)
        sal = rng.random(n) if rng.random() < 0.7 else rng.integers(0, 3, size=n).astype(float)
        quota = int(rng.integers(0, 3 * n * 4))
        step = int(rng.integers(1, 10))
        got = allocate(ranks, sal, quota, r_max, step)
        # Everything the quota asks for, as far as the modules have room.
        assert (got - ranks).sum() == min(quota, (r_max - ranks).sum()) and got.max() <= r_max
        # The same as walking by hand until nothing more fits.
        want, left = ranks.copy(), quota
        while left > 0:
            after = _reference_walk(want, sal, left, r_max, step)
            if (after == want).all():
                break
            want, left = after, left - (after - want).sum()
        assert np.array_equal(got, want)


def _random_schedule(rng):
    r_init = int(rng.integers(1, 16))
    r_target = r_init + int(rng.integers(1, 16))
    r_max = r_target + int(rng.integers(0, 32))
    total = int(rng.integers(50, 3000))
    return GrowthSchedule(
        total_steps=total, n_modules=int(rng.integers(2, 48)), r_init=r_init, r_max=r_max, r_target=r_target,
        warmup_ratio=float(rng.choice([0.0, 0.03, 0.1])), grow_every=int(rng.integers(1, 20)),
        growth_buffer=int(rng.integers(0, 40)), grow_fraction=float(rng.choice([0.05, 0.1, 0.3, 1.0])),
    )


@pytest.mark.parametrize("allocation", ["per-layer", "global"])
def test_growth_invariants_on_random_runs(allocation):
    rng = np.random.default_rng(1 if allocation == "per-layer" else 2)
    runs = 0
    while runs < 120:
        try:
            s = _random_schedule(rng)
        except ScheduleError:
            continue
        runs += 1
        layers = int(rng.integers(1, 4))
        ranks = np.full((layers, s.n_modules), s.r_init)
        for step in range(1, s.total_steps + 1):
            new = allocate_event(ranks, rng.random(ranks.shape), s, step, allocation)
            grown = new - ranks
            assert grown.min() >= 0
            if not s.is_event(step):
                assert not grown.any()
            assert new.max() <= s.r_max
            gained = (new - s.r_init).sum(axis=1)
            if allocation == "per-layer":
                # Every event delivers exactly what the schedule promises by then.
                assert (gained == s.target_growth(step)).all()
            else:
                assert gained.sum() == layers * s.target_growth(step)
            ranks = new
        # The budget, exactly: the same parameters as uniform LoRA at r_target.
        if allocation == "per-layer":
            assert (ranks.mean(axis=1) == s.r_target).all()
        else:
            assert ranks.mean() == s.r_target


@pytest.mark.parametrize("layers,experts,ranks,iters,grow_every,buffer", [
    (3, 6, (8, 16, 32), 800, 200, 200),  # Phi-mini-MoE's ranks, few events: ended at 14.00 before
    (3, 6, (2, 6, 8), 40, 13, 2),  # ended at 5.00 before
])
def test_configurations_that_ended_short_now_reach_r_target(layers, experts, ranks, iters, grow_every, buffer):
    config = DRLoRAConfig(r_init=ranks[0], r_target=ranks[1], r_max=ranks[2], grow_every=grow_every,
                          growth_buffer=buffer)
    s = config.schedule(iters, 2 * experts)
    state = np.full((layers, s.n_modules), ranks[0])
    rng = np.random.default_rng(5)
    for step in range(1, iters + 1):
        state = allocate_event(state, rng.random(state.shape), s, step)
    assert (state.mean(axis=1) == ranks[1]).all()
    assert s.summary([iters])["mean_rank"][str(iters)] == ranks[1]


def test_plan_reports_what_the_allocator_delivers(capsys):
    s = GrowthSchedule(total_steps=40, n_modules=12, r_init=2, r_target=6, r_max=8, grow_every=13, growth_buffer=2)
    events = delivered(s, n_layers=2)
    assert [step for step, _ in events] == s.event_steps() == [2, 15, 28]
    # Quota 24 per event, one rank per module per walk (module_step 1): two walks of 12 each event.
    assert [g.tolist() for _, g in events] == [[24, 24], [24, 24], [0, 0]]
    main(["plan", "--layers", "3", "--experts", "6", "--r-init", "2", "--r-target", "6", "--r-max", "8",
          "--iters", "40", "--grow-every", "13", "--growth-buffer", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["events"] == 3 and out["n_events"] == 2
    assert out["growth"] == [{"step": 2, "grown": [24]}, {"step": 15, "grown": [24]}, {"step": 28, "grown": [0]}]
    assert out["mean_rank"]["40"] == 6.0


def test_builtin_and_default_schedules_reach_r_target():
    # The auto-scaled schedules the trainer uses end at r_target exactly.
    rng = np.random.default_rng(3)
    for total in (100, 200, 500, 1000, 5000):
        for n_modules, r in ((32, (8, 16, 32)), (128, (32, 64, 128)), (16, (4, 8, 16))):
            cfg = DRLoRAConfig(r_init=r[0], r_target=r[1], r_max=r[2])
            s = cfg.schedule(total, n_modules)
            ranks = np.full((2, n_modules), r[0])
            for step in range(1, total + 1):
                ranks = allocate_event(ranks, rng.random(ranks.shape) ** 4, s, step)
            assert (ranks.mean(axis=1) == r[1]).all(), (total, n_modules)


def test_schedule_errors_name_the_flag():
    with pytest.raises(ScheduleError, match="--grow-every"):
        GrowthSchedule(total_steps=100, n_modules=4, r_init=2, r_max=8, r_target=4, grow_every=500, growth_buffer=10)
    with pytest.raises(ScheduleError, match="--growth-buffer"):
        GrowthSchedule(total_steps=100, n_modules=4, r_init=2, r_max=8, r_target=4, growth_buffer=99)


def test_saliency_formula_and_switches():
    f = np.array([[0.5, 0.2]])
    rank_imp = np.array([[[1.0, 3.0, 9.0], [2.0, 0.0, 7.0]]])
    ranks = np.array([[2, 1]])
    g = module_importance(rank_imp, ranks)
    assert np.allclose(g, [[2.0, 2.0]])  # the mean over active ranks only
    gamma = 1.2
    both = saliency(f, g, ranks, gamma, "both")
    assert np.allclose(both, [[0.5 * 2 / 3**gamma, 0.2 * 2 / 2**gamma]])
    assert np.allclose(saliency(f, g, ranks, gamma, "frequency"), [[0.5 / 3**gamma, 0.2 / 2**gamma]])
    assert np.allclose(saliency(f, g, ranks, gamma, "importance"), [[2 / 3**gamma, 2 / 2**gamma]])
