"""The DR-LoRA growth schedule and rank allocator (docs/METHOD.md, section 6: Eq. 11-12, Algorithm 1).

Pure numpy, no MLX: the schedule is a function of a handful of integers and the
allocator a function of rank and saliency arrays, so both can be tested
exhaustively and read against the paper.

Steps count optimizer updates from 1 to ``total_steps``. A growth event at step
``t`` runs after the update of step ``t``; "the mean rank at step t" includes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

# The paper's growth interval and buffer; short runs scale them down.
PAPER_GROW_EVERY = 200
PAPER_GROWTH_BUFFER = 200


def auto_grow_every(total_steps: int) -> int:
    """The growth interval for a run of ``total_steps``: the paper's 200, less
    for short runs so that they still see about 40 events [ours]."""
    return max(1, min(PAPER_GROW_EVERY, total_steps // 40))


def auto_growth_buffer(total_steps: int) -> int:
    """The steps after the last growth event: the paper's 200, or 5% of a short
    run [ours]."""
    return max(1, min(PAPER_GROWTH_BUFFER, total_steps // 20))


class ScheduleError(InputError):
    """A growth schedule that cannot run; the message names the flag to change."""


@dataclass(frozen=True)
class GrowthSchedule:
    """When ranks grow, and by how much, for one run.

    ``n_modules`` is the number of modules that share one budget: the modules of
    one MoE layer (N_mod = targets x experts).
    """

    total_steps: int
    n_modules: int
    r_init: int
    r_target: int
    r_max: int
    warmup_ratio: float = 0.03
    grow_every: int = PAPER_GROW_EVERY
    growth_buffer: int = PAPER_GROWTH_BUFFER
    grow_fraction: float = 0.1

    def __post_init__(self):
        if self.total_steps < 1:
            raise ScheduleError(f"iters must be at least 1, got {self.total_steps}")
        if self.r_init == self.r_target:
            return  # uniform LoRA: nothing ever grows
        if self.end_step < self.warmup_steps:
            raise ScheduleError(
                f"the growth window is empty: warm-up ends at step {self.warmup_steps} "
                f"but growth must stop at step {self.end_step} "
                f"(iters {self.total_steps} - growth-buffer {self.growth_buffer}); "
                "raise --iters or lower --growth-buffer / --warmup-ratio"
            )
        if self.n_events < 1:
            raise ScheduleError(
                f"no growth event fits: {self.end_step - self.warmup_steps} steps "
                f"between warm-up and the buffer, but --grow-every is {self.grow_every}; "
                "lower --grow-every or raise --iters"
            )

    @property
    def warmup_steps(self) -> int:
        """t_warmup = ceil(warmup_ratio * T), at least 1: the first growth event."""
        return max(1, math.ceil(round(self.warmup_ratio * self.total_steps, 9)))

    @property
    def end_step(self) -> int:
        """t_end = T - T_buffer: no growth after this step."""
        return self.total_steps - self.growth_buffer

    @property
    def n_events(self) -> int:
        """floor((t_end - t_warmup) / T_grow), the count the quota is sized on."""
        if self.r_init == self.r_target:
            return 0
        return (self.end_step - self.warmup_steps) // self.grow_every

    @property
    def budget(self) -> int:
        """Ranks one layer may add over the run: N_mod * (r_target - r_init)."""
        return self.n_modules * (self.r_target - self.r_init)

    @property
    def quota(self) -> int:
        """Q: ranks added per layer per event."""
        if self.n_events == 0:
            return 0
        return math.ceil(self.budget / self.n_events)

    @property
    def module_step(self) -> int:
        """The most ranks one module gains in one event: max(1, floor((r_max - r_init) * p_grow))."""
        return max(1, math.floor((self.r_max - self.r_init) * self.grow_fraction))

    def event_steps(self) -> list[int]:
        """Every step at which a growth event runs."""
        if self.n_events == 0:
            return []
        return list(range(self.warmup_steps, self.end_step + 1, self.grow_every))

    def is_event(self, step: int) -> bool:
        return (
            self.n_events > 0
            and self.warmup_steps <= step <= self.end_step
            and (step - self.warmup_steps) % self.grow_every == 0
        )

    def events_through(self, step: int) -> int:
        """How many growth events have run once step ``step`` is done."""
        if self.n_events == 0 or step < self.warmup_steps:
            return 0
        last = min(step, self.end_step)
        return (last - self.warmup_steps) // self.grow_every + 1

    def target_growth(self, step: int) -> int:
        """Ranks a layer should have gained once step ``step`` is done: the
        quota of every event so far, capped by the budget."""
        return min(self.quota * self.events_through(step), self.budget)

    def mean_rank(self, step: int) -> float:
        """The mean active rank per layer that the schedule gives at ``step``."""
        return self.r_init + self.target_growth(step) / self.n_modules

    def budget_exhausted_step(self) -> int | None:
        """The event at which the schedule hands out the last of the budget, or None."""
        for step in self.event_steps():
            if self.target_growth(step) >= self.budget:
                return step
        return None

    @property
    def event_count(self) -> int:
        """How many growth events run (n_events + 1: the first is at t_warmup)."""
        return len(self.event_steps())

    def summary(self, at_steps: list[int] | None = None, n_layers: int = 1, allocation: str = "per-layer") -> dict:
        """The plan as a JSON-ready dict (``drlora-mlx plan --json``): the
        schedule, and the mean ranks and events the allocator delivers."""
        events = delivered(self, n_layers, allocation)
        grown = np.cumsum([g.sum() for _, g in events]) if events else np.zeros(0)
        total_budget = self.budget * n_layers

        def mean_rank(step: int) -> float:
            done = int(grown[sum(1 for s, _ in events if s <= step) - 1]) if step >= self.warmup_steps and events else 0
            return self.r_init + done / (self.n_modules * n_layers)

        exhausted = next((s for (s, _), g in zip(events, grown) if g >= total_budget), None)
        return {
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "end_step": self.end_step,
            "grow_every": self.grow_every,
            "n_events": self.n_events,
            "events": self.event_count,
            "quota": self.quota,
            "cap": self.budget,
            "module_step": self.module_step,
            "budget_exhausted_step": exhausted,
            "mean_rank": {str(s): round(mean_rank(s), 2) for s in at_steps},
            "growth": [{"step": s, "grown": [int(x) for x in g]} for s, g in events],
        }


def walk(ranks: np.ndarray, saliency: np.ndarray, quota: int, r_max: int, module_step: int) -> np.ndarray:
    """One walk of Algorithm 1 over one pool of modules (a layer, or every
    layer with global allocation): from the most to the least salient, each
    module gets ``min(module_step, r_max - r, quota left)`` ranks, saturated
    ones none. Ties keep module order. Returns the new ranks."""
    ranks = np.asarray(ranks, dtype=np.int64)
    order = np.argsort(-np.asarray(saliency, dtype=np.float64), kind="stable")
    want = np.clip(np.minimum(module_step, r_max - ranks[order]), 0, None)
    give = np.clip(int(quota) - (np.cumsum(want) - want), 0, want)  # grants in order, never past the quota
    new = ranks.copy()
    new[order] += give
    return new


def allocate(ranks: np.ndarray, saliency: np.ndarray, quota: int, r_max: int, module_step: int) -> np.ndarray:
    """One growth event for one pool: walks (``walk``) until the quota is
    placed or every module is at r_max. One walk places at most
    N_mod * module_step ranks; when the quota is larger, the walk goes round
    again in the same order [ours], so that the budget is always delivered
    (whenever r_target <= r_max, the pool has room for all of it)."""
    new = np.asarray(ranks, dtype=np.int64).copy()
    left = int(quota)
    while left > 0:
        after = walk(new, saliency, left, r_max, module_step)
        placed = int((after - new).sum())
        if placed == 0:
            break
        new, left = after, left - placed
    return new


def allocate_event(
    ranks: np.ndarray,
    saliency: np.ndarray,
    schedule: GrowthSchedule,
    step: int,
    allocation: str = "per-layer",
) -> np.ndarray:
    """Apply the growth event of ``step`` to ``ranks`` (layers x modules).

    Each pool receives what the schedule says it should have gained by now
    minus what it has gained, so the budget cap holds by construction.
    ``allocation`` is ``per-layer`` (the paper) or ``global`` (one pool of
    every layer, the paper's ablation).
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    saliency = np.asarray(saliency, dtype=np.float64)
    if ranks.shape != saliency.shape or ranks.ndim != 2:
        raise ValueError(f"ranks {ranks.shape} and saliency {saliency.shape} must be equal 2-D shapes")
    if not schedule.is_event(step):
        return ranks.copy()
    if allocation == "per-layer":
        pools = [(slice(l, l + 1), 1) for l in range(ranks.shape[0])]
    elif allocation == "global":
        pools = [(slice(0, ranks.shape[0]), ranks.shape[0])]
    else:
        raise ValueError(f"allocation must be 'per-layer' or 'global', got {allocation!r}")
    new = ranks.copy()
    for rows, n_layers in pools:
        grown = int((ranks[rows] - schedule.r_init).sum())
        quota = n_layers * schedule.target_growth(step) - grown
        if quota <= 0:
            continue
        flat = allocate(ranks[rows].ravel(), saliency[rows].ravel(), quota, schedule.r_max, schedule.module_step)
        new[rows] = flat.reshape(ranks[rows].shape)
    return new


def delivered(schedule: GrowthSchedule, n_layers: int = 1, allocation: str = "per-layer") -> list[tuple[int, np.ndarray]]:
    """What the allocator delivers over a run: (step, ranks added per layer)
    for every event, from ``allocate_event`` itself on the worst-case tie order (every
    saliency equal, so modules fill up in index order and saturate soonest)."""
    ranks = np.full((n_layers, schedule.n_modules), schedule.r_init, dtype=np.int64)
    ties = np.zeros(ranks.shape)
    events = []
    for step in schedule.event_steps():
        new = allocate_event(ranks, ties, schedule, step, allocation)
        events.append((step, (new - ranks).sum(axis=1)))
        ranks = new
    return events
