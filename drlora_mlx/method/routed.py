"""Routed-expert selection at DR-LoRA's budget: the competitor of ESFT and MoE-Sieve (docs/METHOD.md, section 13).

Routing is profiled over the warm-up with LoRA off (every expert at rank 0,
the base model's own routing, as ESFT and MoE-Sieve profile it). At t_warmup
one event picks each layer's experts by routing frequency and gives them the
whole per-layer budget of uniform LoRA at r_target; the others get none, and
the set never changes.

Pure numpy, no MLX: a function of the routing-frequency table (layers x
experts) and a few integers, checkable against a hand-built table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .schedule import GrowthSchedule


@dataclass(frozen=True)
class RoutedSchedule(GrowthSchedule):
    """The routed method's schedule: one event, at t_warmup, that places the
    whole budget N_mod x r_target (r_init is 0: LoRA is off during warm-up)."""

    @property
    def end_step(self) -> int:
        return self.warmup_steps

    @property
    def n_events(self) -> int:
        return 1


def selection_count(n_experts: int, fraction: float) -> int:
    """How many experts a layer's top ``fraction`` holds: ceil(fraction x E), at least 1."""
    return max(1, math.ceil(round(fraction * n_experts, 9)))


def select_experts(frequency: np.ndarray, fraction: float, share: float = 0.0) -> np.ndarray:
    """Which experts each layer adapts ((layers, experts) bool), by routing frequency.

    With ``share`` 0, a layer's ``selection_count(E, fraction)`` most frequent
    experts (MoE-Sieve's top quarter at 0.25). With ``share`` in (0, 1], ESFT's
    threshold: the fewest most frequent experts whose routing shares add up to
    at least ``share``. Ties go to the lower expert index; a layer that saw no
    routing at all counts every expert as equally frequent."""
    frequency = np.asarray(frequency, dtype=np.float64)
    chosen = np.zeros(frequency.shape, dtype=bool)
    for l, row in enumerate(frequency):
        order = np.argsort(-row, kind="stable")
        if share > 0:
            total = row.sum()
            shares = row[order] / total if total > 0 else np.full(len(row), 1.0 / len(row))
            # The first position where the running share reaches the threshold, within float32's
            # precision (the recorded frequencies are float32: 0.35 + 0.35 falls short of 0.7 there).
            count = int(np.argmax(np.cumsum(shares) >= share - 1e-6)) + 1
        else:
            count = selection_count(len(row), fraction)
        chosen[l, order[:count]] = True
    return chosen


@dataclass(frozen=True)
class RoutedRanks:
    """What the routed event gives: module ranks (layers x modules, module
    m = p * E + e) and, per layer, the budget ranks left unspent at the cap."""

    ranks: np.ndarray
    unspent: np.ndarray  # (layers,) ranks of N_mod x r_target not placed
    wanted: np.ndarray  # (layers,) r_target x E / selected before the cap (a fraction where it does not divide)


def routed_ranks(chosen: np.ndarray, frequency: np.ndarray, n_targets: int, r_target: int, r_max: int) -> RoutedRanks:
    """The ranks of the selected experts: every target projection of a layer
    spends E x r_target ranks on its k selected experts, floor(E x r_target / k)
    each and one more for the (E x r_target) mod k most frequent of them, so
    that a layer spends exactly uniform LoRA's N_mod x r_target; no rank
    exceeds r_max (the width a module can hold), and what the cap leaves is
    reported as unspent."""
    chosen = np.asarray(chosen, dtype=bool)
    n_layers, n_experts = chosen.shape
    per_target = n_experts * r_target
    expert_ranks = np.zeros(chosen.shape, dtype=np.int64)
    for l in range(n_layers):
        selected = np.flatnonzero(chosen[l])
        by_frequency = selected[np.argsort(-np.asarray(frequency[l])[selected], kind="stable")]
        base, extra = divmod(per_target, len(selected))
        expert_ranks[l, by_frequency] = base
        expert_ranks[l, by_frequency[:extra]] += 1
    expert_ranks = np.minimum(expert_ranks, r_max)
    unspent = n_targets * (per_target - expert_ranks.sum(axis=1))
    wanted = per_target / chosen.sum(axis=1)
    return RoutedRanks(np.tile(expert_ranks, (1, n_targets)), unspent, wanted)
