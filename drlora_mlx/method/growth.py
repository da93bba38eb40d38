"""Growth events on an attached model (docs/METHOD.md, section 6: Algorithm 1; section 13).

Between optimizer steps: read the statistics as numpy (layers x modules),
score every module by its saliency, let the allocator (``schedule.allocate_event``) hand
out the event's ranks, activate them and reset the importance EMAs of the
modules that grew. Mask values change, shapes never do. The routed method's
one event gives the ranks to the experts its routing frequency selects
(``routed``) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .routed import RoutedRanks, routed_ranks, select_experts
from .saliency import module_importance, saliency
from .schedule import GrowthSchedule, allocate_event


@dataclass
class GrowthEvent:
    """What one growth event did."""

    step: int
    grown: np.ndarray  # (layers, modules) ranks added
    by_frequency: tuple[int, ...] = ()  # layers ranked by routing frequency alone (their importance was all zero)
    routed: RoutedRanks | None = None  # the routed method's choice: its ranks and what the r_max cap left unspent

    @property
    def total(self) -> int:
        return int(self.grown.sum())


def rank_importance(drlora) -> np.ndarray:
    """Per-rank importance EMAs: (layers, modules, r_max)."""
    return np.stack([np.concatenate([np.asarray(m.rank_importance()) for m in layer.modules])
                     for layer in drlora.layers])


def module_frequency(drlora) -> np.ndarray:
    """Routing frequency per module (layers x modules): f of the module's expert,
    for every target projection (module m = p * E + e)."""
    return np.tile(np.asarray(drlora.routing.frequency), (1, len(drlora.targets)))


def module_saliency(drlora) -> tuple[np.ndarray, tuple[int, ...]]:
    """S = f * g / (r + 1) ** gamma for every module (layers x modules), and
    the layers scored by frequency alone: where every importance of a layer is
    zero (every B still zero, as at a first event right after one step), f * g
    would tie everywhere and the walk would grow modules in index order [ours]."""
    ranks = drlora.ranks()
    g = module_importance(rank_importance(drlora), ranks)
    f = module_frequency(drlora)
    config = drlora.config
    scores = saliency(f, g, ranks, config.rank_penalty, config.saliency)
    blind = ()
    if config.saliency != "frequency":
        blind = tuple(int(l) for l in np.flatnonzero(~g.any(axis=1)))
        for l in blind:
            scores[l] = saliency(f[l], g[l], ranks[l], config.rank_penalty, "frequency")
    return scores, blind


def reset_importance(drlora, modules: np.ndarray) -> None:
    """Zero the importance EMAs of the given modules (layers x modules bool)."""
    E = drlora.n_experts
    for l, layer in enumerate(drlora.layers):
        for p, module in enumerate(layer.modules):
            module.reset_importance(modules[l, p * E : (p + 1) * E])


def routed_selection(drlora):
    """The routed method's ranks (``routed.RoutedRanks``) from the routing frequency recorded so far."""
    config = drlora.config
    frequency = np.asarray(drlora.routing.frequency)
    chosen = select_experts(frequency, config.routed_fraction, config.routed_share)
    return routed_ranks(chosen, frequency, len(drlora.targets), config.r_target, config.r_max)


def grow(drlora, step: int, schedule: GrowthSchedule) -> GrowthEvent | None:
    """Run the growth event of ``step``, if there is one."""
    if not schedule.is_event(step):
        return None
    ranks = drlora.ranks()
    by_frequency, routed, new = (), None, ranks
    if drlora.config.method == "routed":
        if not ranks.any():  # ranks already held came from a warm start (a routed run's export): they stay
            routed = routed_selection(drlora)
            new = routed.ranks
    else:
        scores, by_frequency = module_saliency(drlora)
        new = allocate_event(ranks, scores, schedule, step, drlora.config.allocation)
    grown = new - ranks
    if grown.any():
        drlora.set_ranks(new)
        reset_importance(drlora, grown > 0)
    return GrowthEvent(step=step, grown=grown, by_frequency=by_frequency, routed=routed)
